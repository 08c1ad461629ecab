"""A1111's "Outpainting mk2" (``scripts/outpainting_mk_2.py``, img2img): the canvas grown one
direction at a time (left, right, up, down, each chosen one in turn), the new strip filled with
noise whose frequency content and colours are matched to the image, and then inpainted.

Each step, as in A1111 (the canvas size is outpainting.py's :func:`expansion`):

1. the current picture on a canvas ``pixels`` larger on that side (rounded up to a multiple of 64;
   the rounding is cropped off again at the end of the step);
2. a mask covering the new strip and ``mask blur`` pixels of the picture's edge, the rest of the
   canvas filled with matched noise (:func:`matched_noise`, A1111's port of g-diffuser's);
3. a window at that edge, the request's width (height) wide for a sideways (vertical) step and the
   canvas' full height (width) across it, inpainted with "original" masked content, "Whole
   picture", mask blur ``4 * mask blur`` along the axis that grew, one generation for the batch;
4. the window pasted back onto the canvas.

Every step and every batch of ``n_iter`` uses the request's seed (A1111 never advances it here),
the images of a batch ``seed + index``. The finished pictures are returned (a grid of them first
when there are several, as A1111's "return grid" does) and saved as the request's samples are.

The studio has no separate latent mask (A1111 passes one inset by ``2 * mask blur``): the latent
blend uses the blurred mask, as a request with a mask does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from skimage import exposure

from studio.errors import RequestError
from studio.generation.grids import GridLayout
from studio.scripts.base import Script, ScriptArg, ScriptEnv, ScriptRun, as_number, filled
from studio.scripts.outpainting import DIRECTION, PIXELS, expansion, inpaint_changes, parse_directions
from studio.scripts.tiles import sub_request

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult

INFO = "Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, Denoising strength: 0.8"
MK2_ARGS = (
    ScriptArg("", INFO, "html"),
    PIXELS,
    ScriptArg("Mask blur", 8, "slider", minimum=0, maximum=64, step=1),
    DIRECTION,
    ScriptArg("Fall-off exponent (lower=higher detail)", 1.0, "slider", minimum=0.0, maximum=4.0, step=0.01),
    ScriptArg("Color variation", 0.05, "slider", minimum=0.0, maximum=1.0, step=0.01),
)
OVERLAY_BLUR = 4   # A1111 blurs mk2's mask by 4x the slider


@dataclass(frozen=True)
class Mk2Params:
    pixels: int
    mask_blur: int
    directions: tuple[str, ...]
    noise_q: float
    color_variation: float


# --------------------------------------------------------------------------------------------------------
# Matched noise


def _fft2(a: np.ndarray) -> np.ndarray:
    # orthonormal, centred before and after (g-diffuser's helpers), per channel
    return np.fft.ifftshift(np.fft.fft2(np.fft.fftshift(a, axes=(0, 1)), norm="ortho", axes=(0, 1)), axes=(0, 1))


def _ifft2(a: np.ndarray) -> np.ndarray:
    return np.fft.ifftshift(np.fft.ifft2(np.fft.fftshift(a, axes=(0, 1)), norm="ortho", axes=(0, 1)), axes=(0, 1))


def _falloff_window(rows: int, cols: int) -> np.ndarray:
    """A1111's window "mode 1": 1 / ((x^2 + 1) (y^2 + 1)) over [-1, 1] scaled by the aspect ratio."""
    short = min(rows, cols)
    x = (np.arange(rows) / rows * 2.0 - 1.0) * (rows / short)
    y = (np.arange(cols) / cols * 2.0 - 1.0) * (cols / short)
    return np.outer(1.0 / (x ** 2 + 1.0), 1.0 / (y ** 2 + 1.0))


