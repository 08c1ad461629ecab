"""Extras tab: upscale one image or a batch with any upscaler (A1111's "Extras")."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.core import Studio
from studio.generation.outputs import ImageReadError, open_image
from studio.ui.common import USER_ERRORS


def build_extras_tab(studio: Studio) -> None:
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
                run = gr.Button("Generate", variant="primary", elem_id="extras_generate")
            with gr.Column():
                gallery = gr.Gallery(label="Result", elem_id="extras_gallery", columns=2, height=420,
                                     object_fit="contain", format="png")
                info = gr.Markdown("", elem_id="extras_info")

    def upscale(single, batch, mode_index, by, w, h, first, second, vis):
        sources = []
        if batch:
            for path in batch:
                try:
                    sources.append(open_image(Path(path).read_bytes()))
                except (ImageReadError, OSError) as e:
                    gr.Warning(f"{Path(path).name}: {e}")
        elif single is not None:
            sources.append(single)
        if not sources:
            return gr.update(), "**Error:** add an image first"
        results, text = [], ""
        for source in sources:
            try:
                out, text, path = studio.upscale_image(
                    source, first, scale=float(by) if mode_index == 0 else None,
                    size=None if mode_index == 0 else (int(w), int(h)), upscaler_2=second, visibility_2=float(vis))
            except USER_ERRORS as e:
                return gr.update(), f"**Error:** {e}"
            results.append((out, f"{out.width}x{out.height}"))
        return results, f"{text}. Saved to outputs/extras-images."

    run.click(upscale, [image, files, mode, scale, width, height, upscaler_1, upscaler_2, visibility],
              [gallery, info])
