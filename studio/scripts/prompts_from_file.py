"""A1111's "Prompts from file or textbox" script (``scripts/prompts_from_file.py``): one generation
per non-empty line of a text, each line a prompt or a set of A1111's command-line style options.

A line that starts with ``--`` is read as options (``shlex`` quoting)::

    --prompt "a cat, sitting" --negative_prompt ugly --steps 10 --seed 5 --sampler_name "Euler a"

``--prompt`` and ``--negative_prompt`` take every word up to the next ``--option``; every other
option takes one value, converted as A1111's ``prompt_tags`` table says (int, float, "true" for
booleans, a checkpoint name for ``sd_model``). A line's prompt goes before the request's prompt
(or after it, "Insert prompts at the: end"), joined with a space; so does its negative prompt.

Where A1111 prints an error for a line it can't read as options and uses the whole line as the
prompt, the studio refuses the request before it is queued, naming the line and what is wrong
(a line that doesn't start with ``--`` is a plain prompt, as in A1111). The text comes through
``script_args`` only: A1111's file upload merely fills the same textbox in the browser.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from studio.errors import RequestError
from studio.generation.grids import GridLayout
from studio.generation.request import describe_validation_error, validate_txt2img
from studio.generation.samplers import UnknownSamplerError, split_sampler_name
from studio.scripts.base import Script, ScriptArg, ScriptEnv, ScriptRun, as_bool, as_choice, combined, filled

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult

ARGS = (
    ScriptArg("Iterate seed every line", False, "checkbox"),
    ScriptArg("Use same random seed for all lines", False, "checkbox"),
    ScriptArg("Insert prompts at the", "start", "radio", choices=("start", "end")),
    ScriptArg("List of prompt inputs", "", "textarea"),
    ScriptArg("Make a combined image containing all outputs (if more than one)", False, "checkbox"),
)


def _string(text: str) -> str:
    return text


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


def _boolean(text: str) -> bool:
    return text == "true"   # A1111: anything else is false


# A1111's prompt_tags: option -> conversion of its value
PROMPT_TAGS: MappingProxyType[str, Callable[[str], Any]] = MappingProxyType({
    "sd_model": _string,
    "outpath_samples": _string,
    "outpath_grids": _string,
    "prompt_for_display": _string,
    "prompt": _string,
    "negative_prompt": _string,
    "styles": _string,
    "seed": _int,
    "subseed_strength": _float,
    "subseed": _int,
    "seed_resize_from_h": _int,
    "seed_resize_from_w": _int,
    "sampler_index": _int,
    "sampler_name": _string,
    "batch_size": _int,
    "n_iter": _int,
    "steps": _int,
    "cfg_scale": _float,
    "width": _int,
    "height": _int,
    "restore_faces": _boolean,
    "tiling": _boolean,
    "do_not_save_samples": _boolean,
    "do_not_save_grid": _boolean,
})
# In A1111's table but not something a request may do here: output folders are the studio's, and
# styles are applied to the request's prompt before the script runs (not again per line).
REFUSED_TAGS = MappingProxyType({
    "outpath_samples": "output folders are set in the studio's settings",
    "outpath_grids": "output folders are set in the studio's settings",
    "prompt_for_display": "the studio shows the prompt each picture was made with",
    "styles": "styles are applied to the request's prompt, not per line; put the style's text in --prompt",
})
_TYPE_WORDS = MappingProxyType({_int: "a whole number", _float: "a number"})


def parse_line(line: str) -> dict[str, Any]:
    """A1111's ``cmdargs``: the options of one line, values converted. ValueError says what is wrong."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ValueError(f"can't split it into words ({e})") from None
    res: dict[str, Any] = {}
    pos = 0
    while pos < len(words):
        arg = words[pos]
        if not arg.startswith("--"):
            raise ValueError(f'must start with "--": {arg}')
        if pos + 1 >= len(words):
            raise ValueError(f"missing argument for command line option {arg}")
        tag = arg[2:]
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            text = words[pos]
            pos += 1
            while pos < len(words) and not words[pos].startswith("--"):
                text += " " + words[pos]
                pos += 1
            res[tag] = text
            continue
        convert = PROMPT_TAGS.get(tag)
        if convert is None:
            raise ValueError(f"unknown commandline option: {arg} (known: "
                             + ", ".join(f"--{t}" for t in PROMPT_TAGS if t not in REFUSED_TAGS) + ")")
        value = words[pos + 1]
        try:
            res[tag] = convert(value)
        except ValueError:
            raise ValueError(f"{arg} must be {_TYPE_WORDS.get(convert, 'a value')} (got {value!r})") from None
        pos += 2
    return res


@dataclass(frozen=True)
class LineJob:
    """One line: its number in the text (from 1) and what it changes."""

    line_no: int
    prompt: str | None = None
    negative_prompt: str | None = None
    fields: tuple[tuple[str, Any], ...] = ()   # other request fields
    checkpoint: str | None = None              # --sd_model, as the catalog's title


@dataclass(frozen=True)
class PromptsParams:
    iterate: bool
    iterate_batch: bool
    position: str               # "start" | "end"
    text: str
    make_combined: bool
    jobs: tuple[LineJob, ...]