def matched_noise(image: Image.Image, mask: Image.Image, noise_q: float = 1.0,
                  color_variation: float = 0.05) -> Image.Image:
    """``image`` with the area where ``mask`` is white replaced by noise shaped like the rest of the
    image: the noise's spectrum is given the unmasked image's magnitudes (to the power ``noise_q``,
    lower keeps more detail) and phases, and its histogram matched to the unmasked colours;
    ``color_variation`` is how colourful the starting noise is. Seeded, so it depends only on its
    inputs. Pixels outside the mask are the image's, exactly."""
    src = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    grey = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0
    mask_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    fill_area, reference = grey > 1e-6, grey < 1e-3
    if not fill_area.any() or not reference.any():
        return image.convert("RGB").copy()

    windowed = src * (1.0 - mask_rgb)
    peak = np.max(windowed)
    if peak > 0:
        windowed /= peak
    # the hole filled with the average colour, not black, gives the FFT a better estimate
    windowed += np.average(src) * mask_rgb
    src_fft = _fft2(windowed)
    src_dist = np.absolute(src_fft)
    src_phase = np.divide(src_fft, src_dist, out=np.zeros_like(src_fft), where=src_dist > 0)

    rng = np.random.default_rng(0)
    rows, cols = grey.shape
    noise = rng.random((rows, cols, 3))
    noise_grey = noise.sum(axis=2) / 3.0
    noise = noise * color_variation + ((1.0 - color_variation) * noise_grey)[:, :, None]
    noise_fft = _fft2(noise) * _falloff_window(rows, cols)[:, :, None]
    noise = np.real(_ifft2(noise_fft))
    shaped_fft = np.absolute(_fft2(noise)) ** 2 * (src_dist ** noise_q) * src_phase

    shaped = np.real(_ifft2(shaped_fft))
    shaped -= shaped.min()
    top = shaped.max()
    if top > 0:
        shaped /= top
    shaped[fill_area, :] = exposure.match_histograms(shaped[fill_area, :], src[reference, :], channel_axis=1)
    blended = src * (1.0 - mask_rgb) + shaped * mask_rgb
    out = np.clip(np.clip(blended, 0.0, 1.0) * 255.0, 0, 255).astype(np.uint8)
    keep = grey <= 0
    out[keep] = np.asarray(image.convert("RGB"))[keep]
    return Image.fromarray(out, "RGB")


# --------------------------------------------------------------------------------------------------------
# The script


@dataclass(frozen=True)
class _Step:
    side: str
    pixels: int

    @property
    def horizontal(self) -> bool:
        return self.side in ("left", "right")


