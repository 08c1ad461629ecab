"""Building blocks every generation tab shares: the prompt area (prompts, token counters,
styles, extra networks, Generate/Interrupt/Skip), the sampling controls, the output column,
and the loop that streams a queued job's progress into them. Element ids are prefixed with
the tab's id (``txt2img_prompt``, ``img2img_prompt``…), as in A1111."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.core import Studio
from studio.generation.request import MAX_BATCH_COUNT, MAX_BATCH_SIZE, RequestError
from studio.generation.samplers import SAMPLER_NAMES, SCHEDULE_LABELS
from studio.models.manager import ModelNotFoundError
from studio.models.state_dict import ModelFileError
from studio.prompts.styles import Style, StyleError
from studio.ui.bindings import RequestForm
from studio.ui.extra_networks import ExtraNetworksBrowser, build_extra_networks

USER_ERRORS = (RequestError, ModelFileError, ModelNotFoundError, StyleError)


@dataclass
class PromptArea:
    prompt: gr.Textbox
    negative: gr.Textbox
    styles: gr.Dropdown
    generate: gr.Button
    interrupt: gr.Button
    skip: gr.Button
    extra: ExtraNetworksBrowser
    prompt_tokens: gr.HTML
    negative_tokens: gr.HTML

    def bind(self, form: RequestForm) -> None:
        form.bind("prompt", self.prompt, lambda v: v or "")
        form.bind("negative_prompt", self.negative, lambda v: v or "")
        form.bind("styles", self.styles, lambda v: list(v or ()))

    def wire_token_counters(self, studio: Studio, steps: gr.Slider) -> None:
        """A1111's n/75 counters; the steps matter because prompt editing changes the text."""
        def count(text, st):
            try:
                tokens, limit = studio.token_count(text or "", int(st or 20))
            except RequestError as e:
                return f"<span class='token-counter over' title='{html.escape(str(e), quote=True)}'>too long</span>"
            warn = " over" if tokens > limit else ""
            return f"<span class='token-counter{warn}'>{tokens}/{limit}</span>"

        self.prompt.change(count, [self.prompt, steps], self.prompt_tokens, queue=False, show_progress="hidden")
        self.negative.change(count, [self.negative, steps], self.negative_tokens, queue=False,
                             show_progress="hidden")


@dataclass
class SamplingControls:
    sampler: gr.Dropdown
    schedule: gr.Dropdown
    steps: gr.Slider
    width: gr.Slider
    height: gr.Slider
    n_iter: gr.Slider
    batch_size: gr.Slider
    cfg: gr.Slider
    seed: gr.Number
    clip_skip: gr.Slider
    random_seed: gr.Button
    reuse_seed: gr.Button
    subseed: gr.Number
    subseed_strength: gr.Slider
    resize_w: gr.Slider
    resize_h: gr.Slider
    tiling: gr.Checkbox

    def bind(self, form: RequestForm) -> None:
        """Each control sets the request field of the same meaning."""
        as_int = lambda v: int(v if v is not None else -1)  # noqa: E731 - a seed box may be emptied
        form.bind("steps", self.steps, int)
        form.bind("sampler_name", self.sampler)
        form.bind("scheduler", self.schedule)
        form.bind("cfg_scale", self.cfg, float)
        form.bind("seed", self.seed, as_int)
        form.bind("width", self.width, int)
        form.bind("height", self.height, int)
        form.bind("n_iter", self.n_iter, int)
        form.bind("batch_size", self.batch_size, int)
        form.bind("clip_skip", self.clip_skip, int)
        form.bind("subseed", self.subseed, as_int)
        form.bind("subseed_strength", self.subseed_strength, lambda v: float(v or 0))
        form.bind("seed_resize_from_w", self.resize_w, lambda v: int(v or 0))
        form.bind("seed_resize_from_h", self.resize_h, lambda v: int(v or 0))
        form.bind("tiling", self.tiling, bool)


@dataclass
class OutputArea:
    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    error: gr.Markdown
    info: gr.Textbox
    last_seed: gr.State
    infotexts: gr.State

    def outputs(self) -> list[Any]:
        return [self.gallery, self.preview, self.progress, self.info, self.error, self.last_seed, self.infotexts]


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


def build_prompt_area(studio: Studio, tab_id: str) -> PromptArea:
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            with gr.Column(elem_classes="prompt-box"):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{tab_id}_prompt",
                                    placeholder="Prompt (A1111 syntax; longer than 75 tokens is fine)")
                prompt_tokens = gr.HTML("<span class='token-counter'>0/75</span>",
                                        elem_id=f"{tab_id}_token_counter", elem_classes="token-box")
            with gr.Column(elem_classes="prompt-box"):
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{tab_id}_neg_prompt")
                negative_tokens = gr.HTML("<span class='token-counter'>0/75</span>",
                                          elem_id=f"{tab_id}_negative_token_counter", elem_classes="token-box")
            with gr.Row(equal_height=False):
                styles = gr.Dropdown(studio.styles.names(), value=[], multiselect=True, label="Styles",
                                     elem_id=f"{tab_id}_styles", scale=4)
                apply_styles = gr.Button("Apply styles", elem_id=f"{tab_id}_style_apply", scale=0,
                                         min_width=110, size="sm")
                refresh_styles = gr.Button("↻", elem_id=f"{tab_id}_style_refresh", scale=0, min_width=40,
                                           size="sm")
            with gr.Accordion("Save prompt as a style", open=False), gr.Row(equal_height=True):
                style_name = gr.Textbox(label="Style name", elem_id=f"{tab_id}_style_name", scale=4)
                save_style = gr.Button("Save style", elem_id=f"{tab_id}_style_save", scale=1, size="sm")
            extra = build_extra_networks(studio, prompt, tab_id)
        with gr.Column(scale=1, min_width=180):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{tab_id}_generate", size="lg")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id=f"{tab_id}_interrupt", size="sm")
                skip = gr.Button("Skip", elem_id=f"{tab_id}_skip", size="sm")

    def apply_selected(names, p, neg):
        # A1111: the styles' text moves into the prompt boxes and the selection is cleared
        try:
            p, neg = studio.styles.apply(names or [], p or "", neg or "")
        except USER_ERRORS as e:
            gr.Warning(str(e))
            return gr.update(), gr.update(), gr.update()
        return p, neg, []

    def save(name, p, neg):
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
    interrupt.click(lambda: studio.queue.interrupt() and None, None, None, queue=False)
    skip.click(lambda: studio.queue.skip() and None, None, None, queue=False)
    return PromptArea(prompt, negative, styles, generate, interrupt, skip, extra, prompt_tokens, negative_tokens)


