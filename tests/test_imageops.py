"""Image operations for img2img and inpainting: normalisation, A1111 resize modes, mask blur, crops,
masked-content fill and compositing. Pure PIL/numpy, fast."""

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
    blur_mask,
    composite,
    crop_region,
    expand_to_aspect,
    extract_crop,
    fill_masked,
    invert_mask,
    normalize_image,
    normalize_mask,
    paste_crop,
    resize_image,
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
    with pytest.raises(ImageInputError, match="16385x1"):
        normalize_image(Image.new("1", (imageops.MAX_SIDE + 1, 1)))
    with pytest.raises(ImageInputError, match="8193x8192"):
        normalize_image(Image.new("1", (8193, 8192)))
    with pytest.raises(ImageInputError, match="100x100"):
        normalize_image(Image.new("RGB", (100, 100)), max_pixels=5000)
    assert normalize_image(Image.new("RGB", (50, 100)), max_pixels=5000).size == (50, 100)


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


# ------------------------------------------------------------------------------------------------------
# resize_image


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("src", [(40, 20), (20, 40), (33, 33), (7, 51)])
@pytest.mark.parametrize("dst", [(64, 64), (64, 40), (17, 90)])
def test_resize_output_is_always_the_target_size(mode, src, dst):
    out = resize_image(mode, gradient(*src), *dst)
    assert out.size == dst and out.mode == "RGB"


def test_just_resize_stretches():
    out = resize_image(0, halves(40, 20), 20, 40)
    assert out.getpixel((2, 20)) == RED and out.getpixel((17, 20)) == BLUE
    assert out.getpixel((2, 0)) == RED and out.getpixel((17, 39)) == BLUE


def test_latent_upscale_mode_is_just_resize_in_pixels():
    img = gradient(30, 20)
    assert np.array_equal(arr(resize_image(3, img, 50, 50)), arr(resize_image(0, img, 50, 50)))


def test_crop_and_resize_keeps_the_centre():
    a = np.zeros((40, 120, 3), np.uint8)
    a[:, :40] = RED
    a[:, 40:80] = (0, 255, 0)
    a[:, 80:] = BLUE
    out = arr(resize_image(1, Image.fromarray(a), 20, 20))
    assert (np.abs(out[:, 3:-3] - (0, 255, 0)) <= 2).all()
    # Tall source into a square: the middle rows are kept.
    tall = arr(resize_image(1, Image.fromarray(a).transpose(Image.Transpose.ROTATE_90), 20, 20))
    assert (np.abs(tall[3:-3] - (0, 255, 0)) <= 2).all()


def test_crop_and_resize_matches_resizing_the_centre_crop():
    img = gradient(120, 40)
    out = arr(resize_image(1, img, 20, 20))
    ref = arr(img.crop((40, 0, 80, 40)).resize((20, 20), Image.Resampling.LANCZOS))
    assert np.abs(out - ref)[2:-2, 2:-2].max() <= 2


def test_resize_and_fill_bands_repeat_the_edge_rows():
    img = gradient(40, 20)
    out = arr(resize_image(2, img, 40, 40))
    inner = arr(img.resize((40, 20), Image.Resampling.LANCZOS))
    assert np.array_equal(out[10:30], inner)
    assert (out[:10] == out[10]).all() and (out[30:] == out[29]).all()


def test_resize_and_fill_bands_repeat_the_edge_columns():
    img = gradient(20, 40)
    out = arr(resize_image(2, img, 40, 40))
    inner = arr(img.resize((20, 40), Image.Resampling.LANCZOS))
    assert np.array_equal(out[:, 10:30], inner)
    assert (out[:, :10] == out[:, 10:11]).all() and (out[:, 30:] == out[:, 29:30]).all()


def test_resize_and_fill_odd_band_leaves_no_gap():
    out = arr(resize_image(2, gradient(40, 21), 40, 40))
    # 21 content rows: 9 above, 10 below, none left black.
    assert (out[:9] == out[9]).all() and (out[30:] == out[29]).all()


def test_resize_keeps_mask_mode():
    m = rect_mask((40, 20), (10, 5, 30, 15))
    for mode in range(4):
        assert resize_image(mode, m, 32, 32).mode == "L"


def test_resize_rejects_bad_mode_and_size():
    with pytest.raises(ValueError, match="resize mode"):
        resize_image(4, gradient(4, 4), 8, 8)
    with pytest.raises(ValueError):
        resize_image(0, gradient(4, 4), 0, 8)


# ------------------------------------------------------------------------------------------------------
# blur_mask


