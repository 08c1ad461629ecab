"""Face restoration and the Detailer (ADetailer) through the real engine and API: a tiny SD1 model,
a face restorer built by the factory in spandrel's layout, and skimage's astronaut as the photo
with a face (the tiny model's own images hold no face: its weights are random)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import parse_infotext
from studio.generation.request import Img2ImgRequest, RequestError, Txt2ImgRequest
from studio.restore.face_boxes import detect
from studio.testing.face_restorers import make_face_restorer
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("postprocess")
    make_models_dir(root)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    # a detector that finds nothing: ADetailer's "Skip img2img" then hands the photo itself to restore faces
    s.engine.detectors.add("no_hits", lambda image, confidence: [], source="tests")
    yield s
    s.queue.shutdown()


def client(studio) -> TestClient:
    from studio.api.routes import install_api

    app = FastAPI()
    install_api(app, studio)
    return TestClient(app)


def small(**kw) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{"prompt": "a portrait", "steps": 2, "width": 64, "height": 64, "seed": 5,
                             "sampler_name": "Euler", "save_images": False, **kw})


SKIP_IMG2IMG = {"ADetailer": {"args": [True, True, {"ad_model": "no_hits"}]}}


def adetailer(skip_img2img: bool = True, **unit) -> dict:
    """ADetailer's arguments; "Skip img2img" on by default: the photo is detailed as it is."""
    return {"ADetailer": {"args": [True, skip_img2img, {"ad_model": "face_opencv", "ad_denoising_strength": 0.5,
                                                 "ad_inpaint_only_masked_padding": 8, **unit}]}}


def test_restore_faces_without_a_face_needs_no_weights(studio):
    plain = studio.txt2img(small())
    restored = studio.txt2img(small(restore_faces=True))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(restored.images[0]))
    assert "Face restoration" not in restored.infotexts[0]
    assert client(studio).get("/sdapi/v1/face-restorers").json() == []


def test_face_with_no_restorer_installed_is_a_4xx_naming_the_folder(studio, astronaut):
    req = Img2ImgRequest(init_images=[astronaut], width=256, height=256, steps=1, save_images=False,
                         restore_faces=True, alwayson_scripts=SKIP_IMG2IMG)
    with pytest.raises(RequestError, match="models.Codeformer"):
        studio.img2img(req)
    r = client(studio).post("/sdapi/v1/extra-single-image", json={
        "image": _b64(astronaut), "codeformer_visibility": 1})
    assert r.status_code == 400 and "Codeformer" in r.json()["detail"]


def test_restorer_file_is_listed_and_used(studio, astronaut, tmp_path):
    folder = studio.paths.models / "GFPGAN"
    path = make_face_restorer(folder / "RestoreFormer.pth", "RestoreFormer", seed=3)
    try:
        listed = client(studio).get("/sdapi/v1/face-restorers").json()
        assert listed == [{"name": "RestoreFormer", "cmd_dir": str(folder)}]
        box = detect(astronaut)[0]
        # "Skip img2img" details the photo itself: restore faces runs on it, inside the face only
        req = Img2ImgRequest(init_images=[astronaut], width=256, height=256, steps=1, save_images=False,
                             restore_faces=True, override_settings={"face_restoration_model": "RestoreFormer"},
                             alwayson_scripts=SKIP_IMG2IMG)
        result = studio.img2img(req)
        out, before = np.asarray(result.images[0]).astype(int), np.asarray(astronaut).astype(int)
        changed = np.argwhere(np.abs(out - before).sum(axis=2) > 0)
        assert len(changed) > 100
        margin = box.width  # the restorer's square is 2x the box, centred on it
        assert changed[:, 1].min() >= box.x0 - margin and changed[:, 1].max() <= box.x1 + margin
        assert np.array_equal(out[230:], before[230:])
        assert parse_infotext(result.infotexts[0])["Face restoration"] == "RestoreFormer"
    finally:
        path.unlink()


def test_detailer_changes_only_inside_the_detected_face(studio, astronaut):
    box = detect(astronaut)[0]
    req = Img2ImgRequest(prompt="a portrait", init_images=[astronaut], width=256, height=256, steps=2,
                         sampler_name="Euler", seed=3, save_images=False,
                         alwayson_scripts=adetailer(ad_prompt="a smiling face", ad_dilate_erode=4, ad_mask_blur=4))
    result = studio.img2img(req)
    out, before = np.asarray(result.images[0]).astype(int), np.asarray(astronaut).astype(int)
    changed = np.argwhere(np.abs(out - before).sum(axis=2) > 0)
    assert len(changed) > 0.5 * box.area
    reach = 4 + 10 + 1   # dilation + the mask blur's Gaussian reach (A1111: 2.5 sigma)
    assert changed[:, 0].min() >= box.y0 - reach and changed[:, 0].max() < box.y1 + reach
    assert changed[:, 1].min() >= box.x0 - reach and changed[:, 1].max() < box.x1 + reach
    params = parse_infotext(result.infotexts[0])
    assert params["ADetailer model"] == "face_opencv" and params["ADetailer prompt"] == "a smiling face"
    assert params["ADetailer denoising strength"] == "0.5" and "ADetailer version" in params


def test_detailer_from_an_extension_and_refusals(studio, astronaut):
    from studio.restore.face_boxes import Box

    studio.engine.detectors.add("corner_box", lambda image, confidence: [Box(0, 0, 32, 32, 1.0)], source="test")
    try:
        req = Img2ImgRequest(init_images=[astronaut], width=256, height=256, steps=2, seed=1, save_images=False,
                             alwayson_scripts=adetailer(ad_model="corner_box", ad_mask_blur=0, ad_dilate_erode=0))
        out = np.asarray(studio.img2img(req).images[0]).astype(int)
        changed = np.argwhere(np.abs(out - np.asarray(astronaut).astype(int)).sum(axis=2) > 0)
        assert changed.max(axis=0)[:2].tolist() <= [31, 31]
    finally:
        studio.engine.detectors.remove_source("test")
    api = client(studio)
    r = api.post("/sdapi/v1/txt2img", json={"steps": 1, "alwayson_scripts": adetailer(ad_model="mediapipe_face_full")})
    assert r.status_code == 400 and "mediapipe" in r.json()["detail"].lower()
    assert "face_opencv" in api.get("/adetailer/v1/ad_model").json()["ad_model"]


def _b64(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
