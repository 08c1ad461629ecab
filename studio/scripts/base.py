"""A1111's scripts: the txt2img/img2img "Script" dropdown, and ``script_name`` + ``script_args`` in the API.

A script takes over a request: it runs one or many generations with changed fields (X/Y/Z plot,
prompt matrix, prompts from file), or wraps generation in image work (SD upscale, outpainting,
loopback), and returns one result (grids first, then the cells, as A1111 returns them).

Each script declares its arguments in A1111's positional order (what API clients send in
``script_args``, what ``/sdapi/v1/script-info`` lists and what the UI draws), parses them into typed
parameters *before the job is queued* (:meth:`Script.parse`: a bad argument is a 400, never a job
that fails later), and runs inside the one job on the worker through a :class:`ScriptRun`, which
the engine implements: every generation a script makes goes through the same engine path as a
plain request (prepared and validated the same way), so a cell of an X/Y/Z grid is the image a
single request with the cell's values gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from studio.errors import RequestError

if TYPE_CHECKING:
    from PIL import Image

    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult
    from studio.jobs import JobState

TABS = ("txt2img", "img2img")


@dataclass(frozen=True)
class ScriptArg:
    """One positional argument: A1111's ``ScriptArg`` fields (label, value, minimum, maximum, step,
    choices) plus the control the UI draws (``kind``: slider, number, checkbox, dropdown, radio,
    textbox, textarea)."""

    label: str
    value: Any = None
    kind: str = "textbox"
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None

    def info(self) -> dict[str, Any]:
        """A1111's ``/script-info`` entry for this argument."""
        return {"label": self.label, "value": self.value, "minimum": self.minimum, "maximum": self.maximum,
                "step": self.step, "choices": list(self.choices) if self.choices is not None else None}


class ScriptEnv(Protocol):
    """What a script may look up while its arguments are parsed (before queueing) and when the UI
    draws its controls: the names the studio knows now."""

    def sampler_names(self) -> list[str]: ...
    def schedule_names(self) -> list[str]: ...
    def upscaler_names(self) -> list[str]: ...
    def checkpoint_titles(self) -> list[str]: ...
    def find_checkpoint(self, name: str) -> str | None: ...   # the title, or None when unknown
    def vae_names(self) -> list[str]: ...
    def option(self, key: str) -> Any: ...
    def style_names(self) -> list[str]: ...
    def apply_styles(self, names: Sequence[str], prompt: str, negative: str) -> tuple[str, str]: ...


class ScriptRun(Protocol):
    """What a running script may do, on the worker inside its job."""

    state: JobState
    env: ScriptEnv

    def generate(self, req: Txt2ImgRequest) -> GenerationResult:
        """One generation of ``req`` (any kind), validated and prepared as a request from a door is,
        without its script. RequestError for a bad request."""
        ...

    def upscale(self, image: Image.Image, upscaler: str, size: tuple[int, int]) -> Image.Image: ...

    def save_grid(self, image: Image.Image, infotext: str, req: Txt2ImgRequest, basename: str) -> Path | None:
        """Save a finished grid picture to the request kind's grids folder when the ``grid_save``
        option is on (A1111's scripts save their grids whatever the API's save_images says)."""
        ...

    def save_image(self, image: Image.Image, infotext: str, seed: int, req: Txt2ImgRequest) -> Path | None:
        """Save one image as the request's samples are saved (``save_images``, ``samples_save``)."""
        ...


