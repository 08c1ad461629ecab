"""The CLI's generation flags, derived from the request schema: one ``--field-name`` per public field
(plus the older short names the schema lists for it), typed, with the field's description and
default as help. A field added to the schema is a flag at once; nothing here names a field."""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from studio.errors import RequestError
from studio.generation.request import (
    PRESET_FIELDS,
    field_bounds,
    field_type,
    interactive_defaults,
    public_fields,
    studio_hints,
)

# Fields a command line has no use for: the reply's shape (a CLI prints paths) and A1111's old alias.
NOT_ON_THE_COMMAND_LINE = frozenset({"send_images", "save_images", "include_init_images", "sampler_index",
                                     "show_extras_results"})
IMAGE_FIELDS = frozenset({"init_images", "mask"})   # file paths on the command line


def add_request_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add a flag for every public field of ``model``, grouped as the schema says. Every flag
    defaults to "not given" (argparse.SUPPRESS), so only what the user typed reaches the request."""
    groups: dict[str, Any] = {}
    starts = interactive_defaults(model)
    for name, info in public_fields(model).items():
        if name in NOT_ON_THE_COMMAND_LINE:
            continue
        hints = studio_hints(info)
        group_name = hints["group"] or ""
        group = groups.get(group_name)
        if group is None:
            group = groups[group_name] = parser.add_argument_group(group_name) if group_name else parser
        base, is_list = field_type(info.annotation)
        # an alias "--no-x" of a switch is its negative form (argparse would make "--no-no-x" of it)
        negatives = [f for f in hints["cli"] if base is bool and f.startswith("--no-")]
        flags = [f"--{name.replace('_', '-')}", *(f for f in hints["cli"] if f not in negatives)]
        help_text = (info.description or "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if info.is_required():
            kwargs.pop("default")
            kwargs["required"] = True
        else:
            default = starts.get(name, info.default if info.default_factory is None else None)
            if default not in (None, "", [], {}):
                help_text += f" (default {default})"
        lo, hi = field_bounds(info)
        if lo is not None and hi is not None:
            help_text += f" [{_plain(lo)} to {_plain(hi)}]"
        kwargs["help"] = help_text
        if name in IMAGE_FIELDS:
            kwargs.update(metavar="PATH", action="append" if is_list else "store",
                          help=help_text + " (an image file)")
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base in (dict, list) or typing.get_origin(base) in (dict, list) or (base is Any and not is_list):
            kwargs.update(type=json.loads, metavar="JSON")
        elif is_list:
            kwargs.update(action="append", type=_json_or_text if base is Any else base, metavar=name.upper())
        elif base is int and field_bounds(info) == (0, 1):
            kwargs.update(type=int, nargs="?", const=1, metavar="0|1")   # a switch that also takes 0/1
        else:
            kwargs["type"] = base if base in (int, float, str) else str
        group.add_argument(*flags, **kwargs)
        for negative in negatives:
            group.add_argument(negative, dest=name, action="store_false", default=argparse.SUPPRESS,
                               help=f"the same as --no-{name.replace('_', '-')}")


def _json_or_text(value: str) -> Any:
    """A value of a list of anything (``--script-args``): JSON when it reads as JSON (``4``, ``true``,
    ``[1, 2]``), else the text itself (``Steps``, ``10,20``)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _read_image(path: str) -> Any:
    from studio.generation.outputs import ImageReadError, open_image

    try:
        return open_image(Path(path).read_bytes())
    except (OSError, ImageReadError) as e:
        raise RequestError(f"{path}: {e}") from e


def request_values(ns: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields the user gave, over the interactive defaults; image paths read into images."""
    given = {name: getattr(ns, name) for name in public_fields(model) if hasattr(ns, name)}
    for name in IMAGE_FIELDS & given.keys():
        value = given[name]
        given[name] = [_read_image(p) for p in value] if isinstance(value, list) else _read_image(value)
    values = {**interactive_defaults(model), **given}
    if "preset_fields" in model.model_fields:
        # what the user did not type may take the model family's presets (FLUX.1 at CFG 1, schnell in 4 steps)
        typed = set(given) | ({"sampler_name"} if "sampler_index" in given else set())
        values["preset_fields"] = tuple(f for f in PRESET_FIELDS if f not in typed)
    return values
