"""Control-LoRA and ControlNet Union units through the engine (txt2img with controlnet_units)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from studio.config import Flags
from studio.controlnet.units import ControlNetUnitRequest
from studio.core import Studio
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.testing.control_variants import write_control_lora, write_union
from tests.helpers import make_models_dir

BASE = dict(prompt="a house", steps=3, width=64, height=64, seed=11, cfg_scale=7.0, sampler_name="Euler",
            save_images=False)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    make_models_dir(root, (("sdxl", ".safetensors"), ("sd1", ".safetensors")))
    studio = Studio.create(Flags(data_dir=str(root), no_half=True))
    unet = studio.select_checkpoint("tiny-sdxl.safetensors").unet
    folder = root / "models" / "ControlNet"
    write_control_lora(folder / "control-lora-canny-rank4.safetensors", unet)
    union = write_union(folder / "union-folder", unet)
    shutil.copyfile(union / "diffusion_pytorch_model.safetensors", folder / "union-promax.safetensors")
    yield studio
    studio.queue.shutdown()


def stripes() -> Image.Image:
    return Image.fromarray((np.indices((64, 64)).sum(0) % 16 < 8).astype(np.uint8) * 255).convert("RGB")


def generate(studio, *units) -> np.ndarray:
    result = studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=tuple(units)))
    return np.asarray(result.images[0]).astype(int)


def unit(model, **changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": "canny", "model": model, "image": stripes(), **changes})


@pytest.mark.parametrize("model", ["control-lora-canny-rank4", "union-promax", "union-folder"])
def test_weight_zero_is_no_unit_and_weight_one_acts(studio, model):
    studio.select_checkpoint("tiny-sdxl.safetensors")
    plain = generate(studio)
    assert np.array_equal(generate(studio, unit(model, weight=0.0)), plain)
    assert not np.array_equal(generate(studio, unit(model)), plain)


def test_union_type_from_the_unit_field_and_the_file_equals_the_folder(studio):
    studio.select_checkpoint("tiny-sdxl.safetensors")
    depth = generate(studio, unit("union-promax", module="none", union_control_type="Depth"))
    assert np.array_equal(depth, generate(studio, unit("union-folder", module="none", union_control_type="Depth")))
    assert not np.array_equal(depth, generate(studio, unit("union-promax", module="none",
                                                            union_control_type="Hard Edge")))
    with pytest.raises(RequestError, match="union_control_type"):
        generate(studio, unit("union-promax", module="none"))


def test_control_lora_refused_on_sd1(studio):
    studio.select_checkpoint("tiny-sd1.safetensors")
    with pytest.raises(RequestError, match="needs an SDXL base checkpoint"):
        generate(studio, unit("control-lora-canny-rank4"))
