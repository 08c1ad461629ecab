"""Pure PIL/numpy image operations behind img2img and inpainting, behaving like A1111's.

Nothing here touches torch or a model: input images and masks are normalised, resized with A1111's four
resize modes, masks are blurred, cropped for "Only masked" and the generated result is composited back
over the original.

Boxes are PIL boxes ``(left, top, right, bottom)`` with ``right``/``bottom`` exclusive.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

# 64 MP (8192x8192) keeps a decoded image and its float working copies well inside memory, and SD works at
# a small fraction of that anyway; a longer side is allowed so that panoramas within the area still load.
MAX_SIDE = 16384
MAX_PIXELS = 8192 * 8192

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")

# A1111's `img2img_background_color` default.
DEFAULT_BACKGROUND = (255, 255, 255)

NOTE_MASK_EMPTY = "mask is empty: nothing to inpaint, the image is returned as it is"
NOTE_MASK_FULL = "mask covers the whole image"

# Masked-content "fill": (blur sigma, times the layer is laid on), wide to narrow, so distant colours give
# a base that nearer colours progressively override.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2))

Box = tuple[int, int, int, int]


class ImageInputError(ValueError):
    """An input image or mask that cannot be used, with a message meant for the user."""


# --------------------------------------------------------------------------------------------------------
# Normalisation


def _open(img: Image.Image | bytes | bytearray, what: str) -> Image.Image:
    if isinstance(img, (bytes, bytearray)):
        try:
            # The size check below gives a clearer message than Pillow's bomb warning.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(io.BytesIO(img))
        except Image.DecompressionBombError as e:
            raise ImageInputError(f"{what} is too large: {e}") from e
        except (UnidentifiedImageError, OSError) as e:
            raise ImageInputError(f"{what} is not a readable image ({e})") from e
    if not isinstance(img, Image.Image):
        raise ImageInputError(f"{what} must be an image, got {type(img).__name__}")
    return img


def _check_size(img: Image.Image, what: str, max_side: int, max_pixels: int) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what} is empty ({w}x{h})")
    if w > max_side or h > max_side or w * h > max_pixels:
        raise ImageInputError(
            f"{what} is too large: {w}x{h} ({w * h / 1e6:.1f} MP); the limit is {max_side} pixels "
            f"on a side and {max_pixels / 1e6:.1f} MP in all"
        )


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
    img = _open(img, "image")
    _check_size(img, "image", max_side, max_pixels)
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
    mask = _open(mask, "mask")
    _check_size(mask, "mask", max_side, max_pixels)
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


# --------------------------------------------------------------------------------------------------------
# Resizing


def _check_target(width: int, height: int) -> None:
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")


def _resizable(img: Image.Image) -> Image.Image:
    # LANCZOS needs a continuous-tone mode; palette/bilevel/16-bit inputs would otherwise be resampled
    # nearest or refused.
    if img.mode in ("RGB", "RGBA", "L", "LA"):
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_depth_to_l(img)
    return img.convert("RGBA" if _has_alpha(img) else "RGB")


def resize_image(mode: int, img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize with A1111's resize modes; the result is always exactly ``width`` x ``height``.

    0 "Just resize" stretches; 1 "Crop and resize" scales to cover and crops the centre; 2 "Resize and
    fill" scales to fit and fills the empty bands by stretching the image's edge rows/columns outward;
    3 "Just resize (latent upscale)" is 0 at the pixel level (the latent upscale happens elsewhere).
    The input mode is kept when it is L, LA, RGB or RGBA, so masks can go through the same path.
    """
    _check_target(width, height)
    width, height = int(width), int(height)
    img = _resizable(img)
    w, h = img.size
    lanczos = Image.Resampling.LANCZOS
    if mode in (0, 3):
        return img.resize((width, height), lanczos)
    if mode == 1:
        # Resample straight from the centred source window of the target aspect: no rounding of an
        # intermediate size, so the centre stays exactly in the centre.
        if width * h > height * w:
            crop_h = w * height / width
            top = (h - crop_h) / 2
            box = (0.0, top, float(w), top + crop_h)
        else:
            crop_w = h * width / height
            left = (w - crop_w) / 2
            box = (left, 0.0, left + crop_w, float(h))
        return img.resize((width, height), lanczos, box=box)
    if mode == 2:
        return _resize_and_fill(img, width, height)
    raise ValueError(f"resize mode must be 0-3 ({', '.join(RESIZE_MODES)}), got {mode!r}")


