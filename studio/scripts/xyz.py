"""A1111's "X/Y/Z plot" script (``scripts/xyz_grid.py``): one generation per combination of up to
three axes' values, laid out as a labelled grid (X across, Y down, one grid per Z value side by
side).

What it returns, in A1111's order: the grid (the Z grids side by side, or the one X/Y grid), then
the X/Y grid of each Z value when "Include Sub Grids" is on, then one picture per cell when
"Include Sub Images" is on. A cell's picture is what A1111's ``process_images`` puts first: its
image, or the grid of its batch when the cell made several (batch size or count above 1).

The cells run in A1111's loop order: the costliest axis (checkpoint, VAE) outermost, so each model
is loaded once per value rather than once per cell. Every cell is a request of its own through
``ctx.generate`` (validated and prepared as a request from a door), so it is the image a single
request with the cell's values gives. The grids carry the first cell's infotext plus A1111's
"Script", "X Type", "X Values" (… "Fixed X Values" for seed axes) keys, and are saved as
``xyz_grid-NNNN`` when the ``grid_save`` option is on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from studio.errors import RequestError
from studio.generation.grids import GridLayout, image_grid
from studio.generation.infotext import quote
from studio.scripts import ranges
from studio.scripts.base import Script, ScriptArg, ScriptEnv, ScriptRun, as_bool, as_number, combined, filled
from studio.scripts.grid_labels import GridAnnotation, GridStyle, draw_grid_annotations
from studio.scripts.xyz_axes import SEED_AXES, Axis, AxisContext, axis_choices, axis_labels, resolve_axis

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult

TITLE = "X/Y/Z plot"
AXIS_NAMES = ("X", "Y", "Z")
MAX_SEED = 4294967294          # A1111's random.randrange(4294967294), the request's seed bound
DEFAULT_MAX_GRID_MP = 200      # A1111's img_max_size_mp default


@dataclass(frozen=True)
class AxisPlan:
    """One axis of a plot: its type, its values (typed, ranges expanded) and the values text A1111
    writes to the grid's infotext as "X Values" (the dropdown's list as one CSV line, when used)."""

    axis: Axis
    values: tuple[Any, ...]
    text: str = ""

    def labels(self) -> list[str]:
        return [self.axis.format(value) for value in self.values]


@dataclass(frozen=True)
class XyzParams:
    x: AxisPlan
    y: AxisPlan
    z: AxisPlan
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    vary_seeds: tuple[bool, bool, bool] = (False, False, False)
    margin_size: int = 0
    csv_mode: bool = False

    @property
    def plans(self) -> tuple[AxisPlan, AxisPlan, AxisPlan]:
        return self.x, self.y, self.z


# --------------------------------------------------------------------------- parsing


def _dropdown_items(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return ranges.csv_values(value)
    if isinstance(value, (list, tuple)):
        return [str(item).strip() for item in value if item is not None and str(item).strip()]
    raise RequestError(f"{what}: expected a list of values (got {value!r})")


def plan_axis(axis: Axis, text: Any, dropdown: Any, csv_mode: bool, req: Txt2ImgRequest, env: ScriptEnv,
              name: str) -> AxisPlan:
    """An axis's values from its text (or, for an axis with choices, its dropdown list when one is
    given and ``csv_mode`` is off, as A1111's UI sends them), checked by applying each to ``req``."""
    if axis.is_nothing:
        return AxisPlan(axis, (0,), "")
    text = "" if text is None else str(text)
    picked = _dropdown_items(dropdown, f"{name} values")
    if axis.choices is not None and not csv_mode and picked:
        items, text = picked, ranges.csv_string(picked)
    else:
        items = ranges.csv_values(text)
    where = f"{name} values ({axis.label})"
    try:
        values = axis.values_from(items)
    except ValueError as e:
        raise RequestError(f"{where}: {e}") from None
    if not values:
        raise RequestError(f"{where}: no values given; write them comma-separated, e.g. 10,20,30 or 10-30 (+10)")
    if axis.check is not None:
        try:
            axis.check(values, req, env)
        except RequestError as e:
            raise RequestError(f"{where}: {e}") from None
    ctx = AxisContext(tuple(values), env)
    for value in values:
        try:
            axis.apply(req, value, ctx)  # type: ignore[misc]  (supported axes have one)
        except RequestError as e:
            raise RequestError(f"{where} {axis.format(value) or value!r}: {e}") from None
    return AxisPlan(axis, tuple(values), text)


# --------------------------------------------------------------------------- running


