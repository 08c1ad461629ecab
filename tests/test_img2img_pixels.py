"""The pixel steps of img2img and inpainting against A1111's behaviour: resize modes, mask blur, the "Only
masked" crop, masked-content fill, the overlay and colour correction. No model, fast.

A1111's arithmetic is written out in the tests (cv2 calls with its kernel formula, its crop-region and
resize geometry in explicit numbers) so that they check the library calls, not repeat them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from studio.generation.imageops import ImageInputError
from studio.generation.img2img_pixels import (
    blur_kernel_size,
    blur_mask,
    color_reference,
    correct_colors,
    crop_region,
    double_mask,
    extract_crop,
    fill_masked,
    overlay,
    resize_image,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
LANCZOS = Image.Resampling.LANCZOS


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


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def rect_mask(size, box, value=255) -> Image.Image:
    a = np.zeros((size[1], size[0]), np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = value
    return Image.fromarray(a)


# ------------------------------------------------------------------------------------------------------
# resize_image


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("src", [(40, 20), (20, 40), (33, 33), (7, 51), (1000, 1)])
@pytest.mark.parametrize("dst", [(64, 64), (64, 40), (17, 90)])
def test_resize_output_is_always_the_target_size(mode, src, dst):
    out = resize_image(mode, gradient(*src), *dst)
    assert out.size == dst and out.mode == "RGB"


def test_just_resize_is_a_lanczos_stretch_and_latent_upscale_is_the_same_in_pixels():
    img = noise(40, 20)
    assert np.array_equal(arr(resize_image(0, img, 20, 40)), arr(img.resize((20, 40), LANCZOS)))
    assert np.array_equal(arr(resize_image(3, img, 50, 50)), arr(resize_image(0, img, 50, 50)))


def test_crop_and_resize_is_a1111s_geometry():
    # 120x40 into 20x20: A1111 scales to 120*20//40 = 60 wide and pastes at 20//2 - 60//2 = -20
    img = noise(120, 40, seed=1)
    expected = img.resize((60, 20), LANCZOS).crop((20, 0, 40, 20))
    assert np.array_equal(arr(resize_image(1, img, 20, 20)), arr(expected))
    # 77x91 into 64x96: taller target, so 77*96//91 = 81 wide, pasted at 64//2 - 81//2 = -8
    img = noise(77, 91, seed=2)
    expected = img.resize((81, 96), LANCZOS).crop((8, 0, 72, 96))
    assert np.array_equal(arr(resize_image(1, img, 64, 96)), arr(expected))


def test_crop_and_resize_keeps_the_centre():
    a = np.zeros((40, 120, 3), np.uint8)
    a[:, :40] = RED
    a[:, 40:80] = (0, 255, 0)
    a[:, 80:] = BLUE
    out = arr(resize_image(1, Image.fromarray(a), 20, 20))
    assert (np.abs(out[:, 3:-3] - (0, 255, 0)) <= 2).all()
    tall = arr(resize_image(1, Image.fromarray(a).transpose(Image.Transpose.ROTATE_90), 20, 20))
    assert (np.abs(tall[3:-3] - (0, 255, 0)) <= 2).all()


def test_resize_and_fill_is_a1111s_geometry_with_edge_bands():
    # 40x20 into 40x40: A1111 scales to 40x(20*40//40 = 20), pastes it at y = 20 - 10 = 10, and fills the
    # 10-row bands above and below by stretching the first and last rows outward
    img = gradient(40, 20)
    out = arr(resize_image(2, img, 40, 40))
    assert np.array_equal(out[10:30], arr(img.resize((40, 20), LANCZOS)))
    for band in (out[:10], out[30:]):
        assert (band == band[:1]).all()  # every row of a band is the same row
    assert np.abs(out[0] - out[10]).max() <= 8 and np.abs(out[39] - out[29]).max() <= 8
    # and sideways: 20x40 into 40x40 fills 10-column bands left and right
    side = arr(resize_image(2, gradient(20, 40), 40, 40))
    assert np.array_equal(side[:, 10:30], arr(gradient(20, 40).resize((20, 40), LANCZOS)))
    assert (side[:, :10] == side[:, :1]).all() and (side[:, 30:] == side[:, 30:31]).all()


def test_resize_and_fill_odd_band_leaves_no_gap():
    out = arr(resize_image(2, gradient(40, 21), 40, 40))
    # 21 content rows pasted at 20 - 10 = 10: band rows 0-9 above, 31-39 below, none left black
    assert (out[:10] == out[:1]).all() and (out[31:] == out[31:32]).all()
    assert out.reshape(40, -1).max(axis=1).min() > 0  # no row left black


def test_modes_1_and_2_are_the_library_code():
    p = VaeImageProcessor(resample="lanczos")
    for (w, h), (tw, th) in (((64, 128), (96, 64)), ((100, 37), (64, 64)), ((77, 91), (64, 96)), ((300, 200), (64, 64))):
        img = noise(w, h, seed=w)
        assert np.array_equal(arr(resize_image(1, img, tw, th)), arr(p._resize_and_crop(img, tw, th)))
        assert np.array_equal(arr(resize_image(2, img, tw, th)), arr(p._resize_and_fill(img, tw, th)))


def test_resize_keeps_a_mask_a_mask():
    m = rect_mask((40, 20), (10, 5, 30, 15))
    for mode in range(4):
        out = resize_image(mode, m, 32, 32)
        assert out.mode == "L" and out.size == (32, 32)


def test_resize_rejects_bad_mode_and_size():
    with pytest.raises(ValueError, match="resize mode"):
        resize_image(4, gradient(4, 4), 8, 8)
    with pytest.raises(ValueError):
        resize_image(0, gradient(4, 4), 0, 8)


class Recorder:
    """An upscale callable that paints its output green, and records what it was asked for."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, width, height):
        self.calls.append((image.size, (width, height), image.mode))
        return Image.new("RGB", (width * 2, height * 2), (0, 255, 0))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_upscale_is_used_only_when_enlarging_and_its_output_is_used(mode):
    up = Recorder()
    small, big = noise(32, 24), noise(200, 150)
    out = arr(resize_image(mode, small, 64, 64, up))
    assert len(up.calls) == 1 and up.calls[0][0] == (32, 24) and up.calls[0][2] == "RGB"
    assert (out == (0, 255, 0)).all()  # every pixel came from the upscaler (bands stretch its edges)
    assert np.array_equal(arr(resize_image(mode, big, 64, 64, up)), arr(resize_image(mode, big, 64, 64)))
    assert len(up.calls) == 1  # shrinking: Lanczos, no call
    resize_image(mode, small.convert("L"), 64, 64, up)
    assert len(up.calls) == 1  # a mask is never upscaled


