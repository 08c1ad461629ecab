"""A1111's "Loopback" script (``scripts/loopback.py``, img2img): each picture is the next loop's init
image, the denoising strength moving from the request's to the final one along a curve.

As in A1111: one picture per loop (``batch_size`` is 1), the seed + 1 from loop to loop (and on
from one batch of ``n_iter`` to the next), masked content "original" from the second loop on, the
mask (if any) used in every loop. With one batch every loop's picture is returned, with several
each batch's last one; a one-row grid of them comes first when there are several (A1111's
"return grid"). Loop i (from 0) of n uses

    strength = initial + (final - initial) * curve(i / (n - 1))

with curve(p) = p (Linear), sin(p * pi/2) (Aggressive: changes early) or 1 - cos(p * pi/2) (Lazy).

A1111 can also append a CLIP or DeepBooru interrogation of each picture to the prompt; the studio
has no interrogator, so only "None" is accepted. With the ``img2img_color_correction`` setting,
each loop's colours are matched to that loop's init image (A1111 keeps the first one's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from studio.errors import RequestError
from studio.generation.grids import image_grid
from studio.scripts.base import Script, ScriptArg, ScriptEnv, ScriptRun, as_choice, as_number, filled
from studio.scripts.tiles import append_params, sub_request

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult

CURVES = ("Aggressive", "Linear", "Lazy")
INTERROGATORS = ("None", "CLIP", "DeepBooru")
ARGS = (
    ScriptArg("Loops", 4, "slider", minimum=1, maximum=32, step=1),
    ScriptArg("Final denoising strength", 0.5, "slider", minimum=0, maximum=1, step=0.01),
    ScriptArg("Denoising strength curve", "Linear", "dropdown", choices=CURVES),
    ScriptArg("Append interrogated prompt at each iteration", "None", "dropdown", choices=INTERROGATORS),
)


@dataclass(frozen=True)
class LoopbackParams:
    loops: int
    final_strength: float
    curve: str


def denoising_strengths(initial: float, final: float, loops: int, curve: str = "Linear") -> list[float]:
    """The denoising strength of each loop (A1111's ``calculate_denoising_strength``)."""
    if loops == 1:
        return [initial]
    out = []
    for i in range(loops):
        progress = i / (loops - 1)
        if curve == "Aggressive":
            amount = math.sin(progress * math.pi * 0.5)
        elif curve == "Lazy":
            amount = 1 - math.cos(progress * math.pi * 0.5)
        else:
            amount = progress
        out.append(initial + (final - initial) * amount)
    return out


class Loopback(Script):
    title = "Loopback"
    tabs = ("img2img",)

    def args(self, env: ScriptEnv, tab: str) -> tuple[ScriptArg, ...]:
        return ARGS

    def parse(self, values: Sequence[Any], req: Txt2ImgRequest, env: ScriptEnv) -> LoopbackParams:
        v = filled(values, ARGS, self.title)
        loops = int(as_number(v[0], ARGS[0], integer=True))
        final = float(as_number(v[1], ARGS[1]))
        curve = as_choice(v[2], ARGS[2])
        if as_choice(v[3], ARGS[3]) != "None":
            raise RequestError(f"script argument '{ARGS[3].label}': interrogation (CLIP, DeepBooru) is not available "
                               "in this studio; use None")
        return LoopbackParams(loops, final, curve)

    def run(self, ctx: ScriptRun, req: Txt2ImgRequest, params: LoopbackParams) -> GenerationResult:
        initial = req.denoising_strength if req.denoising_strength is not None else 0.75
        strengths = denoising_strengths(initial, params.final_strength, params.loops, params.curve)
        extra = {"Final denoising strength": params.final_strength, "Denoising curve": params.curve}
        batches = req.n_iter
        seed = req.seed
        kept: list[tuple[Image.Image, str, int, GenerationResult]] = []
        results: list[GenerationResult] = []
        for n in range(batches):
            init: list[Any] = list(req.init_images[:1])
            fill = req.inpainting_fill
            last = None
            for i, strength in enumerate(strengths):
                if ctx.state.interrupted:
                    break
                ctx.state.textinfo = f"{self.title}: iteration {i + 1}/{params.loops}, batch {n + 1}/{batches}"
                sub = sub_request(req, self.title, init_images=init, denoising_strength=strength, seed=seed,
                                  inpainting_fill=fill, batch_size=1, n_iter=1, do_not_save_grid=True)
                result = ctx.generate(sub)
                if ctx.state.interrupted or not result.images:
                    break
                results.append(result)
                seed = (result.seeds[0] if result.seeds else seed) + 1
                if ctx.state.skipped:
                    break
                text = append_params(result.infotexts[0] if result.infotexts else "", extra)
                last = (result.images[0], text, result.seeds[0] if result.seeds else seed - 1, result)
                init, fill = [last[0]], 1   # masked content "original" from the second loop on
                if batches == 1:
                    kept.append(last)
            if batches > 1 and last is not None and not ctx.state.skipped and not ctx.state.interrupted:
                kept.append(last)
            if ctx.state.interrupted:
                break
        if not kept:
            raise RequestError("the script made no images (interrupted before the first one)")
        first = results[0]
        images = [k[0] for k in kept]
        infotexts = [k[1] for k in kept]
        seeds = [k[2] for k in kept]
        result = replace(first, images=images, infotexts=infotexts, seeds=seeds,
                         subseeds=[k[3].subseeds[0] if k[3].subseeds else req.subseed for k in kept],
                         paths=[p for k in kept for p in k[3].paths], request=req,
                         notes=list(dict.fromkeys(n for r in results for n in r.notes)),
                         interrupted=ctx.state.interrupted, detected_maps=[], prompts=[], negative_prompts=[],
                         extra_params={**first.extra_params, **extra},
                         denoising_strength=strengths[0])
        if len(images) < 2:
            return result
        grid = image_grid(images, rows=1)
        path = ctx.save_grid(grid, infotexts[0], req, basename="grid")
        if ctx.env.option("return_grid") is False:
            return replace(result, grid_path=path)
        return replace(result, images=[grid, *images], infotexts=[infotexts[0], *infotexts],
                       seeds=[seeds[0], *seeds], subseeds=[result.subseeds[0], *result.subseeds], grid_path=path)
