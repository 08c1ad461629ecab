"""A1111's "Prompt matrix" script (``scripts/prompt_matrix.py``): the prompt split at ``|`` into a
fixed first part and n variable parts, one picture for each of the 2^n subsets of the variable
parts, and a labelled grid of them.

Combination k holds the variable parts whose bit is set in k (part 1 is bit 0), joined to the
fixed part with ", " or " ", after it or (put at start) before it. A1111 runs the combinations as
one job with a list of prompts and a list of seeds; the studio runs one generation per
combination with the same prompt and seed, which gives the same picture (noise is drawn per
image from its own seed), so each cell is exactly what a single request with its prompt makes.

The grid has ``2^(n // 2)`` rows: the first ceil(n/2) parts along the top, the others down the
left, each label black where the part is in that column/row and struck through in grey where not
(studio/scripts/grid_labels.py, shared with the X/Y/Z plot).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from studio.errors import RequestError
from studio.generation.grids import image_grid
from studio.scripts.base import Script, ScriptArg, ScriptEnv, ScriptRun, as_bool, as_choice, as_number, filled
from studio.scripts.grid_labels import GridStyle, draw_prompt_matrix
from studio.scripts.tiles import sub_request

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult

# 2^10 pictures: beyond that the grid alone is hundreds of megapixels
MAX_COMBINATIONS = 1024

ARGS = (
    ScriptArg("Put variable parts at start of prompt", False, "checkbox"),
    ScriptArg("Use different seed for each picture", False, "checkbox"),
    ScriptArg("Select prompt", "positive", "radio", choices=("positive", "negative")),
    ScriptArg("Select joining char", "comma", "radio", choices=("comma", "space")),
    ScriptArg("Grid margins (px)", 0, "slider", minimum=0, maximum=500, step=2),
)


@dataclass(frozen=True)
class MatrixParams:
    put_at_start: bool
    different_seeds: bool
    prompt_type: str        # "positive" | "negative"
    delimiter: str          # ", " | " "
    margin: int
    parts: tuple[str, ...]  # the chosen prompt split at "|" (first = the fixed part)
    prompts: tuple[str, ...]  # one per combination, in A1111's order


def matrix_prompts(prompt: str, put_at_start: bool = False, delimiter: str = ", ") -> list[str]:
    """The 2^(n-1) prompts of a prompt with n ``|``-separated parts, in A1111's order."""
    parts = prompt.split("|")
    prompts = []
    for k in range(2 ** (len(parts) - 1)):
        chosen = [text.strip().strip(",") for n, text in enumerate(parts[1:]) if k & (1 << n)]
        ordered = chosen + [parts[0]] if put_at_start else [parts[0]] + chosen
        prompts.append(delimiter.join(ordered))
    return prompts


class PromptMatrix(Script):
    title = "Prompt matrix"

    def args(self, env: ScriptEnv, tab: str) -> tuple[ScriptArg, ...]:
        return ARGS

    def parse(self, values: Sequence[Any], req: Txt2ImgRequest, env: ScriptEnv) -> MatrixParams:
        v = filled(values, ARGS, self.title)
        put_at_start = as_bool(v[0], ARGS[0].label)
        different = as_bool(v[1], ARGS[1].label)
        prompt_type = as_choice(v[2], ARGS[2])
        delimiter = ", " if as_choice(v[3], ARGS[3]) == "comma" else " "
        margin = int(as_number(v[4], ARGS[4], integer=True))
        source = req.prompt if prompt_type == "positive" else req.negative_prompt
        parts = source.split("|")
        if 2 ** (len(parts) - 1) > MAX_COMBINATIONS:
            raise RequestError(f"Prompt matrix: {len(parts) - 1} variable parts make {2 ** (len(parts) - 1)} "
                               f"pictures; at most {int(math.log2(MAX_COMBINATIONS))} parts "
                               f"({MAX_COMBINATIONS} pictures) are allowed")
        prompts = matrix_prompts(source, put_at_start, delimiter)
        return MatrixParams(put_at_start, different, prompt_type, delimiter, margin, tuple(parts), tuple(prompts))

    def run(self, ctx: ScriptRun, req: Txt2ImgRequest, params: MatrixParams) -> GenerationResult:
        field = "prompt" if params.prompt_type == "positive" else "negative_prompt"
        count = len(params.prompts)
        results: list[GenerationResult] = []
        for i, prompt in enumerate(params.prompts):
            if ctx.state.interrupted:
                break
            ctx.state.textinfo = f"Prompt matrix: {i + 1} of {count}"
            sub = sub_request(req, self.title, **{field: prompt}, batch_size=1, n_iter=1, do_not_save_grid=True,
                              seed=req.seed + (i if params.different_seeds else 0))
            results.append(ctx.generate(sub))
        done = [r for r in results if r.images]
        if not done:
            raise RequestError("the script made no images (interrupted before the first one)")
        cells = [r.images[0] for r in done]
        infotexts = [r.infotexts[0] if r.infotexts else "" for r in done]
        seeds = [r.seeds[0] if r.seeds else req.seed for r in done]
        subseeds = [r.subseeds[0] if r.subseeds else req.subseed for r in done]
        positives = [r.request.prompt for r in done]
        negatives = [r.request.negative_prompt for r in done]
        paths = [p for r in done for p in r.paths]
        notes = list(dict.fromkeys(n for r in done for n in r.notes))
        result = replace(done[0], images=cells, infotexts=infotexts, seeds=seeds, subseeds=subseeds, paths=paths,
                         notes=notes, prompts=positives, negative_prompts=negatives, request=req,
                         interrupted=len(done) < count or any(r.interrupted for r in done),
                         detected_maps=[m for r in done for m in r.detected_maps])
        if len(cells) < count:
            return result   # an interrupted matrix has no complete grid to draw
        rows = 1 << ((len(params.parts) - 1) // 2)
        grid = draw_prompt_matrix(image_grid(cells, rows), cells[0].width, cells[0].height, params.parts,
                                  params.margin, GridStyle.from_options(ctx.env.option))
        grid_path = ctx.save_grid(grid, infotexts[0], req, basename="prompt_matrix")
        return replace(result, images=[grid, *cells], infotexts=[infotexts[0], *infotexts],
                       seeds=[seeds[0], *seeds], subseeds=[subseeds[0], *subseeds],
                       prompts=[req.prompt, *positives], negative_prompts=[req.negative_prompt, *negatives],
                       grid_path=grid_path)
