"""A1111's "SD upscale" script (``scripts/sd_upscale.py``, img2img): the init image enlarged by the
scale factor with an upscaler, cut into overlapping tiles of the request's width x height, each tile
run through img2img, and the tiles feathered back together (studio/scripts/tiles.py).

As in A1111: the upscaler enlarges to ``floor(size * scale / 8) * 8`` ("None" leaves the image as
it is); tiles go in batches of ``batch_size``, the first batch at the request's seed and each next
batch at the previous batch's first seed + 1; ``n_iter`` makes that many upscales, the n-th
starting at seed + n. The tiles are neither saved nor returned; each finished picture is saved
as the request's samples are, with the first tile's infotext plus "SD upscale overlap" and
"SD upscale upscaler".

One difference: a tile larger than the enlarged image is shrunk to it (A1111 would pad it with
black and repaint the padding too), so a small image is not worked on at a needlessly large size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from studio.errors import RequestError
from studio.generation.request import MIN_SIZE
from studio.scripts.base import Script, ScriptArg, ScriptEnv, ScriptRun, as_choice, as_number, filled
from studio.scripts.tiles import append_params, combine_grid, split_grid, sub_request

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult

INFO = "Will upscale the image by the selected scale factor; use width and height sliders to set tile size"
OVERLAP = ScriptArg("Tile overlap", 64, "slider", minimum=0, maximum=256, step=16)
SCALE = ScriptArg("Scale Factor", 2.0, "slider", minimum=1.0, maximum=4.0, step=0.05)


def _args(env: ScriptEnv) -> tuple[ScriptArg, ...]:
    names = tuple(env.upscaler_names())
    return (ScriptArg("", INFO, "html"), OVERLAP,
            ScriptArg("Upscaler", names[0] if names else "None", "radio", choices=names), SCALE)


@dataclass(frozen=True)
class UpscaleParams:
    overlap: int
    upscaler: str
    scale: float


def upscaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """A1111's ``Upscaler.upscale`` target: each side times ``scale``, down to a multiple of 8."""
    return int(size[0] * scale // 8 * 8), int(size[1] * scale // 8 * 8)


def tile_size(image_size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The request's size, shrunk to the image where the image is smaller (a multiple of 8, at least
    the smallest generation size)."""
    w, h = image_size
    return (min(width, max(MIN_SIZE, w // 8 * 8)), min(height, max(MIN_SIZE, h // 8 * 8)))


class SDUpscale(Script):
    title = "SD upscale"
    tabs = ("img2img",)

    def args(self, env: ScriptEnv, tab: str) -> tuple[ScriptArg, ...]:
        return _args(env)

    def parse(self, values: Sequence[Any], req: Txt2ImgRequest, env: ScriptEnv) -> UpscaleParams:
        args = _args(env)
        v = filled(values, args, self.title)
        overlap = int(as_number(v[1], OVERLAP, integer=True))
        value = v[2]
        if isinstance(value, float) and value.is_integer():
            value = int(value)   # an index sent as a JSON number
        upscaler = as_choice(value, args[2])
        scale = float(as_number(v[3], SCALE))
        if getattr(req, "mask", None) is not None:
            raise RequestError("SD upscale works on the whole image: send it without a mask")
        w, h = req.init_images[0].size if getattr(req, "init_images", None) else (req.width, req.height)
        big = upscaled_size((w, h), scale) if upscaler != "None" else (w, h)
        tw, th = tile_size(big, req.width, req.height)
        for side, tile in (("width", tw), ("height", th)):
            if tile <= overlap and tile < (big[0] if side == "width" else big[1]):
                raise RequestError(f"SD upscale: the tile {side} ({tile}, the request's {side}) must be larger "
                                   f"than the tile overlap ({overlap})")
        return UpscaleParams(overlap, upscaler, scale)

    def run(self, ctx: ScriptRun, req: Txt2ImgRequest, params: UpscaleParams) -> GenerationResult:
        init = req.init_images[0].convert("RGB")
        if params.upscaler != "None":
            ctx.state.textinfo = f"SD upscale: upscaling with {params.upscaler}"
            image = ctx.upscale(init, params.upscaler, upscaled_size(init.size, params.scale))
        else:
            image = init
        tw, th = tile_size(image.size, req.width, req.height)
        grid = split_grid(image, tw, th, params.overlap)
        work = grid.images()
        extra = {"SD upscale overlap": params.overlap, "SD upscale upscaler": params.upscaler}
        batch = req.batch_size
        batches = -(-len(work) // batch)
        finished: list[Image.Image] = []
        seeds: list[int] = []
        paths = []
        results: list[GenerationResult] = []
        infotext = ""
        for n in range(req.n_iter):
            start_seed = seed = req.seed + n
            done: list[Image.Image] = []
            for i in range(batches):
                if ctx.state.interrupted:
                    break
                ctx.state.textinfo = f"SD upscale: batch {i + 1 + n * batches} of {batches * req.n_iter}"
                tiles = work[i * batch:(i + 1) * batch]
                sub = sub_request(req, self.title, init_images=tiles, batch_size=len(tiles), n_iter=1, seed=seed,
                                  width=tw, height=th, resize_mode=0, save_images=False, do_not_save_samples=True,
                                  do_not_save_grid=True)
                result = ctx.generate(sub)
                results.append(result)
                if not infotext and result.infotexts:
                    infotext = append_params(result.infotexts[0], extra)
                seed = (result.seeds[0] if result.seeds else seed) + 1
                done += result.images
            if ctx.state.interrupted and len(done) < len(work):
                break
            picture = combine_grid(grid.with_images(done))
            finished.append(picture)
            seeds.append(start_seed)
            path = ctx.save_image(picture, infotext, start_seed, req)
            if path is not None:
                paths.append(path)
        if not finished:
            raise RequestError("the script made no images (interrupted before the first one)")
        first = results[0]
        return replace(first, images=finished, seeds=seeds, infotexts=[infotext] * len(finished),
                       subseeds=[req.subseed] * len(finished), paths=paths, request=req,
                       notes=list(dict.fromkeys(n for r in results for n in r.notes)),
                       interrupted=ctx.state.interrupted, detected_maps=[],
                       extra_params={**first.extra_params, **extra}, prompts=[], negative_prompts=[])