# ------------------------------------------------------------------------------------------------------
# blur_mask


def a1111_blur(a: np.ndarray, bx: int, by: int) -> np.ndarray:
    """A1111's mask blur as its processing.py writes it: two 8-bit cv2 passes."""
    if bx > 0:
        a = cv2.GaussianBlur(a, (2 * int(2.5 * bx + 0.5) + 1, 1), bx)
    if by > 0:
        a = cv2.GaussianBlur(a, (1, 2 * int(2.5 * by + 0.5) + 1), by)
    return a.astype(np.int32)


@pytest.mark.parametrize("bx,by", [(4, 4), (1, 3), (8, 0), (0, 6), (30, 30), (64, 64)])
def test_blur_is_a1111s_cv2_blur(bx, by):
    rng = np.random.default_rng(1)
    a = np.zeros((40, 50), np.uint8)
    a[10:30, 15:40] = 255
    a[:6] = rng.integers(0, 256, (6, 50))
    assert np.array_equal(arr(blur_mask(Image.fromarray(a), bx, by)), a1111_blur(a, bx, by))


def test_blur_is_close_to_a_plain_float_gaussian():
    # an independent check of the kernel: sigma s, 2*int(2.5*s+0.5)+1 taps, mirrored borders
    a = np.zeros((48, 64), np.uint8)
    a[12:36, 20:44] = 255
    s = 4
    r = int(2.5 * s + 0.5)
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * s * s))
    k /= k.sum()
    assert blur_kernel_size(s) == len(k) == 21
    x = np.apply_along_axis(lambda row: np.convolve(np.pad(row, r, mode="reflect"), k, "valid"), 1, a.astype(float))
    x = np.apply_along_axis(lambda col: np.convolve(np.pad(col, r, mode="reflect"), k, "valid"), 0, x)
    assert np.abs(arr(blur_mask(Image.fromarray(a), s, s)) - x).max() <= 2


def test_blur_zero_keeps_the_mask_binary_and_axes_are_separate():
    m = rect_mask((30, 20), (10, 5, 20, 15))
    assert np.array_equal(arr(blur_mask(m, 0, 0)), arr(m))
    assert set(np.unique(arr(blur_mask(m, 0, 0)))) == {0, 255}
    horizontal = arr(blur_mask(m, 3, 0))
    assert (horizontal[:5] == 0).all() and (horizontal[15:] == 0).all()  # rows untouched
    assert 0 < horizontal[10, 9] < 255
    vertical = arr(blur_mask(m, 0, 3))
    assert (vertical[:, :10] == 0).all() and 0 < vertical[4, 15] < 255


def test_blur_wider_than_the_image_and_bad_values():
    m = rect_mask((6, 1), (2, 0, 4, 1))
    out = blur_mask(m, 64, 64)
    assert out.size == (6, 1)
    assert np.array_equal(arr(out), a1111_blur(np.asarray(m), 64, 64))
    with pytest.raises(ValueError):
        blur_mask(m, -1, 0)


