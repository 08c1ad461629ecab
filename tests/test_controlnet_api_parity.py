"""sd-webui-controlnet's API as the extension answers it: the control type table and its filters,
settings, model_list?update, the out-of-range leniency shared by /controlnet/detect and generation,
and requests rewritten from the extension's own tests/web_api suite."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import requests

from studio.controlnet.control_types import CONTROL_TYPES, api_control_types, select_control_type
from studio.controlnet.preprocessors import PreprocessorRegistry
from studio.controlnet.units import (
    ControlNetUnitRequest,
    UnitError,
    check_unit,
    lenient_params,
    units_from_alwayson,
)
from tests.helpers import control_square, decode_b64, png_b64

MODULES = ["none", "blur_gaussian", "canny", "depth_midas", "depth_zoe", "invert", "lineart_anime",
           "lineart_standard", "mlsd", "normal_bae", "openpose", "scribble_xdog", "shuffle", "softedge_hed",
           "threshold", "tile_resample"]
MODELS = ["control_sd15_canny [aaaa1111]", "control_v11p_sd15_canny [bbbb2222]", "t2iadapter_sketch_sd15v2 [c]",
          "control_v11f1e_sd15_tile [dddd4444]", "ip-adapter_sd15 [e]"]


# --------------------------------------------------------------------------- the table (pure)


def test_every_extension_type_in_its_order_with_the_api_shape():
    body = api_control_types(MODULES, MODELS)["control_types"]
    assert list(body) == list(CONTROL_TYPES)
    for name in ("All", "Canny", "Depth", "NormalMap", "OpenPose", "MLSD", "Lineart", "SoftEdge",
                 "Scribble/Sketch", "Segmentation", "Shuffle", "Tile/Blur", "Inpaint", "InstructP2P", "Reference",
                 "Recolor", "Revision", "T2I-Adapter", "IP-Adapter", "Instant_ID", "SparseCtrl"):
        entry = body[name]
        assert set(entry) == {"module_list", "model_list", "default_option", "default_model"}
        assert entry["module_list"][0] == "none" and entry["model_list"][0] == "None"
    assert body["All"] == {"module_list": MODULES, "model_list": ["None", *MODELS], "default_option": "none",
                           "default_model": "None"}


def test_canny_lists_canny_none_and_invert_and_prefers_the_v11_model():
    choice = select_control_type("Canny", MODULES, MODELS)
    assert choice.module_list == ["none", "canny", "invert"]
    assert choice.model_list == ["None", "control_sd15_canny [aaaa1111]", "control_v11p_sd15_canny [bbbb2222]"]
    assert choice.default_option == "canny"
    assert choice.default_model == "control_v11p_sd15_canny [bbbb2222]"


def test_aliases_filter_modules_and_models():
    tile = select_control_type("Tile/Blur", MODULES, MODELS)
    assert tile.module_list == ["none", "blur_gaussian", "tile_resample"]
    assert tile.model_list == ["None", "control_v11f1e_sd15_tile [dddd4444]"] and tile.default_option == "tile_resample"
    sketch = select_control_type("Scribble/Sketch", MODULES, MODELS)
    assert sketch.module_list == ["none", "scribble_xdog", "invert"]
    assert sketch.default_model == "t2iadapter_sketch_sd15v2 [c]"   # "sketch" is an alias of the type
    assert select_control_type("T2I-Adapter", MODULES, MODELS).model_list == ["None", "t2iadapter_sketch_sd15v2 [c]"]
    assert select_control_type("IP-Adapter", MODULES, MODELS).model_list == ["None", "ip-adapter_sd15 [e]"]
    depth = select_control_type("Depth", MODULES, MODELS)
    assert depth.module_list == ["none", "depth_midas", "depth_zoe"] and depth.default_option == "depth_midas"


def test_no_matching_model_means_default_model_none_and_missing_default_module_falls_back():
    depth = select_control_type("Depth", MODULES, MODELS)
    assert depth.model_list == ["None"] and depth.default_model == "None"
    # the extension's usual OpenPose module (openpose_full) is not here: the first matching one is picked
    assert select_control_type("OpenPose", MODULES, MODELS).default_option == "openpose"
    # nothing matches at all: only "none"
    seg = select_control_type("Segmentation", MODULES, [])
    assert (seg.module_list, seg.model_list, seg.default_option, seg.default_model) == (["none"], ["None"], "none",
                                                                                          "None")
    with pytest.raises(KeyError, match="unknown control type"):
        select_control_type("Bogus", MODULES, MODELS)


# --------------------------------------------------------------------------- leniency (pure)


def test_out_of_range_values_take_the_default_with_a_warning(tmp_path, caplog):
    canny = PreprocessorRegistry.with_builtins(tmp_path).get("canny")
    with caplog.at_level(logging.WARNING, logger="studio.controlnet.units"):
        assert lenient_params(canny, 99999, 300, 0, "unit 0") == (512, 100.0, 200.0)
    assert "canny.processor_res 99999 is outside 64-2048, using the default 512" in caplog.text
    assert "canny.threshold_a 300" in caplog.text and "canny.threshold_b 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="studio.controlnet.units"):
        assert lenient_params(canny, -1, -1, -1) == (512, 100.0, 200.0)   # the "default" sentinel: no warning
        assert lenient_params(canny, 256, 50, 150) == (256, 50.0, 150.0)
    assert caplog.text == ""
    invert = PreprocessorRegistry.with_builtins(tmp_path).get("invert")   # no sliders: nothing to check
    assert lenient_params(invert, 99999, 7, 8) == (99999, 7.0, 8.0)


def test_check_unit_no_longer_refuses_processor_res():
    check_unit(ControlNetUnitRequest(processor_res=99999), 0)
    check_unit(ControlNetUnitRequest(processor_res=10, threshold_a=1e6), 0)


# --------------------------------------------------------------------------- positional units (pure)


def _units(args, notes=None):
    return units_from_alwayson({"ControlNet": {"args": args}}, lambda b: f"decoded {b}", notes)


def test_positional_units_flat_as_the_first_api_and_nested():
    first = [True, "canny", "cn [1]", 0.5, "img", False, 0, False, True, 256, 50, 150, 0.1, 0.9, False]
    second = [False, "none", "cn [1]", 1.0, "img2"]      # a short one: the rest are defaults
    notes: list[str] = []
    flat = _units([*first, *second], notes)
    assert len(flat) == 2 and notes == []
    a, b = flat
    assert (a.enabled, a.module, a.model, a.weight, a.image, a.resize_mode, a.low_vram) == (
        True, "canny", "cn [1]", 0.5, "decoded img", "Just Resize", True)
    assert (a.processor_res, a.threshold_a, a.threshold_b, a.guidance_start, a.guidance_end) == (256, 50, 150, 0.1, 0.9)
    assert not b.enabled and b.image == "decoded img2" and b.resize_mode == "Crop and Resize"
    assert _units([first, {"module": "invert", "model": "cn [1]"}, None]) == (a, _units([{"module": "invert",
                                                                                        "model": "cn [1]"}])[0])


def test_positional_units_old_switches():
    inverted = _units([True, "none", "cn", 1.0, "img", True])[0]
    assert inverted.module == "invert"
    with pytest.raises(UnitError, match="invert_image works only with module 'none'"):
        _units([True, "canny", "cn", 1.0, "img", True])
    notes: list[str] = []
    _units([True, "canny", "cn", 1.0, "img", False, 1, True, False, 64, 64, 64, 0, 1, True], notes)
    assert any("rgbbgr_mode" in n for n in notes) and any("guess_mode" in n for n in notes)
    with pytest.raises(UnitError, match="at most 15 values"):
        _units([[True, *range(15)]])


# --------------------------------------------------------------------------- on the running app


b64, decode = png_b64, decode_b64


control_image = control_square


BASE = {"prompt": "a house", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
        "save_images": False, "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}


def get(server, path: str) -> dict:
    r = requests.get(server.url + path, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def tiny_model(server) -> str:
    return next(n for n in get(server, "/controlnet/model_list")["model_list"] if n.startswith("tinycn"))


def test_api_control_types_settings_and_model_list_update(server):
    types = get(server, "/controlnet/control_types")["control_types"]
    assert list(types) == list(CONTROL_TYPES)
    assert types["Canny"]["module_list"] == ["none", "canny", "invert"]
    assert types["Canny"]["default_option"] == "canny" and types["Canny"]["default_model"] == "None"
    assert "edges_plus" in types["All"]["module_list"]   # an extension's module is in the table too
    assert get(server, "/controlnet/settings") == {"control_net_unit_count": 3}

    folder = server.data_dir / "models" / "ControlNet"
    added = folder / "control_v11p_sd15_canny.safetensors"
    before = get(server, "/controlnet/model_list?update=false")["model_list"]
    shutil.copyfile(folder / "tinycn.safetensors", added)
    try:
        assert get(server, "/controlnet/model_list?update=false")["model_list"] == before   # not rescanned
        names = get(server, "/controlnet/model_list?update=true")["model_list"]
        canny_name = next(n for n in names if n.startswith("control_v11p_sd15_canny ["))
        canny = get(server, "/controlnet/control_types")["control_types"]["Canny"]
        assert canny["model_list"] == ["None", canny_name] and canny["default_model"] == canny_name
    finally:
        added.unlink()
        get(server, "/controlnet/model_list?update=true")
    assert get(server, "/controlnet/model_list")["model_list"] == before


def test_detect_out_of_range_uses_the_default_and_logs_it(server):
    r = requests.post(server.url + "/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(control_image())],
        "controlnet_processor_res": 99999, "controlnet_threshold_a": 300}, timeout=60)
    assert r.status_code == 200, r.text
    assert decode(r.json()["images"][0]).size == (512, 512)   # the default resolution, not 2048 nor a 400
    log = (server.data_dir / "server.log").read_text()
    assert "canny.processor_res 99999 is outside 64-2048, using the default 512" in log
    assert "canny.threshold_a 300 is outside 1-255, using the default 100" in log


def test_txt2img_unit_with_out_of_range_values_generates(server):
    unit = {"module": "canny", "model": tiny_model(server), "image": b64(control_image()),
            "processor_res": 99999, "threshold_a": 300, "threshold_b": -5}
    r = requests.post(server.url + "/sdapi/v1/txt2img",
                      json={**BASE, "alwayson_scripts": {"controlnet": {"args": [unit]}}}, timeout=300)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2
    info = json.loads(r.json()["info"])["extra_generation_params"]["ControlNet 0"]
    # the same rule as /detect: each out-of-range value is the module's default
    assert "Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0" in info


# ---- requests rewritten from the extension's tests/web_api (the ones a studio without annotator weights answers)


def test_web_api_every_control_type_is_listed(server):
    # control_types_test.py: each type of the extension's table is a key of the answer
    types = get(server, "/controlnet/control_types")["control_types"]
    assert set(CONTROL_TYPES) <= set(types)


def test_web_api_detect_multiple_inputs_and_default_params(server):
    # detect_test.py: one map per input image; -1 everywhere means the module's defaults
    image = b64(control_image())
    r = requests.post(server.url + "/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [image, image]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["images"]) == 2, r.text
    r = requests.post(server.url + "/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [image], "controlnet_processor_res": -1,
        "controlnet_threshold_a": -1, "controlnet_threshold_b": -1}, timeout=60)
    assert r.status_code == 200 and r.json()["info"] == "Success", r.text
    assert decode(r.json()["images"][0]).size == (512, 512)
    assert requests.post(server.url + "/controlnet/detect", json={"controlnet_module": "INVALID"},
                         timeout=30).status_code == 422


def test_web_api_alwayson_units_with_legacy_fields_and_a_batch(server):
    # txt2img_test.py (TestAlwaysonTxt2ImgWorking): legacy names, an index for resize_mode, the removed
    # guessmode, an image and a mask, two units, a batch of two
    image = b64(control_image())
    unit = {"module": "none", "model": tiny_model(server), "weight": 1.0, "input_image": image, "mask": image,
            "resize_mode": 1, "lowvram": False, "processor_res": 64, "threshold_a": 64, "threshold_b": 64,
            "guidance_start": 0.0, "guidance_end": 1.0, "guessmode": False}
    body = {**BASE, "batch_size": 2, "sampler_index": "Euler a",
            "alwayson_scripts": {"ControlNet": {"args": [unit, unit]}}}
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 4   # the batch, then each unit's detected map
    info = json.loads(r.json()["info"])["extra_generation_params"]
    assert info["ControlNet 1"].startswith("Module: none") and "Resize Mode: Crop and Resize" in info["ControlNet 1"]


def test_positional_unit_generates_like_the_same_object(server):
    name, image = tiny_model(server), b64(control_image())
    as_object = {"enabled": True, "module": "canny", "model": name, "weight": 0.7, "image": image,
                 "resize_mode": "Just Resize", "processor_res": 64, "threshold_a": 50, "threshold_b": 150}
    positional = [True, "canny", name, 0.7, image, False, 0, False, False, 64, 50, 150, 0.0, 1.0, False]
    got = [requests.post(server.url + "/sdapi/v1/txt2img", timeout=300,
                         json={**BASE, "alwayson_scripts": {"controlnet": {"args": args}}})
           for args in ([as_object], positional)]
    assert got[0].status_code == got[1].status_code == 200, (got[0].text, got[1].text)
    assert got[0].json()["images"] == got[1].json()["images"]


def gradient_b64() -> str:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    return b64(Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], axis=2).astype(np.uint8)))


def mask_b64() -> str:
    from PIL import Image

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return b64(mask.convert("RGB"))


def txt2img(server, *units, **changes):
    return requests.post(server.url + "/sdapi/v1/txt2img", timeout=300,
                         json={**BASE, **changes, "alwayson_scripts": {"controlnet": {"args": list(units)}}})


def test_web_api_reference_needs_no_model(server):
    # generation_test.py test_reference: reference_only with model "None"
    r = txt2img(server, {"module": "reference_only", "model": "None", "image": gradient_b64()})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2     # the picture and the reference as its "detected map"
    assert "Module: reference_only, Model: None" in json.loads(r.json()["info"])["extra_generation_params"][
        "ControlNet 0"]


def test_web_api_txt2img_and_img2img_inpaint(server):
    # generation_test.py test_txt2img_inpaint / test_img2img_inpaint, inpaint_test.py's module loop
    model = tiny_model(server)
    for module in ("inpaint_only", "inpaint"):
        r = txt2img(server, {"image": gradient_b64(), "mask_image": mask_b64(), "model": model, "module": module})
        assert r.status_code == 200, r.text
    r = requests.post(server.url + "/sdapi/v1/img2img", timeout=300, json={
        **BASE, "init_images": [gradient_b64()], "mask": mask_b64(), "denoising_strength": 0.75,
        "alwayson_scripts": {"controlnet": {"args": [{"model": model, "module": "inpaint_only"}]}}})
    assert r.status_code == 200, r.text
    assert "Module: inpaint," in json.loads(r.json()["info"])["extra_generation_params"]["ControlNet 0"]


def test_web_api_inpaint_without_a_mask_fails_and_lama_names_its_weights(server):
    # inpaint_test.py test_inpaint_no_mask: no mask is an error (a 400 saying so, no detected map)
    model = tiny_model(server)
    r = txt2img(server, {"image": {"image": gradient_b64()}, "model": model, "module": "inpaint_only"})
    assert r.status_code == 400 and "needs a mask" in r.json()["detail"], r.text
    # generation_test.py test_lama_outpaint: no mask needed with Resize and Fill; here LaMa's weights
    # are missing, so the answer names the file (docs/controlnet-tests.md lists it)
    r = txt2img(server, {"image": gradient_b64(), "model": model, "module": "inpaint_only+lama",
                         "resize_mode": "Resize and Fill"}, width=96)
    assert r.status_code == 400 and "ControlNetLama.pth" in r.json()["detail"], r.text


def test_web_api_masked_controlnet_txt2img(server):
    # generation_test.py test_masked_controlnet_txt2img: a unit with an image and a mask_image
    r = txt2img(server, {"image": gradient_b64(), "mask_image": mask_b64(), "model": tiny_model(server)})
    assert r.status_code == 200, r.text
    detected = decode(r.json()["images"][1]).convert("L")
    assert detected.getpixel((32, 32)) == 255 and detected.getpixel((2, 2)) == 0   # the mask was read


def test_web_api_detect_inpaint_modules_need_masks(server):
    # detect_test.py test_mask_error (422 without a mask) and test_inpaint_mask (a map with one)
    for module in ("inpaint", "inpaint_only", "inpaint_only+lama"):
        r = requests.post(server.url + "/controlnet/detect", timeout=60, json={
            "controlnet_module": module, "controlnet_input_images": [gradient_b64()]})
        assert r.status_code == 422, r.text
    for module in ("inpaint", "inpaint_only"):
        r = requests.post(server.url + "/controlnet/detect", timeout=60, json={
            "controlnet_module": module, "controlnet_input_images": [gradient_b64()],
            "controlnet_masks": [mask_b64()]})
        assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
