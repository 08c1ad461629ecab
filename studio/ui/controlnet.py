"""ControlNet in the UI: the units accordion of txt2img / img2img / inpainting, and the ControlNet tab.

Each unit has the sd-webui-controlnet controls (enable, image, preprocessor and its sliders, model,
weight, guidance window, control mode, resize mode, pixel perfect, hires option) plus a preview of
the preprocessed map. The values go into :class:`ControlNetUnitRequest`, the same type the API and
CLI build, so every front door runs units the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from studio.controlnet.guidance import CONTROL_MODES
from studio.controlnet.units import CONTROL_RESIZE_MODES, HR_OPTIONS, ControlNetUnitRequest, unit_count
from studio.core import Studio
from studio.generation.request import build_request
from studio.ui.bindings import RequestForm

# The order UnitControls.inputs() hands values to units_from_values().
UNIT_FIELDS = ("enabled", "use_init", "image", "module", "model", "weight", "guidance_start", "guidance_end",
               "pixel_perfect", "processor_res", "threshold_a", "threshold_b", "control_mode", "resize_mode",
               "hr_option")


@dataclass
class UnitControls:
    components: dict[str, Any] = field(default_factory=dict)
    preview: Any = None

    def inputs(self) -> list[Any]:
        return [self.components[name] for name in UNIT_FIELDS]


@dataclass
class ControlNetPanel:
    units: list[UnitControls]

    def inputs(self) -> list[Any]:
        return [c for unit in self.units for c in unit.inputs()]

    @property
    def size(self) -> int:
        return len(UNIT_FIELDS) * len(self.units)

    def bind(self, form: RequestForm) -> None:
        """The units' controls make the request's ControlNet units (the same unit requests the API's
        ``alwayson_scripts`` gives)."""
        form.bind_group(("controlnet_units", "alwayson_scripts"), self.inputs(),
                        lambda values: {"controlnet_units": units_from_values(values)})


def units_from_values(values: list[Any] | tuple[Any, ...]) -> tuple[ControlNetUnitRequest, ...]:
    """Unit requests from the flat values of :meth:`ControlNetPanel.inputs`; units left off are
    passed too (disabled), so indices in the infotext match the unit tabs."""
    units = []
    width = len(UNIT_FIELDS)
    for start in range(0, len(values), width):
        v = dict(zip(UNIT_FIELDS, values[start:start + width]))
        image = None if v["use_init"] else v["image"]
        units.append(ControlNetUnitRequest(
            enabled=bool(v["enabled"]), module=v["module"] or "none", model=v["model"] or "None",
            weight=float(v["weight"]), image=image, guidance_start=float(v["guidance_start"]),
            guidance_end=float(v["guidance_end"]), pixel_perfect=bool(v["pixel_perfect"]),
            processor_res=int(v["processor_res"]), threshold_a=float(v["threshold_a"]),
            threshold_b=float(v["threshold_b"]), control_mode=v["control_mode"] or CONTROL_MODES[0],
            resize_mode=v["resize_mode"] or "Crop and Resize", hr_option=v["hr_option"] or HR_OPTIONS[0]))
    return tuple(u for u in units) if any(u.enabled for u in units) else ()


def model_choices(studio: Studio) -> list[str]:
    return ["None", *studio.controlnets.names()]


# A threshold the preprocessor does not have: hidden, -1 ("default"), in a range that admits -1
# because Gradio checks a slider's value against its current bounds.
_HIDDEN_THRESHOLD = gr.update(visible=False, minimum=-1, maximum=2048, value=-1)


def slider_updates(studio: Studio, module: str) -> tuple[Any, Any, Any]:
    """Processor resolution and threshold sliders for a preprocessor: shown with its labels, ranges
    and defaults, hidden when it has none (what the extension's UI does)."""
    if module not in studio.preprocessors:
        return gr.update(visible=False), _HIDDEN_THRESHOLD, _HIDDEN_THRESHOLD
    p = studio.preprocessors.get(module)
    out = []
    for index, slider in enumerate((p.resolution, p.slider_1, p.slider_2)):
        if slider is None:
            out.append(gr.update(visible=False) if index == 0 else _HIDDEN_THRESHOLD)
        else:
            out.append(gr.update(visible=True, label=slider.label, minimum=slider.minimum, maximum=slider.maximum,
                                 step=slider.step, value=slider.value))
    return tuple(out)


def run_preview(studio: Studio, image: Any, module: str, resolution: float, a: float, b: float) -> tuple[Any, str]:
    from studio.ui.common import USER_ERRORS

    if image is None:
        return None, "Upload an image first."
    try:
        return studio.detect(module or "none", [image], int(resolution), float(a), float(b))[0], ""
    except USER_ERRORS as e:
        return None, f"**Error:** {e}"


def _unit(studio: Studio, tab_id: str, index: int, img2img: bool, hires: bool) -> UnitControls:
    c: dict[str, Any] = {}
    p = f"{tab_id}_controlnet_unit_{index}"
    modules = studio.preprocessors.names()
    with gr.Row():
        c["enabled"] = gr.Checkbox(False, label="Enable", elem_id=f"{p}_enable")
        c["pixel_perfect"] = gr.Checkbox(False, label="Pixel Perfect", elem_id=f"{p}_pixel_perfect")
        # img2img units use the img2img image unless the user uploads one (the extension's default)
        c["use_init"] = gr.Checkbox(img2img, label="Use the img2img image", visible=img2img,
                                    elem_id=f"{p}_use_init")
    with gr.Row(equal_height=True):
        c["image"] = gr.Image(type="pil", label="Control image", sources=["upload", "clipboard"], height=220,
                              elem_id=f"{p}_image", visible=not img2img)
        preview = gr.Image(type="pil", label="Preprocessor preview", interactive=False, height=220,
                           elem_id=f"{p}_preview")
    with gr.Row(equal_height=True):
        c["module"] = gr.Dropdown(modules, value="none", label="Preprocessor", elem_id=f"{p}_module", scale=4)
        run = gr.Button("💥 Preview", elem_id=f"{p}_run_preprocessor", scale=1, min_width=100, size="sm")
    with gr.Row(equal_height=True):
        c["model"] = gr.Dropdown(model_choices(studio), value="None", label="Model", elem_id=f"{p}_model", scale=4)
        refresh = gr.Button("↻", elem_id=f"{p}_refresh_models", scale=0, min_width=40, size="sm")
    c["weight"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Control Weight", elem_id=f"{p}_weight")
    with gr.Row():
        c["guidance_start"] = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting Control Step",
                                        elem_id=f"{p}_guidance_start")
        c["guidance_end"] = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending Control Step",
                                      elem_id=f"{p}_guidance_end")
    c["processor_res"] = gr.Slider(64, 2048, value=512, step=8, label="Preprocessor Resolution",
                                   visible=False, elem_id=f"{p}_processor_res")
    with gr.Row():
        c["threshold_a"] = gr.Slider(-1, 2048, value=-1, label="Threshold A", visible=False,
                                     elem_id=f"{p}_threshold_a")
        c["threshold_b"] = gr.Slider(-1, 2048, value=-1, label="Threshold B", visible=False,
                                     elem_id=f"{p}_threshold_b")
    c["control_mode"] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode",
                                 elem_id=f"{p}_control_mode")
    c["resize_mode"] = gr.Radio(list(CONTROL_RESIZE_MODES), value="Crop and Resize", label="Resize Mode",
                                elem_id=f"{p}_resize_mode")
    c["hr_option"] = gr.Radio(list(HR_OPTIONS), value="Both", label="Hires-Fix Option", visible=hires,
                              elem_id=f"{p}_hr_option")
    status = gr.Markdown("", elem_id=f"{p}_status")

    sliders = [c["processor_res"], c["threshold_a"], c["threshold_b"]]
    c["module"].change(lambda m: slider_updates(studio, m), c["module"], sliders, queue=False)
    run.click(lambda *v: run_preview(studio, *v), [c["image"], c["module"], *sliders], [preview, status])
    refresh.click(lambda: (studio.controlnets.library.refresh(), gr.update(choices=model_choices(studio)))[1],
                  None, c["model"], queue=False)
    if img2img:
        c["use_init"].change(lambda use: gr.update(visible=not use), c["use_init"], c["image"], queue=False)
    return UnitControls(c, preview)


