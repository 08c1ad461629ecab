"""img2img tab (upload, Sketch, Batch) and the Inpaint tab, on the shared building blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from studio.core import Studio
from studio.generation.request import INPAINT_FILL, RESIZE_MODES, build_request
from studio.ui.bindings import RequestForm
from studio.ui.common import (
    USER_ERRORS,
    GenerationTab,
    build_output_area,
    build_prompt_area,
    build_sampling_controls,
    clip_skip_setting,
    error_updates,
    model_guidance,
    stream_job,
    wire_generate,
)
from studio.ui.controlnet import build_controlnet_panel
from studio.ui.detailer import build_detailer_panel
from studio.ui.fast_preset import wire_fast
from studio.ui.queue_panel import build_queue_panel
from studio.ui.refiner import build_refiner_controls
from studio.ui.scripts import build_script_panel

INPAINT_AREAS = ("Whole picture", "Only masked")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")


def editor_parts(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """(image, mask) from a gr.ImageEditor value: the background is the picture, the painted
    layers' alpha is the mask (white = repaint). The composite is used as the image when
    there is no background (a sketch drawn on an empty canvas)."""
    if not value:
        return None, None
    background, layers, composite = value.get("background"), value.get("layers") or [], value.get("composite")
    image = background if background is not None else composite
    mask = None
    painted = [layer for layer in layers if layer is not None]
    if painted:
        alpha = np.zeros(painted[0].size[::-1], dtype=np.uint8)
        for layer in painted:
            alpha = np.maximum(alpha, np.asarray(layer.convert("RGBA").getchannel("A")))
        if alpha.any():
            mask = Image.fromarray(alpha, "L")
    return image, mask


def size_from_image(image: Image.Image | None) -> tuple[Any, Any]:
    """A1111's "auto detect size from img2img": width and height from the picture, down to multiples of
    8 (the sliders' step), within the sliders' 64–2048."""
    if image is None:
        gr.Warning("Upload an image first.")
        return gr.update(), gr.update()

    def fit(n: int) -> int:
        return max(64, min(2048, n - n % 8))

    return gr.update(value=fit(image.width)), gr.update(value=fit(image.height))


def _mode_controls(tab_id: str, inpaint: bool) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], type="index", label="Resize mode",
                                elem_id=f"{tab_id}_resize_mode")
    c["denoising"] = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                               elem_id=f"{tab_id}_denoising_strength")
    if inpaint:
        c["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id=f"{tab_id}_mask_blur")
        with gr.Row():
            c["mask_mode"] = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], type="index", label="Mask mode",
                                      elem_id=f"{tab_id}_mask_mode")
            c["fill"] = gr.Radio(list(INPAINT_FILL), value="original", type="index", label="Masked content",
                                 elem_id=f"{tab_id}_inpainting_fill")
        with gr.Row():
            c["area"] = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], type="index", label="Inpaint area",
                                 elem_id=f"{tab_id}_inpaint_full_res")
            c["padding"] = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels",
                                     elem_id=f"{tab_id}_inpaint_full_res_padding")
    return c


def _request_form(studio: Studio, tab_id: str, parts: tuple[Any, ...], mode: dict[str, Any],
                  extra_column: Any) -> RequestForm:
    """The tab's controls bound to the img2img schema, and controls for the fields none of them set."""
    form = RequestForm(studio.schemas.img2img, tab_id)
    for part in parts:
        part.bind(form)
    _bind_mode(form, mode)
    with extra_column:
        form.add_schema_controls()
    return form


def _bind_mode(form: RequestForm, c: dict[str, Any]) -> None:
    form.bind("resize_mode", c["resize_mode"], int)
    form.bind("denoising_strength", c["denoising"], float)
    if "mask_blur" in c:
        form.bind("mask_blur", c["mask_blur"], int)
        form.bind("inpainting_mask_invert", c["mask_mode"], int)
        form.bind("inpainting_fill", c["fill"], int)
        form.bind("inpaint_full_res", c["area"], bool)
        form.bind("inpaint_full_res_padding", c["padding"], int)


def _error(out: Any, area: Any, message: str):
    yield error_updates(out, area, message)


def build_img2img_tab(studio: Studio) -> GenerationTab:
    with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
        area = build_prompt_area(studio, "img2img")
        with gr.Row(equal_height=False, elem_classes="gen-main"):
            with gr.Column(scale=1, min_width=340, elem_classes="gen-params"):
                with gr.Tabs(elem_id="mode_img2img") as sources:
                    with gr.Tab("img2img", id="upload", elem_id="img2img_img2img_tab"):
                        upload = gr.Image(label="Image for img2img", type="pil", image_mode="RGBA",
                                          sources=["upload", "clipboard"], elem_id="img2img_image", height=360)
                    with gr.Tab("Sketch", id="sketch", elem_id="img2img_img2img_sketch_tab"):
                        sketch = gr.ImageEditor(label="Sketch", type="pil", elem_id="img2img_sketch", height=360,
                                                brush=gr.Brush(colors=["#000000", "#ffffff", "#e11d48", "#2563eb",
                                                                       "#16a34a", "#f59e0b"]))
                    with gr.Tab("Batch", id="batch", elem_id="img2img_batch_tab"):
                        batch_in = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir")
                        batch_out = gr.Textbox(label="Output directory (empty: outputs/img2img-images)",
                                               elem_id="img2img_batch_output_dir")
                mode = _mode_controls("img2img", inpaint=False)
                controls = build_sampling_controls("img2img", clip_skip_setting(studio), model_guidance(studio))
                size_button = gr.Button("Size from image", elem_id="img2img_detect_image_size_btn", size="sm")
                refiner = build_refiner_controls(studio, "img2img")
                detailer = build_detailer_panel(studio, "img2img", img2img=True)
                panel = build_controlnet_panel(studio, "img2img", img2img=True)
                extra_column = gr.Column()
                scripts = build_script_panel(studio, "img2img")
            with gr.Column(scale=1, min_width=340, elem_classes="gen-results"):
                out = build_output_area("img2img")
                # under the results: the picture is what the first screen is for
                queue_panel = build_queue_panel(studio, "img2img")
        source = gr.State("upload")
    area.wire_token_counters(studio, controls.steps)
    sources.select(_tab_id, None, source, queue=False)
    form = _request_form(studio, "img2img", (area, controls, refiner, detailer, panel, scripts), mode, extra_column)

    def run(data: dict[Any, Any]):
        fields = form.values(data)
        if data[source] == "batch":
            yield from _run_batch(studio, fields, data[batch_in], data[batch_out], out, area)
            return
        init = editor_parts(data[sketch])[0] if data[source] == "sketch" else data[upload]
        if init is None:
            yield from _error(out, area, "upload an image first")
            return
        yield from stream_job(studio, lambda: studio.engine.submit(
            build_request(form.schema, {**fields, "init_images": [init]})), out, area)

    inputs = form.inputs() | {source, upload, sketch, batch_in, batch_out}
    wire_generate(area, out, run, inputs, queue_panel)
    wire_fast(studio, area, controls, out)
    size_button.click(lambda src, up, sk: size_from_image(up if src != "sketch" else editor_parts(sk)[0]),
                      [source, upload, sketch], [controls.width, controls.height], queue=False)
    controls.reuse_seed.click(lambda s: s, out.last_seed, controls.seed, queue=False)
    return GenerationTab(area, controls, image=upload, out=out)


def _tab_id(evt: gr.SelectData) -> str:
    """Which source sub-tab is open (the Generate button reads it)."""
    ids = {"img2img": "upload", "Sketch": "sketch", "Batch": "batch", "upload": "upload", "sketch": "sketch",
           "batch": "batch"}
    for key in (evt.value, evt.index):
        if isinstance(key, str) and key in ids:
            return ids[key]
    if isinstance(evt.index, int):
        return ("upload", "sketch", "batch")[min(evt.index, 2)]
    return "upload"


def _run_batch(studio: Studio, fields: dict[str, Any], folder_in: str, folder_out: str, out: Any, area: Any):
    """A1111's Batch tab: every image of a folder through img2img, saved to the output folder."""
    try:
        paths = studio.img2img_folder(fields, Path(folder_in or ""), Path(folder_out) if folder_out else None)
    except USER_ERRORS + (OSError,) as e:
        yield error_updates(out, area, str(e))
        return
    images = [(str(p), p.name) for p in paths[:16]]
    yield {out.gallery: images, out.info: "", out.error: f"_Saved {len(paths)} images._"}


def build_inpaint_tab(studio: Studio) -> GenerationTab:
    with gr.Tab("Inpaint", id="inpaint", elem_id="tab_inpaint"):
        area = build_prompt_area(studio, "inpaint")
        with gr.Row(equal_height=False, elem_classes="gen-main"):
            with gr.Column(scale=1, min_width=340, elem_classes="gen-params"):
                editor = gr.ImageEditor(label="Image: paint over what to repaint", type="pil", elem_id="inpaint_image",
                                        height=420, brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                        layers=False, transforms=())
                with gr.Accordion("Upload a mask instead", open=False):
                    mask_upload = gr.Image(label="Mask (white = repaint)", type="pil", image_mode="L",
                                           elem_id="inpaint_mask_upload", height=240)
                mode = _mode_controls("inpaint", inpaint=True)
                controls = build_sampling_controls("inpaint", clip_skip_setting(studio), model_guidance(studio))
                size_button = gr.Button("Size from image", elem_id="inpaint_detect_image_size_btn", size="sm")
                refiner = build_refiner_controls(studio, "inpaint")
                detailer = build_detailer_panel(studio, "inpaint", img2img=True)
                panel = build_controlnet_panel(studio, "inpaint", img2img=True)
                extra_column = gr.Column()
                scripts = build_script_panel(studio, "img2img", elem_prefix="inpaint")
            with gr.Column(scale=1, min_width=340, elem_classes="gen-results"):
                queue_panel = build_queue_panel(studio, "inpaint")
                out = build_output_area("inpaint")
    area.wire_token_counters(studio, controls.steps)
    form = _request_form(studio, "inpaint", (area, controls, refiner, detailer, panel, scripts), mode, extra_column)

    def run(data: dict[Any, Any]):
        image, mask = editor_parts(data[editor])
        if data[mask_upload] is not None:
            mask = data[mask_upload]
        if image is None:
            yield from _error(out, area, "upload an image first")
            return
        if mask is None:
            yield from _error(out, area, "paint over the area to repaint (or upload a mask)")
            return
        values = {**form.values(data), "init_images": [image], "mask": mask}
        yield from stream_job(studio, lambda: studio.engine.submit(build_request(form.schema, values)), out, area)

    wire_generate(area, out, run, form.inputs() | {editor, mask_upload}, queue_panel)

    wire_fast(studio, area, controls, out)
    size_button.click(lambda value: size_from_image(editor_parts(value)[0]), editor, [controls.width, controls.height],
                      queue=False)
    controls.reuse_seed.click(lambda s: s, out.last_seed, controls.seed, queue=False)
    return GenerationTab(area, controls, image=editor, out=out)
