"""A1111's Refiner accordion and the "Restore faces" checkbox, shared by txt2img and img2img."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.core import Studio
from studio.ui.bindings import RequestForm


@dataclass
class RefinerControls:
    controls: dict[str, Any]

    def bind(self, form: RequestForm) -> None:
        bind_refiner(form, self.controls)


def build_refiner_controls(studio: Studio, tab: str) -> RefinerControls:
    titles = [c.title for c in studio.checkpoints()]
    c: dict[str, Any] = {}
    with gr.Accordion("Refiner", open=False, elem_id=f"{tab}_refiner"):
        c["enable"] = gr.Checkbox(False, label="Enable", elem_id=f"{tab}_enable_refiner")
        with gr.Row():
            c["checkpoint"] = gr.Dropdown(titles, value=None, label="Checkpoint", elem_id=f"{tab}_refiner_checkpoint")
            c["switch_at"] = gr.Slider(0.01, 1, value=0.8, step=0.01, label="Switch at",
                                       elem_id=f"{tab}_refiner_switch_at")
    c["restore_faces"] = gr.Checkbox(False, label="Restore faces", elem_id=f"{tab}_restore_faces")
    return RefinerControls(c)


def bind_refiner(form: RequestForm, c: dict[str, Any]) -> None:
    def fields(values: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
        enable, checkpoint, switch_at = values
        if not enable or not checkpoint:
            return {"refiner_checkpoint": None, "refiner_switch_at": None}
        return {"refiner_checkpoint": checkpoint, "refiner_switch_at": float(switch_at)}

    form.bind_group(("refiner_checkpoint", "refiner_switch_at"), [c["enable"], c["checkpoint"], c["switch_at"]],
                    fields)
    form.bind("restore_faces", c["restore_faces"], bool)
