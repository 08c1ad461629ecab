"""A Gradio slider whose value is not checked against its range when an event reads it.

The ControlNet units' preprocessor sliders change their range with the chosen preprocessor. An
event sent just before a range change (switching between preprocessors whose sliders differ, or
two quick module changes racing their follow-up previews) would otherwise be refused by Gradio
with "Value 0 is less than minimum value 1" on the page. The engine applies the extension's rule
instead: a value out of range is the module's default, with a warning (``units.lenient_params``).

Why a class and not a patched instance: once an event updates a component's props, Gradio keeps a
per-session copy made with ``block.__class__(**kwargs)`` and preprocesses with that copy, so an
instance patch is lost after the first range change.

Why it is built with ``ABCMeta.__new__``: Gradio's component metaclass writes a ``.pyi`` stub beside
the module of any component subclass it creates, which an installed package must not do (the
folder may be read-only). The metaclass's other work (events, the recorded constructor arguments)
is inherited from ``gr.Slider`` unchanged, so skipping its ``__new__`` loses nothing.
``is_template`` makes Gradio draw it with its own slider, as it does for its template components.
"""

from __future__ import annotations

from abc import ABCMeta

import gradio as gr
from gradio.components.number import Number


def _preprocess(self: gr.Slider, payload: float) -> float:
    """The value rounded to the slider's precision, not checked against its range."""
    return Number.round_to_precision(payload, self.precision)


LenientSlider: type[gr.Slider] = ABCMeta.__new__(
    type(gr.Slider), "LenientSlider", (gr.Slider,),
    {"__module__": __name__, "__qualname__": "LenientSlider", "is_template": True,
     "preprocess": _preprocess, "__doc__": __doc__})
