"""A1111's "Poor man's outpainting" (``scripts/poor_mans_outpainting.py``, img2img), and what it
shares with "Outpainting mk2" (studio/scripts/outpainting_mk2.py): the directions, the canvas size
and the mask blur.

Both grow the canvas so that each side is a multiple of 64: ``pixels`` are added on each chosen
side, the width (height) rounded up to a multiple of 64, and the extra split between left and
right (up and down) in proportion (``left = left * extra // (left + right)``, right takes the rest).

Poor man's outpainting puts the image on a black canvas of that size, cuts the canvas into tiles
of the request's width x height overlapping by ``pixels`` (studio/scripts/tiles.py), inpaints every
tile that reaches into the new area (one generation each, the seed + 1 from tile to tile) with a
mask that covers the new area and ``2 * mask blur`` pixels of the image's edge, blurred by
``2 * mask blur``, and feathers the tiles back together. Only the combined picture is returned.
Where a side that did not grow is not a multiple of 64, the picture is cropped back to the image's
size on that axis (A1111 returns the canvas, with a black band where it rounded up).

The studio has no separate latent mask (A1111 passes one, inset by ``mask blur // 2``, for the
latent blend): the latent blend uses the blurred mask, as a request with a mask does.

Both scripts draw the kept rectangle of their masks as A1111 does, except that its right and
bottom edges are exclusive where the canvas grew: A1111's inclusive Pillow rectangle keeps the
first new column (row) there, which with mask blur 0 leaves a black line along the seam.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from studio.errors import RequestError
from studio.generation.img2img_pixels import blur_mask
from studio.generation.request import INPAINT_FILL, MAX_MASK_BLUR
from studio.scripts.base import Script, ScriptArg, ScriptEnv, ScriptRun, as_choice, as_number, filled
from studio.scripts.sd_upscale import tile_size
from studio.scripts.tiles import combine_grid, split_grid, sub_request

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult

DIRECTIONS = ("left", "right", "up", "down")
PIXELS = ScriptArg("Pixels to expand", 128, "slider", minimum=8, maximum=256, step=8)
DIRECTION = ScriptArg("Outpainting direction", DIRECTIONS, "checkboxgroup", choices=DIRECTIONS)


def parse_directions(value: Any, arg: ScriptArg = DIRECTION) -> tuple[str, ...]:
    """The chosen directions: a list of names (A1111's checkbox group), or one comma-separated text."""
    items = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise RequestError(f"script argument '{arg.label}' must be a list of {', '.join(DIRECTIONS)} "
                           f"(got {value!r})")
    chosen = {as_choice(str(item).strip(), arg) for item in items}
    if not chosen:
        raise RequestError(f"script argument '{arg.label}': choose at least one of {', '.join(DIRECTIONS)}")
    return tuple(d for d in DIRECTIONS if d in chosen)


@dataclass(frozen=True)
class Expansion:
    """Pixels added on each side, the canvas size (each side a multiple of 64) and the image's."""

    left: int
    right: int
    up: int
    down: int
    width: int
    height: int
    image_w: int
    image_h: int

    @property
    def interior(self) -> tuple[int, int, int, int]:
        """The canvas less the added strips (A1111's test for tiles that need no work)."""
        return self.left, self.up, self.width - self.right, self.height - self.down

    @property
    def result_size(self) -> tuple[int, int]:
        """The image and the added strips: the canvas less the rounding of a side that did not grow."""
        return self.left + self.image_w + self.right, self.up + self.image_h + self.down


def expansion(size: tuple[int, int], pixels: int, directions: Sequence[str]) -> Expansion:
    """A1111's target size and per-side split (both outpainting scripts)."""
    w, h = size
    left = pixels if "left" in directions else 0
    right = pixels if "right" in directions else 0
    up = pixels if "up" in directions else 0
    down = pixels if "down" in directions else 0
    target_w = math.ceil((w + left + right) / 64) * 64
    target_h = math.ceil((h + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - w) // (left + right)
    if right > 0:
        right = target_w - w - left
    if up > 0:
        up = up * (target_h - h) // (up + down)
    if down > 0:
        down = target_h - h - up
    return Expansion(left, right, up, down, target_w, target_h, w, h)


def blur_changes(mask: Image.Image, blur_x: int, blur_y: int) -> tuple[Image.Image, dict[str, Any]]:
    """The mask and the request's blur fields for a blur of ``blur_x`` x ``blur_y``: the request's own
    blur up to its limit, beyond it (the scripts multiply their slider) the mask blurred here the
    same way (A1111's Gaussian) and sent unblurred."""
    if blur_x <= MAX_MASK_BLUR and blur_y <= MAX_MASK_BLUR:
        return mask, {"mask_blur_x": blur_x, "mask_blur_y": blur_y, "mask_blur": None}
    return blur_mask(mask, blur_x, blur_y), {"mask_blur_x": 0, "mask_blur_y": 0, "mask_blur": None}


def inpaint_changes(mask: Image.Image, blur_x: int, blur_y: int, fill: int) -> dict[str, Any]:
    """Request fields of one outpainting generation: "Whole picture" inpainting of ``mask``."""
    mask, blur = blur_changes(mask, blur_x, blur_y)
    return {"mask": mask, **blur, "inpainting_fill": fill, "inpaint_full_res": False, "inpainting_mask_invert": 0,
            "resize_mode": 0, "save_images": False, "do_not_save_samples": True, "do_not_save_grid": True}


# --------------------------------------------------------------------------------------------------------
# Poor man's outpainting

POOR_ARGS = (
    PIXELS,
    ScriptArg("Mask blur", 4, "slider", minimum=0, maximum=64, step=1),
    ScriptArg("Masked content", "fill", "radio", choices=INPAINT_FILL),
    DIRECTION,
)


@dataclass(frozen=True)
class PoorParams:
    pixels: int
    mask_blur: int
    fill: int                       # index into INPAINT_FILL
    directions: tuple[str, ...]


def poor_mask(exp: Expansion, blur: int) -> Image.Image:
    """White (repaint) on the new area and ``2 * blur`` pixels into the image on each grown side."""
    mask = Image.new("L", (exp.width, exp.height), 255)
    ImageDraw.Draw(mask).rectangle((
        exp.left + (blur * 2 if exp.left > 0 else 0),
        exp.up + (blur * 2 if exp.up > 0 else 0),
        exp.width - exp.right - (blur * 2 + 1 if exp.right > 0 else 0),
        exp.height - exp.down - (blur * 2 + 1 if exp.down > 0 else 0),
    ), fill=0)
    return mask


class PoorMansOutpainting(Script):
    title = "Poor man's outpainting"
    tabs = ("img2img",)

    def args(self, env: ScriptEnv, tab: str) -> tuple[ScriptArg, ...]:
        return POOR_ARGS

    def parse(self, values: Sequence[Any], req: Txt2ImgRequest, env: ScriptEnv) -> PoorParams:
        v = filled(values, POOR_ARGS, self.title)
        pixels = int(as_number(v[0], POOR_ARGS[0], integer=True))
        blur = int(as_number(v[1], POOR_ARGS[1], integer=True))
        fill = INPAINT_FILL.index(as_choice(v[2], POOR_ARGS[2]))
        directions = parse_directions(v[3])
        exp = expansion(req.init_images[0].size, pixels, directions)
        tw, th = tile_size((exp.width, exp.height), req.width, req.height)
        for side, tile, size in (("width", tw, exp.width), ("height", th, exp.height)):
            if tile < size and tile <= pixels:
                raise RequestError(f"{self.title}: the request's {side} ({tile}) is the tile {side}; it must be "
                                   f"larger than the pixels to expand ({pixels}), which the tiles overlap by")
        return PoorParams(pixels, blur, fill, directions)

    def run(self, ctx: ScriptRun, req: Txt2ImgRequest, params: PoorParams) -> GenerationResult:
        init = req.init_images[0].convert("RGB")
        exp = expansion(init.size, params.pixels, params.directions)
        canvas = Image.new("RGB", (exp.width, exp.height))
        canvas.paste(init, (exp.left, exp.up))
        mask = poor_mask(exp, params.mask_blur)
        tw, th = tile_size(canvas.size, req.width, req.height)
        grid = split_grid(canvas, tw, th, params.pixels)
        masks = split_grid(mask, tw, th, params.pixels).images()
        x1, y1, x2, y2 = exp.interior
        todo = [i for i, (x, y, w, h) in enumerate(grid.positions())
                if not (x >= x1 and x + w <= x2 and y >= y1 and y + h <= y2)]
        tiles = grid.images()
        seed = req.seed
        results: list[GenerationResult] = []
        blur = params.mask_blur * 2
        for n, i in enumerate(todo):
            if ctx.state.interrupted:
                break
            ctx.state.textinfo = f"{self.title}: tile {n + 1} of {len(todo)}"
            sub = sub_request(req, self.title, init_images=[tiles[i]], batch_size=1, n_iter=1, seed=seed,
                              width=tw, height=th, **inpaint_changes(masks[i], blur, blur, params.fill))
            result = ctx.generate(sub)
            results.append(result)
            seed = (result.seeds[0] if result.seeds else seed) + 1
            if result.images:
                tiles[i] = result.images[0]
        if not results:
            raise RequestError("the script made no images (interrupted before the first one)")
        picture = combine_grid(grid.with_images(tiles)).crop((0, 0, *exp.result_size))
        first = results[0]
        infotext = first.infotexts[0] if first.infotexts else ""
        initial_seed = first.seeds[0] if first.seeds else req.seed
        path = ctx.save_image(picture, infotext, initial_seed, req)
        return replace(first, images=[picture], seeds=[initial_seed], infotexts=[infotext],
                       subseeds=first.subseeds[:1], paths=[path] if path else [], request=req,
                       notes=list(dict.fromkeys(n for r in results for n in r.notes)),
                       interrupted=ctx.state.interrupted, detected_maps=[], prompts=[], negative_prompts=[])
