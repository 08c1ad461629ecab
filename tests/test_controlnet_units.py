"""ControlNet units as requests: API parsing, checks, map fitting, pixel perfect, infotext, and
units through the real studio (txt2img, img2img, hires fix)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from studio.config import Flags
from studio.controlnet.units import (
    ControlNetUnitRequest,
    UnitError,
    check_unit,
    fit_control_map,
    parse_unit_infotext,
    pixel_perfect_resolution,
    unit_from_api,
    unit_infotext,
    units_from_infotext,
)
from studio.core import Studio
from studio.generation.infotext import parse_infotext
from studio.generation.request import Img2ImgRequest, RequestError, Txt2ImgRequest
from studio.testing import make_checkpoint, tiny_components
from studio.testing.controlnets import make_controlnet
from tests.helpers import make_models_dir

# --------------------------------------------------------------------------- unit level


def test_api_unit_fields_aliases_and_enums():
    notes: list[str] = []
    decoded = []

    def decode(b64):
        decoded.append(b64)
        return Image.new("RGB", (8, 8))

    unit = unit_from_api({"input_image": "AAAA", "module": "canny", "model": "cn [12345678]", "guidance": 0.5,
                          "lowvram": True, "resize_mode": 2, "control_mode": "ControlNet is more important",
                          "processor_res": 256.0, "threshold_a": "50", "pixel_perfect": "true",
                          "unknown_field": 1}, decode, notes)
    assert unit.enabled and unit.module == "canny" and unit.model == "cn [12345678]"
    assert unit.guidance_end == 0.5 and unit.low_vram and unit.pixel_perfect
    assert unit.resize_mode == "Resize and Fill" and unit.control_mode_index == 2
    assert unit.processor_res == 256 and unit.threshold_a == 50.0 and unit.threshold_b == -1
    assert decoded == ["AAAA"] and unit.image.size == (8, 8)
    assert len(notes) == 3 and any("input_image" in n for n in notes)
    # old fit-mode names and the {image, mask} form
    unit = unit_from_api({"image": {"image": "I", "mask": "M"}, "resize_mode": "Envelope (Outer Fit)",
                          "enabled": False}, decode)
    assert unit.resize_mode == "Resize and Fill" and not unit.enabled and unit.mask is not None
    assert decoded[-2:] == ["I", "M"]


@pytest.mark.parametrize("values, message", [
    ({"control_mode": "Loud"}, "control_mode must be one of"),
    ({"resize_mode": 7}, "resize_mode must be one of"),
    ({"weight": "heavy"}, "weight must be a number"),
    ({"image": "a", "input_image": "b"}, "not both"),
    ({"hr_option": True}, "hr_option"),
])
def test_api_unit_rejects_bad_values(values, message):
    with pytest.raises(UnitError, match=message):
        unit_from_api(values, lambda b: None)
    assert issubclass(UnitError, RequestError)  # every front door reports it as the user's error


@pytest.mark.parametrize("changes, message", [
    ({"weight": 2.5}, "weight must be between 0 and 2"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, r"guidance_start \(0.8\) is after guidance_end"),
    ({"guidance_end": 1.5}, "guidance_end must be between"),
])
def test_unit_ranges(changes, message):
    unit = ControlNetUnitRequest(**changes)
    with pytest.raises(UnitError, match=f"unit 1: {message}"):
        check_unit(unit, 1)


def _gradient(w, h):
    x = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1))
    return Image.fromarray(np.stack([x, x, 255 - x], -1).astype(np.uint8))


def test_fit_modes_sizes_and_content():
    wide = _gradient(200, 100)
    just = fit_control_map(wide, 64, 64, "Just Resize")
    crop = fit_control_map(wide, 64, 64, "Crop and Resize")
    fill = fit_control_map(wide, 64, 64, "Resize and Fill")
    assert just.size == crop.size == fill.size == (64, 64)
    # Just Resize keeps the whole width: the left column is the image's left edge (dark red channel)
    assert np.asarray(just)[32, 0, 0] < 10
    # Crop and Resize cuts the sides off: the left column is a quarter into the gradient
    assert 40 < np.asarray(crop)[32, 0, 0] < 90
    # Resize and Fill pads top and bottom with the border's median colour, image in the middle rows
    arr = np.asarray(fill)
    assert np.array_equal(arr[0, 0], arr[63, 63]) and np.array_equal(arr[0], arr[1])
    assert not np.array_equal(arr[32, 0], arr[32, 63])


def test_fit_keeps_flat_colours_crisp():
    # a segmentation-like map with 4 colours stays 4 colours after resizing (nearest, not bicubic)
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:20, :20], arr[:20, 20:], arr[20:, :20] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = np.asarray(fit_control_map(Image.fromarray(arr), 100, 100, "Just Resize"))
    assert len(np.unique(out.reshape(-1, 3), axis=0)) == 4


def test_pixel_perfect_resolution():
    # 1024x512 image for a 512x512 generation: Crop and Resize covers (k=1) → short side 512
    assert pixel_perfect_resolution((1024, 512), 512, 512, "Crop and Resize") == 512
    # Resize and Fill fits inside (k=0.5) → 256
    assert pixel_perfect_resolution((1024, 512), 512, 512, "Resize and Fill") == 256
    assert pixel_perfect_resolution((300, 200), 768, 512, "Just Resize") == 512


def test_infotext_is_the_extensions_format_and_parses_back():
    unit = ControlNetUnitRequest(module="canny", model="x", weight=0.5, guidance_end=0.8,
                                 control_mode="My prompt is more important")
    text = unit_infotext(unit, "cn-a [0123abcd]", 512, 100, 200)
    assert text == ("Module: canny, Model: cn-a [0123abcd], Weight: 0.5, Resize Mode: Crop and Resize, "
                    "Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, "
                    "Guidance End: 0.8, Pixel Perfect: False, Control Mode: My prompt is more important")
    back = parse_unit_infotext(text)
    assert back.module == "canny" and back.model == "cn-a [0123abcd]" and back.weight == 0.5
    assert back.control_mode == "My prompt is more important" and back.guidance_end == 0.8
    assert back.processor_res == 512 and back.threshold_b == 200.0
    units = units_from_infotext({"Steps": "20", "ControlNet 1": text, "ControlNet x": "junk"})
    assert list(units) == [1] and units[1].module == "canny"


# --------------------------------------------------------------------------- through the studio


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnunits")
    make_models_dir(root)
    make_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sdxl.safetensors", "sdxl", seed=1)
    folder = root / "models" / "ControlNet"
    make_controlnet(folder / "cn-a.safetensors", "sd1", seed=2, components=tiny_components("sd1", seed=1))
    make_controlnet(folder / "cn-xl.safetensors", "sdxl", seed=3, components=tiny_components("sdxl", seed=1))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.select_checkpoint("tiny-sd1.safetensors")
    yield s
    s.queue.shutdown()


def control_image() -> Image.Image:
    arr = np.zeros((96, 128, 3), np.uint8)
    arr[20:70, 30:100] = 255
    return Image.fromarray(arr)


BASE = dict(prompt="a house", steps=4, width=64, height=64, seed=11, sampler_name="Euler", save_images=False,
            checkpoint="tiny-sd1.safetensors")


def run(studio, *units, **changes):
    return studio.txt2img(Txt2ImgRequest(**{**BASE, **changes}, controlnet_units=tuple(units)))


def unit(**changes):
    return ControlNetUnitRequest(**{"module": "canny", "model": "cn-a", "image": control_image(), **changes})


def pixels(result):
    return np.asarray(result.images[0], dtype=np.int16)


def test_unit_changes_the_image_and_is_recorded(studio):
    plain = run(studio)
    controlled = run(studio, unit())
    assert np.abs(pixels(plain) - pixels(controlled)).max() > 0
    params = parse_infotext(controlled.infotexts[0])
    name = studio.controlnets.find("cn-a").api_name
    assert name.startswith("cn-a [") and len(name) == len("cn-a [12345678]")
    assert params["ControlNet 0"].startswith(f"Module: canny, Model: {name}, Weight: 1.0, "
                                             "Resize Mode: Crop and Resize, Processor Res: 512, "
                                             "Threshold A: 100.0, Threshold B: 200.0")
    assert units_from_infotext(params)[0].model == name
    # the map is the canny edge map of the control image, kept for the gallery/API
    assert len(controlled.detected_maps) == 1
    edges = np.asarray(controlled.detected_maps[0])
    assert set(np.unique(edges)) == {0, 255}
    assert controlled.info()["extra_generation_params"]["ControlNet 0"] == params["ControlNet 0"]


def test_weight_zero_and_disabled_units_give_the_plain_image(studio):
    plain = pixels(run(studio))
    assert np.array_equal(plain, pixels(run(studio, unit(weight=0.0))))
    assert np.array_equal(plain, pixels(run(studio, unit(enabled=False))))


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_two_units_and_resize_modes_differ(studio):
    one = pixels(run(studio, unit()))
    two = pixels(run(studio, unit(), unit(module="invert", resize_mode="Resize and Fill")))
    assert np.abs(one - two).max() > 0
    # The tiny random ControlNet moves pixels by about one level, too little to tell resize modes apart
    # in 8-bit images, so the modes are compared on the map the sampling loop is handed.
    def control_image_in_loop(resize_mode):
        req = studio.engine.prepare(Txt2ImgRequest(**BASE, controlnet_units=(unit(resize_mode=resize_mode),)))
        plan = studio.queue.run(lambda state: studio.engine.control_plan(
            req.request, studio.models.load("tiny-sd1.safetensors"), state))
        return plan.units_for(64, 64, None)[0].image

    maps = {mode: control_image_in_loop(mode) for mode in ("Crop and Resize", "Just Resize", "Resize and Fill")}
    assert all(m.shape == (1, 3, 64, 64) for m in maps.values())
    assert (maps["Crop and Resize"] - maps["Just Resize"]).abs().max() > 0.1
    assert (maps["Crop and Resize"] - maps["Resize and Fill"]).abs().max() > 0.1


def test_bad_units_are_refused_before_the_queue(studio):
    with pytest.raises(RequestError, match="unit 0: model 'nope' not found. Available: cn-a"):
        run(studio, unit(model="nope"))
    with pytest.raises(RequestError, match="unknown preprocessor 'sobel'"):
        run(studio, unit(module="sobel"))
    with pytest.raises(RequestError, match="no control image"):
        run(studio, unit(image=None))
    with pytest.raises(RequestError, match="choose a ControlNet model"):
        run(studio, unit(model="None"))


def test_family_mismatch_is_a_clear_error(studio):
    with pytest.raises(RequestError, match="ControlNet cn-xl.* is for SDXL, the loaded checkpoint is SD1.x"):
        run(studio, unit(model="cn-xl"))


def test_sdxl_unit_runs_on_an_sdxl_checkpoint(studio):
    plain = pixels(run(studio, checkpoint="tiny-sdxl.safetensors"))
    controlled = pixels(run(studio, unit(model="cn-xl"), checkpoint="tiny-sdxl.safetensors"))
    assert np.abs(plain - controlled).max() > 0


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_img2img_unit_reuses_the_init_image(studio):
    init = control_image().resize((64, 64))
    base = dict(BASE, init_images=(init,), denoising_strength=0.8)
    plain = studio.img2img(Img2ImgRequest(**base))
    reuse = studio.img2img(Img2ImgRequest(**base, controlnet_units=(unit(image=None),)))
    own = studio.img2img(Img2ImgRequest(**base, controlnet_units=(unit(),)))
    assert np.abs(pixels(plain) - pixels(reuse)).max() > 0
    # maps come fitted to the generation, as the extension returns them: the square init image's and
    # the 4:3 unit image's (cropped to the square) differ
    assert reuse.detected_maps[0].size == own.detected_maps[0].size == (64, 64)
    assert not np.array_equal(np.asarray(reuse.detected_maps[0]), np.asarray(own.detected_maps[0]))


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_hires_option_picks_the_passes(studio):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, hr_upscaler="Latent")
    both = pixels(run(studio, unit(), **hires))
    low = pixels(run(studio, unit(hr_option="Low res only"), **hires))
    high = pixels(run(studio, unit(hr_option="High res only"), **hires))
    plain = pixels(run(studio, **hires))
    assert both.shape == (96, 96, 3)
    for a, b in ((both, low), (both, high), (low, high), (plain, high)):
        assert np.abs(a - b).max() > 0


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_a_seeded_preprocessor_uses_the_images_seed(studio):
    """A random seed is resolved before the ControlNet maps are made, so a shuffle map can be made again
    from the seed the infotext reports (it used to be made with seed 0 whenever the seed was -1)."""
    result = run(studio, unit(module="shuffle"), seed=-1)
    seed = result.seeds[0]
    assert seed >= 0 and f"Seed: {seed}," in result.infotexts[0]
    def shuffled(seed: int):   # the map as the result carries it: fitted to the generation
        m = studio.preprocessors.run("shuffle", control_image(), 512, seed=seed)
        return fit_control_map(m, *result.images[0].size, "Crop and Resize")

    again, other = shuffled(seed), shuffled(0 if seed else 1)
    detected = np.asarray(result.detected_maps[0], dtype=np.int16)
    assert np.array_equal(detected, np.asarray(again, dtype=np.int16))
    assert not np.array_equal(detected, np.asarray(other, dtype=np.int16))


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_hires_returns_the_map_of_each_pass_as_the_extension(studio):
    """With hires fix the extension returns two maps per unit, the second pass's first, each at the
    size it steered; a unit in one pass only returns that pass's map."""
    hires = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, hr_upscaler="Latent")
    both = run(studio, unit(), **hires)
    assert [m.size for m in both.detected_maps] == [(96, 96), (64, 64)]
    assert [m.size for m in run(studio, unit(hr_option="Low res only"), **hires).detected_maps] == [(64, 64)]
    assert [m.size for m in run(studio, unit(hr_option="High res only"), **hires).detected_maps] == [(96, 96)]
    assert [m.size for m in run(studio, unit()).detected_maps] == [(64, 64)]


def test_binary_maps_stay_binary_when_resized():
    from PIL import Image

    arr = np.zeros((512, 512, 3), np.uint8)
    arr[::16] = 255      # one-pixel lines
    fitted = np.asarray(fit_control_map(Image.fromarray(arr), 64, 64, "Just Resize"))
    assert set(np.unique(fitted)) == {0, 255}


def test_unknown_unit_fields_are_ignored_and_empty_extras_read_as_unset():
    # as the extension's model: unknown keys pass; advanced_weighting / effective_region_mask are
    # read (tests/test_controlnet_region.py), their empty values mean "not set"
    unit = unit_from_api({"module": "canny", "model": "x", "advanced_weighting": None, "effective_region_mask": "",
                          "foo": 1}, lambda b: b)
    assert unit.advanced_weighting is None and unit.effective_region_mask is None
