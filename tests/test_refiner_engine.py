"""A1111's refiner (``refiner_checkpoint`` + ``refiner_switch_at``) through the real engine: an SDXL
base and the tiny SDXL refiner in their real file layouts."""

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
    root = tmp_path_factory.mktemp("refiner")
    folder = make_models_dir(root, (("sdxl", ".safetensors"), ("sd1", ".safetensors")))
    make_checkpoint(folder / "tiny-refiner.safetensors", "sdxl-refiner", seed=3)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def req(**kw) -> Txt2ImgRequest:
    base = dict(prompt="a castle", negative_prompt="fog", steps=4, width=64, height=64, seed=21,
                sampler_name="Euler", save_images=False,
                override_settings={"sd_model_checkpoint": "tiny-sdxl.safetensors"})
    return Txt2ImgRequest(**{**base, **kw})


def pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index])


def test_refiner_switch_changes_the_image_and_is_recorded(studio):
    none = studio.txt2img(req())
    half = studio.txt2img(req(refiner_checkpoint="tiny-refiner.safetensors", refiner_switch_at=0.5))
    assert not np.array_equal(pixels(none), pixels(half))
    parsed = parse_infotext(half.infotexts[0])
    assert parsed["Refiner"].startswith("tiny-refiner [") and parsed["Refiner switch at"] == "0.5"
    assert parsed["Model"] == "tiny-sdxl"
    fields = infotext_to_fields(parsed)
    assert fields["refiner_switch_at"] == 0.5
    again = studio.txt2img(req(refiner_checkpoint=fields["refiner_checkpoint"], refiner_switch_at=0.5))
    assert np.array_equal(pixels(again), pixels(half))


def test_switch_at_one_equals_no_refiner(studio):
    none = studio.txt2img(req())
    never = studio.txt2img(req(refiner_checkpoint="tiny-refiner.safetensors", refiner_switch_at=1.0))
    assert np.array_equal(pixels(none), pixels(never))
    assert "Refiner" not in never.infotexts[0]   # A1111 writes it only when the switch happened


def test_every_batch_starts_on_the_base_model(studio):
    both = studio.txt2img(req(refiner_checkpoint="tiny-refiner.safetensors", refiner_switch_at=0.5, n_iter=2))
    second = studio.txt2img(req(refiner_checkpoint="tiny-refiner.safetensors", refiner_switch_at=0.5, seed=22))
    assert np.array_equal(pixels(both, 1), pixels(second))


def test_hires_refiner_runs_in_the_second_pass_by_default(studio):
    hires = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.6)
    plain = studio.txt2img(req(**hires))
    refined = studio.txt2img(req(refiner_checkpoint="tiny-refiner.safetensors", refiner_switch_at=0.5, **hires))
    assert not np.array_equal(pixels(plain), pixels(refined))
    first = studio.txt2img(req(refiner_checkpoint="tiny-refiner.safetensors", refiner_switch_at=0.5,
                               override_settings={"sd_model_checkpoint": "tiny-sdxl.safetensors",
                                                  "hires_fix_refiner_pass": "first pass"}, **hires))
    assert not np.array_equal(pixels(first), pixels(refined))


def test_bad_refiners_are_refused(studio):
    with pytest.raises(RequestError, match="refiner_checkpoint: checkpoint 'nope' not found"):
        studio.txt2img(req(refiner_checkpoint="nope"))
    with pytest.raises(RequestError, match="cannot continue the latents|latent"):
        studio.txt2img(req(refiner_checkpoint="tiny-sd1.safetensors", refiner_switch_at=0.5))