class OutpaintingMk2(Script):
    title = "Outpainting mk2"
    tabs = ("img2img",)

    def args(self, env: ScriptEnv, tab: str) -> tuple[ScriptArg, ...]:
        return MK2_ARGS

    def parse(self, values: Sequence[Any], req: Txt2ImgRequest, env: ScriptEnv) -> Mk2Params:
        v = filled(values, MK2_ARGS, self.title)
        pixels = int(as_number(v[1], MK2_ARGS[1], integer=True))
        blur = int(as_number(v[2], MK2_ARGS[2], integer=True))
        return Mk2Params(pixels, blur, parse_directions(v[3]), float(as_number(v[4], MK2_ARGS[4])),
                         float(as_number(v[5], MK2_ARGS[5])))

    def run(self, ctx: ScriptRun, req: Txt2ImgRequest, params: Mk2Params) -> GenerationResult:
        init = req.init_images[0].convert("RGB")
        exp = expansion(init.size, params.pixels, params.directions)
        steps = [_Step(side, amount) for side, amount in
                 (("left", exp.left), ("right", exp.right), ("up", exp.up), ("down", exp.down)) if amount > 0]
        blur_x = params.mask_blur if exp.left or exp.right else 0
        blur_y = params.mask_blur if exp.up or exp.down else 0
        pictures: list[Image.Image] = []
        results: list[GenerationResult] = []
        for n in range(req.n_iter):
            images = [init] * req.batch_size
            for k, step in enumerate(steps):
                if ctx.state.interrupted:
                    break
                ctx.state.textinfo = (f"{self.title}: batch {n + 1} of {req.n_iter}, "
                                      f"{step.side} ({k + 1} of {len(steps)})")
                images, result = self._expand(ctx, req, images, step, blur_x, blur_y, params)
                results.append(result)
            if ctx.state.interrupted:
                break
            pictures += images
        if not pictures:
            raise RequestError("the script made no images (interrupted before the first one)")
        first = results[0]
        infotext = first.infotexts[0] if first.infotexts else ""
        seeds = [req.seed + i % req.batch_size for i in range(len(pictures))]
        paths = [p for p in (ctx.save_image(img, infotext, s, req) for img, s in zip(pictures, seeds)) if p]
        result = replace(first, images=pictures, seeds=seeds, infotexts=[infotext] * len(pictures),
                         subseeds=[req.subseed] * len(pictures), paths=paths, request=req,
                         notes=list(dict.fromkeys(n for r in results for n in r.notes)),
                         interrupted=ctx.state.interrupted, detected_maps=[], prompts=[], negative_prompts=[])
        return _with_grid(ctx, req, result, infotext)

    def _expand(self, ctx: ScriptRun, req: Txt2ImgRequest, images: list[Image.Image], step: _Step, blur_x: int,
                blur_y: int, params: Mk2Params) -> tuple[list[Image.Image], GenerationResult]:
        """One direction for every image of the batch: canvas, noise, window, inpaint, paste back."""
        is_left, is_right, is_top, is_bottom = (step.side == s for s in ("left", "right", "up", "down"))
        grow_x = step.pixels if step.horizontal else 0
        grow_y = 0 if step.horizontal else step.pixels
        canvases, windows, sizes = [], [], []
        mask = window = None
        for image in images:
            res_w, res_h = image.width + grow_x, image.height + grow_y
            canvas = Image.new("RGB", (math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64))
            canvas.paste(image, (grow_x if is_left else 0, grow_y if is_top else 0))
            mask = Image.new("L", canvas.size, 255)
            # the kept rectangle; its far edge exclusive where the canvas grew (see outpainting.py)
            ImageDraw.Draw(mask).rectangle((
                step.pixels + blur_x if is_left else 0,
                step.pixels + blur_y if is_top else 0,
                mask.width - step.pixels - blur_x - 1 if is_right else res_w,
                mask.height - step.pixels - blur_y - 1 if is_bottom else res_h,
            ), fill=0)
            noised = matched_noise(canvas, mask, params.noise_q, params.color_variation)
            target_w = min(req.width, res_w) if step.horizontal else canvas.width
            target_h = canvas.height if step.horizontal else min(req.height, res_h)
            window = (0 if is_left else canvas.width - target_w, 0 if is_top else canvas.height - target_h,
                      target_w if is_left else canvas.width, target_h if is_top else canvas.height)
            canvases.append(noised)
            windows.append(noised.crop(window))
            sizes.append((res_w, res_h))
        assert mask is not None and window is not None
        width, height = window[2] - window[0], window[3] - window[1]
        sub = sub_request(req, self.title, init_images=windows, batch_size=len(windows), n_iter=1, width=width,
                          height=height, **inpaint_changes(mask.crop(window), OVERLAY_BLUR * blur_x,
                                                           OVERLAY_BLUR * blur_y, fill=1))
        result = ctx.generate(sub)
        out = []
        for canvas, made, size in zip(canvases, result.images or [None] * len(canvases), sizes):
            if made is not None:
                canvas.paste(made, (0 if is_left else canvas.width - made.width,
                                    0 if is_top else canvas.height - made.height))
            out.append(canvas.crop((0, 0, *size)))
        return out, result


def _with_grid(ctx: ScriptRun, req: Txt2ImgRequest, result: GenerationResult, infotext: str) -> GenerationResult:
    """A1111's grid of the pictures: saved when ``grid_save`` and put first when ``return_grid`` (on
    unless set off), unless there is one picture and grids are only for several."""
    keys = ("n_rows", "grid_prevent_empty_spots", "grid_background_color", "grid_only_if_multiple")
    layout = GridLayout.from_options({k: ctx.env.option(k) for k in keys})
    if not layout.wanted(len(result.images)):
        return result
    grid = layout.make(result.images, batch_size=1)
    path = ctx.save_grid(grid, infotext, req, basename="grid")
    if ctx.env.option("return_grid") is False:
        return replace(result, grid_path=path)
    return replace(result, images=[grid, *result.images], infotexts=[infotext, *result.infotexts],
                   seeds=[result.seeds[0], *result.seeds], subseeds=[result.subseeds[0], *result.subseeds],
                   grid_path=path)
