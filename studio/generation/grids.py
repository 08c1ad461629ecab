"""A1111's image grid (``modules/images.py image_grid``): a batch's images tiled into one picture.

Rows come from the ``n_rows`` option: a positive number is used as is, 0 means one row per
image of a batch (``batch_size``), -1 (the default) picks ``round(sqrt(count))`` rows, or with
``grid_prevent_empty_spots`` the largest row count up to ``floor(sqrt(count))`` that divides the
count. Columns follow from the rows. Cells are as large as the largest image; smaller images
are centred in their cell on the ``grid_background_color``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageColor

DEFAULT_BACKGROUND = "#ffffff"


def grid_rows(count: int, batch_size: int = 1, n_rows: int = -1, prevent_empty_spots: bool = False) -> int:
    """How many rows A1111 gives a grid of ``count`` images (never more rows than images)."""
    if count < 1:
        raise ValueError("a grid needs at least one image")
    if n_rows > 0:
        rows = n_rows
    elif n_rows == 0:
        rows = batch_size
    elif prevent_empty_spots:
        rows = math.floor(math.sqrt(count))
        while count % rows:
            rows -= 1
    else:
        rows = round(math.sqrt(count))
    return max(1, min(rows, count))


def image_grid(images: Sequence[Image.Image], rows: int, background: str = DEFAULT_BACKGROUND) -> Image.Image:
    """Tile ``images`` row by row into ``rows`` rows (RGB)."""
    cols = math.ceil(len(images) / rows)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), color=_color(background))
    for i, image in enumerate(images):
        x = i % cols * cell_w + (cell_w - image.width) // 2
        y = i // cols * cell_h + (cell_h - image.height) // 2
        grid.paste(image.convert("RGB") if image.mode not in ("RGB", "L") else image, (x, y))
    return grid


def _color(value: str) -> tuple[int, ...]:
    try:
        return ImageColor.getcolor(value, "RGB")
    except (ValueError, TypeError, AttributeError):
        return ImageColor.getcolor(DEFAULT_BACKGROUND, "RGB")


@dataclass(frozen=True)
class GridLayout:
    """The grid options: ``n_rows``, ``grid_prevent_empty_spots``, ``grid_background_color``,
    ``grid_only_if_multiple`` (no grid for a single image)."""

    n_rows: int = -1
    prevent_empty_spots: bool = False
    background: str = DEFAULT_BACKGROUND
    only_if_multiple: bool = True

    @classmethod
    def from_options(cls, options: Any) -> GridLayout:
        """From A1111's option keys; a missing (None) option takes A1111's default."""
        try:
            n_rows = int(options.get("n_rows"))
        except (TypeError, ValueError):
            n_rows = cls.n_rows
        only_if_multiple = options.get("grid_only_if_multiple")
        return cls(n_rows, bool(options.get("grid_prevent_empty_spots")),
                   str(options.get("grid_background_color") or DEFAULT_BACKGROUND),
                   cls.only_if_multiple if only_if_multiple is None else bool(only_if_multiple))

    def wanted(self, count: int) -> bool:
        return count >= 2 or (count == 1 and not self.only_if_multiple)

    def make(self, images: Sequence[Image.Image], batch_size: int = 1) -> Image.Image:
        rows = grid_rows(len(images), batch_size, self.n_rows, self.prevent_empty_spots)
        return image_grid(images, rows, self.background)
