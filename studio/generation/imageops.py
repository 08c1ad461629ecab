"""Input images and masks for img2img, inpainting and every route that reads a picture: decoding with a
size limit checked before any pixel is decoded, and normalisation to what the pixel steps expect (8-bit RGB
images, "L" masks of the image's size), behaving like A1111's.

The pixel steps themselves (resize modes, mask blur, crops, masked-content fill, overlay, colour
correction) are in :mod:`studio.generation.img2img_pixels`; this module stays light (PIL and numpy only)
because the request schema imports it.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

# The largest picture any route decodes. Generation is at most 2048x2048 and Extras enlarges its inputs, so
# 64 MP (8192x8192, ~200 MB as RGB before any working copy) leaves room for big sources while a
# decompression bomb (a ~100 KB PNG declaring 30000x30000) is refused from its header. A longer side is
# allowed so that panoramas within the area still load. Pillow's own refusal starts far higher (179 MP).
MAX_SIDE = 16384
MAX_PIXELS = 8192 * 8192

# A1111's `img2img_background_color` default.
DEFAULT_BACKGROUND = (255, 255, 255)

NOTE_MASK_EMPTY = "mask is empty: nothing to inpaint, the image is returned as it is"
NOTE_MASK_FULL = "mask covers the whole image"


class ImageInputError(ValueError):
    """An input image or mask that cannot be used, with a message meant for the user."""


class ImageTooLargeError(ImageInputError):
    """An image whose declared size is over the limit; raised before its pixels are decoded."""


# --------------------------------------------------------------------------------------------------------
# Decoding with a size limit


def _amount(pixels: int) -> str:
    if pixels < 1_000_000:
        return f"{pixels} pixels"
    return f"{pixels / 1e6:.1f}".removesuffix(".0") + " MP"


def check_size(
    size: tuple[int, int], what: str = "image", *, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS
) -> None:
    """Refuse an empty size, or one over the limits, with a message that names it."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what} is empty ({w}x{h})")
    if w > max_side or h > max_side or w * h > max_pixels:
        side = math.isqrt(max_pixels)
        square = f" ({side}x{side})" if side * side == max_pixels else ""
        raise ImageTooLargeError(
            f"{what} is too large: {w}x{h} ({_amount(w * h)}); the limit is {_amount(max_pixels)}{square} "
            f"and {max_side} pixels on a side"
        )


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """The size in the header of a file Pillow refused as a decompression bomb.

    Pillow's refusal names only the pixel count, so the file is identified again the way ``Image.open``
    does it (the registered format plugins in order, each checking the file's first bytes), minus that
    refusal. A plugin parses the header only; nothing is decoded.
    """
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        verdict = accept(prefix) if accept else True
        if not verdict or isinstance(verdict, str):
            continue
        try:
            with factory(io.BytesIO(data), "") as img:
                return img.size
        except (SyntaxError, IndexError, TypeError, struct.error, OSError, ValueError, EOFError):
            continue
    return None


