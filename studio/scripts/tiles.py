"""A1111's tile grid (``modules/images.py`` ``split_grid`` / ``combine_grid``), used by SD upscale and
poor man's outpainting: an image cut into overlapping tiles of the generation size, each tile
worked on by itself, and the tiles laid back with their overlaps feathered.

The tile positions are A1111's: ``cols = ceil((w - overlap) / (tile_w - overlap))`` tiles spread
evenly from the left edge to the right one (positions truncated to whole pixels, the last tile
flush with the edge), rows likewise. Combining pastes each row's tiles left to right, the first
``overlap`` columns of a tile faded in over its left neighbour with a linear ramp, then each row
over the one above with the same ramp down its first ``overlap`` rows; so a grid whose tiles were
not changed combines back to the image it was cut from, pixel for pixel.

Also here, for the scripts that assemble pictures from their generations: :func:`append_params`
(the extra infotext keys a script adds, e.g. SD upscale's overlap and upscaler) and
:func:`sub_request` (one of a script's generations as a request).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from pydantic import ValidationError

from studio.errors import RequestError
from studio.generation.infotext import quote
from studio.generation.request import describe_validation_error

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest


@dataclass
class Tile:
    x: int
    width: int
    image: Image.Image


@dataclass
class TileRow:
    y: int
    height: int
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class TileGrid:
    """A1111's ``Grid`` namedtuple: the rows of tiles and the sizes they were cut with."""

    rows: list[TileRow]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int

    def images(self) -> list[Image.Image]:
        """The tiles row by row, left to right (the order A1111 processes them in)."""
        return [t.image for row in self.rows for t in row.tiles]

    def positions(self) -> list[tuple[int, int, int, int]]:
        """(x, y, width, height) of each tile, in :meth:`images` order."""
        return [(t.x, row.y, t.width, row.height) for row in self.rows for t in row.tiles]

    def with_images(self, images: Sequence[Image.Image]) -> TileGrid:
        """A copy with the tiles replaced in :meth:`images` order; tiles left without an image (an
        interrupted run) are black, as A1111 fills them."""
        it = iter(images)
        rows = []
        for row in self.rows:
            tiles = [Tile(t.x, t.width, next(it, None) or Image.new("RGB", (self.tile_w, self.tile_h)))
                     for t in row.tiles]
            rows.append(TileRow(row.y, row.height, tiles))
        return TileGrid(rows, self.tile_w, self.tile_h, self.image_w, self.image_h, self.overlap)


def _count(size: int, tile: int, overlap: int, axis: str) -> int:
    if size <= tile:
        # A1111's formula gives 1 here while size > overlap, and no tile at all (a black result)
        # otherwise: one tile always covers it.
        return 1
    if tile <= overlap:
        raise ValueError(f"the tile {axis} ({tile}) must be larger than the overlap ({overlap})")
    return math.ceil((size - overlap) / (tile - overlap))


def split_grid(image: Image.Image, tile_w: int = 512, tile_h: int = 512, overlap: int = 64) -> TileGrid:
    """``image`` cut into overlapping ``tile_w`` x ``tile_h`` tiles (A1111's ``split_grid``). A tile
    larger than the image sits at a negative offset, padded with black, as in A1111.
    ValueError when a tile is not larger than the overlap (A1111 divides by zero there)."""
    if tile_w < 1 or tile_h < 1 or overlap < 0:
        raise ValueError(f"bad tile size {tile_w}x{tile_h} or overlap {overlap}")
    w, h = image.size
    cols = _count(w, tile_w, overlap, "width")
    rows = _count(h, tile_h, overlap, "height")
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = TileGrid([], tile_w, tile_h, w, h, overlap)
    for r in range(rows):
        y = int(r * dy)
        if y + tile_h >= h:
            y = h - tile_h
        row = TileRow(y, tile_h)
        for c in range(cols):
            x = int(c * dx)
            if x + tile_w >= w:
                x = w - tile_w
            row.tiles.append(Tile(x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.rows.append(row)
    return grid


def _ramp(length: int, across: int, horizontal: bool) -> Image.Image:
    # A1111's feather: 0, 255/n, 2*255/n ... truncated to 8 bits, along the overlap
    ramp = (np.arange(length, dtype=np.float32) * 255 / length).astype(np.uint8)
    a = np.repeat(ramp[None, :], across, axis=0) if horizontal else np.repeat(ramp[:, None], across, axis=1)
    return Image.fromarray(np.ascontiguousarray(a), "L")


def combine_grid(grid: TileGrid) -> Image.Image:
    """The tiles laid back into one image of the original size (A1111's ``combine_grid``)."""
    ov = grid.overlap
    out = Image.new("RGB", (grid.image_w, grid.image_h))
    mask_w = _ramp(ov, grid.tile_h, horizontal=True) if ov else None
    mask_h = _ramp(ov, grid.image_w, horizontal=False) if ov else None
    for row in grid.rows:
        line = Image.new("RGB", (grid.image_w, row.height))
        for t in row.tiles:
            tile = t.image.convert("RGB")
            if t.x == 0 or mask_w is None:
                line.paste(tile, (t.x, 0))
                continue
            line.paste(tile.crop((0, 0, ov, row.height)), (t.x, 0), mask=mask_w)
            line.paste(tile.crop((ov, 0, t.width, row.height)), (t.x + ov, 0))
        if row.y == 0 or mask_h is None:
            out.paste(line, (0, row.y))
            continue
        out.paste(line.crop((0, 0, line.width, ov)), (0, row.y), mask=mask_h)
        out.paste(line.crop((0, ov, line.width, row.height)), (0, row.y + ov))
    return out


def append_params(infotext: str, params: Mapping[str, Any]) -> str:
    """``infotext`` with ``params`` added to the end of its parameter line (A1111's
    ``extra_generation_params`` of a script), values quoted where they need it."""
    extra = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    if not extra:
        return infotext
    return f"{infotext}, {extra}" if infotext else extra


def sub_request(req: Txt2ImgRequest, script: str, **changes: Any) -> Txt2ImgRequest:
    """``req`` with ``changes`` for one of a script's generations, without the script itself and
    validated again; a value the schema refuses (a size past the limit) is a RequestError that
    names the script."""
    try:
        return req.with_changes(**changes, script_name=None, script_args=[])
    except ValidationError as e:
        raise RequestError(f"{script}: {describe_validation_error(e)}") from None
