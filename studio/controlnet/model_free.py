"""Weight-free preprocessors that are plain image operations, as sd-webui-controlnet defines them.

- ``recolor_luminance`` / ``recolor_intensity``: the grayscale map the Recolor ControlNets are
  conditioned on (they colour a black-and-white picture), from Lab lightness or HSV value, with the
  extension's "Gamma Correction" slider.
- ``color``: the T2I-Adapter colour grid (the extension's ``t2ia_color_grid``), the image reduced to
  one colour per 64x64 cell.

They are registered in studio.controlnet.preprocessors (``builtin_preprocessors``) with the extension's
names, sliders and ``model_free=False``: in the extension that flag means "works without a ControlNet
model", and these maps are only useful with one. This module imports nothing of the studio's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# The extension's colour grid has one cell per 64 pixels of the map.
COLOR_CELL = 64


def _gamma_gray(channel: np.ndarray, gamma: float) -> Image.Image:
    """A 0-255 channel raised to ``gamma`` (on 0-1) as a grayscale RGB image; truncated to
    integers as the extension does, so maps match its pixel values."""
    x = (channel.astype(np.float32) / 255.0) ** float(gamma)
    gray = (x * 255.0).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def recolor_luminance(image: Image.Image, resolution: int, slider_1: float = 1.0, slider_2: float | None = None,
                      **ctx: object) -> Image.Image:
    """Lab lightness (L scaled to 0-255) with gamma ``slider_1``.

    The extension converts its RGB array with OpenCV's BGR-to-Lab, so red and blue trade their
    weights in the lightness; kept, so a map here equals the extension's map for the same picture.
    """
    import cv2  # OpenCV loads on first use: start-up stays fast

    lab = cv2.cvtColor(np.ascontiguousarray(np.asarray(image)), cv2.COLOR_BGR2LAB)
    return _gamma_gray(lab[:, :, 0], slider_1)


def recolor_intensity(image: Image.Image, resolution: int, slider_1: float = 1.0, slider_2: float | None = None,
                      **ctx: object) -> Image.Image:
    """HSV value, i.e. the brightest of R, G and B per pixel, with gamma ``slider_1``."""
    return _gamma_gray(np.asarray(image).max(axis=2), slider_1)


def color_grid(image: Image.Image, resolution: int, slider_1: float | None = None, slider_2: float | None = None,
               **ctx: object) -> Image.Image:
    """One colour per 64x64 cell: bicubic down to 1/64 of the size, nearest-neighbour back up.

    Bicubic at that ratio reads the few pixels around each cell's centre (no averaging over the
    cell), and nearest-neighbour keeps the cells hard-edged: both as the extension, whose
    T2I-Adapter colour models were trained on such grids.
    """
    import cv2

    arr = np.asarray(image)
    h, w = arr.shape[:2]
    small = cv2.resize(arr, (max(1, w // COLOR_CELL), max(1, h // COLOR_CELL)), interpolation=cv2.INTER_CUBIC)
    return Image.fromarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))
