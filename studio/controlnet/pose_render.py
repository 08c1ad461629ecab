"""OpenPose JSON to a pose map: the extension's ``/controlnet/render_openpose_json``.

Pose editors (sd-webui-openpose-editor, the extension's own, 3D posing tools) save poses in
OpenPose's JSON output format: per person ``pose_keypoints_2d`` (18 COCO body points as x, y,
confidence triples, in pixels of a ``canvas_width`` x ``canvas_height`` canvas), optional hands (21
points each) and face (70 points); animal poses (``animals``) are AP-10K's 17 points. A point whose
confidence is below 1 is absent, as the extension reads it.

People are drawn with controlnet-aux's OpenPose drawing (the colours and limb widths the OpenPose
ControlNets were trained on), which takes coordinates normalised to the canvas. controlnet-aux has
no animal drawing, so the AP-10K skeleton is drawn here with OpenCV: limbs as its dataset defines
them, each in its own hue, on black.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

# A pose file's canvas is drawn at its size: bounded like a generation's (a 16k x 16k canvas is 768 MB)
MAX_POSE_CANVAS = 8192
# Coordinates beyond this many canvases away are nonsense (or infinities): the point is left out
_FAR = 1e6

# AP-10K's skeleton (its dataset definition), 0-based point indices: eyes, nose, neck, tail root,
# then the four legs from shoulder/hip to paw.
AP10K_LIMBS = (
    (0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (3, 5), (5, 6), (6, 7), (3, 8), (8, 9), (9, 10),
    (4, 11), (11, 12), (12, 13), (4, 14), (14, 15), (15, 16),
)


def keypoints(values: Sequence[float] | None, width: int, height: int) -> list[Any] | None:
    """(x, y, confidence) triples -> controlnet-aux Keypoints normalised to the canvas (None where the
    confidence is under 1, as the extension treats them). Pixels as OpenPose writes them; a list whose
    coordinates all lie in [0, 1] is taken as already normalised (the extension's rule, since its own
    detector's JSON holds normalised values)."""
    from controlnet_aux.open_pose import Keypoint

    if not values:
        return None
    if len(values) % 3:
        raise ValueError(f"{len(values)} keypoint numbers are not (x, y, confidence) triples")
    triples = [(x, y, c if _sane(x, y) else 0.0) for x, y, c in
               (values[i:i + 3] for i in range(0, len(values), 3))]
    normalised = all(abs(x) <= 1 and abs(y) <= 1 for x, y, c in triples if c >= 1.0)
    sx, sy = (1.0, 1.0) if normalised else (float(width), float(height))
    return [Keypoint(x / sx, y / sy) if c >= 1.0 else None for x, y, c in triples]


def _sane(x: float, y: float) -> bool:
    return math.isfinite(x) and math.isfinite(y) and abs(x) < _FAR and abs(y) < _FAR


def _flat(points: Sequence[Any] | None, width: int, height: int) -> list[float] | None:
    if not points:
        return None
    return [v for k in points
            for v in ((float(k.x) * width, float(k.y) * height, 1.0) if k is not None else (0.0, 0.0, 0.0))]


def poses_to_json(poses: Sequence[Any], width: int, height: int) -> dict[str, Any]:
    """controlnet-aux PoseResults (normalised) as OpenPose's JSON output in pixels of a ``width`` x
    ``height`` canvas, what /controlnet/detect returns as ``poses`` and pose editors read."""
    return {
        "people": [{"pose_keypoints_2d": _flat(p.body.keypoints, width, height),
                    "face_keypoints_2d": _flat(p.face, width, height),
                    "hand_left_keypoints_2d": _flat(p.left_hand, width, height),
                    "hand_right_keypoints_2d": _flat(p.right_hand, width, height)} for p in poses],
        "animals": [],
        "canvas_height": height,
        "canvas_width": width,
    }


def render_people(people: Sequence[Mapping[str, Any]], width: int, height: int) -> np.ndarray:
    from controlnet_aux.open_pose import BodyResult, PoseResult, draw_poses

    poses = []
    for person in people:
        body = keypoints(person.get("pose_keypoints_2d"), width, height) or []
        poses.append(PoseResult(BodyResult(body + [None] * (18 - len(body)), 0.0, len(body)),
                                keypoints(person.get("hand_left_keypoints_2d"), width, height),
                                keypoints(person.get("hand_right_keypoints_2d"), width, height),
                                keypoints(person.get("face_keypoints_2d"), width, height)))
    return draw_poses(poses, height, width)


def render_animals(animals: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    import cv2

    canvas = np.zeros((height, width, 3), np.uint8)
    thickness = max(2, round(min(width, height) / 128))
    for animal in animals:
        if len(animal) % 3:
            raise ValueError(f"{len(animal)} animal keypoint numbers are not (x, y, confidence) triples")
        points = [(round(animal[i]), round(animal[i + 1]))
                  if animal[i + 2] >= 1.0 and _sane(animal[i], animal[i + 1]) else None
                  for i in range(0, len(animal), 3)]
        for n, (a, b) in enumerate(AP10K_LIMBS):
            if max(a, b) >= len(points) or points[a] is None or points[b] is None:
                continue
            hue = round(180 * n / len(AP10K_LIMBS))
            color = cv2.cvtColor(np.uint8([[[hue, 255, 255]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
            cv2.line(canvas, points[a], points[b], color, thickness, cv2.LINE_AA)
        for point in points:
            if point is not None:
                cv2.circle(canvas, point, thickness + 1, (255, 255, 255), -1, cv2.LINE_AA)
    return canvas


def render_pose_json(pose: Mapping[str, Any]) -> Image.Image:
    """One pose file as the extension renders it: people, else animals, on a black canvas of the
    file's size."""
    width, height = int(pose["canvas_width"]), int(pose["canvas_height"])
    if not (0 < width <= MAX_POSE_CANVAS and 0 < height <= MAX_POSE_CANVAS):
        raise ValueError(f"canvas {width}x{height} must be 1 to {MAX_POSE_CANVAS} pixels each way")
    people = pose.get("people") or []
    if people:
        return Image.fromarray(render_people(people, width, height))
    return Image.fromarray(render_animals(pose.get("animals") or [], width, height))