def build_sampling_controls(tab_id: str, clip_skip: Callable[[], int] | int = 1) -> SamplingControls:
    """``clip_skip``: the slider's starting value, a callable to read the setting on each page load."""
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLER_NAMES), value="DPM++ 2M", label="Sampling method",
                              elem_id=f"{tab_id}_sampling")
        schedule = gr.Dropdown(list(SCHEDULE_LABELS), value="Automatic", label="Schedule type",
                               elem_id=f"{tab_id}_scheduler")
    steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{tab_id}_steps")
    with gr.Row():
        width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id=f"{tab_id}_width")
        height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id=f"{tab_id}_height")
    with gr.Row():
        n_iter = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count", elem_id=f"{tab_id}_batch_count")
        batch_size = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size",
                               elem_id=f"{tab_id}_batch_size")
    cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id=f"{tab_id}_cfg_scale")
    with gr.Row():
        seed = gr.Number(value=-1, label="Seed", precision=0, elem_id=f"{tab_id}_seed", scale=4)
        random_seed = gr.Button("Random", elem_id=f"{tab_id}_random_seed", scale=0, min_width=84, size="sm")
        reuse_seed = gr.Button("Reuse", elem_id=f"{tab_id}_reuse_seed", scale=0, min_width=84, size="sm")
    with gr.Accordion("Variation seed", open=False, elem_id=f"{tab_id}_seed_extras"):
        with gr.Row():
            subseed = gr.Number(value=-1, label="Variation seed", precision=0, elem_id=f"{tab_id}_subseed")
            subseed_strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                         elem_id=f"{tab_id}_subseed_strength")
        with gr.Row():
            resize_w = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width",
                                 elem_id=f"{tab_id}_seed_resize_from_w")
            resize_h = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height",
                                 elem_id=f"{tab_id}_seed_resize_from_h")
    with gr.Row():
        clip_skip = gr.Slider(1, 12, value=clip_skip, step=1, label="Clip skip", elem_id=f"{tab_id}_clip_skip",
                              scale=4)
        tiling = gr.Checkbox(False, label="Tiling", elem_id=f"{tab_id}_tiling", scale=1,
                             info="seamless textures")
    random_seed.click(lambda: -1, None, seed, queue=False)
    return SamplingControls(sampler, schedule, steps, width, height, n_iter, batch_size, cfg, seed, clip_skip,
                            random_seed, reuse_seed, subseed, subseed_strength, resize_w, resize_h, tiling)


def build_output_area(tab_id: str) -> OutputArea:
    progress = gr.HTML("", elem_id=f"{tab_id}_progress")
    preview = gr.Image(label="Live preview", visible=False, interactive=False, elem_id=f"{tab_id}_preview",
                       height=256)
    gallery = gr.Gallery(label="Output", elem_id=f"{tab_id}_gallery", columns=2, height=480,
                         object_fit="contain", format="png")
    error = gr.Markdown("", elem_id=f"{tab_id}_error")
    info = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id=f"{tab_id}_info",
                      buttons=["copy"])
    out = OutputArea(progress, preview, gallery, error, info, gr.State(-1), gr.State([]))

    def show_selected(texts: list[str], evt: gr.SelectData):
        # clicking an image shows its own parameters (each image has its own seed)
        if texts and evt.index is not None and evt.index < len(texts):
            return texts[evt.index]
        return gr.update()

    gallery.select(show_selected, out.infotexts, info, queue=False)
    return out


def clip_skip_setting(studio: Studio) -> Callable[[], int]:
    """The clip-skip slider starts at the setting on every page load; what the user then picks is
    sent explicitly (an explicit 1 is honoured even when the setting is 2)."""
    return lambda: studio.settings.options.CLIP_stop_at_last_layers


def stream_job(studio: Studio, submit: Callable[[], Any]) -> Iterator[tuple]:
    """Submit a job and yield updates for :meth:`OutputArea.outputs` until it ends."""
    try:
        job = submit()
    except USER_ERRORS as e:
        yield gr.update(), gr.update(visible=False), gr.update(), "", f"**Error:** {e}", gr.update(), gr.update()
        return
    seen = -1
    while not job.done.wait(0.2):
        s = job.state
        html = progress_html(s.step, s.total, s.batch, s.batches, s.eta, studio.queue.job_count)
        if s.preview is not None and s.preview_id != seen:
            seen = s.preview_id
            yield gr.update(), gr.update(value=s.preview, visible=True), html, gr.update(), "", gr.update(), gr.update()
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
    if not studio.settings.get("control_net_no_detectmap", False):
        images += [(m, "ControlNet detected map") for m in result.detected_maps]
    yield (images, gr.update(visible=False), "", result.infotexts[0] if result.infotexts else "",
           f"_{notes}_" if notes else "", result.seeds[0] if result.seeds else -1, result.infotexts)
