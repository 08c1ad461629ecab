"""ControlNet in the UI: the units accordion of txt2img / img2img / inpainting, and the ControlNet tab.

Each unit has the sd-webui-controlnet controls (enable, image, Control Type, preprocessor and its
sliders, model, weight, guidance window, control mode, resize mode, pixel perfect, hires option),
"Allow Preview" of the preprocessed map, and on img2img "Upload independent control image", named
as the extension names them so its users find them. The image can be painted on: the strokes are
the unit's mask (inpaint / IP-Adapter style units). The values go into
:class:`ControlNetUnitRequest`, the same type the API and CLI build, so every front door runs units
the same way. The event handlers are pure functions of their inputs (``*_updates``), testable
without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from studio.controlnet.control_types import CONTROL_TYPES, select_control_type
from studio.controlnet.preprocessors import INPAINT_MODULES, REDUX_MODULE
from studio.controlnet.units import (
    CONTROL_MODES,
    CONTROL_RESIZE_MODES,
    HR_OPTIONS,
    ControlNetUnitRequest,
    unit_count,
)
from studio.core import Studio
from studio.generation.request import build_request
from studio.ui.bindings import RequestForm
from studio.ui.lenient_components import LenientDropdown, LenientSlider

# The unit's small buttons sit level with the dropdown's box beside them, as the extension's tool
# buttons do (app.py adds this to the page's CSS). The unit tabs may wrap: Gradio sizes the strip (and
# its hidden measuring copy) to all tab names in one row, which made a phone's page 70 px too wide.
CONTROLNET_CSS = """
.cn-tool-button {align-self: flex-end !important; margin-bottom: 22px;}
[id$="_controlnet"] .tab-container {flex-wrap: wrap;}
"""

# The order UnitControls.inputs() hands values to units_from_values(). "control_type" is the UI's
# filter only (no request field); it is here so that pasting infotext can reset it with the rest.
UNIT_FIELDS = ("enabled", "upload_independent", "image", "module", "model", "weight", "guidance_start",
               "guidance_end", "pixel_perfect", "processor_res", "threshold_a", "threshold_b", "control_mode",
               "resize_mode", "hr_option", "control_type", "effective_region_mask")


@dataclass
class UnitControls:
    components: dict[str, Any] = field(default_factory=dict)
    preview: Any = None
    allow_preview: Any = None
    tab: Any = None

    def inputs(self) -> list[Any]:
        return [self.components[name] for name in UNIT_FIELDS]


@dataclass
class ControlNetPanel:
    units: list[UnitControls]
    accordion: Any = None
    studio: Studio | None = None     # for the full preprocessor and model lists when pasting infotext

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


def image_and_mask(value: Any) -> tuple[Any, Image.Image | None]:
    """A unit image's (image, mask). The value is gr.ImageEditor's ``{background, layers, composite}``
    (or a plain image: the ControlNet tab's "Send map to unit 0", API-style callers). The background
    is the control image; the painted layers' alpha is the mask, white = masked, as the extension's
    sketch tool gives inpaint / IP-Adapter units. A drawing on an empty canvas has no background:
    the drawing itself is then the control image (a scribble), with no mask."""
    if not isinstance(value, dict):
        return value, None
    background, composite = value.get("background"), value.get("composite")
    if background is None:
        return composite, None
    alpha = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        if not isinstance(layer, Image.Image):
            layer = Image.fromarray(np.asarray(layer))
        if layer.size != background.size:
            layer = layer.resize(background.size, Image.Resampling.NEAREST)
        a = np.asarray(layer.convert("RGBA").getchannel("A"))
        alpha = a if alpha is None else np.maximum(alpha, a)
    mask = Image.fromarray(alpha, "L") if alpha is not None and alpha.any() else None
    return background, mask


def units_from_values(values: list[Any] | tuple[Any, ...]) -> tuple[ControlNetUnitRequest, ...]:
    """Unit requests from the flat values of :meth:`ControlNetPanel.inputs`; units left off are
    passed too (disabled), so indices in the infotext match the unit tabs. A unit whose
    "Upload independent control image" is off (img2img's default) has no image: the engine gives
    it the img2img image."""
    units = []
    width = len(UNIT_FIELDS)
    for start in range(0, len(values), width):
        v = dict(zip(UNIT_FIELDS, values[start:start + width]))
        image, mask = image_and_mask(v["image"]) if v["upload_independent"] else (None, None)
        units.append(ControlNetUnitRequest(
            enabled=bool(v["enabled"]), module=v["module"] or "none", model=v["model"] or "None",
            weight=float(v["weight"]), image=image, mask=mask, guidance_start=float(v["guidance_start"]),
            guidance_end=float(v["guidance_end"]), pixel_perfect=bool(v["pixel_perfect"]),
            processor_res=int(v["processor_res"]), threshold_a=float(v["threshold_a"]),
            threshold_b=float(v["threshold_b"]), control_mode=v["control_mode"] or CONTROL_MODES[0],
            resize_mode=v["resize_mode"] or "Crop and Resize", hr_option=v["hr_option"] or HR_OPTIONS[0],
            # as the extension: the Control Type radio is a Union model's control type
            union_control_type=v.get("control_type") if v.get("control_type") not in (None, "All") else "Unknown",
            effective_region_mask=v.get("effective_region_mask")))
    return tuple(u for u in units) if any(u.enabled for u in units) else ()


# (Control Type, loaded checkpoint family) -> the module to select instead of the extension's default
FAMILY_DEFAULT_MODULES = {("Revision", "flux1"): REDUX_MODULE}


def model_choices(studio: Studio) -> list[str]:
    return ["None", *studio.controlnets.names()]


def control_type_updates(studio: Studio, control_type: str | None) -> tuple[Any, Any]:
    """Choosing a Control Type (the extension's ``filter_selected``): the Preprocessor and Model
    dropdowns offer that type's modules and models, with its usual module and its preferred model
    (or "None" when no model file matches) selected."""
    choice = select_control_type(control_type if control_type in CONTROL_TYPES else "All",
                                 studio.preprocessors.names(), studio.controlnets.names())
    module = choice.default_option
    current = studio.models.current
    family = (current.family if current is not None else "").split("-")[0]
    # the extension knows SD only: for a checkpoint of another family, its twin module where one exists
    twin = FAMILY_DEFAULT_MODULES.get((control_type or "", family))
    if twin in choice.module_list:
        module = twin
    return (gr.update(choices=choice.module_list, value=module),
            gr.update(choices=choice.model_list, value=choice.default_model))


def refreshed_models(studio: Studio, control_type: str | None, current: str | None) -> Any:
    """The model ↻ button: rescan ``models/ControlNet`` and list the models of the chosen Control
    Type (the filter stays); the selected model stays when it is still offered."""
    studio.controlnets.library.refresh()
    choice = select_control_type(control_type if control_type in CONTROL_TYPES else "All",
                                 studio.preprocessors.names(), studio.controlnets.names())
    value = current if current in choice.model_list else choice.default_model
    return gr.update(choices=choice.model_list, value=value)


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
    """The preprocessor's map of a unit's image (its background), with the painted mask: the inpaint
    modules read it as their mask, the others as their scribble (as a generation does)."""
    from studio.ui.common import USER_ERRORS

    image, mask = image_and_mask(image)
    if image is None:
        return None, "Upload an image first."
    scribble = not studio.settings.options.control_net_ignore_noninpaint_mask
    if mask is not None and module not in INPAINT_MODULES and scribble:
        image, mask = mask.convert("RGB"), None
    try:
        return studio.detect(module or "none", [image], int(resolution), float(a), float(b),
                             masks=[mask] if mask is not None else [])[0], ""
    except USER_ERRORS as e:
        return None, f"**Error:** {e}"


def preview_updates(studio: Studio, allow: bool, image: Any, module: str, resolution: float, a: float,
                    b: float) -> tuple[Any, Any]:
    """The preview follows the image, the preprocessor and its sliders while "Allow Preview" is on;
    off, nothing runs."""
    if not allow:
        return gr.update(), gr.update()
    return run_preview(studio, image, module, resolution, a, b)


def allow_preview_updates(studio: Studio, allow: bool, image: Any, module: str, resolution: float, a: float,
                          b: float) -> tuple[Any, Any, Any]:
    """"Allow Preview" switched by the user: on shows the preview (run at once when there is an
    image), off hides and clears it. Returns (preview column, preview, status)."""
    if not allow:
        return gr.update(visible=False), None, ""
    if image_and_mask(image)[0] is None:
        return gr.update(visible=True), None, ""
    return gr.update(visible=True), *run_preview(studio, image, module, resolution, a, b)


def run_button_updates(studio: Studio, image: Any, module: str, resolution: float, a: float,
                       b: float) -> tuple[Any, Any, Any, Any]:
    """"Run preprocessor" turns "Allow Preview" on and shows the map (as the extension's button):
    (allow preview, preview column, preview, status)."""
    return gr.update(value=True), gr.update(visible=True), *run_preview(studio, image, module, resolution, a, b)


def independent_updates(on: bool) -> tuple[Any, Any, Any, Any]:
    """img2img's "Upload independent control image": off (the default) the unit uses the img2img
    image, so its own image, preview and preprocessor button are hidden, as in the extension.
    Returns (image row, allow preview, run button, preview column)."""
    return (gr.update(visible=on), gr.update(visible=on, value=False), gr.update(visible=on),
            gr.update(visible=False))


def unit_label(index: int, enabled: bool) -> str:
    """A unit tab's label, marked when the unit is on; plain text, so no emoji font is needed."""
    return f"ControlNet Unit {index}" + (" (on)" if enabled else "")


def accordion_label(enabled: list[bool] | tuple[bool, ...]) -> str:
    """The accordion's title with how many units are on, seen while it is closed."""
    count = sum(bool(e) for e in enabled)
    return "ControlNet" if not count else f"ControlNet ({count} unit{'s' if count > 1 else ''} on)"


def enabled_updates(*enabled: bool) -> list[Any]:
    """Every unit's tab label, then the accordion's, from the units' Enable boxes."""
    return [*(gr.update(label=unit_label(i, bool(on))) for i, on in enumerate(enabled)),
            gr.update(label=accordion_label(enabled))]


def _unit(studio: Studio, tab_id: str, index: int, img2img: bool, hires: bool) -> UnitControls:
    c: dict[str, Any] = {}
    p = f"{tab_id}_controlnet_unit_{index}"
    # txt2img units always use their own image: the hidden box stays on there
    with gr.Row(equal_height=True, visible=not img2img) as image_row:
        c["image"] = gr.ImageEditor(type="pil", label="Control image", sources=["upload", "clipboard"], height=260,
                                    placeholder="Upload the control image. Paint over it to mask a part "
                                                "(white = masked) for inpaint or IP-Adapter units.",
                                    elem_id=f"{p}_image",
                                    brush=gr.Brush(colors=["#ffffff", "#000000"], default_color="#ffffff"),
                                    layers=False, transforms=())
        with gr.Column(visible=False, min_width=160) as preview_column:
            preview = gr.Image(type="pil", label="Preprocessor Preview", interactive=False, height=260,
                               elem_id=f"{p}_preview")
    with gr.Row():
        c["enabled"] = gr.Checkbox(False, label="Enable", elem_id=f"{p}_enable")
        c["pixel_perfect"] = gr.Checkbox(False, label="Pixel Perfect", elem_id=f"{p}_pixel_perfect")
        allow_preview = gr.Checkbox(False, label="Allow Preview", visible=not img2img, elem_id=f"{p}_allow_preview")
        c["upload_independent"] = gr.Checkbox(not img2img, label="Upload independent control image",
                                              visible=img2img, elem_id=f"{p}_upload_independent")
    c["control_type"] = gr.Radio(list(CONTROL_TYPES), value="All", label="Control Type",
                                 elem_id=f"{p}_type_filter_radio")
    # the buttons keep their own height (a row of equal heights would stretch them to the dropdown's box)
    with gr.Row(equal_height=False):
        # lenient: an event from before a Control Type click may carry a module the filter now hides
        c["module"] = LenientDropdown(studio.preprocessors.names(), value="none", label="Preprocessor",
                                      elem_id=f"{p}_module", scale=4)
        # plain text, not the extension's 💥: it must read on systems without an emoji font
        run = gr.Button("Run preprocessor", elem_id=f"{p}_run_preprocessor", scale=1, min_width=120, size="sm",
                        visible=not img2img, elem_classes=["cn-tool-button"])
    with gr.Row(equal_height=False):
        c["model"] = LenientDropdown(model_choices(studio), value="None", label="Model", elem_id=f"{p}_model",
                                     scale=4)
        refresh = gr.Button("↻", elem_id=f"{p}_refresh_models", scale=0, min_width=40, size="sm",
                            elem_classes=["cn-tool-button"])
    c["weight"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Control Weight", elem_id=f"{p}_weight")
    with gr.Row():
        c["guidance_start"] = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting Control Step",
                                        elem_id=f"{p}_guidance_start")
        c["guidance_end"] = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending Control Step",
                                      elem_id=f"{p}_guidance_end")
    c["processor_res"] = LenientSlider(64, 2048, value=512, step=8, label="Preprocessor Resolution",
                                       visible=False, elem_id=f"{p}_processor_res")
    with gr.Row():
        c["threshold_a"] = LenientSlider(-1, 2048, value=-1, label="Threshold A", visible=False,
                                         elem_id=f"{p}_threshold_a")
        c["threshold_b"] = LenientSlider(-1, 2048, value=-1, label="Threshold B", visible=False,
                                         elem_id=f"{p}_threshold_b")
    c["control_mode"] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode",
                                 elem_id=f"{p}_control_mode")
    c["resize_mode"] = gr.Radio(list(CONTROL_RESIZE_MODES), value="Crop and Resize", label="Resize Mode",
                                elem_id=f"{p}_resize_mode")
    c["hr_option"] = gr.Radio(list(HR_OPTIONS), value="Both", label="Hires-Fix Option", visible=hires,
                              elem_id=f"{p}_hr_option")
    with gr.Accordion("Effective Region Mask", open=False, elem_id=f"{p}_effective_region"):
        # the extension's mask for where a ControlNet / T2I-Adapter / IP-Adapter unit acts (white),
        # stretched over the picture; empty = everywhere
        c["effective_region_mask"] = gr.Image(type="pil", label="Effective region (white = the unit acts)",
                                              sources=["upload", "clipboard"], image_mode="L", height=200,
                                              elem_id=f"{p}_effective_region_mask")
    status = gr.Markdown("", elem_id=f"{p}_status")

    sliders = [c["processor_res"], c["threshold_a"], c["threshold_b"]]
    source = [c["image"], c["module"], *sliders]

    def follow(*values: Any) -> tuple[Any, Any]:
        return preview_updates(studio, *values)

    # .input: only the user's choice filters; pasted infotext sets the type back to "All" itself
    c["control_type"].input(lambda t: control_type_updates(studio, t), c["control_type"],
                            [c["module"], c["model"]], queue=False)
    c["module"].change(lambda m: slider_updates(studio, m), c["module"], sliders, queue=False).then(
        follow, [allow_preview, *source], [preview, status], show_progress="hidden")
    for slider in sliders:
        slider.release(follow, [allow_preview, *source], [preview, status], show_progress="hidden")
    c["image"].change(follow, [allow_preview, *source], [preview, status], trigger_mode="always_last",
                      show_progress="hidden")
    allow_preview.input(lambda *v: allow_preview_updates(studio, *v), [allow_preview, *source],
                        [preview_column, preview, status])
    run.click(lambda *v: run_button_updates(studio, *v), source, [allow_preview, preview_column, preview, status])
    refresh.click(lambda t, m: refreshed_models(studio, t, m), [c["control_type"], c["model"]], c["model"],
                  queue=False)
    if img2img:
        c["upload_independent"].change(independent_updates, c["upload_independent"],
                                       [image_row, allow_preview, run, preview_column], queue=False)
    return UnitControls(c, preview, allow_preview)


def build_controlnet_panel(studio: Studio, tab_id: str, img2img: bool = False, hires: bool = False,
                           count: int | None = None, open: bool = False) -> ControlNetPanel:
    """The "ControlNet" accordion with one tab per unit (``control_net_unit_count``, default 3); the
    tabs and the accordion's title say which units are on."""
    units = []
    with gr.Accordion("ControlNet", open=open, elem_id=f"{tab_id}_controlnet") as accordion, gr.Tabs():
        for index in range(count or unit_count(studio.settings)):
            with gr.Tab(unit_label(index, False), elem_id=f"{tab_id}_controlnet_tab_{index}") as tab:
                unit = _unit(studio, tab_id, index, img2img, hires)
            unit.tab = tab
            units.append(unit)
    flags = [u.components["enabled"] for u in units]
    for flag in flags:
        flag.change(enabled_updates, flags, [*(u.tab for u in units), accordion], queue=False,
                    show_progress="hidden")
    return ControlNetPanel(units, accordion, studio)


def save_map(studio: Studio, image: Any) -> str:
    """The ControlNet tab's "Save map": a PNG under outputs/controlnet-maps, never overwriting."""
    from studio.generation.outputs import save_image

    if image is None:
        return "Run a preprocessor first."
    path: Path = save_image(image, None, studio.paths.outputs / "controlnet-maps", 0)
    return f"Saved to `{path}`"


def build_controlnet_tab(studio: Studio) -> Any:
    """Run any preprocessor on an image, look at and save the map, and generate with units. Returns
    the tab's results column (its send-to buttons are wired with the others)."""
    from studio.ui.common import (
        build_output_area,
        build_prompt_area,
        build_sampling_controls,
        clip_skip_setting,
        stream_job,
        wire_generate,
    )
    from studio.ui.queue_panel import build_queue_panel

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
            res = LenientSlider(64, 2048, value=512, step=8, label="Preprocessor Resolution",
                                elem_id="controlnet_detect_res")
            a = LenientSlider(1, 255, value=100, label="Low Threshold", elem_id="controlnet_detect_threshold_a")
            b = LenientSlider(1, 255, value=200, label="High Threshold", elem_id="controlnet_detect_threshold_b")
        message = gr.Markdown("", elem_id="controlnet_detect_result")
    module.change(lambda m: slider_updates(studio, m), module, [res, a, b], queue=False)
    run.click(lambda *v: run_preview(studio, *v), [source, module, res, a, b], [detected, message])
    save.click(lambda image: save_map(studio, image), detected, message, queue=False)

    area = build_prompt_area(studio, "controlnet")
    with gr.Row(equal_height=False, elem_classes="gen-main"):
        with gr.Column(scale=1, min_width=340, elem_classes="gen-params"):
            controls = build_sampling_controls("controlnet", clip_skip_setting(studio))
            panel = build_controlnet_panel(studio, "controlnet", open=True)
        with gr.Column(scale=1, min_width=340, elem_classes="gen-results"):
            queue_panel = build_queue_panel(studio, "controlnet")
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
        yield from stream_job(studio, lambda: studio.engine.submit(build_request(form.schema, form.values(data))),
                              out, area)

    wire_generate(area, out, generate, form.inputs(), queue_panel)
    controls.reuse_seed.click(lambda s: s, out.last_seed, controls.seed, queue=False)
    return out


def paste_updates(panel: ControlNetPanel, params: dict[str, Any]) -> list[Any]:
    """PNG Info → txt2img: updates for every unit's inputs from ``ControlNet N`` infotext entries
    (the image is not in the infotext; units not mentioned are switched off). A pasted unit's
    Control Type goes back to "All", with every preprocessor and model offered, so its module and
    model are in the lists whatever filter was chosen before."""
    from studio.controlnet.units import units_from_infotext

    found = units_from_infotext(params)
    everything: dict[str, list[str]] = {}
    if panel.studio is not None:
        everything = {"module": panel.studio.preprocessors.names(), "model": model_choices(panel.studio)}
    updates: list[Any] = []
    for unit in (found.get(index) for index in range(len(panel.units))):
        for name in UNIT_FIELDS:
            if name == "enabled":
                updates.append(gr.update(value=unit is not None))
            elif unit is None or name in ("image", "upload_independent", "hr_option", "effective_region_mask"):
                updates.append(gr.update())
            elif name == "control_type":
                updates.append(gr.update(value="All"))
            elif name in everything:
                updates.append(gr.update(value=getattr(unit, name), choices=everything[name]))
            else:
                updates.append(gr.update(value=getattr(unit, name)))
    return updates
