"""IP-Adapter units through the whole engine: files found in models/ControlNet and models/ipadapter,
the image encoder from models/clip_vision, the extension's module names, weight 0 equal to no unit,
the UNet left as it was, and the refusals a user can act on."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from studio.config import Flags
from studio.controlnet.units import ControlNetUnitRequest
from studio.core import Studio
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.testing.ip_adapters import write_clip_vision, write_ip_adapter
from tests.helpers import make_models_dir

BASE = dict(prompt="a house", steps=3, width=64, height=64, seed=7, cfg_scale=7.0, sampler_name="Euler",
            save_images=False)
HIDDEN, PROJ = 32, 24


def reference() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, 255 - y * 4, (x * y) % 255], axis=2).astype(np.uint8))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip-engine")
    make_models_dir(root)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.select_checkpoint("tiny-sd1.safetensors")
    unet = s.models.current.unet
    # the A1111 extension keeps IP-Adapters in ControlNet/, ComfyUI in ipadapter/
    write_ip_adapter(root / "models" / "ControlNet" / "ip-adapter_sd15.safetensors", unet, "base", PROJ, seed=2,
                     gain=40.0)
    write_ip_adapter(root / "models" / "ipadapter" / "ip-adapter-plus_sd15.bin", unet, "plus", HIDDEN, seed=3,
                     gain=40.0)
    write_clip_vision(root / "models" / "clip_vision" / "clip_vision_h.safetensors", HIDDEN, 2, PROJ, seed=1)
    s.controlnets.library.refresh()
    yield s
    s.queue.shutdown()


def name(studio, stem: str) -> str:
    return next(n for n in studio.controlnets.names() if n.startswith(stem + " ["))


def unit(studio, stem="ip-adapter_sd15", **changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": "ip-adapter_clip_sd15", "model": name(studio, stem),
                                    "image": reference(), **changes})


def generate(studio, *units, **changes) -> np.ndarray:
    result = studio.txt2img(Txt2ImgRequest(**{**BASE, **changes}, controlnet_units=tuple(units)))
    return np.asarray(result.images[0], dtype=np.int16)


def test_both_folders_are_listed_and_the_modules_exist(studio):
    assert name(studio, "ip-adapter_sd15") and name(studio, "ip-adapter-plus_sd15")
    for module in ("ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_g", "ip-adapter-auto"):
        assert module in studio.preprocessors


@pytest.mark.parametrize("stem,module", [("ip-adapter_sd15", "ip-adapter_clip_sd15"),
                                         ("ip-adapter-plus_sd15", "ip-adapter-auto")])
def test_weight_0_is_no_adapter_and_weight_1_changes_the_picture(studio, stem, module):
    plain = generate(studio)
    assert np.array_equal(generate(studio, unit(studio, stem, module=module, weight=0.0)), plain)
    assert np.abs(generate(studio, unit(studio, stem, module=module)) - plain).mean() > 0.5


def test_the_unet_is_unchanged_after_a_job_and_the_infotext_names_the_adapter(studio):
    unet = studio.models.current.unet
    before = dict(unet.attn_processors)
    result = studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=(unit(studio),)))
    assert f"Module: ip-adapter_clip_sd15, Model: {name(studio, 'ip-adapter_sd15')}" in result.infotexts[0]
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None


def test_a_window_outside_the_steps_changes_nothing(studio):
    plain = generate(studio)
    late = generate(studio, unit(studio, guidance_start=0.99, guidance_end=1.0))
    assert np.array_equal(late, plain)


def test_without_an_encoder_the_answer_names_the_folder(studio, tmp_path):
    folder = studio.controlnets.clip_vision.folders[0]
    moved = tmp_path / "moved"
    (folder).rename(moved)
    studio.controlnets.clip_vision.release()
    try:
        with pytest.raises(RequestError, match="models/clip_vision"):
            studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=(unit(studio),)))
    finally:
        moved.rename(folder)


def test_reference_and_ip_adapter_together_run(studio):
    # the reference pass gets the adapter's image embeddings (tests/test_controlnet_region.py compares
    # the pixels with each unit alone)
    ref = ControlNetUnitRequest(module="reference_only", model="None", image=reference())
    result = studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=(unit(studio), ref)))
    assert len(result.images) == 1 and "reference_only" in result.infotexts[0]
