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
