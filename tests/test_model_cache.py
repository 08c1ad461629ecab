"""Checkpoint hot swap: the LRU cache, its byte budget, and reusing modules for a file of
the same architecture. Tiny real-layout checkpoints through the real loader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from studio.config import Flags
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from studio.testing import make_checkpoint

NAMES = ("a.safetensors", "b.safetensors", "c.ckpt")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    folder = root / "models" / "Stable-diffusion"
    for seed, name in enumerate(NAMES, start=1):
        make_checkpoint(folder / name, "sd1", seed=seed)
    make_checkpoint(folder / "xl.safetensors", "sdxl", seed=1)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def set_limits(studio: Studio, models: int, budget_mb: int = 0) -> None:
    studio.settings.update({"sd_checkpoints_limit": models, "sd_checkpoint_cache_mb": budget_mb}, persist=False)
    studio.queue.run(lambda state: studio.models.unload(), "unload")


def image(studio: Studio, checkpoint: str | None = None) -> np.ndarray:
    req = Txt2ImgRequest(prompt="a cube", steps=2, width=64, height=64, seed=7, sampler_name="Euler",
                         save_images=False, checkpoint=checkpoint)
    return np.asarray(studio.txt2img(req).images[0])


def weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for i, module in enumerate(model.modules):
        out |= {f"{i}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    return out


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_cached_switch_returns_the_same_model_without_reading(studio):
    set_limits(studio, 3)
    a = studio.select_checkpoint("a")
    b = studio.select_checkpoint("b")
    studio.select_checkpoint("c")
    assert len(studio.models.cached()) == 3
    assert studio.select_checkpoint("a") is a
    assert studio.select_checkpoint("b") is b
    # least recently used is now c: a fourth model evicts it
    studio.select_checkpoint("xl")
    titles = [m.info.name for m in studio.models.cached()]
    assert titles == ["a.safetensors", "b.safetensors", "xl.safetensors"]


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_switch_back_gives_the_image_of_a_fresh_load(studio):
    set_limits(studio, 1)
    fresh_a = image(studio, "a")
    a_weights = weights(studio.models.current)
    image_b = image(studio, "b")
    assert not np.array_equal(fresh_a, image_b)
    again_a = image(studio, "a")
    np.testing.assert_array_equal(again_a, fresh_a)
    for key, value in weights(studio.models.current).items():
        assert torch.equal(value, a_weights[key]), key


def test_same_architecture_reuses_module_objects(studio):
    set_limits(studio, 1)
    a = studio.select_checkpoint("a")
    unet, vae, te = a.unet, a.vae, a.text_encoders[0]
    b = studio.select_checkpoint("b")
    assert b is not a
    assert b.unet is unet and b.vae is vae and b.text_encoders[0] is te
    assert "load weights into existing model" in b.timings
    assert studio.models.cached() == [b]
    # a different architecture cannot reuse: a new model is built and the old one dropped
    xl = studio.select_checkpoint("xl")
    assert xl.unet is not unet
    assert studio.models.cached() == [xl]


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_byte_budget_evicts_least_recently_used(studio):
    set_limits(studio, 3)
    a = studio.select_checkpoint("a")
    size_mb = a.nbytes / 2**20
    # room for two tiny SD1 models but not three
    set_limits(studio, 3, budget_mb=int(size_mb * 2.5) + 1)
    for name in ("a", "b", "c"):
        studio.select_checkpoint(name)
    cached = [m.info.name for m in studio.models.cached()]
    assert cached == ["b.safetensors", "c.ckpt"]
    assert studio.models.cached_bytes() <= (int(size_mb * 2.5) + 1) * 2**20


def test_current_model_stays_even_over_budget(studio):
    set_limits(studio, 3, budget_mb=1)
    model = studio.select_checkpoint("a")
    assert studio.models.current is model
    assert studio.models.cached() == [model]


def test_rss_stays_flat_over_ten_switches_among_three_cached(studio):
    set_limits(studio, 3)
    for name in ("a", "b", "c"):
        studio.select_checkpoint(name)
    budget = studio.models.cached_bytes()
    start = rss_bytes()
    for i in range(10):
        studio.select_checkpoint(("a", "b", "c")[i % 3])
    assert len(studio.models.cached()) == 3
    assert studio.models.cached_bytes() == budget
    # switching among cached models allocates nothing: allow allocator noise only
    assert rss_bytes() - start < max(budget // 2, 16 << 20)


def test_request_checkpoint_override_leaves_the_users_choice(studio):
    set_limits(studio, 2)
    studio.select_checkpoint("a")
    chosen = studio.settings.get("sd_model_checkpoint")
    image(studio, "b")
    assert studio.settings.get("sd_model_checkpoint") == chosen
    # a request without a checkpoint runs on the user's choice, not on the last one used
    req = Txt2ImgRequest(prompt="x", steps=1, width=64, height=64, seed=1, save_images=False)
    result = studio.txt2img(req)
    assert result.model.info.title == chosen


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_lowering_the_limit_through_options_evicts_at_once(studio):
    set_limits(studio, 3)
    for name in ("a", "b", "c"):
        studio.select_checkpoint(name)
    studio.apply_options({"sd_checkpoints_limit": 1})
    assert [m.info.name for m in studio.models.cached()] == ["c.ckpt"]
    from studio.generation.request import RequestError

    with pytest.raises(RequestError, match="sd_checkpoints_limit"):
        studio.apply_options({"sd_checkpoints_limit": 0})
