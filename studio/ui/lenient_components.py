"""Gradio components whose value is not checked against their range or choices when an event reads it.

The ControlNet units' preprocessor sliders change their range with the chosen preprocessor, and
their Preprocessor and Model dropdowns change their choices with the Control Type filter and the
models' ↻. An event sent just before such a change (two quick Control Type clicks, a module change
racing its follow-up preview, Generate right after a refresh) carries a value from before it, which
Gradio refuses with a page error ("Value 0 is less than minimum value 1", "Value: canny is not in
the list of choices"). The engine decides instead, as the extension does: a slider value out of
range is the module's default, with a warning (``units.lenient_params``); an unknown module or model
is a clear error message naming it.

Why classes and not patched instances: once an event updates a component's props, Gradio keeps a
per-session copy made with ``block.__class__(**kwargs)`` and preprocesses with that copy, so an
instance patch is lost after the first update.

Why they are built with ``ABCMeta.__new__``: Gradio's component metaclass writes a ``.pyi`` stub beside
the module of any component subclass it creates, which an installed package must not do (the
folder may be read-only). The metaclass's other work (events, the recorded constructor arguments)
is inherited from the Gradio class unchanged, so skipping its ``__new__`` loses nothing.
``is_template`` makes Gradio draw them with its own slider and dropdown, as it does for its template
components.
"""

from __future__ import annotations

from abc import ABCMeta
from typing import Any, Callable

import gradio as gr
from gradio.components.number import Number


def _lenient(base: type, name: str, preprocess: Callable[..., Any], doc: str) -> Any:
    """``base`` with ``preprocess`` replaced, drawn by the frontend as ``base``."""
    return ABCMeta.__new__(type(base), name, (base,), {
        "__module__": __name__, "__qualname__": name, "__doc__": doc, "is_template": True,
        "preprocess": preprocess})


def _slider_value(self: gr.Slider, payload: float) -> float:
    """The value rounded to the slider's precision, not checked against its range."""
    return Number.round_to_precision(payload, self.precision)


def _dropdown_value(self: gr.Dropdown, payload: Any) -> Any:
    """The chosen value(s) as sent, not checked against the current choices. An index dropdown keeps
    Gradio's check: it has no index to give for a value it no longer lists."""
    if self.type != "value":
        return gr.Dropdown.preprocess(self, payload)
    return payload


LenientSlider: type[gr.Slider] = _lenient(
    gr.Slider, "LenientSlider", _slider_value, "A slider whose events pass values outside its current range on.")
LenientDropdown: type[gr.Dropdown] = _lenient(
    gr.Dropdown, "LenientDropdown", _dropdown_value, "A dropdown whose events pass values it no longer lists on.")