def processing_order(counts: Sequence[int], costs: Sequence[float]) -> list[tuple[int, int, int]]:
    """Cell indices (ix, iy, iz) in A1111's loop order: the axis of strictly highest cost outermost,
    then the next; with no single costliest axis, Z outermost, then Y, X innermost."""
    x, y, z = costs
    first, second = 2, 1
    if x > y and x > z:
        first, second = 0, (1 if y > z else 2)
    elif y > x and y > z:
        first, second = 1, (0 if x > z else 2)
    elif z > x and z > y:
        first, second = 2, (0 if x > y else 1)
    third = 3 - first - second
    order = []
    for a in range(counts[first]):
        for b in range(counts[second]):
            for c in range(counts[third]):
                index = [0, 0, 0]
                index[first], index[second], index[third] = a, b, c
                order.append((index[0], index[1], index[2]))
    return order


def varied_seed(seed: int, index: Sequence[int], counts: Sequence[int], vary: Sequence[bool]) -> int:
    """A1111's "Vary seeds for X/Y/Z": the cell's place along the varied axes added to its seed,
    numbering the cells as if the varied axes alone made the grid."""
    x_dim = counts[0] if vary[0] else 1
    y_dim = counts[1] if vary[1] else 1
    offset = (index[0] if vary[0] else 0) + (index[1] * x_dim if vary[1] else 0) \
        + (index[2] * x_dim * y_dim if vary[2] else 0)
    if not offset:
        return seed
    value = seed + offset
    return value % (MAX_SEED + 1) if value > MAX_SEED else value


def _random_seed() -> int:
    from studio.generation.request import resolve_seed

    return resolve_seed(-1)


def fixed_seeds(plan: AxisPlan) -> AxisPlan:
    """A seed axis's -1 values drawn once (A1111's ``fix_axis_seeds``), so the cells compare."""
    if plan.axis.label not in SEED_AXES:
        return plan
    return dataclasses.replace(plan, values=tuple(_random_seed() if v == -1 else v for v in plan.values))


def add_infotext_params(infotext: str, params: dict[str, Any]) -> str:
    """``infotext`` with ``params`` added to its parameter line where A1111 adds a script's
    ``extra_generation_params``: after the generation's own keys, before "Version"."""
    if not params:
        return infotext
    text = ", ".join(f"{key}: {quote(value)}" for key, value in params.items())
    head, sep, last = infotext.rpartition("\n")
    at = last.find(", Version: ")
    if at >= 0:
        last = f"{last[:at]}, {text}{last[at:]}"
    elif last.startswith("Version: "):
        last = f"{text}, {last}"
    else:
        last = f"{last}, {text}" if last else text
    return f"{head}{sep}{last}"


class _Options:
    """``GridLayout.from_options`` reads a mapping; scripts see options through ``env.option``."""

    def __init__(self, env: ScriptEnv) -> None:
        self._env = env

    def get(self, key: str, default: Any = None) -> Any:
        value = self._env.option(key)
        return default if value is None else value


@dataclass(frozen=True)
class _Cell:
    picture: Image.Image
    result: GenerationResult

    @property
    def prompt(self) -> str:
        return self.result.prompts[0] if getattr(self.result, "prompts", None) else self.result.request.prompt

    @property
    def negative_prompt(self) -> str:
        negatives = getattr(self.result, "negative_prompts", None)
        return negatives[0] if negatives else self.result.request.negative_prompt

    @property
    def seed(self) -> int:
        return self.result.seeds[0] if self.result.seeds else self.result.request.seed

    @property
    def subseed(self) -> int:
        return self.result.subseeds[0] if self.result.subseeds else self.result.request.subseed


def cell_picture(result: GenerationResult, layout: GridLayout, return_grid: bool) -> Image.Image:
    """What A1111 takes from a cell: its first image, or its batch's grid when it made several (its
    ``process_images`` puts that grid first when ``return_grid`` is on)."""
    req = result.request
    if len(result.images) > 1 and return_grid and not req.do_not_save_grid:
        return layout.make(result.images, req.batch_size)
    return result.images[0]


