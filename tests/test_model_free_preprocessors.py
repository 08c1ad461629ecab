"""The weight-free image-operation modules of studio.controlnet.model_free: recolor_luminance,
recolor_intensity and color, in the registry (names, sliders as the extension reports them) and
through /controlnet/detect."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from PIL import Image

from studio.controlnet.model_free import color_grid, recolor_intensity, recolor_luminance
from studio.controlnet.preprocessors import PreprocessorRegistry
from tests.helpers import decode_b64, png_b64


@pytest.fixture
def registry(tmp_path):
    return PreprocessorRegistry.with_builtins(tmp_path / "annotators")


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def gray_level(img: Image.Image) -> int:
    arr = np.asarray(img)
    assert (arr == arr[0, 0, 0]).all()   # one gray level, the same in R, G and B
    return int(arr[0, 0, 0])


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


b64, decode = png_b64, decode_b64


# --------------------------------------------------------------------------- registry


def test_names_and_sliders_as_the_extension_reports_them(registry):
    detail = registry.api_module_detail()
    for name in ("recolor_luminance", "recolor_intensity", "color"):
        assert name in detail["module_list"]
    gamma = {"name": "Gamma Correction", "value": 1.0, "min": 0.1, "max": 2.0, "step": 0.001}
    for name in ("recolor_luminance", "recolor_intensity"):
        # no resolution slider: the extension maps the image at its own size
        assert detail["module_detail"][name] == {"model_free": False, "sliders": [gamma]}
        assert registry.get(name).resolution is None
    assert detail["module_detail"]["color"] == {
        "model_free": False,
        "sliders": [{"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}


# --------------------------------------------------------------------------- recolor


def test_recolor_is_grayscale_rgb_at_the_input_size(registry):
    img = noise((70, 45))
    for name in ("recolor_luminance", "recolor_intensity"):
        out = registry.run(name, img, resolution=512)
        assert out.mode == "RGB" and out.size == (70, 45)
        arr = np.asarray(out)
        assert (arr[:, :, 0] == arr[:, :, 1]).all() and (arr[:, :, 1] == arr[:, :, 2]).all()


def test_recolor_luminance_follows_lightness():
    ramp = [gray_level(recolor_luminance(solid((v, v, v)), 0)) for v in range(0, 256, 15)]
    assert ramp == sorted(ramp) and len(set(ramp)) == len(ramp)
    assert ramp[0] == 0 and gray_level(recolor_luminance(solid((255, 255, 255)), 0)) == 255
    red, green, blue = (gray_level(recolor_luminance(solid(c), 0)) for c in
                        ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    # weighted by luminance, green brightest; red and blue swap weights as in the extension, which
    # hands its RGB array to OpenCV's BGR-to-Lab conversion
    assert green > blue > red
    assert (red, green, blue) == (82, 224, 136)


def test_recolor_intensity_is_hsv_value():
    for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)):
        assert gray_level(recolor_intensity(solid(c), 0)) == 255
    assert gray_level(recolor_intensity(solid((10, 200, 90)), 0)) == 200
    assert gray_level(recolor_intensity(solid((0, 0, 0)), 0)) == 0


@pytest.mark.parametrize("fn", [recolor_luminance, recolor_intensity])
def test_gamma_correction(fn):
    mid = solid((128, 128, 128))
    base = gray_level(fn(mid, 0, 1.0))
    brighter, darker = gray_level(fn(mid, 0, 0.5)), gray_level(fn(mid, 0, 2.0))
    assert darker < base < brighter
    # the gamma curve on 0-1, truncated to integers as the extension does
    assert darker == int((base / 255) ** 2 * 255)
    # black and white stay put
    assert gray_level(fn(solid((255, 255, 255)), 0, 2.0)) == 255
    assert gray_level(fn(solid((0, 0, 0)), 0, 0.5)) == 0


def test_gamma_slider_clamped_and_defaulted(registry):
    img = noise((32, 32))
    default = np.asarray(registry.run("recolor_luminance", img))
    assert (np.asarray(registry.run("recolor_luminance", img, slider_1=-1)) == default).all()
    top = np.asarray(registry.run("recolor_luminance", img, slider_1=2.0))
    assert (np.asarray(registry.run("recolor_luminance", img, slider_1=9.0)) == top).all()
    assert not (top == default).all()


# --------------------------------------------------------------------------- colour grid


def cells(arr: np.ndarray, cell: int) -> list[np.ndarray]:
    h, w = arr.shape[:2]
    return [arr[y:y + cell, x:x + cell] for y in range(0, h, cell) for x in range(0, w, cell)]


def test_color_grid_is_blocky_in_64_pixel_cells(registry):
    img = noise((256, 128), seed=3)
    out = registry.run("color", img, resolution=128)
    assert out.mode == "RGB" and out.size == (256, 128)
    arr = np.asarray(out)
    blocks = cells(arr, 64)
    assert len(blocks) == 8
    for block in blocks:
        assert (block == block[0, 0]).all()           # one colour per 64x64 cell
    assert len({tuple(b[0, 0]) for b in blocks}) > 1  # and the cells differ
    # a cell's colour is read around its centre, not averaged: a centre patch sets it
    arr_in = np.full((128, 128, 3), 255, np.uint8)
    arr_in[24:40, 24:40] = (10, 20, 30)
    centred = np.asarray(color_grid(Image.fromarray(arr_in), 128))
    assert tuple(centred[0, 0]) == (10, 20, 30) and tuple(centred[64, 64]) == (255, 255, 255)


def test_color_grid_follows_the_resolution(registry):
    img = noise((200, 100), seed=4)
    out = registry.run("color", img, resolution=256)
    assert out.size == (512, 256)
    assert all((b == b[0, 0]).all() for b in cells(np.asarray(out), 64))
    # a map whose size is not a multiple of 64 keeps its size; the cells stay 64 px from the corner
    odd = registry.run("color", img, resolution=72)
    assert odd.size == (144, 72)
    assert all((b == b[0, 0]).all() for b in cells(np.asarray(odd), 64))


# --------------------------------------------------------------------------- API


@pytest.mark.parametrize("module, threshold_a, size", [
    ("recolor_luminance", 0.5, (96, 64)),
    ("recolor_intensity", 1.5, (96, 64)),
    ("color", -1, (192, 128)),
])
def test_detect(server, module, threshold_a, size):
    img = noise((96, 64), seed=5)
    r = requests.post(server.url + "/controlnet/detect", json={
        "controlnet_module": module, "controlnet_input_images": [b64(img)], "controlnet_processor_res": 128,
        "controlnet_threshold_a": threshold_a}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 1
    out = decode(body["images"][0]).convert("RGB")
    assert out.size == size
    registry = PreprocessorRegistry.with_builtins("unused")
    expected = registry.run(module, img, resolution=128, slider_1=threshold_a)
    assert (np.asarray(out) == np.asarray(expected)).all()


def test_detect_out_of_range_gamma_uses_the_default(server):
    img = noise((64, 64), seed=6)
    maps = []
    for gamma in (1.0, 7.0):
        r = requests.post(server.url + "/controlnet/detect", json={
            "controlnet_module": "recolor_luminance", "controlnet_input_images": [b64(img)],
            "controlnet_threshold_a": gamma}, timeout=60)
        assert r.status_code == 200, r.text
        maps.append(np.asarray(decode(r.json()["images"][0]).convert("RGB")))
    assert (maps[0] == maps[1]).all()