def reference_blur(a: np.ndarray, bx: int, by: int) -> np.ndarray:
    """A1111's blur written out plainly: per axis, kernel 2*int(2.5*s+0.5)+1 of sigma s, borders mirrored
    without repeating the edge (cv2's default), rounded to 8 bits after each axis."""

    def mirror(i: int, n: int) -> int:
        if n == 1:
            return 0
        while i < 0 or i >= n:
            i = -i if i < 0 else 2 * (n - 1) - i
        return i

    def one_axis(x: np.ndarray, s: int) -> np.ndarray:
        r = int(2.5 * s + 0.5)
        k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * s * s))
        k /= k.sum()
        n = x.shape[1]
        out = np.zeros(x.shape, np.float64)
        for j in range(n):
            for t in range(-r, r + 1):
                out[:, j] += k[t + r] * x[:, mirror(j + t, n)]
        return np.clip(np.floor(out + 0.5), 0, 255)

    x = a.astype(np.float64)
    if bx:
        x = one_axis(x, bx)
    if by:
        x = one_axis(x.T, by).T
    return x.astype(np.int32)


@pytest.mark.parametrize("bx,by", [(4, 4), (1, 3), (8, 0), (0, 6), (30, 30)])
def test_blur_matches_a_plain_separable_gaussian(bx, by):
    rng = np.random.default_rng(1)
    a = np.zeros((40, 50), np.uint8)
    a[10:30, 15:40] = 255
    a[:6] = rng.integers(0, 256, (6, 50))
    got = arr(blur_mask(Image.fromarray(a), bx, by))
    assert np.abs(got - reference_blur(a, bx, by)).max() <= 1


def test_blur_zero_is_identity_and_axes_are_separate():
    m = rect_mask((30, 20), (10, 5, 20, 15))
    assert np.array_equal(arr(blur_mask(m, 0, 0)), arr(m))
    horizontal = arr(blur_mask(m, 3, 0))
    assert (horizontal[:5] == 0).all() and (horizontal[15:] == 0).all()  # rows untouched
    assert 0 < horizontal[10, 9] < 255
    vertical = arr(blur_mask(m, 0, 3))
    assert (vertical[:, :10] == 0).all() and 0 < vertical[4, 15] < 255


def test_blur_wider_than_the_image_and_bad_values():
    m = rect_mask((6, 1), (2, 0, 4, 1))
    out = blur_mask(m, 64, 64)
    assert out.size == (6, 1)
    assert np.abs(arr(out) - reference_blur(np.asarray(m), 64, 64)).max() <= 1
    with pytest.raises(ValueError):
        blur_mask(m, -1, 0)


def test_blur_is_close_to_cv2_when_available():
    cv2 = pytest.importorskip("cv2")
    a = np.zeros((96, 128), np.uint8)
    a[20:70, 30:90] = 255
    k = 2 * int(2.5 * 4 + 0.5) + 1
    ref = cv2.GaussianBlur(cv2.GaussianBlur(a, (k, 1), 4), (1, k), 4)
    assert np.abs(arr(blur_mask(Image.fromarray(a), 4, 4)) - ref).max() <= 1


# ------------------------------------------------------------------------------------------------------
# crop_region / expand_to_aspect / extract_crop / paste_crop


def test_crop_region_padding_and_clamping():
    m = rect_mask((100, 80), (10, 30, 20, 40))
    assert crop_region(m, 0) == (10, 30, 20, 40)
    assert crop_region(m, 5) == (5, 25, 25, 45)
    assert crop_region(m, 50) == (0, 0, 70, 80)
    assert crop_region(Image.new("L", (100, 80)), 32) == (0, 0, 100, 80)


def test_crop_region_counts_any_non_zero_pixel():
    m = rect_mask((50, 50), (20, 20, 21, 21), value=1)
    assert crop_region(m, 2) == (18, 18, 23, 23)


def test_expand_to_aspect_square_and_wide():
    assert expand_to_aspect((40, 40, 60, 50), 512, 512, 200, 200) == (40, 35, 60, 55)
    assert expand_to_aspect((40, 40, 50, 60), 512, 512, 200, 200) == (35, 40, 55, 60)
    x1, y1, x2, y2 = expand_to_aspect((40, 40, 60, 50), 768, 512, 200, 200)
    assert (x2 - x1, y2 - y1) == (20, 13)


def test_expand_to_aspect_slides_inside_at_the_edges():
    assert expand_to_aspect((0, 0, 20, 10), 64, 64, 100, 100) == (0, 0, 20, 20)
    assert expand_to_aspect((10, 195, 30, 200), 64, 64, 200, 200) == (10, 180, 30, 200)
    # Not enough room: the full extent of the image in that direction.
    assert expand_to_aspect((0, 0, 100, 10), 64, 64, 100, 50) == (0, 0, 100, 50)


def test_expand_to_aspect_properties():
    rng = np.random.default_rng(7)
    for _ in range(300):
        iw, ih = (int(v) for v in rng.integers(16, 300, 2))
        x1, x2 = sorted(int(v) for v in rng.choice(iw + 1, 2, replace=False))
        y1, y2 = sorted(int(v) for v in rng.choice(ih + 1, 2, replace=False))
        tw, th = (int(v) for v in rng.integers(64, 1024, 2))
        bx1, by1, bx2, by2 = expand_to_aspect((x1, y1, x2, y2), tw, th, iw, ih)
        assert 0 <= bx1 <= x1 and 0 <= by1 <= y1 and x2 <= bx2 <= iw and y2 <= by2 <= ih
        bw, bh = bx2 - bx1, by2 - by1
        if bw < iw and bh < ih:  # room on both axes: the ratio is reached up to rounding
            assert abs(bw - bh * tw / th) <= 1 or abs(bh - bw * th / tw) <= 1


