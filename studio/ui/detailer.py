"""The ADetailer accordion of the generation tabs: the built-in Detailer's first unit, sent as the
same ``alwayson_scripts.ADetailer`` arguments an API client sends (so the infotext, the checks and
the refusals are the API's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.core import Studio
from studio.detailer import DetailerUnit
from studio.ui.bindings import RequestForm

# the unit's fields the accordion shows, in its order
FIELDS = ("ad_model", "ad_prompt", "ad_negative_prompt", "ad_confidence", "ad_dilate_erode", "ad_mask_blur",
          "ad_denoising_strength", "ad_inpaint_only_masked", "ad_inpaint_only_masked_padding")


@dataclass
class DetailerPanel:
    enable: gr.Checkbox
    skip_img2img: gr.Checkbox | None
    controls: list[Any]

    def inputs(self) -> list[Any]:
        return [self.enable, *([self.skip_img2img] if self.skip_img2img is not None else []), *self.controls]

    def fields(self, values: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
        enable, rest = bool(values[0]), list(values[1:])
        skip = bool(rest.pop(0)) if self.skip_img2img is not None else False
        if not enable:
            return {}
        # an untouched text box gives None; ADetailer's empty prompt means "the main prompt"
        unit = {k: "" if v is None and k in ("ad_prompt", "ad_negative_prompt") else v for k, v in zip(FIELDS, rest)}
        return {"alwayson_scripts": {"ADetailer": {"args": [True, skip, unit]}}}

    def bind(self, form: RequestForm) -> None:
        form.bind_group(("alwayson_scripts",), self.inputs(), self.fields)


def build_detailer_panel(studio: Studio, prefix: str, img2img: bool = False) -> DetailerPanel:
    defaults = DetailerUnit()
    names = studio.engine.detectors.names()
    with gr.Accordion("ADetailer", open=False, elem_id=f"{prefix}_adetailer"):
        with gr.Row():
            enable = gr.Checkbox(False, label="Enable ADetailer", elem_id=f"{prefix}_ad_enable")
            skip = gr.Checkbox(False, label="Skip img2img (detail the image as it is)",
                               elem_id=f"{prefix}_ad_skip_img2img") if img2img else None
        model = gr.Dropdown(names, value="face_opencv" if "face_opencv" in names else names[0],
                            label="ADetailer detector", elem_id=f"{prefix}_ad_model")
        prompt = gr.Textbox(label="ADetailer prompt (empty = the main prompt; [SEP] one per detection)", lines=2,
                            elem_id=f"{prefix}_ad_prompt")
        negative = gr.Textbox(label="ADetailer negative prompt", lines=1, elem_id=f"{prefix}_ad_negative_prompt")
        with gr.Row():
            confidence = gr.Slider(0, 1, value=defaults.ad_confidence, step=0.01, label="Detection confidence",
                                   elem_id=f"{prefix}_ad_confidence")
            dilate = gr.Slider(-128, 128, value=defaults.ad_dilate_erode, step=4,
                               label="Mask erosion (-) / dilation (+)", elem_id=f"{prefix}_ad_dilate_erode")
        with gr.Row():
            blur = gr.Slider(0, 64, value=defaults.ad_mask_blur, step=1, label="Inpaint mask blur",
                             elem_id=f"{prefix}_ad_mask_blur")
            strength = gr.Slider(0, 1, value=defaults.ad_denoising_strength, step=0.01,
                                 label="Inpaint denoising strength", elem_id=f"{prefix}_ad_denoising_strength")
        with gr.Row():
            only_masked = gr.Checkbox(defaults.ad_inpaint_only_masked, label="Inpaint only masked",
                                      elem_id=f"{prefix}_ad_inpaint_only_masked")
            padding = gr.Slider(0, 256, value=defaults.ad_inpaint_only_masked_padding, step=4,
                                label="Inpaint only masked padding, pixels", elem_id=f"{prefix}_ad_padding")
    return DetailerPanel(enable, skip, [model, prompt, negative, confidence, dilate, blur, strength, only_masked,
                                        padding])