class XyzPlot(Script):
    title = TITLE

    def args(self, env: ScriptEnv, tab: str) -> tuple[ScriptArg, ...]:
        labels = axis_labels(tab)
        axis_args: list[ScriptArg] = []
        for name, default in zip(AXIS_NAMES, (labels[1], labels[0], labels[0])):
            axis_args += [ScriptArg(f"{name} type", default, "dropdown", choices=labels),
                          ScriptArg(f"{name} values", "", "textbox"),
                          ScriptArg(f"{name} values", [], "dropdown")]
        return (
            *axis_args,
            ScriptArg("Draw legend", True, "checkbox"),
            ScriptArg("Include Sub Images", False, "checkbox"),
            ScriptArg("Include Sub Grids", False, "checkbox"),
            ScriptArg("Keep -1 for seeds", False, "checkbox"),
            ScriptArg("Vary seeds for X", False, "checkbox"),
            ScriptArg("Vary seeds for Y", False, "checkbox"),
            ScriptArg("Vary seeds for Z", False, "checkbox"),
            ScriptArg("Grid margins (px)", 0, "slider", minimum=0, maximum=500, step=2),
            ScriptArg("Use text inputs instead of dropdowns", False, "checkbox"),
        )

    def linked(self, env: ScriptEnv, tab: str) -> dict[int, Any]:
        """An axis type shows its values as a dropdown of its choices (samplers, checkpoints, ...) and
        hides the text box, as A1111's UI does; a free-text axis shows the text box."""
        def on_type(n: int) -> Any:
            def changes(value: Any) -> dict[int, dict[str, Any]]:
                try:
                    choices = axis_choices(resolve_axis(value, tab, "axis"), env)
                except RequestError:
                    choices = None
                return {3 * n + 1: {"visible": choices is None},
                        3 * n + 2: {"visible": choices is not None, "choices": choices or [], "value": []}}
            return changes
        return {3 * n: on_type(n) for n in range(len(AXIS_NAMES))}

    def parse(self, values: Sequence[Any], req: Txt2ImgRequest, env: ScriptEnv) -> XyzParams:
        tab = "img2img" if req.kind == "img2img" else "txt2img"
        args = self.args(env, tab)
        v = filled(values, args, self.title)
        flag = {i: as_bool(v[i], args[i].label) for i in range(9, 16)}
        csv_mode = as_bool(v[17], args[17].label)
        plans = []
        for n, name in enumerate(AXIS_NAMES):
            axis = resolve_axis(v[3 * n], tab, f"{name} type")
            plans.append(plan_axis(axis, v[3 * n + 1], v[3 * n + 2], csv_mode, req, env, name))
        cells = len(plans[0].values) * len(plans[1].values) * len(plans[2].values)
        limit = env.option("img_max_size_mp") or DEFAULT_MAX_GRID_MP
        grid_mp = round(cells * req.width * req.height / 1_000_000)
        if grid_mp >= limit:
            raise RequestError(f"Resulting grid would be too large ({grid_mp} MPixels) (max configured size is "
                               f"{limit} MPixels); use fewer values or a smaller size")
        return XyzParams(plans[0], plans[1], plans[2], draw_legend=flag[9], include_lone_images=flag[10],
                         include_sub_grids=flag[11], no_fixed_seeds=flag[12],
                         vary_seeds=(flag[13], flag[14], flag[15]),
                         margin_size=int(as_number(v[16], args[16], integer=True)), csv_mode=csv_mode)

    # -- the run --------------------------------------------------------------------------
    def run(self, ctx: ScriptRun, req: Txt2ImgRequest, params: XyzParams) -> GenerationResult:
        env = ctx.env
        plans = params.plans
        if not params.no_fixed_seeds:
            # A1111's fix_seed: one seed (and variation seed) for every cell, so the cells compare
            req = req.model_copy(update={"seed": _random_seed() if req.seed == -1 else req.seed,
                                         "subseed": _random_seed() if req.subseed == -1 else req.subseed})
            plans = tuple(fixed_seeds(plan) for plan in plans)  # type: ignore[assignment]
        counts = tuple(len(plan.values) for plan in plans)
        layout = GridLayout.from_options(_Options(env))
        return_grid = env.option("return_grid") is not False
        total = counts[0] * counts[1] * counts[2]
        cells: list[_Cell | None] = [None] * total
        results: list[GenerationResult] = []
        failures: list[RequestError] = []
        interrupted = False
        for done, index in enumerate(processing_order(counts, [plan.axis.cost for plan in plans])):
            if ctx.state.interrupted:
                interrupted = True
                break
            ctx.state.textinfo = f"X/Y/Z plot: {done + 1} of {total}"
            cell_req = self.cell_request(req, params, plans, index, env)
            try:
                result = ctx.generate(cell_req)
            except RequestError as e:
                # A1111 shows the error and leaves the cell empty; the plot goes on
                failures.append(e)
                continue
            results.append(result)
            if result.images:
                cells[_flat(index, counts)] = _Cell(cell_picture(result, layout, return_grid), result)
        if not any(cells):
            if failures:
                raise failures[0]
            return combined(results)  # raises: nothing was made
        return self._assemble(ctx, params, plans, counts, cells, results, failures, interrupted)

    def cell_request(self, req: Txt2ImgRequest, params: XyzParams, plans: Sequence[AxisPlan],
                     index: Sequence[int], env: ScriptEnv) -> Txt2ImgRequest:
        """The request of one cell: each axis's value applied in X, Y, Z order, then the varied seed."""
        cell = req
        for plan, i in zip(plans, index):
            cell = plan.axis.apply(cell, plan.values[i], AxisContext(plan.values, env))  # type: ignore[misc]
        counts = [len(plan.values) for plan in plans]
        seed = varied_seed(cell.seed, index, counts, params.vary_seeds)
        return cell.model_copy(update={"seed": seed, "script_name": None, "script_args": []})

    def _grid_infotext(self, cell: _Cell, params: XyzParams, plans: Sequence[AxisPlan], with_z: bool) -> str:
        extra: dict[str, Any] = {"Script": self.title}
        for name, plan in zip(AXIS_NAMES, plans[:3] if with_z else plans[:2]):
            if plan.axis.is_nothing:
                continue
            extra[f"{name} Type"] = plan.axis.label
            extra[f"{name} Values"] = plan.text
            if plan.axis.label in SEED_AXES and not params.no_fixed_seeds:
                extra[f"Fixed {name} Values"] = ", ".join(str(v) for v in plan.values)
        return add_infotext_params(cell.result.infotexts[0], extra)

    def _assemble(self, ctx: ScriptRun, params: XyzParams, plans: Sequence[AxisPlan], counts: Sequence[int],
                  cells: list[_Cell | None], results: list[GenerationResult], failures: list[RequestError],
                  interrupted: bool) -> GenerationResult:
        env = ctx.env
        nx, ny, nz = counts
        per_grid = nx * ny
        first = next(c for c in cells if c is not None)
        # a cell that made nothing (interrupted, failed) is a black square, as in A1111
        blank = Image.new(first.picture.mode, first.picture.size)
        pictures = [c.picture if c is not None else blank for c in cells]
        layout = GridLayout.from_options(_Options(env))
        style = GridStyle.from_options(env.option)
        x_labels, y_labels, z_labels = (plan.labels() for plan in plans)

        sub_grids: list[Image.Image] = []
        sub_cells: list[_Cell] = []
        for iz in range(nz):
            chunk = pictures[iz * per_grid:(iz + 1) * per_grid]
            grid = image_grid(chunk, rows=ny, background=layout.background)
            if params.draw_legend:
                grid = draw_grid_annotations(grid, max(p.width for p in chunk), max(p.height for p in chunk),
                                             [[GridAnnotation(t)] for t in x_labels],
                                             [[GridAnnotation(t)] for t in y_labels], params.margin_size, style)
            sub_grids.append(grid)
            sub_cells.append(next((c for c in cells[iz * per_grid:(iz + 1) * per_grid] if c is not None), first))
        main = image_grid(sub_grids, rows=1, background=layout.background)
        if params.draw_legend:
            main = draw_grid_annotations(main, max(g.width for g in sub_grids), max(g.height for g in sub_grids),
                                         [[GridAnnotation(t)] for t in z_labels], [[GridAnnotation()]], 0, style)

        grids = [(main, self._grid_infotext(sub_cells[0], params, plans, with_z=True), sub_cells[0])]
        grids += [(grid, self._grid_infotext(cell, params, plans, with_z=False), cell)
                  for grid, cell in zip(sub_grids, sub_cells)]
        # A1111 saves the main grid, and the Z value's grids too when they are returned
        saved = grids[:1] + (grids[1:] if params.include_sub_grids and nz > 1 else [])
        paths = [p for p in (ctx.save_grid(image, info, cell.result.request, basename="xyz_grid")
                             for image, info, cell in saved) if p is not None]

        shown = grids[:1] + (grids[1:] if params.include_sub_grids else [])
        entries = [(image, info, cell) for image, info, cell in shown]
        if params.include_lone_images:
            entries += [(c.picture, c.result.infotexts[0], c) for c in cells if c is not None]
        result = combined(results, images=[e[0] for e in entries], infotexts=[e[1] for e in entries],
                          seeds=[e[2].seed for e in entries], paths=paths + [p for r in results for p in r.paths])
        notes = list(result.notes) + [f"X/Y/Z plot: a cell failed: {e}" for e in failures]
        return dataclasses.replace(
            result, subseeds=[e[2].subseed for e in entries], prompts=[e[2].prompt for e in entries],
            negative_prompts=[e[2].negative_prompt for e in entries], notes=notes,
            interrupted=result.interrupted or interrupted)


def _flat(index: Sequence[int], counts: Sequence[int]) -> int:
    """A1111's cell number: X fastest, then Y, then Z."""
    return index[0] + index[1] * counts[0] + index[2] * counts[0] * counts[1]
