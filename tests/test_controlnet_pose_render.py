"""/controlnet/render_openpose_json: OpenPose JSON (people, hands, face) and AP-10K animals drawn as
pose maps, with the extension's answers (its tests/web_api/render_openpose_json.py cases)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

from studio.api.controlnet import build_controlnet_router
from studio.controlnet.pose_render import keypoints, render_pose_json

W, H = 320, 240
# OpenPose's 18 COCO body points (nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right
# hip/knee/ankle, left hip/knee/ankle, eyes, ears) of a standing figure, in canvas pixels
BODY = [(160, 40), (160, 70), (130, 72), (120, 110), (115, 150), (190, 72), (200, 110), (205, 150),
        (140, 140), (138, 185), (136, 230), (180, 140), (182, 185), (184, 230), (154, 34), (166, 34),
        (148, 38), (172, 38)]


def triples(points, confidence=1.0) -> list[float]:
    return [v for x, y in points for v in (x, y, confidence)]


def person(**extra) -> dict:
    return {"pose_keypoints_2d": triples(BODY), **extra}


def pose_file(**fields) -> dict:
    return {"people": [person()], "canvas_width": W, "canvas_height": H, **fields}


def lit(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).max(axis=2) > 40


def test_keypoints_are_normalised_and_low_confidence_points_dropped():
    got = keypoints([32, 24, 1.0, 10, 10, 0.5], W, H)
    assert (got[0].x, got[0].y) == (0.1, 0.1) and got[1] is None
    assert keypoints(None, W, H) is None
    with pytest.raises(ValueError, match="triples"):
        keypoints([1, 2], W, H)


def test_a_person_is_drawn_where_their_points_are():
    image = render_pose_json(pose_file())
    assert image.size == (W, H)
    mask = lit(image)
    for x, y in BODY[:14]:
        assert mask[y - 2:y + 3, x - 2:x + 3].any(), (x, y)
    assert not mask[:, :90].any() and not mask[:, 240:].any()   # nothing far from the figure
    # the neck-to-right-shoulder limb in OpenPose's first limb colour (red-dominant)
    r, g, b = np.asarray(image)[71, 145]
    assert r > 100 and r > g and r > b


def test_hands_and_face_add_their_points():
    hand = triples([(115 + dx, 150 + dy) for dx in (-6, -3, 0, 3, 6) for dy in (0, 4, 8, 12)] + [(115, 162)])
    face = triples([(150 + 2 * i, 44) for i in range(70)])
    plain = lit(render_pose_json(pose_file()))
    full = lit(render_pose_json(pose_file(people=[person(hand_right_keypoints_2d=hand, face_keypoints_2d=face)])))
    assert full.sum() > plain.sum()
    assert full[158:166, 106:124].sum() > plain[158:166, 106:124].sum()


def test_animals_are_drawn_on_their_canvas():
    points = [(100, 60), (120, 60), (110, 75), (110, 100), (190, 110), (95, 120), (90, 150), (88, 180),
              (125, 120), (128, 150), (130, 180), (180, 130), (178, 160), (176, 190), (200, 130), (205, 160),
              (208, 190)]
    image = render_pose_json({"animals": [triples(points)], "canvas_width": W, "canvas_height": H})
    mask = lit(image)
    assert image.size == (W, H) and mask[105:116, 140:160].any()   # the back, tail root to shoulders
    assert not lit(render_pose_json({"animals": [triples(points, 0.5)], "canvas_width": W,
                                     "canvas_height": H})).any()


@pytest.fixture(scope="module")
def client():
    def encode(image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    app = FastAPI()
    app.include_router(build_controlnet_router(None, APIRoute, lambda data: None, encode))
    return TestClient(app)


def render(client, poses):
    return client.post("/controlnet/render_openpose_json", json=poses)


def test_the_extensions_web_api_cases(client):
    single = render(client, [pose_file()]).json()
    assert single["info"] == "Success" and len(single["images"]) == 1
    image = Image.open(io.BytesIO(base64.b64decode(single["images"][0])))
    assert image.size == (W, H) and lit(image).any()
    assert len(render(client, [pose_file(), pose_file()]).json()["images"]) == 2
    assert render(client, []).json()["info"] != "Success"
    invalid = render(client, [{"foo": 10, "bar": 100}])
    assert invalid.status_code == 422 and "info" not in invalid.json() and "images" not in invalid.json()
    animals = render(client, [{"version": "ap10k", "animals": [triples(BODY[:17])], "canvas_width": W,
                               "canvas_height": H}]).json()
    assert animals["info"] == "Success" and len(animals["images"]) == 1
    bad = render(client, [{"people": [{"pose_keypoints_2d": [1, 2]}], "canvas_width": W, "canvas_height": H}])
    assert bad.status_code == 422 and "triples" in bad.text
    huge = render(client, [{"people": [], "canvas_width": 95393448, "canvas_height": 52582}])
    assert huge.status_code == 422   # the canvas is bounded like a picture
    wild = render(client, [{"animals": [[0.2, 1.5e125, 1.0, 64.0, -1e308, 1.0, 1e308, 5.0, 1.0]], "canvas_width": 64,
                            "canvas_height": 48}]).json()
    assert wild["info"] == "Success"   # points at absurd places are left out, not a server error


# --------------------------------------------------------------------------- /detect's "poses"


class FakeOpenpose:
    """Stands in for controlnet-aux's OpenposeDetector (whose real weights are 200 MB): one person
    whose points are fixed fractions of the image it is given."""

    def __init__(self):
        self.calls = []

    def detect_poses(self, arr, include_hand=False, include_face=False):
        from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult

        self.calls.append((arr.shape, include_hand, include_face))
        body = [Keypoint(x / W, y / H) for x, y in BODY]
        return [PoseResult(BodyResult(body, 1.0, len(body)), None, None, None)]

    def __call__(self, arr, detect_resolution=512, image_resolution=512, include_body=True, include_hand=False,
                 include_face=False, output_type="np", **kwargs):
        from controlnet_aux.open_pose import draw_poses

        h, w = arr.shape[:2]
        return draw_poses(self.detect_poses(arr, include_hand, include_face), h, w, include_body, include_hand,
                          include_face)


def fake_registry(tmp_path):
    from studio.controlnet.preprocessors import PreprocessorRegistry

    registry = PreprocessorRegistry.with_builtins(tmp_path)
    fake = FakeOpenpose()
    registry._models["openpose"] = fake   # the cache the weighted modules look in before loading files
    return registry, fake


def test_openpose_detection_fills_the_pose_sink_in_map_pixels(tmp_path):
    registry, fake = fake_registry(tmp_path)
    image = Image.new("RGB", (300, 200), (90, 90, 90))
    sink: list = []
    detected = registry.run("openpose_full", image, resolution=200, pose_sink=sink)
    assert fake.calls[-1][1:] == (True, True)
    assert len(sink) == 1 and (sink[0]["canvas_width"], sink[0]["canvas_height"]) == detected.size == (300, 200)
    person = sink[0]["people"][0]
    # the detector saw the image padded to 320x256 (multiples of 64): its fractions are of that size
    xs, ys = person["pose_keypoints_2d"][0::3], person["pose_keypoints_2d"][1::3]
    assert xs[0] == pytest.approx(BODY[0][0] / W * 320) and ys[0] == pytest.approx(BODY[0][1] / H * 256)
    # what the sink says, drawn again, is the map the module returned
    redrawn = np.asarray(render_pose_json(sink[0]), dtype=np.int16)
    assert np.abs(redrawn - np.asarray(detected, dtype=np.int16)).mean() < 2
    assert registry.run("openpose", image, resolution=200) is not None and len(sink) == 1   # no sink: nothing


def test_detect_answers_poses_for_openpose_modules_only(tmp_path):
    from studio.api.routes import install_api
    from studio.config import Flags
    from studio.core import Studio
    from tests.helpers import make_models_dir, png_b64

    make_models_dir(tmp_path)
    studio = Studio.create(Flags(data_dir=str(tmp_path), no_half=True))
    try:
        fake = FakeOpenpose()
        studio.preprocessors._models["openpose"] = fake
        app = FastAPI()
        install_api(app, studio)
        client = TestClient(app)
        images = [png_b64(Image.new("RGB", (128, 128), (50, 50, 50))), png_b64(Image.new("RGB", (64, 64)))]
        answer = client.post("/controlnet/detect", json={"controlnet_module": "openpose",
                                                         "controlnet_input_images": images}).json()
        assert answer["info"] == "Success" and len(answer["images"]) == len(answer["poses"]) == 2
        assert [(p["canvas_width"], p["canvas_height"]) for p in answer["poses"]] == [(512, 512), (512, 512)]
        assert len(answer["poses"][0]["people"][0]["pose_keypoints_2d"]) == 18 * 3
        canny = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                        "controlnet_input_images": images[:1]}).json()
        assert "poses" not in canny
        rendered = client.post("/controlnet/render_openpose_json", json=[answer["poses"][0]]).json()
        assert rendered["info"] == "Success"
    finally:
        studio.queue.shutdown()
