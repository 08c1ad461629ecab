"""The pixel steps of img2img and inpainting, done as A1111's ``StableDiffusionProcessingImg2Img`` does them,
with the libraries A1111 uses, so that the same inputs give the same pixels.

- resize modes: A1111's ``images.resize_image``; the "Crop and resize" and "Resize and fill" geometry is
  diffusers' ``VaeImageProcessor._resize_and_crop`` / ``_resize_and_fill`` (A1111's code, carried by
  diffusers); an optional upscaler (A1111's ``upscaler_for_img2img``) enlarges images, never masks;
- mask blur: ``cv2.GaussianBlur`` along x then along y (A1111's ``mask_blur_x`` / ``mask_blur_y``);
- "Only masked": ``VaeImageProcessor.get_crop_region`` (A1111's crop region grown to the generation's
  aspect ratio); the overlay that puts the original back is ``VaeImageProcessor.apply_overlay``;
- masked content "fill": ``masking.fill``, PIL Gaussian blurs at decreasing radii;
- colour correction: LAB histogram matching with ``skimage.exposure.match_histograms``, then the
  result's luminosity laid back with ``blendmodes`` (A1111's ``apply_color_correction``).

Nothing here touches torch or a model. Boxes are PIL boxes ``(left, top, right, bottom)``, right/bottom
exclusive. Images are RGB, masks "L" (white = inpaint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np
from blendmodes.blend import BlendType, blendLayers
from PIL import Image, ImageFilter, ImageOps
from skimage import exposure

from studio.generation.imageops import ImageInputError

if TYPE_CHECKING:
    from diffusers.image_processor import VaeImageProcessor

Box = tuple[int, int, int, int]
# An upscaler for enlarging an init image: (image, width, height) -> an image of about that size.
Upscale = Callable[[Image.Image, int, int], Image.Image]

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")

# Masked-content "fill" (A1111's masking.fill): (blur radius, times the layer is laid on), wide to narrow,
# so distant colours give a base that nearer colours progressively override; radius 0 lays the unmasked
# pixels themselves on last.
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def _processor() -> VaeImageProcessor:
    # Lanczos, as A1111's resize_image; cheap to make (a config object), so none is kept around.
    from diffusers.image_processor import VaeImageProcessor
    return VaeImageProcessor(resample="lanczos")


def _as_l(mask: Image.Image) -> Image.Image:
    return mask if mask.mode == "L" else mask.convert("L")


def _as_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_target(width: int, height: int) -> None:
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")


def _same_size(what: str, a: Image.Image, b: Image.Image) -> None:
    if a.size != b.size:
        raise ImageInputError(f"{what} sizes differ: {a.size[0]}x{a.size[1]} and {b.size[0]}x{b.size[1]}")


# --------------------------------------------------------------------------------------------------------
# Resizing


def _scale(img: Image.Image, width: int, height: int, upscale: Upscale | None) -> Image.Image:
    """A1111's ``resize``: the upscaler first when the image grows (never for a mask), then Lanczos to
    the exact size."""
    if upscale is not None and img.mode != "L" and max(width / img.width, height / img.height) > 1:
        img = upscale(img, width, height)
    if img.size == (width, height):
        return img
    return _processor().resize(img, height, width)


def _inner_size(mode: int, img: Image.Image, width: int, height: int) -> tuple[int, int]:
    """The size A1111 scales the whole image to before cropping (mode 1, covering the target) or
    padding (mode 2, fitting inside it)."""
    ratio, src_ratio = width / height, img.width / img.height
    covers = ratio > src_ratio if mode == 1 else ratio < src_ratio
    # at least one pixel: A1111 fails on a 0-pixel band for extreme ratios (a 1000x1 strip into a square)
    if covers:
        return width, max(1, img.height * width // img.width)
    return max(1, img.width * height // img.height), height


def resize_image(mode: int, img: Image.Image, width: int, height: int, upscale: Upscale | None = None) -> Image.Image:
    """A1111's ``images.resize_image``; the result is always exactly ``width`` x ``height``.

    0 "Just resize" stretches; 1 "Crop and resize" scales to cover and crops the centre; 2 "Resize and
    fill" scales to fit and fills the empty bands by stretching the image's edge rows/columns outward;
    3 "Just resize (latent upscale)" is 0 at the pixel level (the latent upscale happens elsewhere).
    ``upscale`` (A1111's ``upscaler_for_img2img``) does the enlarging where the image grows; "L" images
    (masks) always use Lanczos. An "L" image comes back "L", anything else RGB.
    """
    _check_target(width, height)
    width, height = int(width), int(height)
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"resize mode must be 0-3 ({', '.join(RESIZE_MODES)}), got {mode!r}")
    mask = img.mode == "L"
    img = img if mask else _as_rgb(img)
    if mode in (0, 3):
        return _scale(img, width, height, upscale)
    # The scaled whole image, made by the upscaler when it grows; the library's own resize to that same
    # size is then a copy, and it does the cropping or the band filling as A1111 does.
    img = _scale(img, *_inner_size(mode, img, width, height), upscale)
    p = _processor()
    out = p._resize_and_crop(img, width, height) if mode == 1 else p._resize_and_fill(img, width, height)
    return out.convert("L") if mask else out


# --------------------------------------------------------------------------------------------------------
# Mask blur


def blur_kernel_size(sigma: int) -> int:
    """A1111's kernel length for a mask blur of ``sigma``: 2*int(2.5*sigma+0.5)+1."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's mask blur: a horizontal Gaussian of sigma ``blur_x``, then a vertical one of ``blur_y``,
    each a separate 8-bit ``cv2.GaussianBlur``. 0 leaves that axis alone (a binary mask stays binary)."""
    if blur_x < 0 or blur_y < 0:
        raise ValueError(f"mask blur must be >= 0, got {blur_x}x{blur_y}")
    a = np.asarray(_as_l(mask))
    if blur_x > 0:
        a = cv2.GaussianBlur(a, (blur_kernel_size(blur_x), 1), blur_x)
    if blur_y > 0:
        a = cv2.GaussianBlur(a, (1, blur_kernel_size(blur_y)), blur_y)
    return Image.fromarray(np.ascontiguousarray(a), "L")


# --------------------------------------------------------------------------------------------------------
# "Only masked" crop


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> Box | None:
    """A1111's "Only masked" region: the bounding box of the mask's non-zero pixels grown by ``padding``
    (clamped to the image), then grown to the aspect ratio of ``width`` x ``height`` and shifted to stay
    inside the image (where the image is too small that way, it takes the image's full extent). None
    for an empty mask."""
    _check_target(width, height)
    m = _as_l(mask)
    if m.getbbox() is None:
        return None
    x1, y1, x2, y2 = _processor().get_crop_region(m, int(width), int(height), pad=max(0, int(padding)))
    return int(x1), int(y1), int(x2), int(y2)


def extract_crop(img: Image.Image, box: Box, width: int, height: int, upscale: Upscale | None = None) -> Image.Image:
    """The "Only masked" working image (or mask): ``box`` cut out and brought to the generation size with
    "Resize and fill", as A1111 does, so a box that could not reach the target ratio is padded."""
    return resize_image(2, img.crop(tuple(box)), width, height, upscale)


# --------------------------------------------------------------------------------------------------------
# Masked content, overlay and colour correction


def fill_masked(img: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill" (A1111's ``masking.fill``): the masked area painted with colours spread in
    from the unmasked surroundings, fully unmasked pixels kept as they are.

    The unmasked pixels (premultiplied by how unmasked each is) are blurred at decreasing radii and
    layered over one another, so far-away colours give a base and nearby colours win close to the edge
    of the hole. Where no unmasked colour reaches (a mask covering everything) the result is black, as
    in A1111.
    """
    rgb, m = _as_rgb(img), _as_l(mask)
    _same_size("image and mask", rgb, m)
    if m.getbbox() is None:
        return rgb.copy()
    known = Image.new("RGBa", rgb.size)
    known.paste(rgb.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(m))
    out = Image.new("RGBA", rgb.size)
    for radius, repeats in FILL_PASSES:
        layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def overlay(original: Image.Image, generated: Image.Image, mask: Image.Image, box: Box | None = None,
            upscale: Upscale | None = None) -> Image.Image:
    """The original laid back over a generated image (A1111's overlay): ``original`` with opacity
    255 - ``mask`` over ``generated``, so a 0/255 mask keeps the original exactly outside it.

    With a ``box`` ("Only masked"), ``generated`` is the crop: it is brought to the box's size with
    "Crop and resize" (the inverse of the "Resize and fill" that made it; ``upscale`` enlarges) and placed
    there on a copy of the original's size first.
    """
    original, mask = _as_rgb(original), _as_l(mask)
    _same_size("image and mask", original, mask)
    if box is None:
        _same_size("original and generated image", original, generated)
        return _processor().apply_overlay(mask, original, _as_rgb(generated))
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {box} is empty")
    # Brought to the box size here so the upscaler can do it; the library's crop-resize is then a copy.
    piece = resize_image(1, generated, x2 - x1, y2 - y1, upscale)
    return _processor().apply_overlay(mask, original, piece, crop_coords=(x1, y1, x2, y2))


def double_mask(mask: Image.Image) -> Image.Image:
    """A1111's "Whole picture" overlay mask: the blurred mask doubled, so the generated pixels win over
    the inner half of the blur and the original fades in over the outer half."""
    a = np.asarray(_as_l(mask)).astype(np.float32) * 2
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def color_reference(img: Image.Image) -> np.ndarray:
    """A1111's ``setup_color_correction``: the init image in LAB, the histogram the results are matched to."""
    return cv2.cvtColor(np.asarray(_as_rgb(img)), cv2.COLOR_RGB2LAB)


def correct_colors(img: Image.Image, reference: np.ndarray) -> Image.Image:
    """A1111's ``apply_color_correction``: each LAB channel's histogram matched to the ``reference``'s,
    converted back, then the image's own luminosity laid over the matched colours (so brightness detail
    stays the generated one and hue/saturation move toward the init image)."""
    rgb = _as_rgb(img)
    lab = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2LAB)
    # uint8 in, uint8 out: match_histograms keeps the input's integer type per channel
    matched = exposure.match_histograms(lab, reference, channel_axis=-1)
    corrected = Image.fromarray(cv2.cvtColor(matched, cv2.COLOR_LAB2RGB).astype(np.uint8), "RGB")
    return blendLayers(corrected, rgb, BlendType.LUMINOSITY).convert("RGB")
