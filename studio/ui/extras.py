"""Extras tab: upscale one image or a batch with any upscaler (A1111's "Extras")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from studio.core import Studio
from studio.generation.outputs import ImageReadError, open_image
from studio.generation.request import build_request
from studio.ui.bindings import RequestForm
from studio.ui.common import USER_ERRORS


def build_extras_tab(studio: Studio) -> Any:
    """The Extras tab; returns its source image component (the send-to buttons fill it)."""
    names = [u.name for u in studio.upscalers.items()]
    with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
        with gr.Row(equal_height=False):
            with gr.Column():
                with gr.Tabs():
                    with gr.Tab("Single image", elem_id="extras_single_tab"):
                        image = gr.Image(label="Source", type="pil", elem_id="extras_image", height=320)
                    with gr.Tab("Batch", elem_id="extras_batch_tab"):
                        files = gr.File(label="Images", file_count="multiple", file_types=["image"],
                                        elem_id="extras_image_batch", type="filepath")
                mode = gr.Radio(["Scale by", "Scale to"], value="Scale by", type="index", label="Resize",
                                elem_id="extras_resize_mode")
                with gr.Row():
                    scale = gr.Slider(1, 8, value=2, step=0.05, label="Resize", elem_id="extras_upscaling_resize")
                    width = gr.Slider(64, 8192, value=1024, step=8, label="Width", elem_id="extras_upscaling_resize_w")
                    height = gr.Slider(64, 8192, value=1024, step=8, label="Height",
                                       elem_id="extras_upscaling_resize_h")
                with gr.Row():
                    upscaler_1 = gr.Dropdown(names, value="Lanczos", label="Upscaler 1", elem_id="extras_upscaler_1")
                    upscaler_2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras_upscaler_2")
                    visibility = gr.Slider(0, 1, value=0, step=0.01, label="Upscaler 2 visibility",
                                           elem_id="extras_upscaler_2_visibility")
                crop = gr.Checkbox(True, label="Crop to fit", elem_id="extras_upscaling_crop",
                                   info="Scale to: upscale until the image covers the size, then crop the middle")
                with gr.Accordion("Face restoration", open=False, elem_id="extras_face_restoration"):
                    gr.Markdown("Restorer files go in `models/GFPGAN` and `models/Codeformer`; found now: "
                                + (", ".join(studio.engine.face_restorers.names()) or "none"))
                    with gr.Row():
                        gfpgan = gr.Slider(0, 1, value=0, step=0.01, label="GFPGAN visibility",
                                           elem_id="extras_gfpgan_visibility")
                        codeformer = gr.Slider(0, 1, value=0, step=0.01, label="CodeFormer visibility",
                                               elem_id="extras_codeformer_visibility")
                        weight = gr.Slider(0, 1, value=0, step=0.01, label="CodeFormer weight (0 = maximum effect)",
                                           elem_id="extras_codeformer_weight")
                    first = gr.Checkbox(False, label="Upscale before restoring faces", elem_id="extras_upscale_first")
                form = RequestForm(studio.schemas.extras, "extras")
                run = gr.Button("Generate", variant="primary", elem_id="extras_generate")
            with gr.Column():
                gallery = gr.Gallery(label="Result", elem_id="extras_gallery", columns=2, height=420,
                                     object_fit="contain", format="png")
                info = gr.Markdown("", elem_id="extras_info")

    form.bind("resize_mode", mode, int)
    form.bind("upscaling_resize", scale, float)
    form.bind("upscaling_resize_w", width, int)
    form.bind("upscaling_resize_h", height, int)
    form.bind("upscaling_crop", crop, bool)
    form.bind("upscaler_1", upscaler_1, lambda v: v or "None")
    form.bind("upscaler_2", upscaler_2, lambda v: v or "None")
    form.bind("extras_upscaler_2_visibility", visibility, float)
    form.bind("gfpgan_visibility", gfpgan, float)
    form.bind("codeformer_visibility", codeformer, float)
    form.bind("codeformer_weight", weight, float)
    form.bind("upscale_first", first, bool)

    def upscale(data: dict[Any, Any]):
        sources = []
        if data[files]:
            for path in data[files]:
                try:
                    sources.append(open_image(Path(path).read_bytes()))
                except (ImageReadError, OSError) as e:
                    gr.Warning(f"{Path(path).name}: {e}")
        elif data[image] is not None:
            sources.append(data[image])
        if not sources:
            return gr.update(), "**Error:** add an image first"
        results, text, path = [], "", None
        try:
            req = build_request(form.schema, form.values(data))
            for source in sources:
                out, text, path = studio.engine.extras(req, source)
                results.append((out, f"{out.width}x{out.height}"))
        except USER_ERRORS as e:
            return gr.update(), f"**Error:** {e}"
        return results, f"{text}. Saved to {path.parent if path else 'nowhere'}."

    run.click(upscale, form.inputs() | {image, files}, [gallery, info])
    return image
