"""txt2img tab: prompt area, sampling controls, gallery with live preview."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from studio.generation.samplers import SAMPLER_NAMES, SCHEDULE_LABELS
from studio.ui.common import (
    USER_ERRORS,
    build_output_area,
    build_prompt_area,
    build_sampling_controls,
    sampling_values,
    stream_job,
)
from studio.ui.extra_networks import ExtraNetworksBrowser

__all__ = ["USER_ERRORS", "Txt2ImgControls", "build_txt2img_tab", "fields_to_updates"]


@dataclass
class Txt2ImgControls:
    """The components other tabs fill in (PNG Info's "Send to txt2img")."""
    prompt: gr.Textbox
    negative: gr.Textbox
    steps: gr.Slider
    sampler: gr.Dropdown
    schedule: gr.Dropdown
    cfg: gr.Slider
    seed: gr.Number
    width: gr.Slider
    height: gr.Slider
    clip_skip: gr.Slider
    tab: gr.Tab
    extra: ExtraNetworksBrowser


def build_txt2img_tab(studio: Studio) -> Txt2ImgControls:
    with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img") as tab:
        area = build_prompt_area(studio, "txt2img")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                controls = build_sampling_controls("txt2img")
            with gr.Column(scale=1):
                out = build_output_area("txt2img")
    area.wire_token_counters(studio, controls.steps)

    def run(p, neg, style_names, *values):
        def submit():
            req = Txt2ImgRequest(prompt=p or "", negative_prompt=neg or "", styles=tuple(style_names or ()),
                                 **sampling_values(*values))
            return studio.submit_txt2img(req)
        yield from stream_job(studio, submit)

    area.generate.click(run, [area.prompt, area.negative, area.styles, *controls.inputs()], out.outputs(),
                        concurrency_limit=None)
    controls.reuse_seed.click(lambda s: s, out.last_seed, controls.seed, queue=False)
    return Txt2ImgControls(area.prompt, area.negative, controls.steps, controls.sampler, controls.schedule,
                           controls.cfg, controls.seed, controls.width, controls.height, controls.clip_skip, tab,
                           area.extra)


def fields_to_updates(controls: Txt2ImgControls, fields: dict[str, Any]) -> list[Any]:
    """Updates for (prompt, negative, steps, sampler, schedule, cfg, seed, width, height, clip_skip)."""
    names = ["prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed",
             "width", "height", "clip_skip"]
    updates = []
    for name in names:
        value = fields.get(name)
        if name == "sampler_name" and value not in SAMPLER_NAMES:
            value = None
        if name == "scheduler" and value not in SCHEDULE_LABELS:
            value = None
        updates.append(gr.update(value=value) if value is not None else gr.update())
    return updates
