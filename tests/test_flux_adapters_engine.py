"""FLUX.1 Redux and XLabs' FLUX IP-Adapter as ControlNet units of a FLUX checkpoint, through the engine
and the A1111 API: files found in ComfyUI's folders (models/style_models, models/clip_vision), the
flux_redux module, weight and downsampling, the refusals."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from studio.config import Flags
from studio.controlnet.units import ControlNetUnitRequest
from studio.core import Studio
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.testing.flux import make_flux_checkpoint
from studio.testing.flux_adapters import write_flux_ip_adapter, write_redux, write_siglip_vision
from studio.testing.flux_controlnets import make_flux_controlnet_file
from studio.testing.ip_adapters import write_clip_vision

BASE = dict(prompt="a house", steps=3, width=64, height=64, seed=3, cfg_scale=1.0, sampler_name="Euler",
            save_images=False, checkpoint="flux1-dev-tiny.safetensors")


def reference() -> Image.Image:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:32] = (230, 30, 30)
    arr[32:, 16:48] = (20, 40, 220)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("redux-engine")
    models = root / "models"
    make_flux_checkpoint(models / "Stable-diffusion" / "flux1-dev-tiny.safetensors", dtype=torch.float32)
    write_redux(models / "style_models" / "flux1-redux-dev.safetensors", seed=4)
    write_siglip_vision(models / "clip_vision" / "sigclip_vision_patch14_384.safetensors", seed=3)
    make_flux_controlnet_file(models / "ControlNet" / "flux-canny.safetensors", "plain", seed=1, dtype=torch.float32)
    write_flux_ip_adapter(models / "ControlNet" / "flux-ip-adapter-v2.safetensors", clip_dim=24, seed=5)
    write_clip_vision(models / "clip_vision" / "clip_vision_l.safetensors", proj=24, seed=6)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def name(studio, stem: str) -> str:
    return next(n for n in studio.controlnets.names() if n.startswith(stem))


def redux_unit(studio, **changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": "flux_redux", "model": name(studio, "flux1-redux-dev"),
                                    "image": reference(), **changes})


def generate(studio, *units, **fields):
    return studio.txt2img(Txt2ImgRequest(**{**BASE, **fields}, controlnet_units=tuple(units)))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_a_redux_unit_steers_a_flux_checkpoint(studio):
    plain = pixels(generate(studio))
    assert np.array_equal(pixels(generate(studio, redux_unit(studio, weight=0.0))), plain)
    result = generate(studio, redux_unit(studio))
    full = pixels(result)
    assert np.abs(full - plain).mean() > 0.1
    assert "flux_redux" in result.infotexts[0] and "flux1-redux-dev" in result.infotexts[0]
    # the slider: ReduxAdvanced's downsampling factor, 2 leaves a quarter of the tokens
    assert np.abs(pixels(generate(studio, redux_unit(studio, threshold_a=2))) - full).mean() > 0.01
    # CFG > 1: the negative prompt runs without the image tokens, and the job still completes
    assert pixels(generate(studio, redux_unit(studio), cfg_scale=3.0)).shape == full.shape


def test_the_module_needs_a_redux_model_and_a_flux_checkpoint(studio):
    with pytest.raises(RequestError, match="flux_redux module needs a FLUX.1 Redux model"):
        generate(studio, redux_unit(studio, model=name(studio, "flux-canny")))


def test_the_api_lists_redux_under_revision_and_generates_with_it(studio):
    from studio.api.routes import install_api

    app = FastAPI()
    install_api(app, studio)
    client = TestClient(app)
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert any(m.startswith("flux1-redux-dev") for m in models)
    modules = client.get("/controlnet/module_list").json()
    assert "flux_redux" in modules["module_list"]
    assert modules["module_detail"]["flux_redux"]["sliders"][0]["name"] == "Downsampling factor"
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert any(m.startswith("flux-ip-adapter-v2") for m in types["IP-Adapter"]["model_list"])
    revision = types["Revision"]
    assert "flux_redux" in revision["module_list"] and revision["default_model"].startswith("flux1-redux-dev")
    buf = io.BytesIO()
    reference().save(buf, format="PNG")
    unit = {"enabled": True, "module": "flux_redux", "model": revision["default_model"],
            "image": base64.b64encode(buf.getvalue()).decode()}
    body = {**{k: v for k, v in BASE.items() if k != "checkpoint"},
            "override_settings": {"sd_model_checkpoint": "flux1-dev-tiny.safetensors"}}
    plain = client.post("/sdapi/v1/txt2img", json=body)
    steered = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert plain.status_code == 200 and steered.status_code == 200, steered.text
    assert steered.json()["images"][0] != plain.json()["images"][0]


def test_an_xlabs_ip_adapter_unit_steers_a_flux_checkpoint(studio):
    plain = pixels(generate(studio))
    model = name(studio, "flux-ip-adapter-v2")
    unit = ControlNetUnitRequest(module="ip-adapter-auto", model=model, image=reference())
    assert np.array_equal(pixels(generate(studio, replace(unit, weight=0.0))), plain)
    steered = generate(studio, unit)
    assert np.abs(pixels(steered) - plain).mean() > 0.1
    assert "ip-adapter-auto" in steered.infotexts[0]
    # both adapters together: the image tokens and the adapter's attention
    both = pixels(generate(studio, unit, redux_unit(studio)))
    assert np.abs(both - pixels(steered)).mean() > 0.01
    assert np.array_equal(pixels(generate(studio)), plain)   # the transformer is as it was


def test_the_cli_takes_a_redux_unit(studio, tmp_path, capsys):
    from studio.cli import main
    from studio.generation.infotext import parse_infotext

    ref = tmp_path / "ref.png"
    reference().save(ref)
    out = tmp_path / "out"
    code = main(["generate", "--data-dir", str(studio.flags.data_dir), "-p", "a house", "--steps", "2", "--width", "64",
                 "--height", "64", "--seed", "3", "--sampler", "Euler", "--cfg-scale", "1", "--checkpoint",
                 "flux1-dev-tiny.safetensors", "--out", str(out),
                 "--controlnet", f"model=flux1-redux-dev,module=flux_redux,image={ref},threshold_a=3"])
    assert code == 0, capsys.readouterr().err
    params = parse_infotext(Image.open(next(out.glob("*.png"))).info["parameters"])
    assert params["ControlNet 0"].startswith("Module: flux_redux, Model: flux1-redux-dev [")
    assert "Threshold A: 3.0" in params["ControlNet 0"]
