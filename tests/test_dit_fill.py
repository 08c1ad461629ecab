"""FLUX.1 Fill (inpainting with the model's 384-channel input) and Kontext (editing the init image),
compared with diffusers' FluxFillPipeline / FluxKontextPipeline on the same modules."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxKontextPipeline
from PIL import Image

from studio.config import Flags
from studio.core import Studio
from studio.errors import RequestError
from studio.generation.dit_denoisers import pack_latents
from studio.generation.infotext import parse_infotext
from studio.generation.noise import make_noise
from studio.generation.request import Img2ImgRequest, Txt2ImgRequest
from studio.testing.flux import make_flux_checkpoint, tiny_flux_components

FILL = "flux1-fill-dev.safetensors"
KONTEXT = "flux1-kontext-dev.safetensors"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill")
    make_flux_checkpoint(root / "models" / "Stable-diffusion" / FILL, "fill",
                         components=tiny_flux_components("fill", seed=6), dtype=torch.float32)
    make_flux_checkpoint(root / "models" / "Stable-diffusion" / KONTEXT, "dev",
                         components=tiny_flux_components("dev", seed=8), dtype=torch.float32)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8))


def mask() -> Image.Image:
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    return m


def test_fill_matches_diffusers_fill_pipeline_inside_the_mask(studio):
    req = Img2ImgRequest(prompt="a red cube", init_images=[picture()], mask=mask(), mask_blur=0,
                         inpaint_full_res=False, denoising_strength=1.0, steps=4, width=64, height=64, seed=9,
                         save_images=False, override_settings={"sd_model_checkpoint": FILL})
    result = studio.engine.submit(req).wait()
    assert parse_infotext(result.infotexts[0])["Distilled CFG Scale"] == "30"   # Fill's preset
    model = studio.engine.models.current
    noise, _ = make_noise([9], (16, 8, 8))
    pipe = FluxFillPipeline(scheduler=flux_scheduler(), vae=model.vae, text_encoder=model.text_encoders[0],
                            tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
                            tokenizer_2=model.tokenizers[1], transformer=model.unet)
    pipe.set_progress_bar_config(disable=True)
    # the pipeline samples the VAE's latent distribution; the studio (as A1111) takes its mode
    with mock.patch("diffusers.pipelines.flux.pipeline_flux_fill.retrieve_latents",
                    lambda encoded, generator=None, sample_mode="sample": encoded.latent_dist.mode()):
        want = pipe("a red cube", image=picture(), mask_image=mask(), height=64, width=64, num_inference_steps=4,
                    guidance_scale=30.0, latents=pack_latents(noise), output_type="np").images[0]
    want = (want * 255).round().astype(np.int16)
    got = np.asarray(result.images[0], dtype=np.int16)
    assert np.abs(got[16:48, 16:48] - want[16:48, 16:48]).max() <= 1
    assert np.abs(got[:8] - np.asarray(picture(), dtype=np.int16)[:8]).max() <= 1   # A1111's overlay outside


def test_fill_without_a_mask_is_refused(studio):
    req = Txt2ImgRequest(prompt="x", steps=1, width=64, height=64, save_images=False,
                         override_settings={"sd_model_checkpoint": FILL})
    with pytest.raises(RequestError, match="Fill without a mask"):
        studio.engine.submit(req).wait()


def test_kontext_edits_the_init_image_as_diffusers_kontext_pipeline(studio):
    req = Img2ImgRequest(prompt="make it red", init_images=[picture()], denoising_strength=1.0, steps=4,
                         width=64, height=64, seed=9, save_images=False,
                         override_settings={"sd_model_checkpoint": KONTEXT})
    result = studio.engine.submit(req).wait()
    model = studio.engine.models.current
    assert model.probe.variant == "kontext"
    assert parse_infotext(result.infotexts[0])["Distilled CFG Scale"] == "2.5"
    noise, _ = make_noise([9], (16, 8, 8))
    pipe = FluxKontextPipeline(scheduler=flux_scheduler(), vae=model.vae, text_encoder=model.text_encoders[0],
                               tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
                               tokenizer_2=model.tokenizers[1], transformer=model.unet)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(image=picture(), prompt="make it red", height=64, width=64, max_area=64 * 64, _auto_resize=False,
                num_inference_steps=4, guidance_scale=2.5, latents=pack_latents(noise), output_type="np").images[0]
    want = (want * 255).round().astype(np.int16)
    assert np.abs(np.asarray(result.images[0], dtype=np.int16) - want).max() <= 1
    # the reference matters: another init image gives another edit
    other = studio.engine.submit(req.with_changes(init_images=[picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]))
    assert not np.array_equal(np.asarray(other.wait().images[0]), np.asarray(result.images[0]))
