"""The hires pass on another checkpoint (A1111's ``hr_checkpoint_name``), through the real engine."""

from __future__ import annotations

import numpy as np
import pytest

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import infotext_to_fields, parse_infotext
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.testing import make_checkpoint
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("hrckpt")
    folder = make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors")))
    make_checkpoint(folder / "other-sd1.safetensors", "sd1", seed=7)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def hires(**kw) -> Txt2ImgRequest:
    base = dict(prompt="a red cube", steps=2, width=64, height=64, seed=11, sampler_name="Euler",
                enable_hr=True, hr_scale=1.5, denoising_strength=0.6, save_images=False,
                override_settings={"sd_model_checkpoint": "tiny-sd1.safetensors"})
    base.update(kw)
    return Txt2ImgRequest(**base)


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


def test_same_checkpoint_named_equals_none(studio):
    plain = studio.txt2img(hires())
    named = studio.txt2img(hires(hr_checkpoint_name="tiny-sd1.safetensors"))
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain), pixels(named)))
    same = studio.txt2img(hires(hr_checkpoint_name="Use same checkpoint"))
    assert "Hires checkpoint" not in same.infotexts[0]


def test_other_checkpoint_runs_the_second_pass_and_is_recorded(studio):
    plain = studio.txt2img(hires())
    other = studio.txt2img(hires(hr_checkpoint_name="other-sd1.safetensors"))
    assert other.images[0].size == plain.images[0].size == (96, 96)
    assert not np.array_equal(pixels(plain)[0], pixels(other)[0])
    parsed = parse_infotext(other.infotexts[0])
    assert parsed["Hires checkpoint"].startswith("other-sd1 [")
    assert parsed["Model"] == "tiny-sd1"
    fields = infotext_to_fields(parsed)
    assert fields["hr_checkpoint_name"].startswith("other-sd1") and fields["enable_hr"] is True
    # the hires checkpoint's title from the infotext finds the same model again
    again = studio.txt2img(hires(hr_checkpoint_name=parsed["Hires checkpoint"]))
    assert np.array_equal(pixels(again)[0], pixels(other)[0])


def test_each_batch_starts_on_the_first_checkpoint(studio):
    both = studio.txt2img(hires(hr_checkpoint_name="other-sd1.safetensors", n_iter=2))
    second = studio.txt2img(hires(hr_checkpoint_name="other-sd1.safetensors", seed=12))
    assert both.seeds == [11, 12]
    assert np.array_equal(pixels(both)[1], pixels(second)[0])


def test_unknown_or_incompatible_hires_checkpoint_is_refused(studio):
    with pytest.raises(RequestError, match="hr_checkpoint_name: checkpoint 'nope' not found"):
        studio.txt2img(hires(hr_checkpoint_name="nope"))
    with pytest.raises(RequestError, match="cannot continue the latents"):
        studio.txt2img(hires(hr_checkpoint_name="tiny-sdxl.safetensors"))


def test_prompt_networks_are_said_to_stay_on_the_first_checkpoint(studio):
    result = studio.txt2img(hires(prompt="a red cube <lora:absent:1>", hr_checkpoint_name="other-sd1.safetensors"))
    assert any("first checkpoint only" in note for note in result.notes)
