"""The Extras request is one schema too (A1111's ExtrasBaseRequest): the API body, the CLI's
`upscale` flags and the Extras tab's bindings; "scale to" works as A1111's (cover, then crop the
middle); face restoration with no restorer installed is refused (naming the folder) instead of ignored."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from studio.cli import main
from studio.config import Flags
from studio.core import Studio
from studio.errors import RequestError
from studio.generation.request import ExtrasRequest, build_request


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    s = Studio.create(Flags(data_dir=str(tmp_path_factory.mktemp("extras")), no_demo=True))
    yield s
    s.queue.shutdown()


def picture(width=60, height=40) -> Image.Image:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((20, 20, 220), (0, 0, width // 2, height))
    return image


def test_scale_to_covers_then_crops_the_middle(studio):
    req = build_request(ExtrasRequest, {"resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64,
                                        "upscaler_1": "Lanczos"})
    out, info, _ = studio.engine.extras(req, picture(), save=False)
    assert out.size == (64, 64)
    assert "Postprocess upscale to: 64x64" in info and "Postprocess crop to: 64x64" in info
    # the middle was kept: blue on the left half of the crop, red on the right, not squashed
    assert out.getpixel((8, 32))[2] > 150 and out.getpixel((56, 32))[0] > 150
    whole, _, _ = studio.engine.extras(req.model_copy(update={"upscaling_crop": False}), picture(), save=False)
    assert whole.size == (96, 64)   # 60x40 scaled by max(64/60, 64/40) = 1.6, aspect kept


def test_scale_by_and_the_result_is_saved(studio):
    req = build_request(ExtrasRequest, {"upscaling_resize": 2, "upscaler_1": "Lanczos"})
    out, info, path = studio.engine.extras(req, picture())
    assert out.size == (120, 80) and "Postprocess upscale by: 2" in info
    assert path is not None and path.parent.parent == studio.paths.data / "outputs" / "extras-images"


def test_face_restoration_without_weights_is_refused_not_ignored(studio):
    req = build_request(ExtrasRequest, {"gfpgan_visibility": 0.5, "upscaler_1": "Lanczos"})
    with pytest.raises(RequestError, match=r"No GFPGAN model found: .*models.GFPGAN"):
        studio.engine.extras(req, picture(), save=False)
    with pytest.raises(RequestError, match="upscaling_resize"):
        build_request(ExtrasRequest, {"upscaling_resize": 100})


def test_the_api_body_is_the_schema(studio):
    from studio.api.routes import build_router

    app = FastAPI()
    app.include_router(build_router(studio))
    client = TestClient(app)
    buf = io.BytesIO()
    picture().save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    ok = client.post("/sdapi/v1/extra-single-image", json={"image": data, "upscaler_1": "Lanczos",
                                                          "resize_mode": 1, "upscaling_resize_w": 64,
                                                          "upscaling_resize_h": 32})
    assert ok.status_code == 200, ok.text
    assert Image.open(io.BytesIO(base64.b64decode(ok.json()["image"]))).size == (64, 32)
    refused = client.post("/sdapi/v1/extra-single-image", json={"image": data, "codeformer_visibility": 1})
    assert refused.status_code == 400 and "models/Codeformer" in refused.json()["detail"]
    hidden = client.post("/sdapi/v1/extra-single-image", json={"image": data, "upscaler_1": "Lanczos",
                                                              "show_extras_results": False})
    assert hidden.status_code == 200 and hidden.json()["image"] is None


def test_the_cli_flags_come_from_the_schema(tmp_path, capsys):
    source = tmp_path / "in.png"
    picture().save(source)
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    help_text = capsys.readouterr().out
    assert "--upscaling-crop" in help_text and "--upscaler-2" in help_text and "--scale" in help_text
    code = main(["upscale", str(source), "--data-dir", str(tmp_path / "data"), "--no-demo", "--upscaler", "Lanczos",
                 "--resize-mode", "1", "--upscaling-resize-w", "50", "--upscaling-resize-h", "50",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    written = capsys.readouterr().out.strip().splitlines()[-1]
    assert Image.open(written).size == (50, 50)
