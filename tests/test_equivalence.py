"""Our sampler loop gives the same pixels as diffusers' own pipelines on the same modules,
scheduler, seed and prompts (fp32), so the loop adds features, not differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.config import Flags
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from studio.generation.samplers import find_schedule, make_scheduler, split_sampler_name
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("equiv")
    make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors"), ("sd2-v", ".safetensors")))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def _pipeline(model, scheduler):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["tiny-sd1.safetensors", "tiny-sdxl.safetensors", "tiny-sd2-v.safetensors"])
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_matches_diffusers_pipeline(studio, name, sampler):
    model = studio.select_checkpoint(name)
    req = Txt2ImgRequest(prompt="a red cube on a table", negative_prompt="blurry", steps=4, width=64,
                         height=64, seed=99, cfg_scale=6.0, sampler_name=sampler, save_images=False)
    ours = np.asarray(studio.txt2img(req).images[0]).astype(int)

    spec, schedule = split_sampler_name(sampler, "Automatic")
    pipe = _pipeline(model, make_scheduler(spec, schedule if schedule.name != "automatic"
                                           else find_schedule(spec.default_schedule), model.scheduler_config))
    theirs = pipe("a red cube on a table", negative_prompt="blurry", num_inference_steps=4, height=64, width=64,
                  guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(99)).images[0]
    diff = np.abs(ours - np.asarray(theirs).astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()}"