def _resize_and_fill(img: Image.Image, width: int, height: int) -> Image.Image:
    w, h = img.size
    if width * h > height * w:
        # Target is wider: fit the height, bands left and right.
        inner = (min(width, max(1, round(w * height / h))), height)
    else:
        inner = (width, min(height, max(1, round(h * width / w))))
    fitted = np.asarray(img.resize(inner, Image.Resampling.LANCZOS))
    if inner[0] < width:
        left = (width - inner[0]) // 2
        right = width - inner[0] - left
        out = np.concatenate(
            [np.repeat(fitted[:, :1], left, axis=1), fitted, np.repeat(fitted[:, -1:], right, axis=1)], axis=1
        )
    elif inner[1] < height:
        top = (height - inner[1]) // 2
        bottom = height - inner[1] - top
        out = np.concatenate(
            [np.repeat(fitted[:1], top, axis=0), fitted, np.repeat(fitted[-1:], bottom, axis=0)], axis=0
        )
    else:
        out = fitted
    return Image.fromarray(np.ascontiguousarray(out), img.mode)


# --------------------------------------------------------------------------------------------------------
# Mask blur


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel A1111's mask blur uses: size 2*int(2.5*sigma+0.5)+1, normalised to sum 1."""
    radius = int(2.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def _convolve_axis(a: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric-kernel convolution along ``axis`` with mirrored borders that do not repeat the edge
    pixel (OpenCV's default BORDER_REFLECT_101, which A1111's cv2 blur uses)."""
    r = len(kernel) // 2
    n = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    # numpy's "reflect" is reflect-101 and keeps mirroring when the kernel is wider than the image.
    p = np.pad(a, pad, mode="reflect") if n > 1 else np.pad(a, pad, mode="edge")
    p = np.moveaxis(p, axis, -1)
    # FFT rather than a tap loop: as fast at the default blur and far faster at the 321 taps of blur 64.
    size = p.shape[-1] + len(kernel) - 1
    full = np.fft.irfft(np.fft.rfft(p, size, axis=-1) * np.fft.rfft(kernel, size), size, axis=-1)
    out = full[..., len(kernel) - 1 : len(kernel) - 1 + n]
    return np.moveaxis(out, -1, axis)


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's mask blur: a horizontal Gaussian of sigma ``blur_x``, then a vertical one of ``blur_y``,
    each rounded back to 8 bits as A1111's two separate cv2 passes are. 0 leaves that axis alone."""
    if blur_x < 0 or blur_y < 0:
        raise ValueError(f"mask blur must be >= 0, got {blur_x}x{blur_y}")
    a = np.asarray(mask if mask.mode == "L" else mask.convert("L"))
    for sigma, axis in ((blur_x, 1), (blur_y, 0)):
        if sigma > 0:
            a = np.clip(
                np.floor(_convolve_axis(a.astype(np.float64), gaussian_kernel(sigma), axis) + 0.5), 0, 255
            ).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a), "L")


# --------------------------------------------------------------------------------------------------------
# "Only masked" crop


