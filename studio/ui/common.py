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
from studio.generation.fast import CHOICES as FAST_CHOICES
from studio.generation.request import (
    MAX_BATCH_COUNT,
    MAX_BATCH_SIZE,
    RequestError,
    Txt2ImgRequest,
    interactive_defaults,
)
from studio.generation.samplers import SAMPLER_NAMES, SCHEDULE_LABELS, find_schedule
from studio.jobs import JobCancelled
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

    def busy_controls(self) -> list[Any]:
        """What a running job changes: Generate says it queues, Interrupt and Skip come alive."""
        return [self.generate, self.interrupt, self.skip]

    def bind(self, form: RequestForm) -> None:
        form.bind("prompt", self.prompt, lambda v: v or "")
        form.bind("negative_prompt", self.negative, lambda v: v or "")
        form.bind("styles", self.styles, lambda v: list(v or ()))

    def wire_token_counters(self, studio: Studio, steps: gr.Slider) -> None:
        """A1111's n/75 counters; the steps matter because prompt editing changes the text."""
        def count(text, st):
            return token_counter_html(studio, text, st)

        self.prompt.change(count, [self.prompt, steps], self.prompt_tokens, queue=False, show_progress="hidden")
        self.negative.change(count, [self.negative, steps], self.negative_tokens, queue=False,
                             show_progress="hidden")


# What each text encoder is called in the counter (SD3/FLUX read the prompt with CLIP and T5).
ENCODER_LABELS = {"clip": "CLIP", "t5": "T5", "qwen3": "Qwen3"}


def token_counter_html(studio: Studio, text: str | None, steps: Any) -> str:
    """The counter under a prompt: "12/75" for SD models; for SD3/FLUX each encoder's own count
    ("CLIP 12/75 · T5 14/255"), because CLIP is cut at 75 tokens while T5 reads on."""
    try:
        counts = studio.engine.token_counts(text or "", int(steps or 20))
    except RequestError as e:
        return f"<span class='token-counter over' title='{html.escape(str(e), quote=True)}'>too long</span>"
    if set(counts) == {"clip"}:
        tokens, limit = counts["clip"]
        return f"<span class='token-counter{' over' if tokens > limit else ''}'>{tokens}/{limit}</span>"
    parts = [f"<span class='{'over' if n > limit else ''}'>{ENCODER_LABELS.get(key, key)} {n}/{limit}</span>"
             for key, (n, limit) in counts.items()]
    return "<span class='token-counter'>" + " · ".join(parts) + "</span>"


def takes_guidance(model: Any) -> bool:
    """Whether the loaded model has FLUX.1's guidance input (dev; not schnell, not SD3 or SD), the
    value of Forge's "Distilled CFG Scale"."""
    return model is not None and bool(getattr(model.unet.config, "guidance_embeds", False))


def ui_presets(model: Any, from_flow: bool = False) -> dict[str, Any]:
    """The model family's sampling presets for its variant (FLUX.1 dev: CFG 1, Euler, Simple,
    distilled 3.5; schnell also 4 steps), named as the controls' request fields and holding the
    dropdowns' own choices (the schedule by its label). SD families have none, except right after a
    flow model (``from_flow``): then the UI's SD defaults come back, as Forge's "sd" preset does, so
    an SD model does not inherit FLUX's CFG 1."""
    if model is None:
        return {}
    if model.info.is_demo:
        # the demo's first picture in seconds: a real checkpoint's 512 px and 20 steps would take a minute
        return dict(DEMO_PRESETS)
    if not model.spec.is_flow:
        if not from_flow:
            return {}
        defaults = interactive_defaults(Txt2ImgRequest)
        presets = {k: defaults[k] for k in PRESET_CONTROLS if k in defaults and k not in ("width", "height")}
        presets.setdefault("cfg_scale", Txt2ImgRequest.model_fields["cfg_scale"].default)
    else:
        presets = dict(model.spec.presets_for(model.probe.variant))
    if "scheduler" in presets:
        presets["scheduler"] = find_schedule(presets["scheduler"]).label
    return presets


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
    distilled: gr.Slider
    fast_kind: gr.Dropdown   # the few-step preset's kind ("auto": recognised from the files)
    fast: gr.Button          # sets sampler, schedule, steps and CFG (and adds the LoRA) for that kind
    # read when Generate is pressed: the slider's value is sent only to a model with a guidance input
    guidance: Callable[[], bool] = lambda: False

    def bind(self, form: RequestForm) -> None:
        """Each control sets the request field of the same meaning."""
        as_int = lambda v: int(v if v is not None else -1)
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
        # None lets the engine take the preset and keeps SD/schnell infotexts free of a value they ignore
        form.bind("distilled_cfg_scale", self.distilled, lambda v: float(v) if self.guidance() else None)

    # the controls a model change updates, in the order of :func:`model_updates`
    def model_controls(self) -> list[Any]:
        return [self.steps, self.cfg, self.sampler, self.schedule, self.width, self.height, self.distilled]


