"""Input images and masks for img2img and inpainting: normalisation and size limits. Pure PIL/numpy, fast.
(The pixel steps are tested in test_img2img_pixels.py, the size limit on every route in
test_image_limits.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from studio.generation import imageops
from studio.generation.imageops import (
    NOTE_MASK_EMPTY,
    NOTE_MASK_FULL,
    ImageInputError,
    ImageTooLargeError,
    invert_mask,
    normalize_image,
    normalize_mask,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int32)


def halves(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2 :] = right
    return Image.fromarray(a)


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, (x + y) / 2], -1).astype(np.uint8))


def rect_mask(size, box, value=255) -> Image.Image:
    a = np.zeros((size[1], size[0]), np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = value
    return Image.fromarray(a)


def png_roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    buf.seek(0)
    return Image.open(buf)


# ------------------------------------------------------------------------------------------------------
# normalize_image


def test_rgb_passes_through_as_a_copy():
    img = gradient(30, 20)
    out = normalize_image(img)
    assert out.mode == "RGB" and out is not img
    assert np.array_equal(arr(out), arr(img))


def test_grayscale_l():
    out = normalize_image(Image.new("L", (5, 4), 77))
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (77, 77, 77)


def test_la_transparent_goes_onto_white_and_opaque_keeps_its_grey():
    a = np.zeros((4, 6, 2), np.uint8)
    a[..., 0] = 100
    a[:, 3:, 1] = 255
    out = normalize_image(Image.fromarray(a, "LA"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((5, 0)) == (100, 100, 100)


def test_palette_with_and_without_transparency():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert normalize_image(p).getpixel((1, 1)) == (10, 200, 30)
    p.info["transparency"] = 1
    assert normalize_image(png_roundtrip(p)).getpixel((1, 1)) == (255, 255, 255)


def test_rgba_transparency_is_composited_onto_white():
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    a[0, 0, 3] = 0
    a[0, 1, 3] = 128
    a[0, 2, 3] = 255
    out = normalize_image(Image.fromarray(a, "RGBA"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    assert out.getpixel((2, 0)) == RED


def test_rgba_background_colour_can_be_chosen():
    img = Image.new("RGBA", (3, 3), (9, 9, 9, 0))
    assert normalize_image(img, background="#102030").getpixel((1, 1)) == (16, 32, 48)
    assert normalize_image(img, background=(1, 2, 3)).getpixel((1, 1)) == (1, 2, 3)


def test_16bit_png_gradient_maps_to_the_8bit_gradient():
    levels = np.arange(256, dtype=np.uint16)
    a16 = np.tile(levels * 257, (3, 1))
    img = png_roundtrip(Image.fromarray(a16))
    assert img.mode.startswith("I")
    out = arr(normalize_image(img))
    assert np.array_equal(out[0, :, 0], np.arange(256))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_16bit_values_are_scaled_not_clipped():
    a16 = np.array([[0, 1000, 32768, 65535]], np.uint16)
    out = arr(normalize_image(png_roundtrip(Image.fromarray(a16))))[0, :, 0]
    assert list(out) == [0, 4, 128, 255]


def test_i_mode_and_big_endian_16bit():
    assert normalize_image(Image.new("I", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)
    big = Image.frombytes("I;16B", (2, 1), np.array([0, 32896], ">u2").tobytes())
    assert [p[0] for p in normalize_image(big).getdata()] == [0, 128]


def test_cmyk():
    out = normalize_image(Image.new("CMYK", (3, 3), (0, 255, 255, 0)))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == RED


def test_exif_orientation_is_applied():
    img = halves(40, 20)  # red left, blue right as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer rotates 90 degrees clockwise: the stored left edge ends up on top
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    buf.seek(0)
    out = normalize_image(Image.open(buf))
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_bytes_input_and_garbage_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), RED).save(buf, "PNG")
    assert normalize_image(buf.getvalue()).size == (3, 2)
    with pytest.raises(ImageInputError, match="not a readable image"):
        normalize_image(b"not an image at all")
    with pytest.raises(ImageInputError, match="must be an image"):
        normalize_image(42)


def test_size_limits_name_the_size():
    with pytest.raises(ImageTooLargeError, match="16385x1"):
        normalize_image(Image.new("1", (imageops.MAX_SIDE + 1, 1)))
    with pytest.raises(ImageTooLargeError, match=r"8193x8192 \(67\.1 MP\); the limit is 67\.1 MP \(8192x8192\)"):
        normalize_image(Image.new("1", (8193, 8192)))
    with pytest.raises(ImageInputError, match="100x100"):
        normalize_image(Image.new("RGB", (100, 100)), max_pixels=5000)
    assert normalize_image(Image.new("RGB", (50, 100)), max_pixels=5000).size == (50, 100)


class NoPixelsImage(Image.Image):
    """An image the size of a UI upload whose pixels must not be touched."""

    def __init__(self, size):
        super().__init__()
        self._size = size
        self._mode = "RGB"

    def load(self):
        raise AssertionError("pixels were decoded")


def test_a_ui_image_over_the_limit_is_refused_from_its_size_alone():
    with pytest.raises(ImageTooLargeError, match="30000x30000 \\(900 MP\\)"):
        normalize_image(NoPixelsImage((30000, 30000)))
    with pytest.raises(ImageTooLargeError, match="mask is too large: 30000x30000"):
        normalize_mask(NoPixelsImage((30000, 30000)), (64, 64))


# ------------------------------------------------------------------------------------------------------
# normalize_mask


def test_mask_luminance_and_same_size_has_no_notes():
    m, notes = normalize_mask(rect_mask((20, 10), (2, 2, 8, 8)).convert("RGB"), (20, 10))
    assert m.mode == "L" and m.size == (20, 10) and notes == []
    assert m.getpixel((5, 5)) == 255 and m.getpixel((15, 5)) == 0


def test_luminance_mask_stays_soft():
    m, _ = normalize_mask(Image.new("L", (4, 4), 100), (4, 4))
    assert m.getpixel((0, 0)) == 100


def test_mask_size_mismatch_is_resized_with_a_note():
    m, notes = normalize_mask(rect_mask((100, 80), (50, 0, 100, 80)), (64, 64))
    assert m.size == (64, 64)
    assert notes[0].startswith("mask was 100x80, resized to the image's 64x64")
    assert set(np.unique(arr(m))) <= {0, 255}  # a binary mask stays binary
    assert m.getpixel((10, 32)) == 0 and m.getpixel((54, 32)) == 255


def test_soft_mask_resized_stays_soft():
    a = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    m, notes = normalize_mask(Image.fromarray(a), (64, 64))
    assert len(np.unique(arr(m))) > 10 and notes


def test_alpha_painted_mask_uses_alpha_whatever_the_stroke_colour():
    a = np.zeros((10, 10, 4), np.uint8)
    a[2:6, 3:7] = (0, 0, 0, 255)  # black strokes on a transparent layer
    a[8, 8] = (255, 255, 255, 100)  # faint stroke: below the A1111 rounding cut
    m, notes = normalize_mask(Image.fromarray(a, "RGBA"), (10, 10))
    assert notes == []
    assert m.getpixel((4, 3)) == 255 and m.getpixel((0, 0)) == 0 and m.getpixel((8, 8)) == 0
    soft, _ = normalize_mask(Image.fromarray(a, "RGBA"), (10, 10), round_alpha=False)
    assert soft.getpixel((8, 8)) == 100


def test_opaque_rgba_mask_uses_luminance():
    a = np.zeros((6, 6, 4), np.uint8)
    a[..., 3] = 255
    a[:3] = (255, 255, 255, 255)
    m, _ = normalize_mask(Image.fromarray(a, "RGBA"), (6, 6))
    assert m.getpixel((0, 0)) == 255 and m.getpixel((0, 5)) == 0


def test_la_mask_with_alpha():
    a = np.zeros((4, 4, 2), np.uint8)
    a[0, 0] = (0, 255)
    m, _ = normalize_mask(Image.fromarray(a, "LA"), (4, 4))
    assert m.getpixel((0, 0)) == 255 and m.getpixel((1, 1)) == 0


def test_empty_and_full_masks_are_accepted_with_notes():
    m, notes = normalize_mask(Image.new("L", (8, 8), 0), (8, 8))
    assert notes == [NOTE_MASK_EMPTY] and m.getextrema() == (0, 0)
    assert "nothing to inpaint" in NOTE_MASK_EMPTY
    m, notes = normalize_mask(Image.new("RGB", (8, 8), "white"), (8, 8))
    assert notes == [NOTE_MASK_FULL]
    transparent = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert normalize_mask(transparent, (8, 8))[1] == [NOTE_MASK_EMPTY]


def test_mask_errors():
    with pytest.raises(ImageInputError, match="too large"):
        normalize_mask(Image.new("1", (imageops.MAX_SIDE + 1, 2)), (10, 10))
    with pytest.raises(ImageInputError):
        normalize_mask(b"junk", (10, 10))


def test_invert_mask():
    m = rect_mask((4, 4), (0, 0, 2, 4))
    inv = invert_mask(m)
    assert inv.getpixel((0, 0)) == 0 and inv.getpixel((3, 0)) == 255
    assert invert_mask(m.convert("RGB")).mode == "L"