def test_expand_to_aspect_rejects_empty_box():
    with pytest.raises(ValueError):
        expand_to_aspect((5, 5, 5, 9), 64, 64, 100, 100)


def test_paste_crop_geometry():
    original = Image.new("RGB", (100, 80), (0, 0, 0))
    out = arr(paste_crop(original, Image.new("RGB", (64, 64), (255, 255, 255)), (10, 20, 42, 52)))
    assert out.shape == (80, 100, 3)
    assert (out[20:52, 10:42] == 255).all()
    outside = np.ones((80, 100), bool)
    outside[20:52, 10:42] = False
    assert (out[outside] == 0).all()
    assert original.getpixel((20, 30)) == (0, 0, 0)  # the original is not modified


def test_extract_then_paste_round_trips_even_off_ratio():
    img = gradient(120, 90)
    box = (10, 10, 50, 30)  # 2:1 into a square generation: extract pads, paste trims
    crop = extract_crop(img, box, 64, 64)
    assert crop.size == (64, 64)
    back = arr(paste_crop(img, crop, box))
    assert np.abs(back - arr(img))[12:28, 12:48].max() <= 3
    assert np.array_equal(back[40:], arr(img)[40:])


# ------------------------------------------------------------------------------------------------------
# fill_masked / composite


def test_fill_masked_red_hole_is_filled_with_red():
    img = Image.new("RGB", (64, 64), RED)
    a = arr(img)
    a[20:44, 20:44] = (0, 255, 0)  # content under the mask must disappear
    hole = rect_mask((64, 64), (20, 20, 44, 44))
    out = arr(fill_masked(Image.fromarray(a.astype(np.uint8)), hole))
    assert (np.abs(out[20:44, 20:44] - RED) <= 2).all()
    assert np.array_equal(out[:20], a[:20])


def test_fill_masked_uses_the_nearby_colours_and_keeps_unmasked_pixels():
    img = halves(64, 64)
    hole = rect_mask((64, 64), (16, 16, 48, 48))
    out = arr(fill_masked(img, hole))
    inside = np.asarray(hole) > 0
    assert np.array_equal(out[~inside], arr(img)[~inside])
    left, right = out[32, 18], out[32, 45]
    assert left[0] > 150 and left[2] < 100
    assert right[2] > 150 and right[0] < 100


def test_fill_masked_soft_mask_and_edge_cases():
    img = gradient(48, 40)
    soft = blur_mask(rect_mask((48, 40), (12, 10, 36, 30)), 4, 4)
    out = arr(fill_masked(img, soft))
    zero = np.asarray(soft) == 0
    assert np.array_equal(out[zero], arr(img)[zero])
    assert np.array_equal(arr(fill_masked(img, Image.new("L", (48, 40)))), arr(img))
    whole = arr(fill_masked(img, Image.new("L", (48, 40), 255)))
    assert (np.abs(whole - whole[0, 0]) == 0).all()
    with pytest.raises(ImageInputError, match="sizes differ"):
        fill_masked(img, Image.new("L", (10, 10)))


def test_composite_binary_mask_is_exact():
    original, generated = gradient(40, 30), halves(40, 30)
    mask = rect_mask((40, 30), (5, 5, 25, 20))
    out = arr(composite(original, generated, mask))
    inside = np.asarray(mask) > 0
    assert np.array_equal(out[inside], arr(generated)[inside])
    assert np.array_equal(out[~inside], arr(original)[~inside])


def test_composite_blurred_mask_blends():
    original = Image.new("RGB", (40, 10), (0, 0, 0))
    generated = Image.new("RGB", (40, 10), (200, 100, 50))
    mask = blur_mask(rect_mask((40, 10), (20, 0, 40, 10)), 4, 0)
    out = arr(composite(original, generated, mask))
    m = arr(mask)[5]
    assert np.abs(out[5, :, 0] - np.rint(200 * m / 255)).max() <= 1
    assert (np.diff(out[5, :, 0]) >= 0).all() and 0 < out[5, 20, 0] < 200
    half = arr(composite(original, generated, Image.new("L", (40, 10), 128)))
    assert abs(half[0, 0, 0] - 100) <= 1


def test_composite_size_mismatch():
    with pytest.raises(ImageInputError, match="sizes differ"):
        composite(gradient(10, 10), gradient(12, 10), Image.new("L", (10, 10)))
    with pytest.raises(ImageInputError, match="sizes differ"):
        composite(gradient(10, 10), gradient(10, 10), Image.new("L", (9, 10)))