PRESET_CONTROLS = ("steps", "cfg_scale", "sampler_name", "scheduler", "width", "height")
DEMO_PRESETS = (("steps", 8), ("width", 256), ("height", 256))


def model_updates(model: Any, apply_presets: bool, from_flow: bool = False) -> list[Any]:
    """Updates for :meth:`SamplingControls.model_controls` when ``model`` is loaded. Presets (Forge's
    behaviour on a checkpoint change) set the controls the family declares; SD families declare none,
    so they keep the user's values. The Distilled CFG Scale slider is shown only for a model that
    takes it. No model (still loading): nothing changes."""
    if model is None:
        return [gr.update() for _ in range(len(PRESET_CONTROLS) + 1)]
    values = ui_presets(model, from_flow) if apply_presets else {}
    updates = [gr.update(value=values[name]) if name in values else gr.update() for name in PRESET_CONTROLS]
    distilled: dict[str, Any] = {"visible": takes_guidance(model)}
    if "distilled_cfg_scale" in values:
        distilled["value"] = values["distilled_cfg_scale"]
    return [*updates, gr.update(**distilled)]


@dataclass
class GenerationTab:
    """A generation tab's controls that follow the loaded model: the sampling controls (presets,
    the Distilled CFG Scale slider) and the token counters (one count per text encoder). Also what
    the send-to buttons need: the input picture's component and the results column."""
    area: PromptArea
    sampling: SamplingControls
    image: Any = None          # img2img's picture / Inpaint's editor; None for txt2img
    out: Any = None            # the tab's OutputArea

    def params(self) -> list[Any]:
        """The controls of send_to.PARAM_FIELDS, in that order."""
        s = self.sampling
        return [self.area.prompt, self.area.negative, s.steps, s.sampler, s.schedule, s.cfg, s.seed, s.width,
                s.height, s.clip_skip, s.distilled]

    def inputs(self) -> list[Any]:
        return [self.area.prompt, self.area.negative, self.sampling.steps]

    def outputs(self) -> list[Any]:
        return [*self.sampling.model_controls(), self.area.prompt_tokens, self.area.negative_tokens]

    def updates(self, studio: Studio, data: dict[Any, Any], apply_presets: bool,
                from_flow: bool = False) -> list[Any]:
        """Updates for :meth:`outputs` from an event's ``{component: value}`` of :meth:`inputs`;
        ``from_flow``: the previous model was a flow model (SD defaults come back)."""
        model = studio.models.current
        updates = model_updates(model, apply_presets, from_flow)
        # the counters are taken with the steps the presets set, as the next Generate will use them
        steps = ui_presets(model, from_flow).get("steps") if apply_presets else None
        steps = steps or data.get(self.sampling.steps)
        counters = [token_counter_html(studio, data.get(box), steps) for box in (self.area.prompt, self.area.negative)]
        return [*updates, *counters]


# The send-to buttons under every gallery, as A1111 names them: (key, label)
SEND_TARGETS = (("txt2img", "Send to txt2img"), ("img2img", "Send to img2img"), ("inpaint", "Send to inpaint"),
                ("extras", "Send to extras"), ("controlnet", "Send to ControlNet"))


