"""txt2img tab: prompt area, sampling controls, gallery with live preview."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.core import Studio
from studio.generation.request import build_request
from studio.generation.samplers import SAMPLER_NAMES, SCHEDULE_LABELS
from studio.ui.bindings import RequestForm
from studio.ui.common import (
    USER_ERRORS,
    GenerationTab,
    build_output_area,
    build_prompt_area,
    build_sampling_controls,
    clip_skip_setting,
    model_guidance,
    stream_job,
    wire_generate,
)
from studio.ui.controlnet import ControlNetPanel, build_controlnet_panel
from studio.ui.detailer import build_detailer_panel
from studio.ui.extra_networks import ExtraNetworksBrowser
from studio.ui.fast_preset import wire_fast
from studio.ui.queue_panel import build_queue_panel
from studio.ui.refiner import build_refiner_controls
from studio.ui.scripts import ScriptPanel, build_script_panel
from studio.ui.send_to import fields_to_send, param_updates, value_update

__all__ = ["USER_ERRORS", "Txt2ImgControls", "build_txt2img_tab", "fields_to_send", "fields_to_updates"]


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
    controlnet: ControlNetPanel
    distilled: gr.Slider
    follows_model: GenerationTab
    scripts: ScriptPanel
    hires: dict[str, Any]


def build_txt2img_tab(studio: Studio) -> Txt2ImgControls:
    with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img") as tab:
        area = build_prompt_area(studio, "txt2img")
        with gr.Row(equal_height=False, elem_classes="gen-main"):
            with gr.Column(scale=1, min_width=340, elem_classes="gen-params"):
                controls = build_sampling_controls("txt2img", clip_skip_setting(studio), model_guidance(studio))
                hires = build_hires_controls(studio)
                refiner = build_refiner_controls(studio, "txt2img")
                detailer = build_detailer_panel(studio, "txt2img")
                panel = build_controlnet_panel(studio, "txt2img", hires=True)
                extra_column = gr.Column()
                scripts = build_script_panel(studio, "txt2img")
            with gr.Column(scale=1, min_width=340, elem_classes="gen-results"):
                out = build_output_area("txt2img")
                # under the results: the picture is what the first screen is for
                queue_panel = build_queue_panel(studio, "txt2img")
    area.wire_token_counters(studio, controls.steps)
    form = RequestForm(studio.schemas.txt2img, "txt2img")
    area.bind(form)
    controls.bind(form)
    bind_hires(form, hires)
    refiner.bind(form)
    detailer.bind(form)
    panel.bind(form)
    scripts.bind(form)
    with extra_column:
        form.add_schema_controls()

    def run(data: dict[Any, Any]):
        yield from stream_job(studio, lambda: studio.engine.submit(build_request(form.schema, form.values(data))),
                              out, area)

    wire_generate(area, out, run, form.inputs(), queue_panel)

    wire_fast(studio, area, controls, out)
    controls.reuse_seed.click(lambda s: s, out.last_seed, controls.seed, queue=False)
    return Txt2ImgControls(area.prompt, area.negative, controls.steps, controls.sampler, controls.schedule,
                           controls.cfg, controls.seed, controls.width, controls.height, controls.clip_skip, tab,
                           area.extra, panel, controls.distilled, GenerationTab(area, controls, out=out), scripts,
                           hires)


def build_hires_controls(studio: Studio) -> dict[str, Any]:
    """A1111's Hires. fix accordion: a second pass at a larger size."""
    from studio.upscale import LATENT_MODES

    names = [*LATENT_MODES, *(u.name for u in studio.upscalers.items() if u.kind != "none")]
    c: dict[str, Any] = {}
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hr"):
        c["enable"] = gr.Checkbox(False, label="Enable", elem_id="txt2img_enable_hr")
        with gr.Row():
            c["upscaler"] = gr.Dropdown(names, value="Latent", label="Upscaler", elem_id="txt2img_hr_upscaler")
            c["steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0 = same)",
                                   elem_id="txt2img_hires_steps")
            c["denoising"] = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                       elem_id="txt2img_denoising_strength")
        with gr.Row():
            c["scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
            c["resize_x"] = gr.Slider(0, 2048, value=0, step=8, label="Resize width to",
                                      elem_id="txt2img_hr_resize_x")
            c["resize_y"] = gr.Slider(0, 2048, value=0, step=8, label="Resize height to",
                                      elem_id="txt2img_hr_resize_y")
        with gr.Row():
            c["checkpoint"] = gr.Dropdown(["Use same checkpoint", *(ck.title for ck in studio.checkpoints())],
                                          value="Use same checkpoint", label="Hires checkpoint",
                                          elem_id="txt2img_hr_checkpoint")
            c["sampler"] = gr.Dropdown(["Use same sampler", *SAMPLER_NAMES], value="Use same sampler",
                                       label="Hires sampling method", elem_id="txt2img_hr_sampler")
            c["scheduler"] = gr.Dropdown(["Use same scheduler", *SCHEDULE_LABELS], value="Use same scheduler",
                                         label="Hires schedule type", elem_id="txt2img_hr_scheduler")
        c["prompt"] = gr.Textbox(label="Hires prompt (empty = same)", lines=2, elem_id="txt2img_hr_prompt")
        c["negative"] = gr.Textbox(label="Hires negative prompt (empty = same)", lines=2,
                                   elem_id="txt2img_hr_neg_prompt")
    return c


# Hires. fix controls and the request fields they show; "Use same …" stands for an empty field
HIRES_FIELDS = (("enable", "enable_hr"), ("upscaler", "hr_upscaler"), ("steps", "hr_second_pass_steps"),
                ("denoising", "denoising_strength"), ("scale", "hr_scale"), ("resize_x", "hr_resize_x"),
                ("resize_y", "hr_resize_y"), ("checkpoint", "hr_checkpoint_name"), ("sampler", "hr_sampler_name"),
                ("scheduler", "hr_scheduler"), ("prompt", "hr_prompt"), ("negative", "hr_negative_prompt"))
_SAME = {"checkpoint": "Use same checkpoint", "sampler": "Use same sampler", "scheduler": "Use same scheduler"}


def hires_components(c: dict[str, Any]) -> list[Any]:
    return [c[key] for key, _ in HIRES_FIELDS]


def hires_updates(fields: dict[str, Any]) -> list[Any]:
    """PNG Info / send-to: the Hires. fix controls from an infotext's fields. Without hires keys the
    checkbox goes off and the rest stays; with them, a key the infotext lacks takes its "same" value."""
    if not fields.get("enable_hr"):
        return [gr.update(value=False)] + [gr.update() for _ in HIRES_FIELDS[1:]]
    out = []
    for key, name in HIRES_FIELDS:
        value = fields.get(name)
        if value is None and key in _SAME:
            value = _SAME[key]
        elif value is None and key in ("prompt", "negative"):
            value = ""
        out.append(value_update(name, value) if key not in _SAME or value != _SAME[key] else gr.update(value=value))
    return out


def bind_hires(form: RequestForm, c: dict[str, Any]) -> None:
    form.bind("enable_hr", c["enable"], bool)
    form.bind("hr_upscaler", c["upscaler"], lambda v: v or "Latent")
    form.bind("hr_scale", c["scale"], float)
    form.bind("hr_second_pass_steps", c["steps"], int)
    form.bind("denoising_strength", c["denoising"], float)  # A1111: txt2img's denoising is the hires pass's
    form.bind("hr_resize_x", c["resize_x"], lambda v: int(v or 0))
    form.bind("hr_resize_y", c["resize_y"], lambda v: int(v or 0))
    form.bind("hr_sampler_name", c["sampler"], lambda v: None if v in (None, "Use same sampler") else v)
    form.bind("hr_checkpoint_name", c["checkpoint"], lambda v: None if v in (None, "Use same checkpoint") else v)
    form.bind("hr_scheduler", c["scheduler"], lambda v: None if v in (None, "Use same scheduler") else v)
    form.bind("hr_prompt", c["prompt"], lambda v: v or "")
    form.bind("hr_negative_prompt", c["negative"], lambda v: v or "")


def fields_to_updates(controls: Txt2ImgControls, fields: dict[str, Any]) -> list[Any]:
    """Updates for (prompt, negative, steps, sampler, schedule, cfg, seed, width, height, clip_skip,
    distilled_cfg_scale): send_to.PARAM_FIELDS."""
    return param_updates(fields)