def crop_region(mask: Image.Image, padding: int) -> Box:
    """Bounding box of the mask's non-zero pixels grown by ``padding`` on every side and clamped to the
    image; the whole image when the mask is empty."""
    m = mask if mask.mode == "L" else mask.convert("L")
    w, h = m.size
    box = m.getbbox()
    if box is None:
        return 0, 0, w, h
    pad = max(0, int(padding))
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def _grow_span(lo: int, hi: int, length: int, limit: int) -> tuple[int, int]:
    extra = length - (hi - lo)
    lo -= extra // 2
    hi += extra - extra // 2
    # Slide back inside rather than clip, so the span keeps its length where the image allows.
    if hi > limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def expand_to_aspect(box: Box, width: int, height: int, image_w: int, image_h: int) -> Box:
    """Grow ``box`` (never shrink it) to the aspect ratio of ``width`` x ``height``, centred on the box and
    shifted to stay inside the image; when the image is too small in that direction the box takes the
    image's full extent there and the ratio is only approached."""
    _check_target(width, height)
    x1, y1, x2, y2 = (int(v) for v in box)
    bw, bh = x2 - x1, y2 - y1
    if bw <= 0 or bh <= 0:
        raise ValueError(f"box {box} is empty")
    target = width / height
    if bw / bh > target:
        want = min(max(bh, round(bw / target)), image_h)
        y1, y2 = _grow_span(y1, y2, want, image_h)
    else:
        want = min(max(bw, round(bh * target)), image_w)
        x1, x2 = _grow_span(x1, x2, want, image_w)
    return x1, y1, x2, y2


def extract_crop(img: Image.Image, box: Box, width: int, height: int) -> Image.Image:
    """The "Only masked" working image: ``box`` cut out and brought to the generation size with "Resize
    and fill", as A1111 does, so a box that could not reach the target ratio is padded, not distorted."""
    return resize_image(2, img.crop(tuple(box)), width, height)


def paste_crop(original: Image.Image, generated_crop: Image.Image, box: Box) -> Image.Image:
    """Put a generated "Only masked" crop back into a copy of ``original`` at ``box``.

    The crop is brought to the box size with "Crop and resize", which is the inverse of the "Resize and
    fill" that made it (``extract_crop``): it trims the filled bands again; when the box has the
    generation's ratio it is a plain LANCZOS resize.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {box} is empty")
    out = original.convert("RGB") if original.mode != "RGB" else original.copy()
    piece = resize_image(1, generated_crop, x2 - x1, y2 - y1)
    out.paste(piece.convert("RGB") if piece.mode != "RGB" else piece, (x1, y1))
    return out


# --------------------------------------------------------------------------------------------------------
# Masked content and compositing


def _same_size(what: str, a: Image.Image, b: Image.Image) -> None:
    if a.size != b.size:
        raise ImageInputError(f"{what} sizes differ: {a.size[0]}x{a.size[1]} and {b.size[0]}x{b.size[1]}")


def _box_blur_axis(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Mean over a window of 2r+1 along ``axis``, edges extended; O(n) whatever the radius."""
    n = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis)
    hi = [slice(None)] * a.ndim
    lo = [slice(None)] * a.ndim
    hi[axis] = slice(2 * r + 1, 2 * r + 1 + n)
    lo[axis] = slice(0, n)
    return (c[tuple(hi)] - c[tuple(lo)]) * (1.0 / (2 * r + 1))


