"""The requests A1111's own API tests send (its test/ folder: txt2img, img2img, extras, utils), against
the studio started as a user starts it (app.py, the session server), checked for more than the status
code: the script runs, the faces field is answered, the lists are what is installed."""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from PIL import Image, ImageDraw


def api(server, path: str) -> str:
    return f"{server.url}/sdapi/v1/{path}"


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def picture() -> Image.Image:
    image = Image.new("RGB", (96, 96), "skyblue")
    ImageDraw.Draw(image).ellipse((20, 20, 76, 76), fill="orange")
    return image


A1111_TXT2IMG = {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
                 "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
                 "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0,
                 "s_tmin": 0, "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1,
                 "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1, "subseed_strength": 0,
                 "tiling": False, "width": 64}


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_restore_faces_and_vanilla_samplers(server):
    for change in ({"restore_faces": True}, {"sampler_index": "PLMS"}, {"sampler_index": "DDIM"},
                   {"sampler_index": "UniPC"}):
        r = requests.post(api(server, "txt2img"), json={**A1111_TXT2IMG, **change}, timeout=120)
        assert r.status_code == 200, (change, r.text)
        assert len(r.json()["images"]) == 1


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_img2img_sd_upscale_script_doubles_the_picture(server):
    body = {"init_images": [b64(picture())], "denoising_strength": 0.75, "width": 64, "height": 64, "steps": 3,
            "sampler_index": "Euler a", "prompt": "example prompt", "mask": None, "inpainting_mask_invert": False,
            "script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]}
    r = requests.post(api(server, "img2img"), json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert out.size == (192, 192)
    assert "SD upscale" in json.loads(r.json()["info"])["infotexts"][0]


def test_extras_bodies_and_lists(server):
    image = b64(picture())
    r = requests.post(api(server, "extra-single-image"), json={"image": image, "model": "clip"}, timeout=60)
    assert r.status_code == 200
    r = requests.post(api(server, "extra-single-image"), json={
        "resize_mode": 0, "upscaling_resize": 2, "upscaler_1": "Lanczos", "upscaler_2": "None",
        "gfpgan_visibility": 0, "codeformer_visibility": 0, "codeformer_weight": 0, "image": image}, timeout=60)
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).size == (192, 192)
    assert requests.get(api(server, "face-restorers"), timeout=10).json() == []   # none installed here
    assert "x/y/z plot" in requests.get(api(server, "scripts"), timeout=10).json()["txt2img"]