@dataclass
class OutputArea:
    tab_id: str
    progress: gr.HTML
    gallery: gr.Gallery
    error: gr.Markdown
    info: gr.Textbox
    last_seed: gr.State
    infotexts: gr.State
    selected: gr.State                      # the gallery image the buttons act on (index)
    send: dict[str, gr.Button]              # SEND_TARGETS' buttons
    save: gr.Button
    zip: gr.Button
    open_folder: gr.Button
    download: gr.File

    def outputs(self) -> list[Any]:
        return [self.gallery, self.progress, self.info, self.error, self.last_seed, self.infotexts, self.selected]


def progress_html(step: int, total: int, batch: int, batches: int, eta: float | None, waiting: int) -> str:
    if not total:
        text = "Waiting in queue…" if waiting > 1 else "Preparing…"
        return f"<div class='studio-progress'><span>{text}</span></div>"
    if step == 0 and batch == 0 and eta is None and waiting < 0:
        return f"<div class='studio-progress'><span>Queued: {-waiting} ahead</span></div>"
    pct = 100.0 * (batch * total + step) / (total * max(batches, 1))
    eta_text = f" · ETA {eta:.1f}s" if eta is not None else ""
    return (
        f"<div class='studio-progress'><div class='bar' style='width:{pct:.0f}%'></div>"
        f"<span>Step {step}/{total} · batch {batch + 1}/{batches} · {pct:.0f}%{eta_text}</span></div>"
    )


def build_prompt_area(studio: Studio, tab_id: str) -> PromptArea:
    """A1111's top row: the prompts at the left, Generate at the right with Interrupt | Skip under it
    and the styles below; the extra networks browser (collapsed) under the row."""
    with gr.Row(equal_height=False, elem_id=f"{tab_id}_toprow", elem_classes="gen-toprow"):
        with gr.Column(scale=6, min_width=320):
            with gr.Column(elem_classes="prompt-box"):
                prompt = gr.Textbox(label="Prompt", lines=3, max_lines=12, elem_id=f"{tab_id}_prompt",
                                    placeholder="Prompt (A1111 syntax; longer than 75 tokens is fine)")
                prompt_tokens = gr.HTML("<span class='token-counter'>0/75</span>",
                                        elem_id=f"{tab_id}_token_counter", elem_classes="token-box")
            with gr.Column(elem_classes="prompt-box"):
                negative = gr.Textbox(label="Negative prompt", lines=2, max_lines=8, elem_id=f"{tab_id}_neg_prompt")
                negative_tokens = gr.HTML("<span class='token-counter'>0/75</span>",
                                          elem_id=f"{tab_id}_negative_token_counter", elem_classes="token-box")
        with gr.Column(scale=2, min_width=240, elem_classes="gen-toolbar"):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{tab_id}_generate", size="lg",
                                 elem_classes="gen-button")
            with gr.Row(elem_classes="gen-stop-row"):
                # alive while a job runs; always there, so nothing moves when one starts
                interrupt = gr.Button("Interrupt", elem_id=f"{tab_id}_interrupt", size="sm", interactive=False)
                skip = gr.Button("Skip", elem_id=f"{tab_id}_skip", size="sm", interactive=False)
            styles = gr.Dropdown(studio.styles.names(), value=[], multiselect=True, label="Styles",
                                 elem_id=f"{tab_id}_styles")
            with gr.Row(elem_classes="gen-style-row"):
                apply_styles = gr.Button("Apply styles", elem_id=f"{tab_id}_style_apply", size="sm", min_width=60)
                refresh_styles = gr.Button("↻", elem_id=f"{tab_id}_style_refresh", size="sm", min_width=40,
                                           scale=0)
    with gr.Row(equal_height=False, elem_classes="gen-drawers"):
        with gr.Column(scale=4, min_width=320):
            extra = build_extra_networks(studio, prompt, tab_id)
        with gr.Column(scale=1, min_width=240), gr.Accordion("Save prompt as a style", open=False,
                                                              elem_id=f"{tab_id}_style_create"):
            style_name = gr.Textbox(label="Style name", elem_id=f"{tab_id}_style_name")
            save_style = gr.Button("Save style", elem_id=f"{tab_id}_style_save", size="sm")

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