def _line_job(line_no: int, line: str, env: ScriptEnv) -> LineJob:
    if not line.startswith("--"):
        return LineJob(line_no, prompt=line)
    try:
        options = parse_line(line)
    except ValueError as e:
        raise RequestError(f"Prompts from file: line {line_no}: {e}") from None
    fields: dict[str, Any] = {}
    checkpoint = None
    for tag, value in options.items():
        if tag in REFUSED_TAGS:
            raise RequestError(f"Prompts from file: line {line_no}: --{tag} is not supported here "
                               f"({REFUSED_TAGS[tag]})")
        if tag == "sd_model":
            checkpoint = env.find_checkpoint(value)
            if checkpoint is None:
                raise RequestError(f"Prompts from file: line {line_no}: unknown checkpoint {value!r} for --sd_model "
                                   "(put it in models/Stable-diffusion, or use a name from the checkpoint list)")
        elif tag == "sampler_index":
            names = env.sampler_names()
            if not 0 <= value < len(names):
                raise RequestError(f"Prompts from file: line {line_no}: --sampler_index must be between 0 and "
                                   f"{len(names) - 1} (got {value})")
            fields["sampler_name"] = names[value]
        elif tag == "sampler_name":
            try:
                split_sampler_name(value, None)
            except UnknownSamplerError as e:
                raise RequestError(f"Prompts from file: line {line_no}: --sampler_name: {e}") from None
            fields["sampler_name"] = value
        elif tag not in ("prompt", "negative_prompt"):
            fields[tag] = value
    return LineJob(line_no, options.get("prompt"), options.get("negative_prompt"), tuple(fields.items()),
                   checkpoint)


def _joined(line_text: str | None, main: str, position: str) -> str:
    """A1111: a non-empty line prompt is put before (start) or after (end) a non-empty request
    prompt; a line without one keeps the request's; an empty one (``--prompt ""``) empties it."""
    if line_text is None:
        return main
    if line_text and main:
        return f"{line_text} {main}" if position == "start" else f"{main} {line_text}"
    return line_text


def line_request(req: Txt2ImgRequest, job: LineJob, position: str, seed: int) -> Txt2ImgRequest:
    """The request one line runs (validated again; pydantic errors raise ValidationError)."""
    sub = req.with_changes(
        **{"seed": seed, **dict(job.fields)},
        prompt=_joined(job.prompt, req.prompt, position),
        negative_prompt=_joined(job.negative_prompt, req.negative_prompt, position),
        do_not_save_grid=True, script_name=None, script_args=[])
    return sub.model_copy(update={"checkpoint": job.checkpoint}) if job.checkpoint else sub


class PromptsFromFile(Script):
    title = "Prompts from file or textbox"

    def args(self, env: ScriptEnv, tab: str) -> tuple[ScriptArg, ...]:
        return ARGS

    def parse(self, values: Sequence[Any], req: Txt2ImgRequest, env: ScriptEnv) -> PromptsParams:
        v = filled(values, ARGS, self.title)
        iterate, iterate_batch = as_bool(v[0], ARGS[0].label), as_bool(v[1], ARGS[1].label)
        position = as_choice(v[2], ARGS[2])
        if not isinstance(v[3], str):
            raise RequestError(f"script argument '{ARGS[3].label}' must be text (got {type(v[3]).__name__})")
        make_combined = as_bool(v[4], ARGS[4].label)
        jobs = tuple(_line_job(n, line.strip(), env) for n, line in enumerate(v[3].splitlines(), start=1)
                     if line.strip())
        if not jobs:
            raise RequestError(f"Prompts from file: '{ARGS[3].label}' is empty: give one prompt per line")
        for job in jobs:   # every line's request checked now, so a bad line is a 400, not a failed job
            try:
                validate_txt2img(line_request(req, job, position, req.seed))
            except ValidationError as e:
                raise RequestError(f"Prompts from file: line {job.line_no}: {describe_validation_error(e)}") from None
            except RequestError as e:
                raise RequestError(f"Prompts from file: line {job.line_no}: {e}") from None
        return PromptsParams(iterate, iterate_batch, position, v[3], make_combined, jobs)

    def run(self, ctx: ScriptRun, req: Txt2ImgRequest, params: PromptsParams) -> GenerationResult:
        # The request's seed is already fixed (a random one drawn) when the script runs, which is what
        # A1111's two checkboxes ask for when the seed is -1.
        seed = req.seed
        results: list[GenerationResult] = []
        prompts: list[str] = []
        negatives: list[str] = []
        for i, job in enumerate(params.jobs):
            if ctx.state.interrupted:
                break
            ctx.state.textinfo = f"Prompts from file: line {job.line_no} ({i + 1} of {len(params.jobs)})"
            sub = line_request(req, job, params.position, seed)
            result = ctx.generate(sub)
            results.append(result)
            prompts += [sub.prompt] * len(result.images)
            negatives += [sub.negative_prompt] * len(result.images)
            if params.iterate:
                seed += req.batch_size * req.n_iter
        result = replace(combined(results), request=req, prompts=prompts, negative_prompts=negatives)
        if not params.make_combined or len(result.images) < 2:
            return result
        return _with_combined_image(ctx, req, result, params.text)


def _with_combined_image(ctx: ScriptRun, req: Txt2ImgRequest, result: GenerationResult,
                         text: str) -> GenerationResult:
    """A1111's "Make a combined image": a grid of every picture first, with all the infotexts."""
    keys = ("n_rows", "grid_prevent_empty_spots", "grid_background_color", "grid_only_if_multiple")
    layout = GridLayout.from_options({k: ctx.env.option(k) for k in keys})
    grid = layout.make(result.images, batch_size=1)
    infotext = "\n".join(result.infotexts)
    if ctx.env.option("grid_save"):
        path = ctx.save_grid(grid, infotext, req, basename="")
    else:
        path = ctx.save_image(grid, infotext, req.seed, req)
    return replace(result, images=[grid, *result.images], infotexts=[infotext, *result.infotexts],
                   seeds=[result.seeds[0], *result.seeds], prompts=[text, *result.prompts],
                   negative_prompts=[req.negative_prompt, *result.negative_prompts], grid_path=path)
