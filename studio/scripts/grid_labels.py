"""A1111's labelled grids (``modules/images.py``: ``GridAnnotation``, ``draw_grid_annotations``,
``draw_prompt_matrix``): text centred above each column and left of each row, cells spread apart by
a margin. The X/Y/Z plot and the prompt matrix draw their legends with these.

The geometry is A1111's: the font size is (cell width + cell height) // 25, a column label wraps at
the cell width (a line that still does not fit is drawn smaller), the row labels get a left strip
3/4 of a cell wide, and the top strip is as tall as the tallest column label plus a line spacing
above and below. A label that is off (``is_active`` false, the prompt matrix's parts left out) is
drawn grey and struck through. A1111 draws with Roboto; no font files ship with the studio, so the
text is Pillow's own scalable default font (same sizes and layout, different letter shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageColor, ImageDraw, ImageFont

Color = tuple[int, ...]


@dataclass(frozen=True)
class GridAnnotation:
    """One label line: its text and whether it is drawn as on (black) or off (grey, struck through)."""

    text: str = ""
    is_active: bool = True


def _color(value: Any, default: str) -> Color:
    try:
        return ImageColor.getcolor(str(value), "RGB") if value else ImageColor.getcolor(default, "RGB")
    except (ValueError, TypeError):
        return ImageColor.getcolor(default, "RGB")


@dataclass(frozen=True)
class GridStyle:
    """The colours A1111 reads from its options (``grid_background_color``, ``grid_text_active_color``,
    ``grid_text_inactive_color``)."""

    background: Color = (255, 255, 255)
    active: Color = (0, 0, 0)
    inactive: Color = (153, 153, 153)

    @classmethod
    def from_options(cls, option: Callable[[str], Any]) -> GridStyle:
        """From an option lookup (``ScriptEnv.option``); a missing or bad colour takes A1111's default."""
        return cls(_color(option("grid_background_color"), "#ffffff"),
                   _color(option("grid_text_active_color"), "#000000"),
                   _color(option("grid_text_inactive_color"), "#999999"))


@dataclass(frozen=True)
class _Line:
    text: str
    is_active: bool
    size: tuple[int, int]
    allowed_width: int


class _Fonts:
    """Pillow's default font at the sizes one drawing asks for (kept for that drawing only)."""

    def __init__(self) -> None:
        self._by_size: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}

    def get(self, size: int) -> Any:
        size = max(1, size)
        if size not in self._by_size:
            self._by_size[size] = ImageFont.load_default(size=size)
        return self._by_size[size]


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, line_length: int) -> list[str]:
    """Words onto lines no wider than ``line_length`` (a single long word keeps its own line)."""
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=font) <= line_length:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def _layout(texts: Sequence[Sequence[GridAnnotation]], allowed_width: int, draw: ImageDraw.ImageDraw,
            font: Any) -> list[list[_Line]]:
    laid_out = []
    for entry in texts:
        lines = []
        for annotation in entry:
            for text in _wrap(draw, annotation.text, font, allowed_width):
                lines.append(_Line(text, annotation.is_active, _text_size(draw, text, font), allowed_width))
        laid_out.append(lines)
    return laid_out


def draw_grid_annotations(im: Image.Image, width: int, height: int,
                          hor_texts: Sequence[Sequence[GridAnnotation]],
                          ver_texts: Sequence[Sequence[GridAnnotation]],
                          margin: int = 0, style: GridStyle | None = None) -> Image.Image:
    """``im`` (a grid of ``width`` x ``height`` cells) with a label strip above (one entry of
    ``hor_texts`` per column) and left of it (one of ``ver_texts`` per row), the cells ``margin``
    pixels apart. Strips whose texts are all empty take no room, so an unlabelled grid only gains
    the margins."""
    style = style or GridStyle()
    cols, rows = im.width // width, im.height // height
    if cols != len(hor_texts):
        raise ValueError(f"bad number of horizontal texts: {len(hor_texts)}; must be {cols}")
    if rows != len(ver_texts):
        raise ValueError(f"bad number of vertical texts: {len(ver_texts)}; must be {rows}")

    fonts = _Fonts()
    fontsize = (width + height) // 25
    line_spacing = fontsize // 2
    font = fonts.get(fontsize)
    has_ver = sum(len(a.text) for entry in ver_texts for a in entry) > 0
    pad_left = width * 3 // 4 if has_ver else 0

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1), "white"))
    hor = _layout(hor_texts, width, measure, font)
    ver = _layout(ver_texts, pad_left, measure, font)
    hor_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing for lines in hor]
    # A1111 subtracts a spacing per line here, so a row label's block is just its lines' heights
    ver_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing * len(lines) for lines in ver]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + line_spacing * 2

    result = Image.new("RGB", (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1)),
                       style.background)
    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))

    draw = ImageDraw.Draw(result)

    def draw_lines(x: float, y: float, lines: list[_Line]) -> None:
        for line in lines:
            size, line_font = fontsize, font
            # a line wider than its room is drawn smaller until it fits
            while _text_size(draw, line.text, line_font)[0] > line.allowed_width and size > 1:
                size -= 1
                line_font = fonts.get(size)
            colour = style.active if line.is_active else style.inactive
            draw.multiline_text((x, y + line.size[1] / 2), line.text, font=line_font, fill=colour, anchor="mm",
                                align="center")
            if not line.is_active:
                draw.line((x - line.size[0] // 2, y + line.size[1] // 2, x + line.size[0] // 2, y + line.size[1] // 2),
                          fill=style.inactive, width=4)
            y += line.size[1] + line_spacing

    for col in range(cols):
        draw_lines(pad_left + (width + margin) * col + width / 2, pad_top / 2 - hor_heights[col] / 2, hor[col])
    for row in range(rows):
        draw_lines(pad_left / 2, pad_top + (height + margin) * row + height / 2 - ver_heights[row] / 2, ver[row])
    return result


def draw_prompt_matrix(im: Image.Image, width: int, height: int, all_prompts: Sequence[str], margin: int = 0,
                       style: GridStyle | None = None) -> Image.Image:
    """The prompt matrix's legend: ``all_prompts[1:]`` are the optional parts; the first half label
    the columns, the rest the rows, each drawn on or off as the cell's bit pattern says."""
    parts = list(all_prompts[1:])
    boundary = math.ceil(len(parts) / 2)
    horizontal, vertical = parts[:boundary], parts[boundary:]
    hor_texts = [[GridAnnotation(x, is_active=pos & (1 << i) != 0) for i, x in enumerate(horizontal)]
                 for pos in range(1 << len(horizontal))]
    ver_texts = [[GridAnnotation(x, is_active=pos & (1 << i) != 0) for i, x in enumerate(vertical)]
                 for pos in range(1 << len(vertical))]
    return draw_grid_annotations(im, width, height, hor_texts, ver_texts, margin, style)