def build_sampling_controls(tab_id: str, clip_skip: Callable[[], int] | int = 1,
                            guidance: Callable[[], bool] | None = None) -> SamplingControls:
    """``clip_skip``: the slider's starting value, a callable to read the setting on each page load.
    ``guidance``: whether the model that will run takes the Distilled CFG Scale (see
    :func:`model_guidance`); without it the slider's value is never sent (the model's preset is used)."""
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLER_NAMES), value="DPM++ 2M", label="Sampling method",
                              elem_id=f"{tab_id}_sampling")
        schedule = gr.Dropdown(list(SCHEDULE_LABELS), value="Automatic", label="Schedule type",
                               elem_id=f"{tab_id}_scheduler")
    with gr.Row(equal_height=True, elem_classes="steps-row"):
        steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{tab_id}_steps", scale=4)
        fast_kind = gr.Dropdown(list(FAST_CHOICES), value="auto", label="Few-step kind", scale=1, min_width=110,
                                elem_id=f"{tab_id}_fast_kind")
        fast = gr.Button("Fast", elem_id=f"{tab_id}_fast", scale=0, min_width=70, size="sm",
                         elem_classes="fast-preset")
    with gr.Row():
        width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id=f"{tab_id}_width")
        height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id=f"{tab_id}_height")
    with gr.Row():
        n_iter = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count", elem_id=f"{tab_id}_batch_count")
        batch_size = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size",
                               elem_id=f"{tab_id}_batch_size")
    with gr.Row():
        cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id=f"{tab_id}_cfg_scale")
        # Forge's slider for FLUX.1 dev's guidance input; shown while such a model is loaded
        distilled = gr.Slider(0, 30, value=3.5, step=0.1, label="Distilled CFG Scale", visible=False,
                              elem_id=f"{tab_id}_distilled_cfg_scale")
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
                            random_seed, reuse_seed, subseed, subseed_strength, resize_w, resize_h, tiling, distilled,
                            fast_kind, fast, guidance or (lambda: False))


def build_output_area(tab_id: str) -> OutputArea:
    """The results column: progress bar, the gallery (the live preview shows in it while a job runs,
    so nothing moves), the notes, the infotext and A1111's buttons under it."""
    progress = gr.HTML("<div class='studio-progress idle'><span></span></div>", elem_id=f"{tab_id}_progress")
    gallery = gr.Gallery(label="Output", elem_id=f"{tab_id}_gallery", columns=2, height=520, object_fit="contain",
                         format="png", type="filepath", preview=True, allow_preview=True, interactive=False,
                         elem_classes="gen-gallery")
    with gr.Row(elem_classes="gen-send-row"):
        save = gr.Button("Save", elem_id=f"save_{tab_id}", size="sm", min_width=60)
        zipped = gr.Button("Zip", elem_id=f"save_zip_{tab_id}", size="sm", min_width=50)
        open_folder = gr.Button("Open folder", elem_id=f"open_folder_{tab_id}", size="sm", min_width=90)
        send = {key: gr.Button(label, elem_id=f"{tab_id}_send_to_{key}", size="sm", min_width=90)
                for key, label in SEND_TARGETS if key != tab_id}
    download = gr.File(label="Download", visible=False, interactive=False, elem_id=f"download_files_{tab_id}")
    error = gr.Markdown("", elem_id=f"{tab_id}_error")
    info = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id=f"{tab_id}_info",
                      buttons=["copy"])
    out = OutputArea(tab_id, progress, gallery, error, info, gr.State(-1), gr.State([]), gr.State(0), send, save,
                     zipped, open_folder, download)

    def show_selected(texts: list[str], evt: gr.SelectData):
        # clicking an image shows its own parameters (each image has its own seed)
        index = evt.index if isinstance(evt.index, int) else 0
        if texts and index < len(texts):
            return texts[index], index
        return gr.update(), index

    gallery.select(show_selected, out.infotexts, [info, out.selected], queue=False)
    return out