# ------------------------------------------------------------------------------------------------------
# "Only masked": crop_region / extract_crop / overlay with a box


def test_crop_region_is_a1111s_padded_box_grown_to_the_ratio():
    m = rect_mask((100, 80), (10, 30, 20, 40))
    assert crop_region(m, 0, 64, 64) == (10, 30, 20, 40)
    assert crop_region(m, 5, 64, 64) == (5, 25, 25, 45)
    # padding clamps to the image (0, 0, 70, 80), then the 70x80 box grows to 80 wide, centred, slid inside
    assert crop_region(m, 50, 64, 64) == (0, 0, 80, 80)
    # A1111 truncates the growth: 34x10 to 2.5:1 wants 13.6 high, int(3.6) = 3 rows more, 1 above, 2 below
    assert crop_region(rect_mask((200, 200), (40, 40, 74, 50)), 0, 640, 256) == (40, 39, 74, 52)
    # diffusers' example: a 128x32 region for a 512x512 generation becomes 128x128
    x1, y1, x2, y2 = crop_region(rect_mask((512, 512), (100, 200, 228, 232)), 0, 512, 512)
    assert (x2 - x1, y2 - y1) == (128, 128)


def test_crop_region_slides_inside_at_the_edges_and_empty_is_none():
    assert crop_region(rect_mask((100, 100), (0, 0, 20, 10)), 0, 64, 64) == (0, 0, 20, 20)
    assert crop_region(rect_mask((200, 200), (10, 195, 30, 200)), 0, 64, 64) == (10, 180, 30, 200)
    # not enough room: the image's full extent in that direction
    assert crop_region(rect_mask((100, 50), (0, 0, 100, 10)), 0, 64, 64) == (0, 0, 100, 50)
    assert crop_region(rect_mask((50, 50), (20, 20, 21, 21), value=1), 2, 64, 64) == (18, 18, 23, 23)
    assert crop_region(Image.new("L", (100, 80)), 32, 64, 64) is None


def test_crop_region_properties():
    rng = np.random.default_rng(7)
    for _ in range(100):
        iw, ih = (int(v) for v in rng.integers(16, 300, 2))
        x1, x2 = sorted(int(v) for v in rng.choice(iw + 1, 2, replace=False))
        y1, y2 = sorted(int(v) for v in rng.choice(ih + 1, 2, replace=False))
        tw, th = (int(v) for v in rng.integers(64, 1024, 2))
        bx1, by1, bx2, by2 = crop_region(rect_mask((iw, ih), (x1, y1, x2, y2)), 0, tw, th)
        assert 0 <= bx1 <= x1 and 0 <= by1 <= y1 and x2 <= bx2 <= iw and y2 <= by2 <= ih
        bw, bh = bx2 - bx1, by2 - by1
        if bw < iw and bh < ih:  # room on both axes: the ratio is reached up to A1111's truncation
            assert abs(bw - bh * tw / th) <= 2 or abs(bh - bw * th / tw) <= 2


def test_overlay_with_a_box_pastes_the_crop_and_keeps_the_rest():
    original = Image.new("RGB", (100, 80), (0, 0, 0))
    mask = rect_mask((100, 80), (10, 20, 42, 52))
    out = arr(overlay(original, Image.new("RGB", (64, 64), (255, 255, 255)), mask, (10, 20, 42, 52)))
    assert out.shape == (80, 100, 3)
    assert (out[20:52, 10:42] == 255).all()
    outside = np.ones((80, 100), bool)
    outside[20:52, 10:42] = False
    assert (out[outside] == 0).all()
    assert original.getpixel((20, 30)) == (0, 0, 0)  # the original is not modified


def test_extract_then_overlay_round_trips_even_off_ratio():
    img = gradient(120, 90)
    box = (10, 10, 50, 30)  # 2:1 into a square generation: extract pads, the overlay's crop trims
    crop = extract_crop(img, box, 64, 64)
    assert crop.size == (64, 64)
    back = arr(overlay(img, crop, rect_mask((120, 90), box), box))
    assert np.abs(back - arr(img))[12:28, 12:48].max() <= 3
    assert np.array_equal(back[40:], arr(img)[40:])


def test_overlay_upscales_a_crop_that_grows_back():
    up = Recorder()
    box = (0, 0, 100, 100)
    out = overlay(noise(120, 120), noise(64, 64), rect_mask((120, 120), box), box, up)
    assert up.calls == [((64, 64), (100, 100), "RGB")]
    assert (arr(out)[:100, :100] == (0, 255, 0)).all()


# ------------------------------------------------------------------------------------------------------
# fill_masked


