"""txt2img tab: prompt row, sampler/size/seed controls, gallery with live preview."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.core import Studio
from studio.generation.request import MAX_BATCH_COUNT, MAX_BATCH_SIZE, RequestError, Txt2ImgRequest
from studio.generation.samplers import SAMPLER_NAMES, SCHEDULE_LABELS
from studio.models.manager import ModelNotFoundError
from studio.models.state_dict import ModelFileError
from studio.prompts.styles import StyleError
from studio.ui.extra_networks import ExtraNetworksBrowser, build_extra_networks

USER_ERRORS = (RequestError, ModelFileError, ModelNotFoundError, StyleError)


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


def progress_html(step: int, total: int, batch: int, batches: int, eta: float | None, waiting: int) -> str:
    if not total:
        text = "Waiting in queue…" if waiting > 1 else "Preparing…"
        return f"<div class='studio-progress'><span>{text}</span></div>"
    pct = 100.0 * (batch * total + step) / (total * max(batches, 1))
    eta_text = f" · ETA {eta:.1f}s" if eta is not None else ""
    return (
        f"<div class='studio-progress'><div class='bar' style='width:{pct:.0f}%'></div>"
        f"<span>Step {step}/{total} · batch {batch + 1}/{batches} · {pct:.0f}%{eta_text}</span></div>"
    )


def build_txt2img_tab(studio: Studio) -> Txt2ImgControls:
    with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                with gr.Column(elem_classes="prompt-box"):
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="txt2img_prompt",
                                        placeholder="Prompt (A1111 syntax; longer than 75 tokens is fine)")
                    prompt_tokens = gr.HTML("<span class='token-counter'>0/75</span>",
                                            elem_id="txt2img_token_counter", elem_classes="token-box")
                with gr.Column(elem_classes="prompt-box"):
                    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt")
                    negative_tokens = gr.HTML("<span class='token-counter'>0/75</span>",
                                              elem_id="txt2img_negative_token_counter", elem_classes="token-box")
                with gr.Row(equal_height=False):
                    styles = gr.Dropdown(studio.styles.names(), value=[], multiselect=True, label="Styles",
                                         elem_id="txt2img_styles", scale=4)
                    apply_styles = gr.Button("Apply styles", elem_id="txt2img_style_apply", scale=0,
                                             min_width=110, size="sm")
                    refresh_styles = gr.Button("↻", elem_id="txt2img_style_refresh", scale=0, min_width=40,
                                               size="sm")
                with gr.Accordion("Save prompt as a style", open=False):
                    with gr.Row(equal_height=True):
                        style_name = gr.Textbox(label="Style name", elem_id="txt2img_style_name", scale=4)
                        save_style = gr.Button("Save style", elem_id="txt2img_style_save", scale=1, size="sm")
                extra = build_extra_networks(studio, prompt, "txt2img")
            with gr.Column(scale=1, min_width=180):
                generate = gr.Button("Generate", variant="primary", elem_id="txt2img_generate", size="lg")
                with gr.Row():
                    interrupt = gr.Button("Interrupt", elem_id="txt2img_interrupt", size="sm")
                    skip = gr.Button("Skip", elem_id="txt2img_skip", size="sm")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLER_NAMES), value="DPM++ 2M", label="Sampling method",
                                          elem_id="txt2img_sampling")
                    schedule = gr.Dropdown(list(SCHEDULE_LABELS), value="Automatic", label="Schedule type",
                                           elem_id="txt2img_scheduler")
                steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps")
                with gr.Row():
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
                with gr.Row():
                    n_iter = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count",
                                       elem_id="txt2img_batch_count")
                    batch_size = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size",
                                           elem_id="txt2img_batch_size")
                cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
                with gr.Row():
                    seed = gr.Number(value=-1, label="Seed", precision=0, elem_id="txt2img_seed", scale=4)
                    random_seed = gr.Button("Random", elem_id="txt2img_random_seed", scale=0, min_width=84, size="sm")
                    reuse_seed = gr.Button("Reuse", elem_id="txt2img_reuse_seed", scale=0, min_width=84, size="sm")
                clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id="txt2img_clip_skip")
            with gr.Column(scale=1):
                progress = gr.HTML("", elem_id="txt2img_progress")
                preview = gr.Image(label="Live preview", visible=False, interactive=False,
                                   elem_id="txt2img_preview", height=256)
                gallery = gr.Gallery(label="Output", elem_id="txt2img_gallery", columns=2, height=480,
                                     object_fit="contain", format="png")
                error = gr.Markdown("", elem_id="txt2img_error")
                info = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                  elem_id="txt2img_info", buttons=["copy"])
        last_seed = gr.State(-1)
        infotexts = gr.State([])

    inputs = [prompt, negative, steps, sampler, schedule, cfg, seed, width, height, n_iter, batch_size,
              clip_skip, styles]

    def run(p, neg, st, samp, sched, cfg_v, seed_v, w, h, count, size, skip_v, style_names):
        try:
            req = Txt2ImgRequest(
                prompt=p or "", negative_prompt=neg or "", steps=int(st), cfg_scale=float(cfg_v),
                width=int(w), height=int(h), seed=int(seed_v if seed_v is not None else -1),
                batch_size=int(size), n_iter=int(count), sampler_name=samp, scheduler=sched,
                clip_skip=int(skip_v), styles=tuple(style_names or ()),
            )
            job = studio.submit_txt2img(req)
        except USER_ERRORS as e:
            yield gr.update(), gr.update(visible=False), gr.update(), "", f"**Error:** {e}", gr.update(), gr.update()
            return
        seen = -1
        while not job.done.wait(0.2):
            s = job.state
            html = progress_html(s.step, s.total, s.batch, s.batches, s.eta, studio.queue.job_count)
            if s.preview is not None and s.preview_id != seen:
                seen = s.preview_id
                yield (gr.update(), gr.update(value=s.preview, visible=True), html, gr.update(), "", gr.update(),
                       gr.update())
            else:
                yield gr.update(), gr.update(), html, gr.update(), "", gr.update(), gr.update()
            time.sleep(0.05)
        try:
            result = job.wait()
        except USER_ERRORS as e:
            yield gr.update(), gr.update(visible=False), "", gr.update(), f"**Error:** {e}", gr.update(), gr.update()
            return
        notes = " ".join(result.notes + (["Interrupted."] if result.interrupted else []))
        images = [(img, f"seed {s}") for img, s in zip(result.images, result.seeds)]
        yield (images, gr.update(visible=False), "", result.infotexts[0] if result.infotexts else "",
               f"_{notes}_" if notes else "", result.seeds[0] if result.seeds else -1, result.infotexts)

    def show_selected(texts: list[str], evt: gr.SelectData):
        # clicking an image shows its own parameters (each image has its own seed)
        if texts and evt.index is not None and evt.index < len(texts):
            return texts[evt.index]
        return gr.update()

    outputs = [gallery, preview, progress, info, error, last_seed, infotexts]
    gallery.select(show_selected, infotexts, info, queue=False)
    generate.click(run, inputs, outputs, concurrency_limit=None)
    interrupt.click(lambda: studio.queue.interrupt() and None, None, None, queue=False)
    skip.click(lambda: studio.queue.skip() and None, None, None, queue=False)
    def count(text, st):
        tokens, limit = studio.token_count(text or "", int(st or 20))
        warn = " over" if tokens > limit else ""
        return f"<span class='token-counter{warn}'>{tokens}/{limit}</span>"

    prompt.change(count, [prompt, steps], prompt_tokens, queue=False, show_progress="hidden")
    negative.change(count, [negative, steps], negative_tokens, queue=False, show_progress="hidden")

    def apply_selected(names, p, neg):
        # A1111: the styles' text moves into the prompt boxes and the selection is cleared
        try:
            p, neg = studio.styles.apply(names or [], p or "", neg or "")
        except USER_ERRORS as e:
            gr.Warning(str(e))
            return gr.update(), gr.update(), gr.update()
        return p, neg, []

    def save(name, p, neg):
        from studio.prompts.styles import Style

        try:
            studio.styles.save(Style((name or "").strip(), p or "", neg or ""))
        except (USER_ERRORS + (OSError,)) as e:
            gr.Warning(str(e))
            return gr.update()
        gr.Info(f"Style {name!r} saved to {studio.styles.path.name}")
        return gr.update(choices=studio.styles.names())

    def reload_styles():
        studio.styles.reload()
        if studio.styles.error:
            gr.Warning(studio.styles.error)
        return gr.update(choices=studio.styles.names())

    apply_styles.click(apply_selected, [styles, prompt, negative], [prompt, negative, styles], queue=False)
    save_style.click(save, [style_name, prompt, negative], styles, queue=False)
    refresh_styles.click(reload_styles, None, styles, queue=False)
    random_seed.click(lambda: -1, None, seed, queue=False)
    reuse_seed.click(lambda s: s, last_seed, seed, queue=False)
    return Txt2ImgControls(prompt, negative, steps, sampler, schedule, cfg, seed, width, height, clip_skip, tab,
                           extra)


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
