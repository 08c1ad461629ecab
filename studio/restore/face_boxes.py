"""Finding faces with the Haar cascade OpenCV ships (``cv2.data``): no download, no pickled code.

It is a 2001-era detector: frontal faces only, and a handful of false hits on busy textures, which
is why callers get a score (the number of overlapping detections) and a minimum size to filter on.
Face restoration and the detailer share it; better detectors (YOLO files) are the detailer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

CASCADES = {"face": "haarcascade_frontalface_default.xml", "person": "haarcascade_fullbody.xml"}


class CascadeMissingError(RuntimeError):
    """The installed OpenCV has no bundled cascades (opencv 5 dropped them)."""


@dataclass(frozen=True)
class Box:
    """A detection in pixels, ``x1``/``y1`` exclusive; ``score`` = neighbouring detections (higher = surer)."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 1.0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height


@lru_cache(maxsize=4)
def _cascade(kind: str) -> Any:
    # cached: a pure function of the bundled file (reading the XML takes ~50 ms)
    import cv2

    folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
    path = Path(folder) / CASCADES[kind]
    if not folder or not path.is_file() or not hasattr(cv2, "CascadeClassifier"):
        raise CascadeMissingError(f"OpenCV {cv2.__version__} has no bundled {CASCADES[kind]}; "
                                  "install opencv-python-headless<5")
    return cv2.CascadeClassifier(str(path))


def detect(image: Any, kind: str = "face", min_size: int = 24) -> list[Box]:
    """Boxes of ``kind`` ("face" or "person") in a PIL image, largest first. ``min_size``: the
    smallest side in pixels worth reporting (smaller hits are mostly noise)."""
    import cv2

    gray = np.asarray(image.convert("L"))
    if min(gray.shape) < min_size:
        return []
    gray = cv2.equalizeHist(gray)
    found, _levels, weights = _cascade(kind).detectMultiScale3(
        gray, scaleFactor=1.1, minNeighbors=4, minSize=(min_size, min_size), outputRejectLevels=True)
    boxes = [Box(int(x), int(y), int(x + w), int(y + h), float(s))
             for (x, y, w, h), s in zip(np.asarray(found).reshape(-1, 4), np.asarray(weights).reshape(-1))]
    return sorted(boxes, key=lambda b: b.area, reverse=True)
