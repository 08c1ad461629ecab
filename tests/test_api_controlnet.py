"""The ControlNet extension's API on the running app: /controlnet/* routes, units in
alwayson_scripts (raw and data-URI base64, legacy names, webuiapi's client), extensions."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from studio.generation.infotext import parse_infotext


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def control_image() -> Image.Image:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[16:48, 20:44] = 255
    return Image.fromarray(arr)


BASE = {"prompt": "a house", "steps": 3, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
        "save_images": False, "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}


def model_name(server) -> str:
    names = requests.get(server.url + "/controlnet/model_list", timeout=30).json()["model_list"]
    return next(n for n in names if n.startswith("tinycn"))


def test_version_models_modules_settings(server):
    assert requests.get(server.url + "/controlnet/version", timeout=10).json() == {"version": 2}
    name = model_name(server)
    assert len(name.split(" [")[1].rstrip("]")) == 8   # "stem [sha256 prefix]" as the extension names models
    modules = requests.get(server.url + "/controlnet/module_list", timeout=10).json()
    for expected in ("none", "canny", "invert", "scribble_xdog", "tile_resample", "openpose", "posterize",
                     "edges_plus"):
        assert expected in modules["module_list"]
    # the extension's slider appears with its parameters, so clients can draw it
    sliders = modules["module_detail"]["edges_plus"]["sliders"]
    assert {"name": "Strength", "value": 4, "min": 1, "max": 10, "step": 1.0} in sliders
    assert modules["module_detail"]["canny"]["sliders"][1]["name"] == "Low Threshold"
    assert requests.get(server.url + "/controlnet/settings", timeout=10).json() == {"control_net_unit_count": 3}


def test_extensions_listed_with_errors(server):
    listed = {e["name"]: e for e in requests.get(server.url + "/sdapi/v1/extensions", timeout=10).json()}
    assert listed["edges_plus"]["status"] == "loaded" and listed["edges_plus"]["enabled"]
    assert listed["posterize"]["status"] == "loaded"
    assert listed["broken_ext"]["status"] == "error"
    assert "broken on purpose" in listed["broken_ext"]["error"]
    scripts = requests.get(server.url + "/sdapi/v1/scripts", timeout=10).json()
    assert "controlnet" in scripts["txt2img"]


@pytest.mark.parametrize("field", ["controlnet_input_images", "controlnet_images"])
def test_detect_accepts_both_image_field_names(server, field):
    r = requests.post(server.url + "/controlnet/detect", json={
        "controlnet_module": "canny", field: [b64(control_image())], "controlnet_processor_res": 128,
        "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 1
    edges = np.asarray(decode(body["images"][0]).convert("L"))
    assert edges.shape == (128, 128) and set(np.unique(edges)) == {0, 255}


def test_detect_errors(server):
    r = requests.post(server.url + "/controlnet/detect", json={"controlnet_module": "sobel",
                                                              "controlnet_input_images": [b64(control_image())]})
    assert r.status_code == 422 and r.json()["detail"] == "Module not available"
    r = requests.post(server.url + "/controlnet/detect", json={"controlnet_module": "canny"})
    assert r.status_code == 422 and r.json()["detail"] == "No image selected"
    r = requests.post(server.url + "/controlnet/detect", json={"controlnet_module": "openpose",
                                                              "controlnet_input_images": [b64(control_image())]})
    assert r.status_code == 400 and "body_pose_model.pth" in r.json()["detail"]


def txt2img(server, **extra):
    return requests.post(server.url + "/sdapi/v1/txt2img", json={**BASE, **extra}, timeout=300)


def test_txt2img_unit_returns_image_map_and_infotext(server):
    name = model_name(server)
    plain = txt2img(server).json()
    r = txt2img(server, alwayson_scripts={"ControlNet": {"args": [
        {"enabled": True, "module": "canny", "model": name, "image": b64(control_image()), "weight": 1.0,
         "resize_mode": "Crop and Resize", "control_mode": "Balanced"}]}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2   # the image, then the unit's detected map
    info = json.loads(body["info"])
    assert info["extra_generation_params"]["ControlNet 0"].startswith(f"Module: canny, Model: {name}, Weight: 1.0")
    stored = parse_infotext(decode(body["images"][0]).info["parameters"])
    assert stored["ControlNet 0"] == info["extra_generation_params"]["ControlNet 0"]
    a = np.asarray(decode(plain["images"][0]), dtype=np.int16)
    b = np.asarray(decode(body["images"][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(a - b).max() > 0


def test_data_uri_and_legacy_fields_give_the_same_image(server):
    name = model_name(server)
    unit = {"module": "invert", "model": name, "weight": 0.8, "guidance_end": 0.7}
    raw = txt2img(server, alwayson_scripts={"controlnet": {"args": [{**unit, "image": b64(control_image())}]}})
    legacy = txt2img(server, alwayson_scripts={"controlnet": {"args": [
        {"module": "invert", "model": name, "weight": 0.8, "guidance": 0.7,
         "input_image": "data:image/png;base64," + b64(control_image())}]}})
    assert raw.status_code == legacy.status_code == 200, (raw.text, legacy.text)
    assert raw.json()["images"][0] == legacy.json()["images"][0]


def test_bad_units_are_400_with_the_reason(server):
    name = model_name(server)
    cases = [
        ({"module": "canny", "model": "missing", "image": b64(control_image())}, "model 'missing' not found"),
        ({"module": "canny", "model": name}, "no control image"),
        ({"module": "canny", "model": name, "image": "not base64!"}, "Invalid base64"),
        ({"module": "canny", "model": name, "image": b64(control_image()), "weight": 3}, "weight must be between"),
        ({"module": "canny", "model": name, "image": b64(control_image()), "control_mode": "Loud"}, "control_mode"),
    ]
    for unit, message in cases:
        r = txt2img(server, alwayson_scripts={"controlnet": {"args": [unit]}})
        assert r.status_code == 400 and message in r.json()["detail"], (unit, r.text)


def test_img2img_unit_without_image_uses_the_init_image(server):
    name = model_name(server)
    body = {**BASE, "init_images": [b64(control_image())], "denoising_strength": 0.6,
            "alwayson_scripts": {"controlnet": {"args": [{"module": "canny", "model": name}]}}}
    r = requests.post(server.url + "/sdapi/v1/img2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2
    assert "ControlNet 0" in json.loads(r.json()["info"])["extra_generation_params"]


def test_webuiapi_client_controlnet(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl=server.url + "/sdapi/v1")
    name = model_name(server)
    assert name in api.controlnet_model_list()
    assert "canny" in api.controlnet_module_list()
    detected = api.controlnet_detect([control_image()], module="canny", processor_res=64)
    assert len(detected.images) == 1 and detected.image.size == (64, 64)
    unit = webuiapi.ControlNetUnit(image=control_image(), module="canny", model=name, processor_res=64)
    result = api.txt2img(prompt="a house", steps=3, width=64, height=64, seed=5, sampler_name="Euler",
                         controlnet_units=[unit], save_images=False,
                         override_settings={"sd_model_checkpoint": "tiny-sd1.safetensors"})
    assert len(result.images) == 2
    assert result.info["extra_generation_params"]["ControlNet 0"].startswith(f"Module: canny, Model: {name}")