def wire_generate(area: PromptArea, out: OutputArea, run: Callable[..., Iterator[dict]], inputs: Any,
                  queue_panel: Any = None) -> None:
    """Generate → ``run`` (a generator of :func:`stream_job` updates). Every click counts: a click
    while a job runs queues another job (Gradio's default would drop it); the tab's queue panel is
    redrawn right after, so the new job is listed at once."""
    area.generate.click(run, inputs, [*out.outputs(), *area.busy_controls()], concurrency_limit=None,
                        trigger_mode="multiple", show_progress="hidden")
    if queue_panel is not None:
        def wake() -> Any:
            time.sleep(0.3)   # the job is submitted by the run above, in parallel
            return queue_panel.wake()

        area.generate.click(wake, None, queue_panel.outputs(), queue=False, show_progress="hidden",
                            trigger_mode="multiple")


def model_guidance(studio: Studio) -> Callable[[], bool]:
    """Whether the loaded model takes the Distilled CFG Scale, asked when Generate is pressed."""
    return lambda: takes_guidance(studio.models.current)


def clip_skip_setting(studio: Studio) -> Callable[[], int]:
    """The clip-skip slider starts at the setting on every page load; what the user then picks is
    sent explicitly (an explicit 1 is honoured even when the setting is 2)."""
    return lambda: studio.settings.options.CLIP_stop_at_last_layers


def busy_updates(area: PromptArea | None, busy: bool) -> dict[Any, Any]:
    if area is None:
        return {}
    return {area.generate: gr.update(value="Add to queue" if busy else "Generate"),
            area.interrupt: gr.update(interactive=busy), area.skip: gr.update(interactive=busy)}


def error_updates(out: OutputArea, area: PromptArea | None, message: str, busy: bool = False) -> dict[Any, Any]:
    return {out.error: f"**Error:** {message}", **busy_updates(area, busy)}


def stream_job(studio: Studio, submit: Callable[[], Any], out: OutputArea,
               area: PromptArea | None = None) -> Iterator[dict[Any, Any]]:
    """Submit a job and yield updates for ``out`` (and ``area``'s busy controls) until it ends. A job
    that waits behind another stays quiet (the running one owns the progress bar and the gallery;
    the queue panel lists it); once it runs, its previews show in the gallery."""
    try:
        job = submit()
    except USER_ERRORS as e:
        yield error_updates(out, area, str(e), busy=studio.queue.job_count > 0)
        return
    yield {out.error: "", **busy_updates(area, True)}
    seen = -1
    started = False
    while not job.done.wait(0.2):
        s = job.state
        if not s.started:
            continue
        if not started:
            started = True
            yield {out.progress: progress_html(0, 0, 0, 1, None, 1), **busy_updates(area, True)}
        html = progress_html(s.step, s.total, s.batch, s.batches, s.eta, studio.queue.job_count)
        if s.preview is not None and s.preview_id != seen:
            seen = s.preview_id
            yield {out.gallery: gr.update(value=[(s.preview, "Live preview")]), out.progress: html}
        else:
            yield {out.progress: html}
        time.sleep(0.05)
    busy = studio.queue.job_count > 0
    idle = "<div class='studio-progress idle'><span></span></div>"
    try:
        result = job.wait()
    except JobCancelled:
        yield {out.progress: idle, out.error: "_Cancelled from the queue._", **busy_updates(area, busy)}
        return
    except USER_ERRORS as e:
        yield {out.progress: idle, **error_updates(out, area, str(e), busy)}
        return
    notes = " ".join(result.notes + (["Interrupted."] if result.interrupted else []))
    images = [(img, f"seed {s}") for img, s in zip(result.images, result.seeds)]
    if not studio.settings.get("control_net_no_detectmap", False):
        images += [(m, "ControlNet detected map") for m in result.detected_maps]
    yield {out.gallery: gr.update(value=images), out.progress: idle,
           out.info: result.infotexts[0] if result.infotexts else "", out.error: f"_{notes}_" if notes else "",
           out.last_seed: result.seeds[0] if result.seeds else -1, out.infotexts: result.infotexts, out.selected: 0,
           **busy_updates(area, busy)}
