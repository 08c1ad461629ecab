"""REST API against a studio started the way a user starts it (python app.py)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
import requests
from PIL import Image

from studio.generation.infotext import parse_infotext

SMALL = {"prompt": "a blue sphere", "steps": 3, "width": 64, "height": 64, "seed": 4321,
         "sampler_name": "Euler a"}


def api(server, path):
    return f"{server.url}/sdapi/v1/{path}"


def test_sd_models_titles(server):
    models = requests.get(api(server, "sd-models")).json()
    names = {m["model_name"] for m in models}
    assert {"tiny-sd1", "tiny-sdxl"} <= names
    for m in models:
        assert set(m) >= {"title", "model_name", "hash", "sha256", "filename", "config"}


def test_embeddings_styles_endpoints(server):
    models = requests.get(api(server, "sd-models")).json()
    sd1 = next(m for m in models if m["model_name"] == "tiny-sd1")
    assert requests.post(api(server, "options"), json={"sd_model_checkpoint": sd1["title"]}).status_code == 200
    assert requests.post(api(server, "refresh-embeddings")).status_code == 200
    emb = requests.get(api(server, "embeddings")).json()
    assert set(emb) == {"loaded", "skipped"}
    assert emb["loaded"]["tinyemb"]["vectors"] == 2 and emb["loaded"]["tinyemb"]["shape"] == 32
    styles = requests.get(api(server, "prompt-styles")).json()
    assert styles == [{"name": "framed", "prompt": "{prompt}, framed", "negative_prompt": "blurry"}]
    r = requests.post(api(server, "txt2img"), json={**SMALL, "prompt": "tinyemb castle", "styles": ["framed"]})
    info = json.loads(r.json()["info"])
    assert info["prompt"] == "tinyemb castle, framed"
    assert "TI hashes: \"tinyemb: " in info["infotexts"][0] or "TI hashes: tinyemb: " in info["infotexts"][0]
    bad = requests.post(api(server, "txt2img"), json={**SMALL, "styles": ["missing"]})
    assert bad.status_code == 400 and "Unknown style" in bad.json()["detail"]


def test_openapi_docs(server):
    assert requests.get(server.url + "/docs").status_code == 200
    assert "/sdapi/v1/txt2img" in requests.get(server.url + "/openapi.json").json()["paths"]


def test_samplers_and_schedulers(server):
    samplers = requests.get(api(server, "samplers")).json()
    assert "Euler a" in [s["name"] for s in samplers]
    schedulers = requests.get(api(server, "schedulers")).json()
    assert {"Automatic", "Karras", "Exponential"} <= {s["label"] for s in schedulers}


def test_options_switch_checkpoint(server):
    models = requests.get(api(server, "sd-models")).json()
    xl = next(m for m in models if m["model_name"] == "tiny-sdxl")
    r = requests.post(api(server, "options"), json={"sd_model_checkpoint": xl["title"]})
    assert r.status_code == 200
    opts = requests.get(api(server, "options")).json()
    assert opts["sd_model_checkpoint"].startswith("tiny-sdxl.safetensors [")
    r = requests.post(api(server, "options"), json={"sd_model_checkpoint": "nope.safetensors"})
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert requests.get(api(server, "options")).json()["sd_model_checkpoint"] == opts["sd_model_checkpoint"]


def test_txt2img_response_shape_and_infotext(server):
    r = requests.post(api(server, "txt2img"), json={**SMALL, "batch_size": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["all_seeds"] == [4321, 4322]
    assert len(info["infotexts"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (64, 64)
    parsed = parse_infotext(image.info["parameters"])
    assert parsed["Seed"] == "4321" and parsed["Sampler"] == "Euler a"
    # the same request reproduces the same pixels
    again = requests.post(api(server, "txt2img"), json={**SMALL, "batch_size": 2}).json()
    assert again["images"][0] == body["images"][0]


def test_txt2img_infotext_field_fills_unset_fields(server):
    text = "a tree\nNegative prompt: fog\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 99, Size: 72x64"
    r = requests.post(api(server, "txt2img"), json={"infotext": text, "width": 64})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"]) == ("a tree", "fog", 99, 2)
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert (info["width"], info["height"]) == (64, 64)  # explicit width wins


def test_png_info_round_trip(server):
    body = requests.post(api(server, "txt2img"), json=SMALL).json()
    r = requests.post(api(server, "png-info"), json={"image": "data:image/png;base64," + body["images"][0]})
    assert r.status_code == 200
    out = r.json()
    assert out["parameters"]["Prompt"] == "a blue sphere"
    assert out["info"].startswith("a blue sphere\nSteps: 3")


def test_progress_and_interrupt_while_running(server):  # skip: tests/test_skip.py
    result = {}

    def run():
        result["r"] = requests.post(api(server, "txt2img"),
                                    json={**SMALL, "steps": 150, "width": 128, "height": 128, "n_iter": 4})

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    seen = None
    while time.monotonic() < deadline:
        p = requests.get(api(server, "progress")).json()
        if p["state"]["sampling_step"] >= 2:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "progress never reported steps"
    assert seen["state"]["job_count"] >= 1 and 0 < seen["progress"] < 1
    assert requests.post(api(server, "interrupt")).status_code == 200
    t.join(60)
    r = result["r"]
    assert r.status_code == 200
    assert json.loads(r.json()["info"])["interrupted"] is True
    idle = requests.get(api(server, "progress")).json()
    assert idle["state"]["job_count"] == 0


@pytest.mark.parametrize("payload,status,needle", [
    ({**SMALL, "width": 30}, 422, "width"),
    ({**SMALL, "steps": -1}, 422, "steps"),
    ({**SMALL, "cfg_scale": 99}, 422, "cfg_scale"),
    ({**SMALL, "sampler_name": "Bogus"}, 400, "Valid samplers"),
    ({**SMALL, "scheduler": "Bogus"}, 400, "Valid schedule types"),
    ({**SMALL, "steps": "many"}, 422, "steps"),
    ({**SMALL, "override_settings": {"sd_model_checkpoint": "../../secret.ckpt"}}, 404, "not found"),
    ({**SMALL, "override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 404, "not found"),
])
def test_bad_requests_get_4xx_with_detail(server, payload, status, needle):
    r = requests.post(api(server, "txt2img"), json=payload)
    assert r.status_code == status, r.text
    assert needle in json.dumps(r.json()["detail"])
    assert requests.post(api(server, "txt2img"), json=SMALL).status_code == 200


def test_malformed_json_and_bad_images(server):
    r = requests.post(api(server, "txt2img"), data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "detail" in r.json()
    r = requests.post(api(server, "png-info"), json={"image": "!!!notbase64"})
    assert r.status_code == 400 and "base64" in r.json()["detail"]
    r = requests.post(api(server, "png-info"), json={"image": base64.b64encode(b"plain text").decode()})
    assert r.status_code == 400 and "not a readable image" in r.json()["detail"]


def test_webuiapi_client(server):
    webuiapi = pytest.importorskip("webuiapi")
    client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    titles = client.util_get_model_names()
    sd1 = next(t for t in titles if t.startswith("tiny-sd1"))
    client.util_set_model(sd1)
    assert client.util_get_current_model().startswith("tiny-sd1")
    result = client.txt2img(prompt="a house", steps=2, width=64, height=64, seed=5, cfg_scale=6)
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [5]
    info = client.png_info(result.image)
    assert info.info.startswith("a house")


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_nowebui_serves_only_the_api(tmp_path):
    from tests.helpers import make_models_dir, running_server

    make_models_dir(tmp_path)
    with running_server(tmp_path, "--nowebui") as srv:
        assert requests.get(api(srv, "samplers")).status_code == 200
        assert requests.get(srv.url + "/").status_code == 404  # no UI
        r = requests.post(api(srv, "txt2img"), json=SMALL)
        assert r.status_code == 200 and len(r.json()["images"]) == 1


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_override_settings_checkpoint_is_restored_afterwards(server):
    def title(part: str) -> str:
        # listed again each time: as in A1111, a title carries its [hash] once the file has been hashed
        return next(m["title"] for m in requests.get(api(server, "sd-models")).json() if part in m["title"])

    sd1, xl = title("sd1"), title("sdxl")
    assert requests.post(api(server, "options"), json={"sd_model_checkpoint": sd1}).status_code == 200
    try:
        body = {**SMALL, "override_settings": {"sd_model_checkpoint": xl}}
        r = requests.post(api(server, "txt2img"), json=body)
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["sd_model_name"] == "tiny-sdxl"
        assert requests.get(api(server, "options")).json()["sd_model_checkpoint"] == title("sd1")
        r = requests.post(api(server, "txt2img"), json=SMALL)
        assert json.loads(r.json()["info"])["sd_model_name"] == "tiny-sd1"
        # without restore the override becomes the user's setting
        body["override_settings_restore_afterwards"] = False
        assert requests.post(api(server, "txt2img"), json=body).status_code == 200
        assert requests.get(api(server, "options")).json()["sd_model_checkpoint"] == title("sdxl")
    finally:   # the server is shared by the session's tests: leave SD1 loaded whatever happened
        requests.post(api(server, "options"), json={"sd_model_checkpoint": sd1})


def test_network_and_vae_lists(server, tmp_path):
    loras = requests.get(api(server, "loras")).json()
    assert [(x["name"], x["alias"]) for x in loras] == [("tinylora", "tinyAlias")]
    assert loras[0]["metadata"]["ss_base_model_version"] == "sd_v1"
    assert loras[0]["path"].endswith("tinylora.safetensors")
    assert requests.get(api(server, "hypernetworks")).json()[0]["name"] == "tinyhn"
    vaes = requests.get(api(server, "sd-vae")).json()
    assert vaes == [{"model_name": "tinyvae.safetensors", "filename": vaes[0]["filename"]}]
    # a file dropped in while running appears after refresh
    from studio.testing import tiny_components
    from studio.testing.loras import write_kohya_lora

    write_kohya_lora(server.data_dir / "models" / "Lora" / "late.safetensors", tiny_components("sd1", seed=1),
                     "sd1", seed=9)
    assert requests.post(api(server, "refresh-loras")).status_code == 200
    assert "late" in [x["name"] for x in requests.get(api(server, "loras")).json()]
    assert requests.post(api(server, "refresh-vae")).status_code == 200


def test_lora_and_vae_in_a_request(server):
    models = requests.get(api(server, "sd-models")).json()
    sd1 = next(m for m in models if "sd1" in m["title"])
    body = {**SMALL, "prompt": "a cube <lora:tinylora:0.8>", "override_settings": {
        "sd_model_checkpoint": sd1["title"], "sd_vae": "tinyvae.safetensors"}}
    r = requests.post(api(server, "txt2img"), json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    params = parse_infotext(info["infotexts"][0])
    assert params["Lora hashes"].startswith("tinyAlias: ")
    assert params["VAE"] == "tinyvae.safetensors"
    assert info["sd_vae_name"] == "tinyvae.safetensors"
    # the VAE override was restored: the next plain request uses the checkpoint's own VAE
    r = requests.post(api(server, "txt2img"), json={**SMALL, "override_settings": {
        "sd_model_checkpoint": sd1["title"]}})
    assert "VAE" not in parse_infotext(json.loads(r.json()["info"])["infotexts"][0])


def test_options_sd_vae(server):
    r = requests.post(api(server, "options"), json={"sd_vae": "nope.safetensors"})
    assert r.status_code == 400 and "nope" in r.json()["detail"]
    assert requests.post(api(server, "options"), json={"sd_vae": "tinyvae.safetensors"}).status_code == 200
    assert requests.get(api(server, "options")).json()["sd_vae"] == "tinyvae.safetensors"
    assert requests.post(api(server, "options"), json={"sd_vae": "Automatic"}).status_code == 200


def _b64_png(image, data_uri=False) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_uri else text


def test_img2img_with_mask(server):
    import numpy as np

    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {**SMALL, "init_images": [_b64_png(init, data_uri=True)], "mask": _b64_png(mask),
            "denoising_strength": 0.9, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False}
    r = requests.post(api(server, "img2img"), json=body)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
    assert out.size == (64, 64)
    keep = np.asarray(mask) == 0
    assert (np.asarray(out)[keep] == np.asarray(init)[keep]).all()
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.9
    params = parse_infotext(info["infotexts"][0])
    assert params["Denoising strength"] == "0.9" and params["Mask blur"] == "0"
    assert r.json()["parameters"]["init_images"] is None  # include_init_images is false by default


@pytest.mark.parametrize("body,fragment", [
    ({}, "init_images"),
    ({"init_images": ["!!!not base64!!!"]}, "base64"),
    ({"init_images": [base64.b64encode(b"plain text, not a picture").decode()]}, "image"),
    ({"init_images": ["iVBORw0KGgo="], "denoising_strength": 2}, ""),
])
def test_img2img_bad_input_is_a_4xx(server, body, fragment):
    r = requests.post(api(server, "img2img"), json={**SMALL, **body})
    assert 400 <= r.status_code < 500, r.text
    assert fragment.lower() in json.dumps(r.json()["detail"]).lower()
    assert requests.get(api(server, "progress")).status_code == 200


def test_upscalers_hires_and_extras(server):
    import numpy as np

    ups = requests.get(api(server, "upscalers")).json()
    assert [u["name"] for u in ups][:3] == ["None", "Lanczos", "Nearest"]
    assert set(ups[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    modes = [m["name"] for m in requests.get(api(server, "latent-upscale-modes")).json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes
    body = {**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2,
            "denoising_strength": 0.4}
    r = requests.post(api(server, "txt2img"), json=body)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert out.size == (96, 96)
    params = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert params["Hires upscaler"] == "Lanczos" and params["Denoising strength"] == "0.4"
    bad = requests.post(api(server, "txt2img"), json={**body, "hr_upscaler": "Nope"})
    assert bad.status_code == 400 and "hr_upscaler" in bad.json()["detail"]

    src = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    r = requests.post(api(server, "extra-single-image"), json={"image": _b64_png(src), "upscaler_1": "Lanczos",
                                                                "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).size == (60, 80)
    r = requests.post(api(server, "extra-batch-images"), json={
        "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 48, "upscaler_1": "Nearest",
        "imageList": [{"data": _b64_png(src), "name": "a.png"}, {"data": _b64_png(src, True), "name": "b.png"}]})
    assert r.status_code == 200, r.text
    assert [Image.open(io.BytesIO(base64.b64decode(i))).size for i in r.json()["images"]] == [(64, 48)] * 2
    r = requests.post(api(server, "extra-single-image"), json={"image": _b64_png(src), "upscaler_1": "Nope"})
    assert r.status_code == 400 and "Nope" in r.json()["detail"]


def test_token_merging_from_override_settings_and_infotext(server):
    """A1111 clients turn token merging on per request with override_settings; it is written into the
    infotext, and a pasted infotext brings it back."""
    body = {**SMALL, "sampler_name": "Euler", "override_settings": {"token_merging_ratio": 0.5}}
    r = requests.post(api(server, "txt2img"), json=body)
    assert r.status_code == 200, r.text
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert parse_infotext(text)["Token merging ratio"] == "0.5"
    assert requests.get(api(server, "options")).json()["token_merging_ratio"] == 0.0, "restored afterwards"
    again = requests.post(api(server, "txt2img"), json={"infotext": text, "steps": 3})
    assert again.status_code == 200, again.text
    assert again.json()["images"][0] == r.json()["images"][0]
    bad = requests.post(api(server, "txt2img"), json={**SMALL, "override_settings": {"token_merging_ratio": 3}})
    assert bad.status_code == 400 and "token_merging_ratio" in bad.json()["detail"]