def test_fill_keeps_unmasked_pixels_and_fills_a_hole_from_its_border():
    img = halves(64, 64)
    a = arr(img)
    a[16:48, 16:48] = (0, 0, 0)  # content under the mask must disappear
    hole = rect_mask((64, 64), (16, 16, 48, 48))
    out = arr(fill_masked(Image.fromarray(a.astype(np.uint8)), hole))
    inside = np.asarray(hole) > 0
    assert np.array_equal(out[~inside], a[~inside])
    filled = out[inside]
    assert (filled.max(axis=1) > 100).all()  # no black left: every pixel got a border colour
    assert (filled[:, 1] < 40).all()  # made of red and blue only
    left, right = out[32, 18], out[32, 45]
    assert left[0] > 150 and left[2] < 100
    assert right[2] > 150 and right[0] < 100


def test_fill_of_a_red_hole_is_red():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:] = RED
    a[20:44, 20:44] = (0, 255, 0)
    out = arr(fill_masked(Image.fromarray(a), rect_mask((64, 64), (20, 20, 44, 44))))
    assert (np.abs(out[20:44, 20:44] - RED) <= 2).all()


def test_fill_soft_mask_and_edge_cases():
    img = gradient(48, 40)
    soft = blur_mask(rect_mask((48, 40), (12, 10, 36, 30)), 4, 4)
    out = arr(fill_masked(img, soft))
    zero = np.asarray(soft) == 0
    assert np.array_equal(out[zero], arr(img)[zero])
    assert np.array_equal(arr(fill_masked(img, Image.new("L", (48, 40)))), arr(img))
    # nothing unmasked to spread from: black, as A1111's fill gives
    assert (arr(fill_masked(img, Image.new("L", (48, 40), 255))) == 0).all()
    with pytest.raises(ImageInputError, match="sizes differ"):
        fill_masked(img, Image.new("L", (10, 10)))


# ------------------------------------------------------------------------------------------------------
# overlay (Whole picture) and double_mask


def test_overlay_binary_mask_is_exact():
    original, generated = gradient(40, 30), halves(40, 30)
    mask = rect_mask((40, 30), (5, 5, 25, 20))
    out = arr(overlay(original, generated, mask))
    inside = np.asarray(mask) > 0
    assert np.array_equal(out[inside], arr(generated)[inside])
    assert np.array_equal(out[~inside], arr(original)[~inside])


def test_overlay_blurred_mask_blends():
    original = Image.new("RGB", (40, 10), (0, 0, 0))
    generated = Image.new("RGB", (40, 10), (200, 100, 50))
    mask = blur_mask(rect_mask((40, 10), (20, 0, 40, 10)), 4, 0)
    out = arr(overlay(original, generated, mask))
    m = arr(mask)[5]
    assert np.abs(out[5, :, 0] - np.rint(200 * m / 255)).max() <= 2
    assert (np.diff(out[5, :, 0]) >= 0).all() and 0 < out[5, 20, 0] < 200
    half = arr(overlay(original, generated, Image.new("L", (40, 10), 128)))
    assert abs(half[0, 0, 0] - 100) <= 2


def test_overlay_size_mismatch():
    with pytest.raises(ImageInputError, match="sizes differ"):
        overlay(gradient(10, 10), gradient(12, 10), Image.new("L", (10, 10)))
    with pytest.raises(ImageInputError, match="sizes differ"):
        overlay(gradient(10, 10), gradient(10, 10), Image.new("L", (9, 10)))


def test_double_mask():
    m = Image.fromarray(np.array([[0, 1, 100, 127, 128, 200, 255]], np.uint8))
    assert arr(double_mask(m)).tolist() == [[0, 2, 200, 254, 255, 255, 255]]


# ------------------------------------------------------------------------------------------------------
# colour correction


def test_color_correction_pulls_a_tinted_result_toward_the_init_colours():
    init = gradient(64, 64)
    a = arr(init).astype(float)
    # a colour cast that keeps the luminosity (0.299*40 - 0.587*20 ~ 0): A1111 keeps the result's own
    # luminosity and takes the init image's colours
    tinted = Image.fromarray(np.clip(a + (40, -20, 0), 0, 255).astype(np.uint8))
    out = correct_colors(tinted, color_reference(init))
    assert out.size == init.size and out.mode == "RGB"
    before = np.abs(arr(tinted).mean(axis=(0, 1)) - a.mean(axis=(0, 1))).sum()
    after = np.abs(arr(out).mean(axis=(0, 1)) - a.mean(axis=(0, 1))).sum()
    assert after < before / 4


def test_color_correction_of_the_init_image_itself_changes_little():
    init = gradient(64, 48)
    out = arr(correct_colors(init, color_reference(init)))
    assert np.abs(out - arr(init)).mean() < 2