class Script:
    """A script; subclasses set ``title`` and ``tabs`` and implement the three methods."""

    title: ClassVar[str] = ""
    tabs: ClassVar[tuple[str, ...]] = TABS

    def args(self, env: ScriptEnv, tab: str) -> tuple[ScriptArg, ...]:
        """The arguments in A1111's positional order (choices may depend on what is installed)."""
        raise NotImplementedError

    def parse(self, values: Sequence[Any], req: Txt2ImgRequest, env: ScriptEnv) -> Any:
        """Typed parameters from ``script_args`` (missing trailing values take the defaults, as
        A1111 fills them from the UI's). RequestError names the argument that is wrong."""
        raise NotImplementedError

    def run(self, ctx: ScriptRun, req: Txt2ImgRequest, params: Any) -> GenerationResult:
        raise NotImplementedError

    def linked(self, env: ScriptEnv, tab: str) -> dict[int, Any]:
        """Controls that change others in the UI: argument index -> ``fn(value) -> {index: changes}``,
        the changes being ``gr.update`` keyword arguments (visible, choices, value). None by default."""
        return {}

    @property
    def name(self) -> str:
        """A1111 matches ``script_name`` against the lower-cased title."""
        return self.title.lower()

    def info(self, env: ScriptEnv, tab: str) -> dict[str, Any]:
        """A1111's ``/sdapi/v1/script-info`` item."""
        return {"name": self.name, "is_alwayson": False, "is_img2img": tab == "img2img",
                "args": [a.info() for a in self.args(env, tab)]}


def filled(values: Sequence[Any], args: Sequence[ScriptArg], title: str) -> list[Any]:
    """``values`` with the defaults of the arguments a client left off the end; too many values is
    an error (A1111 would pass them to the wrong parameters)."""
    values = list(values or [])
    if len(values) > len(args):
        raise RequestError(f"script '{title}' takes at most {len(args)} script_args "
                           f"({', '.join(a.label for a in args)}); got {len(values)}")
    return values + [a.value for a in args[len(values):]]


def as_bool(value: Any, label: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise RequestError(f"script argument '{label}' must be true or false (got {value!r})")


def as_number(value: Any, arg: ScriptArg, integer: bool = False) -> float | int:
    """A number within the argument's range; RequestError naming the argument otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"script argument '{arg.label}' must be a number (got {value!r})") from None
    if number != number:  # NaN
        raise RequestError(f"script argument '{arg.label}' must be a number (got {value!r})")
    if (arg.minimum is not None and number < arg.minimum) or (arg.maximum is not None and number > arg.maximum):
        raise RequestError(f"script argument '{arg.label}' must be between {arg.minimum:g} and {arg.maximum:g} "
                           f"(got {value!r})")
    if integer:
        if number != int(number):
            raise RequestError(f"script argument '{arg.label}' must be a whole number (got {value!r})")
        return int(number)
    return number


def as_choice(value: Any, arg: ScriptArg, choices: Sequence[str] | None = None) -> str:
    """One of the argument's choices (A1111 also accepts the index of a radio's choice)."""
    options = list(choices if choices is not None else arg.choices or ())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options):
        return options[value]
    text = str(value)
    for option in options:
        if option.lower() == text.lower():
            return option
    raise RequestError(f"script argument '{arg.label}' must be one of {', '.join(options)} (got {value!r})")


def combined(results: Sequence[GenerationResult], images: list[Any] | None = None,
             infotexts: list[str] | None = None, seeds: list[int] | None = None,
             paths: list[Path] | None = None) -> GenerationResult:
    """One result from a script's generations: the first one's request and model, every image, seed,
    note and path in order (or the ones given, e.g. a grid put first)."""
    if not results:
        raise RequestError("the script made no images (interrupted before the first one)")
    first = results[0]
    notes: list[str] = []
    for r in results:
        notes += [n for n in r.notes if n not in notes]
    return replace(
        first,
        images=images if images is not None else [i for r in results for i in r.images],
        infotexts=infotexts if infotexts is not None else [t for r in results for t in r.infotexts],
        seeds=seeds if seeds is not None else [s for r in results for s in r.seeds],
        subseeds=[s for r in results for s in r.subseeds],
        paths=paths if paths is not None else [p for r in results for p in r.paths],
        notes=notes, interrupted=any(r.interrupted for r in results),
        detected_maps=[m for r in results for m in r.detected_maps])
