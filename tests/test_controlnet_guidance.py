"""ControlNet units in the sampling loop: weight, guidance window, control modes, several units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.config import Flags
from studio.controlnet.guidance import ControlUnit, control_residuals
from studio.controlnet.models import ControlNetLibrary, load_controlnet
from studio.core import Studio
from studio.testing import tiny_components
from studio.testing.controlnets import make_controlnet
from tests.helpers import guided_latents, make_models_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    make_models_dir(root)
    folder = root / "models" / "ControlNet"
    components = tiny_components("sd1", seed=1)
    make_controlnet(folder / "cn-a.safetensors", "sd1", seed=2, components=components)
    make_controlnet(folder / "cn-b.safetensors", "sd1", seed=3, components=components)
    studio = Studio.create(Flags(data_dir=str(root), no_half=True))
    model = studio.select_checkpoint("tiny-sd1.safetensors")
    library = ControlNetLibrary([folder], studio.models.catalog.hash_cache)
    library.refresh()
    nets = {name: load_controlnet(library.find(name), config_cache=root / "cache").model for name in ("cn-a", "cn-b")}
    yield studio, model, nets
    studio.queue.shutdown()


def hint() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, 64, 64, generator=g) > 0.5).float()


latents = guided_latents


def test_weight_zero_is_no_unit_and_weight_one_acts(setup):
    studio, model, nets = setup
    none = latents(studio, model, [])
    zero = latents(studio, model, [ControlUnit(nets["cn-a"], hint(), weight=0.0)])
    one = latents(studio, model, [ControlUnit(nets["cn-a"], hint(), weight=1.0)])
    assert torch.equal(none, zero)
    assert not torch.allclose(none, one)


def test_unit_acts_only_inside_its_window(setup):
    studio, model, nets = setup
    calls = []
    handle = nets["cn-a"].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        latents(studio, model, [ControlUnit(nets["cn-a"], hint(), guidance_start=0.5, guidance_end=1.0)], steps=4)
    finally:
        handle.remove()
    # steps 0..3 are at 0, .25, .5, .75: only the last two are inside [0.5, 1]
    assert len(calls) == 2


def residuals(model, nets, mode, units=("cn-a",)):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, model.text_encoders[0].config.hidden_size)
    us = [ControlUnit(nets[n], hint(), weight=0.8, control_mode=mode) for n in units]
    with torch.no_grad():
        return control_residuals(us, x, torch.tensor(500), context, None, 0, 4, groups=2, batch=1, has_uncond=True)


def test_control_modes_scale_as_the_extension(setup):
    _, model, nets = setup
    balanced = residuals(model, nets, 0)
    soft = residuals(model, nets, 1)
    cfg = residuals(model, nets, 2)
    all_b = [*balanced["down_block_additional_residuals"], balanced["mid_block_additional_residual"]]
    all_s = [*soft["down_block_additional_residuals"], soft["mid_block_additional_residual"]]
    all_c = [*cfg["down_block_additional_residuals"], cfg["mid_block_additional_residual"]]
    for i, (b, s) in enumerate(zip(all_b, all_s)):
        torch.testing.assert_close(s, b * 0.825 ** (12 - i))
    for b, c in zip(all_b, all_c):
        assert torch.count_nonzero(c[:1]) == 0          # no control on the unconditional half
        torch.testing.assert_close(c[1:], b[1:])


def test_two_units_add_up(setup):
    _, model, nets = setup
    a, b = residuals(model, nets, 0, ("cn-a",)), residuals(model, nets, 0, ("cn-b",))
    both = residuals(model, nets, 0, ("cn-a", "cn-b"))
    torch.testing.assert_close(both["mid_block_additional_residual"],
                               a["mid_block_additional_residual"] + b["mid_block_additional_residual"])
    assert np.isfinite(both["mid_block_additional_residual"].numpy()).all()
