"""SDXL Revision (revision_clipvision, revision_ignore_prompt) as the extension runs it: the image's
CLIP-G embedding written over SDXL's pooled text embedding in the prompt's rows (zeros in the
negative's), the text zeroed by ignore_prompt, noise augmentation, and the refusal on other families."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from studio.config import Flags
from studio.controlnet.clip_vision import ClipVisionEncoders, load_clip_vision
from studio.controlnet.ip_adapter import encode_reference
from studio.controlnet.revision import RevisionGuidance, RevisionUnit, noise_augment
from studio.controlnet.units import ControlNetUnitRequest
from studio.core import Studio
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.generation.step_callbacks import ModelCall
from studio.testing.ip_adapters import write_clip_vision
from tests.helpers import make_models_dir

POOLED = 64   # the tiny SDXL's pooled text width (its CLIP-G projection)
BASE = dict(prompt="a house", steps=3, width=64, height=64, seed=7, cfg_scale=7.0, sampler_name="Euler",
            save_images=False, checkpoint="tiny-sdxl.safetensors")


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, 255 - y * 4, (x * y) % 255], axis=2).astype(np.uint8))


def test_noise_augmentation_follows_the_unclip_schedule():
    embeds = torch.ones(1, 8)
    light = noise_augment(embeds, 0.0, torch.Generator().manual_seed(1))
    heavy = noise_augment(embeds, 1.0, torch.Generator().manual_seed(1))
    assert torch.allclose(light, embeds, atol=0.05)              # step 0: beta 1e-4
    assert (heavy - embeds).abs().mean() > 0.5                    # step 999: mostly noise
    assert torch.equal(noise_augment(embeds, 0.3, torch.Generator().manual_seed(2)),
                       noise_augment(embeds, 0.3, torch.Generator().manual_seed(2)))


def test_the_pooled_embedding_of_the_prompt_rows_becomes_the_picture(tmp_path):
    encoder_file = write_clip_vision(tmp_path / "clip_vision_g.safetensors", 32, 2, POOLED, seed=3)
    encoders = ClipVisionEncoders([tmp_path])
    units = [RevisionUnit(picture(), weight=0.5), RevisionUnit(picture(), weight=0.25, guidance_start=0.5)]
    guidance = RevisionGuidance(units, encoders, seed=1)
    guidance.on_pass_start(SimpleNamespace(model=SimpleNamespace(policy=None)))
    pooled = torch.randn(4, POOLED)
    context = torch.randn(4, 5, 16)

    def call(step: int) -> ModelCall:
        return ModelCall(step, step, 4, None, 1.0, None, context, {"text_embeds": pooled}, 2, 2, True)

    embeds, _ = encode_reference(load_clip_vision(encoder_file), [picture()], False)
    g = torch.Generator().manual_seed(1)   # the job's seed; each unit draws its own noise from it in turn
    want, second = noise_augment(embeds.float(), 0.0, g), noise_augment(embeds.float(), 0.0, g)
    early = guidance.unet_kwargs(call(0))
    rows = early["added_cond_kwargs"]["text_embeds"]
    assert torch.equal(rows[:2], torch.zeros(2, POOLED))          # the negative prompt's rows
    assert torch.allclose(rows[2:], (want * 0.5).expand(2, -1), atol=1e-6)
    assert "encoder_hidden_states" not in early
    late = guidance.unet_kwargs(call(3))["added_cond_kwargs"]["text_embeds"]   # both units now
    assert torch.allclose(late[2:], (want * 0.5 + second * 0.25).expand(2, -1), atol=1e-5)
    ignoring = RevisionGuidance([RevisionUnit(picture(), ignore_prompt=True)], encoders)
    ignoring.on_pass_start(SimpleNamespace(model=SimpleNamespace(policy=None)))
    assert torch.equal(ignoring.unet_kwargs(call(0))["encoder_hidden_states"], torch.zeros_like(context))
    empty = RevisionGuidance([RevisionUnit(picture())], encoders, empty_prompts=True)
    empty.on_pass_start(SimpleNamespace(model=SimpleNamespace(policy=None)))
    assert "encoder_hidden_states" in empty.unet_kwargs(call(0))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("revision")
    make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors")))
    write_clip_vision(root / "models" / "clip_vision" / "clip_vision_g.safetensors", 32, 2, POOLED, seed=3)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def generate(studio, *units, **changes) -> np.ndarray:
    result = studio.txt2img(Txt2ImgRequest(**{**BASE, **changes}, controlnet_units=tuple(units)))
    return np.asarray(result.images[0], dtype=np.int16)


def revision(module: str = "revision_clipvision", **changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": module, "model": "None", "image": picture(), **changes})


class UNetInputs:
    """What the UNet is called with during a generation (a forward pre-hook)."""

    def __init__(self, unet):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((kwargs["encoder_hidden_states"].clone(),
                           kwargs["added_cond_kwargs"]["text_embeds"].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_revision_units_steer_an_sdxl_checkpoint_without_a_model(studio):
    plain = generate(studio)
    assert np.array_equal(generate(studio, revision(weight=0.0)), plain)
    unet = studio.models.current.unet
    with UNetInputs(unet) as seen:
        steered = generate(studio, revision())
    assert not np.array_equal(steered, plain)
    context, pooled = seen.calls[0]   # rows: the negative prompt's, then the prompt's
    assert torch.equal(pooled[0], torch.zeros_like(pooled[0])) and pooled[1].abs().sum() > 0
    assert context.abs().sum() > 0
    with UNetInputs(unet) as seen:
        ignoring = generate(studio, revision("revision_ignore_prompt"))
    assert not np.array_equal(ignoring, steered)
    assert all(torch.equal(c, torch.zeros_like(c)) for c, _ in seen.calls)
    with UNetInputs(unet) as seen:
        noisy = generate(studio, revision(threshold_a=0.8))
    assert not torch.allclose(seen.calls[0][1][1], pooled[1], atol=1e-3)   # the picture's embedding, noised
    assert np.array_equal(generate(studio, revision(threshold_a=0.8)), noisy)   # the seed fixes the noise


def test_revision_on_another_family_is_refused(studio):
    with pytest.raises(RequestError, match="revision_clipvision works with SDXL checkpoints only"):
        generate(studio, revision(), checkpoint="tiny-sd1.safetensors")
