"""img2img and inpainting through the engine with tiny real-layout checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from studio.config import Flags
from studio.core import Studio
from studio.generation import img2img_pixels as pixels
from studio.generation.img2img import latent_mask, prepare, run_img2img
from studio.generation.infotext import parse_infotext
from studio.generation.request import Img2ImgRequest, RequestError
from studio.jobs import JobState
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2img")
    make_models_dir(root, (("sd1", ".safetensors"), ("sd1-inpaint", ".safetensors"), ("sdxl", ".safetensors"),
                           ("sd2", ".safetensors"), ("sdxl-inpaint", ".safetensors")))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def picture(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth colours: something a VAE can reproduce roughly
    base = rng.integers(0, 255, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)


def centre_mask(w: int = 64, h: int = 64, box=(16, 16, 48, 48)) -> Image.Image:
    arr = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = 255
    return Image.fromarray(arr, "L")


def request(**kw) -> Img2ImgRequest:
    base = dict(prompt="a stone bridge", steps=4, width=64, height=64, seed=5, sampler_name="Euler",
                save_images=False, init_images=(picture(),), checkpoint="tiny-sd1.safetensors")
    base.update(kw)
    return Img2ImgRequest(**base)


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_denoising_zero_returns_the_vae_round_trip(studio):
    image = picture()
    result = studio.img2img(request(init_images=(image,), denoising_strength=0.0))
    model = result.model
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        lat = model.vae.encode(x).latent_dist.mode()
        px = model.vae.decode(lat).sample[0]
    expected = ((px.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    # equal up to rounding: the engine scales latents by the VAE's factor and back
    assert np.abs(np.asarray(result.images[0]).astype(int) - expected.astype(int)).max() <= 1
    info = parse_infotext(result.infotexts[0])
    assert info["Denoising strength"] == "0" and result.info()["denoising_strength"] == 0


def test_strength_changes_the_result_and_seeds_repeat(studio):
    low = studio.img2img(request(denoising_strength=0.3))
    high = studio.img2img(request(denoising_strength=0.9))
    again = studio.img2img(request(denoising_strength=0.9))
    assert not np.array_equal(arr(low.images[0]), arr(high.images[0]))
    np.testing.assert_array_equal(arr(high.images[0]), arr(again.images[0]))
    assert low.images[0].size == (64, 64)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_resize_modes_give_the_requested_geometry(studio, mode):
    # a tall init image into a wide generation: every mode must give exactly the requested size
    result = studio.img2img(request(init_images=(picture(64, 128),), width=96, height=64, resize_mode=mode,
                                    denoising_strength=0.5))
    assert result.images[0].size == (96, 64)


@pytest.mark.parametrize("full_res", [False, True])
@pytest.mark.parametrize("invert", [False, True])
def test_pixels_outside_the_mask_are_the_original(studio, full_res, invert):
    image, mask = picture(seed=3), centre_mask()
    result = studio.img2img(request(init_images=(image,), mask=mask, mask_blur_x=0, mask_blur_y=0,
                                    inpaint_full_res=full_res, inpaint_full_res_padding=8,
                                    inpainting_mask_invert=invert, denoising_strength=1.0))
    out = arr(result.images[0])
    assert result.images[0].size == image.size
    repaint = np.asarray(mask) > 0
    if invert:
        repaint = ~repaint
    np.testing.assert_array_equal(out[~repaint], arr(image)[~repaint])
    assert np.abs(out[repaint] - arr(image)[repaint]).mean() > 1  # something was painted inside
    info = parse_infotext(result.infotexts[0])
    assert info["Mask blur"] == "0"
    assert (info.get("Inpaint area") == "Only masked") == full_res
    assert (info.get("Mask mode") == "Inpaint not masked") == invert


def test_blurred_mask_blends_softly_and_keeps_far_pixels(studio):
    image, mask = picture(seed=4), centre_mask()
    result = studio.img2img(request(init_images=(image,), mask=mask, mask_blur_x=4, mask_blur_y=4,
                                    denoising_strength=1.0))
    out, orig = arr(result.images[0]), arr(image)
    np.testing.assert_array_equal(out[:4], orig[:4])  # rows far from the mask
    assert parse_infotext(result.infotexts[0])["Mask blur"] == "4"


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_masked_content_modes_run(studio, fill):
    result = studio.img2img(request(mask=centre_mask(), inpainting_fill=fill, denoising_strength=0.8))
    names = ["fill", "original", "latent noise", "latent nothing"]
    assert parse_infotext(result.infotexts[0])["Masked content"] == names[fill]


@pytest.mark.parametrize("checkpoint", ["tiny-sd1-inpaint", "tiny-sdxl-inpaint", "tiny-sd2", "tiny-sdxl"])
def test_inpainting_on_every_family(studio, checkpoint):
    image, mask = picture(seed=6), centre_mask()
    result = studio.img2img(request(checkpoint=f"{checkpoint}.safetensors", init_images=(image,), mask=mask,
                                    mask_blur_x=0, mask_blur_y=0, denoising_strength=1.0))
    assert result.info()["is_using_inpainting_conditioning"] is checkpoint.endswith("inpaint")
    out, orig = arr(result.images[0]), arr(image)
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(out[keep], orig[keep])


def test_sdxl_img2img(studio):
    result = studio.img2img(request(checkpoint="tiny-sdxl.safetensors", denoising_strength=0.6))
    assert result.images[0].size == (64, 64)


def test_odd_inputs_are_accepted_or_refused_clearly(studio):
    gray = picture().convert("L")
    rgba = picture().convert("RGBA")
    buf = io.BytesIO()
    Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)).save(buf, "PNG")
    sixteen = Image.open(io.BytesIO(buf.getvalue()))
    for image in (gray, rgba, sixteen, picture(1024, 768)):
        assert studio.img2img(request(init_images=(image,), denoising_strength=0.2)).images[0].size == (64, 64)
    # a mask of another size is resized, and the result says so
    result = studio.img2img(request(mask=centre_mask(32, 32, (8, 8, 24, 24)), denoising_strength=0.5))
    assert any("resized" in n for n in result.notes)
    empty = studio.img2img(request(mask=Image.new("L", (64, 64), 0), denoising_strength=0.5, mask_blur_x=0,
                                   mask_blur_y=0))
    assert any("empty" in n for n in empty.notes)
    np.testing.assert_array_equal(arr(empty.images[0]), arr(picture()))
    full = studio.img2img(request(mask=Image.new("L", (64, 64), 255), denoising_strength=0.5))
    assert any("whole image" in n for n in full.notes) and full.images[0].size == (64, 64)
    with pytest.raises(RequestError, match="init image"):
        studio.submit_img2img(request(init_images=()))
    with pytest.raises(RequestError):
        studio.submit_img2img(request(init_images=(b"not an image at all",)))
    with pytest.raises(ValueError, match="denoising_strength"):  # the schema refuses it when built
        request(denoising_strength=1.5)


def run_direct(studio, req: Img2ImgRequest, **options):
    """run_img2img itself, for the engine parameters the settings feed (colour correction, upscaler), on the
    request as the engine prepares it (clip skip, seed and the other settings-backed fields resolved)."""
    req = studio.engine.prepare(req).request
    model = studio.models.load(req.checkpoint)
    return run_img2img(model, req, JobState(job_id="test", description="img2img"), None, **options)


def test_color_correction_matches_the_result_to_the_init_colours(studio):
    init = picture(seed=7)
    req = request(init_images=(init,), denoising_strength=0.9)
    plain = run_direct(studio, req).images[0]
    corrected = run_direct(studio, req, color_correction=True).images[0]
    # the same sampling, then A1111's correction toward the init image's LAB histogram
    expected = pixels.correct_colors(plain, pixels.color_reference(init))
    np.testing.assert_array_equal(arr(corrected), arr(expected))

    def colour_distance(image):  # mean LAB a/b: the colour, whatever the luminosity (which the result keeps)
        ab = lambda im: pixels.color_reference(im)[..., 1:].reshape(-1, 2).mean(axis=0)
        return np.abs(ab(image) - ab(init)).sum()

    assert colour_distance(corrected) < colour_distance(plain)


def test_color_correction_comes_before_the_inpaint_overlay(studio):
    image, mask = picture(seed=8), centre_mask()
    req = request(init_images=(image,), mask=mask, mask_blur_x=0, mask_blur_y=0, inpaint_full_res=False,
                  denoising_strength=1.0)
    out = arr(run_direct(studio, req, color_correction=True).images[0])
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(out[keep], arr(image)[keep])  # the original, uncorrected, outside


def test_upscale_enlarges_a_small_init_image_and_only_then(studio):
    calls = []

    def green(image, width, height):
        calls.append((image.size, (width, height)))
        return Image.new("RGB", (width, height), (0, 200, 0))

    small = request(init_images=(picture(32, 32),), denoising_strength=0.0)
    out = arr(run_direct(studio, small, upscale=green).images[0])
    assert calls == [((32, 32), (64, 64))]
    # its output is what was encoded: the same as starting from that green picture
    already = request(init_images=(Image.new("RGB", (64, 64), (0, 200, 0)),), denoising_strength=0.0)
    np.testing.assert_array_equal(out, arr(run_direct(studio, already).images[0]))
    assert not np.array_equal(out, arr(run_direct(studio, small).images[0]))
    big = request(init_images=(picture(128, 128),), denoising_strength=0.0)
    np.testing.assert_array_equal(arr(run_direct(studio, big, upscale=green).images[0]),
                                  arr(run_direct(studio, big).images[0]))
    assert len(calls) == 1  # shrinking is Lanczos


def test_only_masked_region_comes_from_the_blurred_mask():
    mask = centre_mask(box=(24, 24, 40, 40))
    req = request(mask=mask, mask_blur_x=4, mask_blur_y=4, inpaint_full_res=True, inpaint_full_res_padding=0)
    box = prepare(req, picture()).box
    # the blur reaches int(2.5*4+0.5) = 10 pixels past the painted square; A1111 crops around that
    assert box[0] <= 24 - 8 and box[1] <= 24 - 8 and box[2] >= 40 + 8 and box[3] >= 40 + 8


@pytest.mark.parametrize("fill,filled", [(0, True), (1, False), (2, True), (3, True)])
def test_masked_area_is_filled_unless_original(fill, filled):
    image = picture(seed=9)
    req = request(init_images=(image,), mask=centre_mask(), mask_blur_x=0, mask_blur_y=0, inpaint_full_res=False,
                  inpainting_fill=fill)
    work = arr(prepare(req, image).work)
    inside = np.asarray(centre_mask()) > 0
    assert np.array_equal(work[~inside], arr(image)[~inside])
    assert (not np.array_equal(work[inside], arr(image)[inside])) == filled


def test_latent_mask_is_a1111s_latmask():
    mask = pixels.blur_mask(centre_mask(64, 48, (10, 7, 37, 30)), 4, 4)
    # A1111: init_mask.convert('RGB').resize((w // 8, h // 8)) with Pillow's default filter, first channel, rounded
    expected = np.around(np.asarray(mask.convert("RGB").resize((8, 6)), dtype=np.float32)[..., 0] / 255)
    np.testing.assert_array_equal(latent_mask(mask, 64, 48)[0, 0].numpy(), expected)


def test_variation_seed_and_resize_seed(studio):
    from studio.generation.request import Txt2ImgRequest

    def run(**kw):
        base = dict(prompt="a lake", steps=3, width=64, height=64, seed=9, sampler_name="Euler", save_images=False,
                    checkpoint="tiny-sd1.safetensors")
        return studio.txt2img(Txt2ImgRequest(**{**base, **kw}))

    plain = run()
    zero = run(subseed=123, subseed_strength=0.0)
    np.testing.assert_array_equal(arr(plain.images[0]), arr(zero.images[0]))
    half = run(subseed=123, subseed_strength=0.5)
    assert not np.array_equal(arr(plain.images[0]), arr(half.images[0]))
    info = parse_infotext(half.infotexts[0])
    assert info["Variation seed"] == "123" and info["Variation seed strength"] == "0.5"
    batch = run(subseed=123, subseed_strength=0.5, batch_size=2)
    assert batch.seeds == [9, 9] and batch.info()["all_subseeds"] == [123, 124]
    resized = run(seed_resize_from_w=128, seed_resize_from_h=64)
    parsed = parse_infotext(resized.infotexts[0])
    assert (parsed["Seed resize from-1"], parsed["Seed resize from-2"]) == ("128", "64")
    assert "Seed resize from: 128x64" in resized.infotexts[0]
    assert not np.array_equal(arr(plain.images[0]), arr(resized.images[0]))


def test_tiling_makes_left_and_right_edges_continuous(studio):
    from studio.generation.request import Txt2ImgRequest

    def edges(tiling: bool) -> float:
        req = Txt2ImgRequest(prompt="a pattern", steps=3, width=64, height=64, seed=2, sampler_name="Euler",
                             save_images=False, checkpoint="tiny-sd1.safetensors", tiling=tiling)
        result = studio.txt2img(req)
        a = arr(result.images[0]).astype(float)
        wrap = np.abs(a[:, 0] - a[:, -1]).mean()        # across the seam
        inner = np.abs(a[:, 1:] - a[:, :-1]).mean()     # between neighbours inside
        if tiling:
            assert parse_infotext(result.infotexts[0])["Tiling"] == "True"
        return wrap / inner

    # the wrap-around step looks like any other step between neighbours only with tiling
    assert edges(True) < 1.5
    assert edges(True) < edges(False)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos", "tiny4x"])
def test_hires_fix_size_steps_and_infotext(studio, upscaler):
    from studio.generation.request import Txt2ImgRequest
    from studio.testing.upscalers import write_esrgan

    write_esrgan(studio.paths.models / "ESRGAN" / "tiny4x.pth", scale=4, nf=8, nb=1)
    studio.upscalers.refresh()
    calls = []
    handle = studio.models.load("tiny-sd1.safetensors").unet.register_forward_pre_hook(
        lambda module, args: calls.append(tuple(args[0].shape[2:])))
    try:
        req = Txt2ImgRequest(prompt="a tower", steps=4, width=64, height=64, seed=3, sampler_name="Euler",
                             save_images=False, checkpoint="tiny-sd1.safetensors", enable_hr=True, hr_scale=1.5,
                             hr_upscaler=upscaler, hr_second_pass_steps=6, hr_denoising_strength=0.5)
        result = studio.txt2img(req)
    finally:
        handle.remove()
    assert result.images[0].size == (96, 96)
    # first pass: 4 steps at 8x8 latents; second: A1111 runs int(0.5 * 6) + 1 = 4 of 6 steps at 12x12
    assert calls.count((8, 8)) == 4 and calls.count((12, 12)) == 4
    info = parse_infotext(result.infotexts[0])
    assert (info["Size-1"], info["Size-2"]) == ("64", "64")  # the first pass's size, as A1111
    assert info["Hires upscale"] == "1.5" and info["Hires steps"] == "6" and info["Hires upscaler"] == upscaler
    assert info["Denoising strength"] == "0.5"
    with pytest.raises(RequestError, match="hr_upscaler"):
        studio.txt2img(req.with_changes(hr_upscaler="no-such-upscaler"))


def test_mask_round_off_keeps_a_soft_mask(studio):
    """A1111's ``mask_round``: on (the default) the latent mask is rounded to 0/1; off, a soft mask's
    grey edge blends the new latents in partly, so the pictures differ."""
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1))
    soft = Image.fromarray(ramp.astype(np.uint8), "L")
    common = dict(mask=soft, mask_blur=0, inpainting_fill=1, inpaint_full_res=False, denoising_strength=0.9)
    rounded = arr(studio.img2img(request(**common)).images[0])
    again = arr(studio.img2img(request(**common, mask_round=True)).images[0])
    kept = arr(studio.img2img(request(**common, mask_round=False)).images[0])
    assert np.array_equal(rounded, again)
    assert np.abs(rounded - kept).max() > 0
