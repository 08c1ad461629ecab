"""The UI's bindings between request fields and components, derived from the request schema.

A tab binds each of its hand-made controls to the field it sets (``form.bind("steps", slider)``);
every public field the tab does not bind, and that the schema does not mark as UI-less, gets a
control drawn from its type, range and description (``add_schema_controls``). The Generate event
takes the components as a set, so its handler receives ``{component: value}`` and
:meth:`RequestForm.values` turns that into request fields by name: no positional slicing, and a
field added to the schema appears in the UI without touching the tabs."""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from pydantic import BaseModel

from studio.generation.request import (
    field_bounds,
    field_type,
    interactive_defaults,
    public_fields,
    studio_hints,
)


@dataclass
class _Binding:
    components: list[Any]
    convert: Callable[[list[Any]], dict[str, Any]]


@dataclass
class RequestForm:
    schema: type[BaseModel]
    tab_id: str
    bindings: list[_Binding] = field(default_factory=list)
    bound: set[str] = field(default_factory=set)

    def bind(self, name: str, component: Any, convert: Callable[[Any], Any] | None = None) -> Any:
        """``component``'s value becomes field ``name`` (through ``convert`` when given)."""
        if name not in self.schema.model_fields:
            raise KeyError(f"{self.schema.__name__} has no field {name!r}")
        fn = convert or (lambda value: value)
        self.bindings.append(_Binding([component], lambda values: {name: fn(values[0])}))
        self.bound.add(name)
        return component

    def bind_group(self, names: tuple[str, ...], components: list[Any],
                   convert: Callable[[list[Any]], dict[str, Any]]) -> None:
        """Several components that together make some fields (a ControlNet unit's controls)."""
        self.bindings.append(_Binding(list(components), convert))
        self.bound.update(names)

    def inputs(self) -> set[Any]:
        return {c for b in self.bindings for c in b.components}

    def values(self, data: dict[Any, Any]) -> dict[str, Any]:
        """Request fields from an event's ``{component: value}``, over the interactive defaults."""
        out = interactive_defaults(self.schema)
        for binding in self.bindings:
            out.update(binding.convert([data.get(c) for c in binding.components]))
        return out

    def add_schema_controls(self) -> list[Any]:
        """A control for every public field that no hand-made control binds (fields added to the
        schema later, or by a subclass), in an accordion, so nothing the schema has is unreachable."""
        fields = {name: info for name, info in public_fields(self.schema).items()
                  if name not in self.bound and studio_hints(info)["ui"]}
        if not fields:
            return []
        made = []
        with gr.Accordion("More parameters", open=False, elem_id=f"{self.tab_id}_more_parameters"):
            for name, info in fields.items():
                component = _control_for(name, info, self.tab_id, interactive_defaults(self.schema))
                if component is not None:
                    self.bind(name, component, _converter(info))
                    made.append(component)
        return made


def control_for(info: Any, value: Any, label: str, elem_id: str) -> Any:
    """A component for a pydantic field, from its type: checkbox, dropdown (a Literal, or a list of
    names with ``choices``), slider (a bounded number), number, or text. None for structured fields and
    lists (a text box would hand a list field a string; forge_additional_modules has its own picker)."""
    kind, is_list = field_type(info.annotation)
    if is_list:
        return None
    common = {"label": label, "elem_id": elem_id, "info": info.description if info.description != label else None}
    if kind is bool:
        return gr.Checkbox(value=bool(value), **common)
    if typing.get_origin(kind) is typing.Literal:
        choices = list(typing.get_args(kind))
        return gr.Dropdown(choices, value=value if value in choices else choices[0], **common)
    if kind in (int, float):
        lo, hi = field_bounds(info)
        if lo is not None and hi is not None and hi - lo <= 100_000:
            step = 1 if kind is int else (hi - lo) / 100
            return gr.Slider(lo, hi, value=value if value is not None else lo, step=step, **common)
        return gr.Number(value=value, precision=0 if kind is int else None, minimum=lo, maximum=hi, **common)
    if kind is str:
        return gr.Textbox(value=value or "", **common)
    return None


def _control_for(name: str, info: Any, tab_id: str, starts: dict[str, Any]) -> Any:
    label = studio_hints(info)["label"] or name.replace("_", " ").capitalize()
    default = starts.get(name, None if info.default_factory else info.default)
    return control_for(info, default, label, f"{tab_id}_{name}")


def _converter(info: Any) -> Callable[[Any], Any]:
    kind = field_type(info.annotation)[0]
    optional = kind is not info.annotation

    def convert(value: Any) -> Any:
        if value is None or (value == "" and optional):
            return None if optional else info.default
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        return value

    return convert
