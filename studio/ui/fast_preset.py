"""The Fast button: one click sets the sampler, schedule, steps and CFG a few-step model was distilled
for (and adds its LoRA to the prompt when the speed comes from one). The controls change where the user
sees them, so the next Generate sends ordinary values and the infotext reproduces the image."""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.core import Studio
from studio.errors import RequestError
from studio.generation.fast import with_lora
from studio.generation.samplers import find_schedule
from studio.ui.common import OutputArea, PromptArea, SamplingControls


def fast_updates(studio: Studio, kind: str, prompt: str) -> tuple[Any, ...]:
    """(prompt, sampler, schedule, steps, cfg, message) for the Fast button; on a refusal only the message."""
    keep = (gr.update(),) * 5
    try:
        preset = studio.engine.fast_preset(kind or "auto", prompt or "", studio.current_title)
    except RequestError as e:
        return (*keep, f"**Fast:** {e}")
    if preset is None:
        return (*keep, "_Fast: this model family sets its own sampler and steps (its few-step variants are "
                       "known by name)._")
    return (gr.update(value=with_lora(prompt or "", preset.lora)), gr.update(value=preset.sampler_name),
            gr.update(value=find_schedule(preset.scheduler).label), gr.update(value=preset.steps),
            gr.update(value=preset.cfg_scale), f"_{preset.note()}_")


def wire_fast(studio: Studio, area: PromptArea, controls: SamplingControls, out: OutputArea) -> None:
    controls.fast.click(lambda kind, prompt: fast_updates(studio, kind, prompt), [controls.fast_kind, area.prompt],
                        [area.prompt, controls.sampler, controls.schedule, controls.steps, controls.cfg, out.error],
                        queue=False, show_progress="hidden")