def _resize_channels(a: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    # Pillow resamples float32 ("F") planes, so the fill keeps its precision through the reduction.
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(a[..., c], dtype=np.float32), "F").resize(size, resample)
        )
        for c in range(a.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def _soft_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Approximate Gaussian of an (h, w, c) float array: three box passes (a close fit at any radius, O(n)),
    run on a copy reduced by up to sigma/2 and scaled back bilinearly; the result is smooth at that scale,
    and without the reduction the wide fill radii cost seconds on a 1024x1024 image."""
    h, w = a.shape[:2]
    f = max(1, int(sigma // 2))
    small = (max(1, -(-w // f)), max(1, -(-h // f)))
    if f > 1:
        a = _resize_channels(a, small, Image.Resampling.BOX)
    s = sigma * small[0] / w
    r = max(1, round((math.sqrt(4 * s * s + 1) - 1) / 2))
    for _ in range(3):
        for axis in (0, 1):
            a = _box_blur_axis(a, r, axis)
    if f > 1:
        a = _resize_channels(a, (w, h), Image.Resampling.BILINEAR)
    return a


def fill_masked(img: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": the masked area painted with colours spread in from the unmasked
    surroundings, leaving fully unmasked pixels exactly as they were.

    Like A1111, the unmasked colours (weighted by how unmasked each pixel is) are blurred at decreasing
    radii and layered over one another, so far-away colours give a base and nearby colours win close to
    the edge of the hole. A mask that covers everything leaves nothing to spread; the image's mean colour
    is used then.
    """
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    m = mask if mask.mode == "L" else mask.convert("L")
    _same_size("image and mask", rgb, m)
    bbox = m.getbbox()
    if bbox is None:
        return rgb.copy()
    src = np.asarray(rgb).astype(np.float32)
    known = 1.0 - np.asarray(m).astype(np.float32) / 255.0
    if known.sum() <= 0:
        mean = src.reshape(-1, 3).mean(axis=0)
        return Image.fromarray(np.broadcast_to(np.rint(mean), src.shape).astype(np.uint8), "RGB")

    h, w = known.shape
    x1, y1, x2, y2 = bbox
    # Colour premultiplied by how known it is, with the weight as a fourth channel: one blur gives both the
    # weighted colour sum and the weight that normalises it.
    layers = np.concatenate([src * known[..., None], known[..., None]], axis=-1)
    # Start from the mean known colour so pixels no blur reaches (huge images) still get a sensible one.
    out = np.broadcast_to(layers[..., :3].sum(axis=(0, 1)) / known.sum(), (y2 - y1, x2 - x1, 3)).copy()
    for sigma, repeats in _FILL_PASSES:
        # Only the masked box changes; a blur needs its neighbours out to ~4 sigma, not the whole image.
        margin = 4 * sigma + 4
        cx1, cy1, cx2, cy2 = (
            max(0, x1 - margin),
            max(0, y1 - margin),
            min(w, x2 + margin),
            min(h, y2 + margin),
        )
        blurred = _soft_blur(layers[cy1:cy2, cx1:cx2], sigma)[y1 - cy1 : y2 - cy1, x1 - cx1 : x2 - cx1]
        weight = blurred[..., 3:]
        colour = blurred[..., :3] / np.maximum(weight, 1e-12)
        # Laying the same layer on n times is one layer of opacity 1-(1-a)^n.
        alpha = 1.0 - (1.0 - np.clip(weight, 0.0, 1.0)) ** repeats
        out = colour * alpha + out * (1.0 - alpha)
    # The last layer is the image itself over the known pixels, so they come back unchanged.
    k = known[y1:y2, x1:x2, None]
    out = src[y1:y2, x1:x2] * k + out * (1.0 - k)
    filled = np.asarray(rgb).copy()
    region = filled[y1:y2, x1:x2]
    exact = k[..., 0] >= 1.0
    region[~exact] = np.clip(np.rint(out[~exact]), 0, 255).astype(np.uint8)
    return Image.fromarray(filled, "RGB")


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """``generated`` over ``original`` weighted by ``mask`` (white = generated): per pixel
    out = generated·m + original·(1−m), so a 0/255 mask keeps the original exactly outside it."""
    o = original.convert("RGB") if original.mode != "RGB" else original
    g = generated.convert("RGB") if generated.mode != "RGB" else generated
    m = mask if mask.mode == "L" else mask.convert("L")
    _same_size("original and generated image", o, g)
    _same_size("image and mask", o, m)
    oa = np.asarray(o).astype(np.uint32)
    ga = np.asarray(g).astype(np.uint32)
    ma = np.asarray(m).astype(np.uint32)[..., None]
    # Integer blend with rounding: exact at 0 and 255, no float drift in the kept original.
    out = (ga * ma + oa * (255 - ma) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")
