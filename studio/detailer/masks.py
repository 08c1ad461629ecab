"""From detections to inpaint masks, the way ADetailer prepares them.

Order (ADetailer's ``pred_preprocessing`` + ``mask_preprocess``): drop boxes outside the area
ratio range, keep the k largest (or most confident), draw one mask per detection (the detector's
own mask, or its box), shift it, dilate (+) or erode (-) it with a square kernel, drop masks that
vanished, then merge (and invert) if asked. Masks are "L" images, 255 = inpaint.

One difference: ADetailer shifts with ``ImageChops.offset``, which wraps what leaves one edge round
to the opposite edge; here it falls off instead (a face near the top must not grow a mask strip at
the bottom).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from studio.restore.face_boxes import Box


@dataclass(frozen=True)
class Detection:
    """A detector's hit: a box (``score`` = confidence, 0-1) and optionally its own mask ("L",
    image size) — segmentation models give one; otherwise the box is the mask."""

    box: Box
    mask: Any = None  # PIL "L" image or None

    @property
    def confidence(self) -> float:
        return float(self.box.score)


def filter_by_ratio(detections: list[Detection], image_size: tuple[int, int], low: float,
                    high: float) -> list[Detection]:
    """Keep boxes whose area is between ``low`` and ``high`` of the image's (bounds included)."""
    area = image_size[0] * image_size[1]
    return [d for d in detections if low <= d.box.area / area <= high]


def filter_k(detections: list[Detection], k: int, by: str = "Area") -> list[Detection]:
    """The ``k`` largest ("Area") or most confident ("Confidence") detections, best first; k=0 = all,
    in the detector's order."""
    if k <= 0:
        return list(detections)
    if by == "Area":
        def key(d: Detection) -> float:
            return d.box.area
    elif by == "Confidence":
        def key(d: Detection) -> float:
            return d.confidence
    else:
        raise ValueError(f"unknown top-k method {by!r}")
    return sorted(detections, key=key, reverse=True)[:k]


def box_mask(box: Box, size: tuple[int, int]) -> Image.Image:
    """A white rectangle on black; the box's ``x1``/``y1`` are exclusive."""
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    arr[max(box.y0, 0):max(box.y1, 0), max(box.x0, 0):max(box.x1, 0)] = 255
    return Image.fromarray(arr)


def detection_mask(detection: Detection, size: tuple[int, int]) -> Image.Image:
    if detection.mask is None:
        return box_mask(detection.box, size)
    mask = detection.mask.convert("L")
    return mask if mask.size == size else mask.resize(size, Image.NEAREST)


def offset(mask: Image.Image, x: int, y: int) -> Image.Image:
    """Shift right by ``x`` and *up* by ``y`` (ADetailer's y axis points up); what leaves is lost."""
    if x == 0 and y == 0:
        return mask
    src = np.asarray(mask)
    out = np.zeros_like(src)
    h, w = src.shape
    dy = -y
    ys, yd = (slice(0, max(h - dy, 0)), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, max(h + dy, 0)))
    xs, xd = (slice(0, max(w - x, 0)), slice(x, w)) if x >= 0 else (slice(-x, w), slice(0, max(w + x, 0)))
    out[yd, xd] = src[ys, xs]
    return Image.fromarray(out)


def dilate_erode(mask: Image.Image, value: int) -> Image.Image:
    """Grow (value > 0) or shrink (value < 0) with a ``|value|``-square kernel, as ADetailer (cv2)."""
    if value == 0:
        return mask
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (abs(value), abs(value)))
    op = cv2.dilate if value > 0 else cv2.erode
    return Image.fromarray(op(np.asarray(mask), kernel, iterations=1))


def is_empty(mask: Image.Image) -> bool:
    return not np.asarray(mask).any()


def merge_invert(masks: list[Image.Image], mode: str) -> list[Image.Image]:
    """"None": as they are; "Merge": one mask, their union; "Merge and Invert": everything else."""
    if mode == "None" or not masks:
        return masks
    merged = np.maximum.reduce([np.asarray(m) for m in masks])
    if mode == "Merge":
        return [Image.fromarray(merged)]
    if mode == "Merge and Invert":
        return [Image.fromarray(255 - merged)]
    raise ValueError(f"unknown mask merge mode {mode!r}")


def build_masks(detections: list[Detection], size: tuple[int, int], *, dilate: int = 0, x_offset: int = 0,
                y_offset: int = 0, mode: str = "None") -> list[Image.Image]:
    """One mask per detection (or one merged mask), ready for the inpaint."""
    masks = [offset(detection_mask(d, size), x_offset, y_offset) for d in detections]
    if dilate:
        masks = [dilate_erode(m, dilate) for m in masks]
        masks = [m for m in masks if not is_empty(m)]
    return merge_invert(masks, mode)


def touching(masks: list[Image.Image], region: Image.Image) -> list[Image.Image]:
    """The masks that overlap ``region`` (img2img inpainting: ADetailer only details what lies in the
    user's mask when the whole picture is inpainted)."""
    if not masks:
        return []
    if region.size != masks[0].size:
        region = region.resize(masks[0].size, Image.LANCZOS)
    inside = np.asarray(region.convert("L")) > 0
    return [m for m in masks if (np.asarray(m)[inside] > 0).any()]