def open_unloaded(
    data: bytes | bytearray, what: str = "image", *, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """The image in ``data``, identified and its header read but no pixel decoded yet.

    Raises :class:`ImageTooLargeError` when the header declares a size over the limits (Pillow's own
    decompression-bomb refusal included) and :class:`ImageInputError` when ``data`` is not an image.
    """
    try:
        img = Image.open(io.BytesIO(bytes(data)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # the warning arrives here only where warnings are turned into errors
        size = _declared_size(bytes(data))
        if size is not None:
            check_size(size, what, max_side=max_side, max_pixels=max_pixels)
        raise ImageTooLargeError(f"{what} is too large ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageInputError(f"{what} is not a readable image ({e})") from e
    check_size(img.size, what, max_side=max_side, max_pixels=max_pixels)
    return img


# --------------------------------------------------------------------------------------------------------
# Normalisation


def _open(img: Image.Image | bytes | bytearray, what: str, max_side: int, max_pixels: int) -> Image.Image:
    if isinstance(img, (bytes, bytearray)):
        return open_unloaded(img, what, max_side=max_side, max_pixels=max_pixels)
    if not isinstance(img, Image.Image):
        raise ImageInputError(f"{what} must be an image, got {type(img).__name__}")
    # An image handed in by the UI, or opened lazily: its size is known before its pixels are.
    check_size(img.size, what, max_side=max_side, max_pixels=max_pixels)
    return img


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit and float single-channel images to 8 bits; Pillow's convert("L") clips instead."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        # Float images are conventionally 0..1; anything brighter is taken as already 0..255.
        scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        a = np.nan_to_num(a) * scale
    else:
        # Pillow decodes 16-bit PNG/TIFF greyscale as I;16* or as I holding 0..65535.
        a = a.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def _to_rgba(img: Image.Image) -> Image.Image:
    # P/L/RGB with a tRNS colour key go through RGBA so the key becomes real transparency.
    return img if img.mode == "RGBA" else img.convert("RGBA")


def _background_rgb(background: str | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(background, str):
        try:
            rgb = ImageColor.getrgb(background)
        except ValueError as e:
            raise ImageInputError(f"background colour {background!r} is not a colour") from e
        return rgb[0], rgb[1], rgb[2]
    r, g, b = (int(c) for c in tuple(background)[:3])
    return r, g, b


def normalize_image(
    img: Image.Image | bytes,
    *,
    background: str | Sequence[int] = DEFAULT_BACKGROUND,
    max_side: int = MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Any decodable input image as 8-bit RGB, upright, with transparency flattened onto ``background``."""
    img = _open(img, "image", max_side, max_pixels)
    try:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            return _high_depth_to_l(img).convert("RGB")
        if _has_alpha(img):
            rgba = _to_rgba(img)
            base = Image.new("RGBA", rgba.size, (*_background_rgb(background), 255))
            return Image.alpha_composite(base, rgba).convert("RGB")
        return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except (OSError, SyntaxError) as e:
        # Truncated or corrupt data only surfaces when the pixels are decoded.
        raise ImageInputError(f"image could not be decoded ({e})") from e


def _binarize(a: np.ndarray) -> np.ndarray:
    # Same cut as A1111's rounded alpha masks: strictly above half is painted.
    return np.where(a > 128, 255, 0).astype(np.uint8)


def normalize_mask(
    mask: Image.Image | bytes,
    size: tuple[int, int],
    *,
    round_alpha: bool = True,
    max_side: int = MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> tuple[Image.Image, list[str]]:
    """An inpainting mask as mode "L" of exactly ``size``, white = inpaint; plus notes for the user.

    A mask with a partly transparent alpha channel (the editor's painted strokes on a transparent layer)
    is read from its alpha, thresholded when ``round_alpha`` (A1111's ``mask_round``); any other mask is
    read as luminance and kept soft, as A1111 does.
    """
    mask = _open(mask, "mask", max_side, max_pixels)
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ImageInputError(f"image size {width}x{height} is not valid for a mask")
    notes: list[str] = []
    try:
        mask = ImageOps.exif_transpose(mask)
        if mask.mode in ("I", "F") or mask.mode.startswith("I;16"):
            m = _high_depth_to_l(mask)
        elif _has_alpha(mask) and _to_rgba(mask).getextrema()[3] != (255, 255):
            alpha = np.asarray(_to_rgba(mask).getchannel("A"))
            m = Image.fromarray(_binarize(alpha) if round_alpha else alpha.copy(), "L")
        else:
            m = mask.convert("L")
    except (OSError, SyntaxError) as e:
        raise ImageInputError(f"mask could not be decoded ({e})") from e

    if m.size != (width, height):
        a = np.asarray(m)
        was_binary = bool(np.isin(a, (0, 255)).all())
        resized = np.asarray(m.resize((width, height), Image.Resampling.BILINEAR))
        # Bilinear then threshold gives cleaner edges than nearest; a soft mask stays soft.
        m = Image.fromarray(_binarize(resized) if was_binary else resized.copy(), "L")
        note = f"mask was {a.shape[1]}x{a.shape[0]}, resized to the image's {width}x{height}"
        if abs(a.shape[1] / a.shape[0] - width / height) > 0.01 * (width / height):
            note += " (stretched: its aspect ratio differs)"
        notes.append(note)

    lo, hi = m.getextrema()
    if hi == 0:
        notes.append(NOTE_MASK_EMPTY)
    elif lo == 255:
        notes.append(NOTE_MASK_FULL)
    return m, notes


def invert_mask(mask: Image.Image) -> Image.Image:
    """For "Inpaint not masked"."""
    return ImageOps.invert(mask if mask.mode == "L" else mask.convert("L"))
