"""FLUX.1 ControlNet units through the whole engine: a file in models/ControlNet, the unit on a FLUX
checkpoint, weight 0 equal to no unit, a Union unit's control type, and an SD ControlNet refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.config import Flags
from studio.controlnet.units import ControlNetUnitRequest
from studio.core import Studio
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.testing import tiny_components
from studio.testing.controlnets import make_controlnet
from studio.testing.flux import make_flux_checkpoint
from studio.testing.flux_controlnets import make_flux_controlnet_file

BASE = dict(prompt="a house", steps=3, width=64, height=64, seed=3, cfg_scale=1.0, sampler_name="Euler",
            save_images=False, checkpoint="flux1-dev-tiny.safetensors")


def square() -> Image.Image:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[16:48, 8:40] = 255
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-cn")
    make_flux_checkpoint(root / "models" / "Stable-diffusion" / "flux1-dev-tiny.safetensors", dtype=torch.float32)
    folder = root / "models" / "ControlNet"
    make_flux_controlnet_file(folder / "flux-canny.safetensors", "plain", seed=1,
                              dtype=torch.float32)
    make_flux_controlnet_file(folder / "flux-union-pro.safetensors", "union", seed=2, dtype=torch.float32)
    make_controlnet(folder / "sd-canny.safetensors", "sd1", seed=2, components=tiny_components("sd1", seed=1))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def name(studio, stem: str) -> str:
    return next(n for n in studio.controlnets.names() if n.startswith(stem))


def generate(studio, *units) -> np.ndarray:
    result = studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=tuple(units)))
    return np.asarray(result.images[0], dtype=np.int16)


def unit(studio, stem="flux-canny", **changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": "none", "model": name(studio, stem), "image": square(), **changes})


def test_a_flux_controlnet_steers_a_flux_checkpoint(studio):
    plain = generate(studio)
    assert np.array_equal(generate(studio, unit(studio, weight=0.0)), plain)
    assert np.abs(generate(studio, unit(studio)) - plain).mean() > 0.1


def test_a_union_unit_takes_its_control_type(studio):
    canny = generate(studio, unit(studio, "flux-union-pro", module="canny"))
    depth = generate(studio, unit(studio, "flux-union-pro", union_control_type="depth"))
    assert np.abs(canny - depth).mean() > 0.01


def test_an_sd_controlnet_on_flux_is_refused_by_family(studio):
    with pytest.raises(RequestError, match="FLUX"):
        generate(studio, unit(studio, "sd-canny"))