def build_controlnet_panel(studio: Studio, tab_id: str, img2img: bool = False, hires: bool = False,
                           count: int | None = None, open: bool = False) -> ControlNetPanel:
    """The "ControlNet" accordion with one tab per unit (``control_net_unit_count``, default 3)."""
    units = []
    with gr.Accordion("ControlNet", open=open, elem_id=f"{tab_id}_controlnet"), gr.Tabs():
        for index in range(count or unit_count(studio.settings)):
            with gr.Tab(f"ControlNet Unit {index}", elem_id=f"{tab_id}_controlnet_tab_{index}"):
                units.append(_unit(studio, tab_id, index, img2img, hires))
    return ControlNetPanel(units)


def save_map(studio: Studio, image: Any) -> str:
    """The ControlNet tab's "Save map": a PNG under outputs/controlnet-maps, never overwriting."""
    from studio.generation.outputs import save_image

    if image is None:
        return "Run a preprocessor first."
    path: Path = save_image(image, None, studio.paths.outputs / "controlnet-maps", 0)
    return f"Saved to `{path}`"


def build_controlnet_tab(studio: Studio) -> None:
    """Run any preprocessor on an image, look at and save the map, and generate with units."""
    from studio.ui.common import (
        build_output_area,
        build_prompt_area,
        build_sampling_controls,
        clip_skip_setting,
        stream_job,
    )

    gr.Markdown("Preprocess an image into a control map, then generate with ControlNet units. "
                "Units are also in the txt2img, img2img and Inpaint tabs.")
    with gr.Accordion("Preprocessor", open=True, elem_id="controlnet_detect"):
        with gr.Row(equal_height=True):
            source = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], height=300,
                              elem_id="controlnet_detect_image")
            detected = gr.Image(type="pil", label="Detected map", interactive=False, height=300, format="png",
                                elem_id="controlnet_detect_map")
        with gr.Row(equal_height=True):
            module = gr.Dropdown(studio.preprocessors.names(), value="canny", label="Preprocessor",
                                 elem_id="controlnet_detect_module", scale=3)
            run = gr.Button("Run preprocessor", variant="primary", elem_id="controlnet_detect_run", scale=1)
            save = gr.Button("Save map", elem_id="controlnet_detect_save", scale=1)
            send = gr.Button("Send map to unit 0", elem_id="controlnet_detect_send", scale=1)
        with gr.Row():
            res = gr.Slider(64, 2048, value=512, step=8, label="Preprocessor Resolution",
                            elem_id="controlnet_detect_res")
            a = gr.Slider(1, 255, value=100, label="Low Threshold", elem_id="controlnet_detect_threshold_a")
            b = gr.Slider(1, 255, value=200, label="High Threshold", elem_id="controlnet_detect_threshold_b")
        message = gr.Markdown("", elem_id="controlnet_detect_result")
    module.change(lambda m: slider_updates(studio, m), module, [res, a, b], queue=False)
    run.click(lambda *v: run_preview(studio, *v), [source, module, res, a, b], [detected, message])
    save.click(lambda image: save_map(studio, image), detected, message, queue=False)

    area = build_prompt_area(studio, "controlnet")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            controls = build_sampling_controls("controlnet", clip_skip_setting(studio))
            panel = build_controlnet_panel(studio, "controlnet", open=True)
        with gr.Column(scale=1):
            out = build_output_area("controlnet")
    area.wire_token_counters(studio, controls.steps)
    first = panel.units[0].components

    def send_to_unit(image):
        if image is None:
            return gr.update(), gr.update(), gr.update(), "Run a preprocessor first."
        # the map is already preprocessed: the unit takes it as is
        return image, True, "none", "Sent to ControlNet Unit 0 (preprocessor none); choose its model."

    send.click(send_to_unit, detected, [first["image"], first["enabled"], first["module"], message], queue=False)
    form = RequestForm(studio.schemas.txt2img, "controlnet")
    area.bind(form)
    controls.bind(form)
    panel.bind(form)

    def generate(data: dict[Any, Any]):
        yield from stream_job(studio, lambda: studio.engine.submit(build_request(form.schema, form.values(data))))

    area.generate.click(generate, form.inputs(), out.outputs(), concurrency_limit=None)
    controls.reuse_seed.click(lambda s: s, out.last_seed, controls.seed, queue=False)


def paste_updates(panel: ControlNetPanel, params: dict[str, Any]) -> list[Any]:
    """PNG Info → txt2img: updates for every unit's inputs from ``ControlNet N`` infotext entries
    (the image is not in the infotext; units not mentioned are switched off)."""
    from studio.controlnet.units import units_from_infotext

    found = units_from_infotext(params)
    updates: list[Any] = []
    for index, unit_controls in enumerate(panel.units):
        unit = found.get(index)
        for name in UNIT_FIELDS:
            if name == "enabled":
                updates.append(gr.update(value=unit is not None))
            elif unit is None or name in ("image", "use_init", "hr_option"):
                updates.append(gr.update())
            else:
                updates.append(gr.update(value=getattr(unit, name)))
    return updates
