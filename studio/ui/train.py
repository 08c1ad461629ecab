"""Train tab: A1111's Train tab (create an embedding or a hypernetwork, train them) with LoRA training
next to it.

The training forms are bound to the studio's training schemas (studio.training.schemas) with
:class:`~studio.ui.bindings.RequestForm`: each control sets the field it is bound to, a field no control
binds gets one under "More parameters", and the values go through a module-level function
(``lora_request_from_values``, ``ti_request_from_values``) into the same
:class:`~studio.training.runner.TrainingRequest` the API and CLI build, validated by the same schema (a
bad value is said in pydantic's words, as the API's 422 says it), so the tests drive the tab without a
browser. A training button submits the job (a bad value is said in the result and nothing is
queued), then streams its progress: step/total and ETA, the live loss plot, the latest sample image,
and at the end what was written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image, ImageOps

from studio.core import Studio
from studio.generation.request import build_request
from studio.training.base import LR_SCHEDULERS, MIXED_PRECISION, OPTIMIZERS, TrainingError, TrainSettings
from studio.training.dataset import DEFAULT_TEMPLATES, TrainDataset, summary
from studio.training.runner import TrainingRequest, request_for
from studio.training.schemas import TrainingSchemas, training_schemas
from studio.ui.bindings import RequestForm
from studio.ui.common import USER_ERRORS

TI_KINDS = ("embedding", "hypernetwork")

HN_SIZES = ("768", "1024", "320", "640", "1280")
HN_DEFAULT_SIZES = ["768", "320", "640", "1280"]
HN_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid")
HN_WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")

PREVIEW_LIMIT = 64          # images shown by "Preview dataset"
PLOT_POINTS = 1000          # the loss plot keeps at most this many points (long runs are thinned)
THUMBNAIL = 256


# --------------------------------------------------------------------------------------------------------
# Values -> requests


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: Any, label: str) -> float:
    if _blank(value) or isinstance(value, bool):
        raise TrainingError(f"{label}: give a number")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise TrainingError(f"{label} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise TrainingError(f"{label} must be a finite number, not {value!r}")
    return number


def _int(value: Any, label: str) -> int:
    number = _number(value, label)
    if not number.is_integer():
        raise TrainingError(f"{label} must be a whole number, not {value!r}")
    return int(number)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _optional(value: Any) -> Any:
    """An optional field's control: empty is "not set" (None)."""
    return None if _blank(value) else value


def _extension(value: Any) -> str:
    return _text(value) or ".txt"


def resolve_data_dir(studio: Studio | None, text: Any) -> str:
    """The dataset folder a user typed: quotes and ``~`` handled; a relative path that is not found from
    the working directory is looked up in the studio's data folder."""
    text = "" if text is None else str(text).strip().strip('"').strip("'").strip()
    if not text:
        return ""
    path = Path(text).expanduser()
    if not path.is_absolute() and not path.exists() and studio is not None:
        inside = Path(studio.paths.data) / path
        if inside.exists():
            return str(inside)
    return str(path)


def _schemas(studio: Studio | None) -> TrainingSchemas:
    return training_schemas(getattr(studio, "schemas", None))


def lora_request_from_values(studio: Studio | None, values: Mapping[str, Any]) -> TrainingRequest:
    """The LoRA form's values (the LoRA schema's field names, as :meth:`RequestForm.values` gives them)
    as a request; a value the schema refuses is a RequestError in pydantic's words."""
    return request_for("lora", build_request(_schemas(studio).lora, dict(values)))


def template_text(name: Any) -> str:
    """A template choice (a :data:`DEFAULT_TEMPLATES` key) as the lines TrainSettings.template takes."""
    key = str(name or "").strip()
    if key not in DEFAULT_TEMPLATES:
        raise TrainingError(f"unknown prompt template {key!r} (one of {', '.join(DEFAULT_TEMPLATES)})")
    return "\n".join(DEFAULT_TEMPLATES[key])


def ti_buckets(resolution: Any) -> dict[str, Any]:
    """A1111's Train tab has one size: the buckets around it (a value that is no number goes to the schema
    as it is, which says so)."""
    try:
        size = int(resolution)
    except (TypeError, ValueError):
        return {"resolution": resolution}
    return {"resolution": resolution, "min_bucket_reso": max(64, min(256, size)),
            "max_bucket_reso": max(1024, size)}


def ti_request_from_values(studio: Studio | None, kind: str, values: Mapping[str, Any]) -> TrainingRequest:
    """The "Train embedding / hypernetwork" form's values as a request for ``kind`` "embedding" or
    "hypernetwork": the schema's fields both kinds share, plus the sub-tab's two name dropdowns and two
    learning rates (keys ``embedding``, ``hypernetwork``, ``embedding_lr``, ``hypernetwork_lr``), of which
    ``kind``'s are the output name and the learn rate."""
    if kind not in TI_KINDS:
        raise ValueError(f"kind must be embedding or hypernetwork, not {kind!r}")
    name = str(values.get(kind) or "").strip()
    if not name:
        where = "Create embedding" if kind == "embedding" else "Create hypernetwork"
        raise TrainingError(f"choose the {kind} to train (or make one in {where})")
    rate = str(values.get(f"{kind}_lr") or "").strip()
    if not rate:
        raise TrainingError(f"give the {kind} learning rate (a number or a schedule like 0.005:100, 1e-5)")
    schema = _schemas(studio).of(kind)
    fields = {key: value for key, value in values.items() if key in schema.model_fields}
    return request_for(kind, build_request(schema, {**fields, "output_name": name, "learn_rate": rate}))


# --------------------------------------------------------------------------------------------------------
# Dataset preview


def _thumbnail(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode not in ("RGB", "RGBA"):
                img = img.convert("RGBA" if "transparency" in img.info or img.mode in ("LA", "PA") else "RGB")
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            return img.copy()
    except (OSError, ValueError):
        return None


def preview_dataset(studio: Studio | None, data_dir: Any, resolution: Any = 512, enable_bucket: bool = True,
                    min_bucket: Any = 256, max_bucket: Any = 1024, caption_extension: Any = ".txt",
                    limit: int = PREVIEW_LIMIT) -> tuple[list[tuple[Image.Image, str]], str]:
    """``(gallery items, summary markdown)`` for the dataset folder: each image (a thumbnail) captioned
    with its bucket and caption, and the summary with the scan's notes. An error is the summary."""
    try:
        settings = build_request(TrainSettings, {
            "train_data_dir": resolve_data_dir(studio, data_dir), "output_name": "preview",
            "resolution": resolution, "enable_bucket": bool(enable_bucket), "min_bucket_reso": min_bucket,
            "max_bucket_reso": max_bucket, "caption_extension": _extension(caption_extension)})
        dataset = TrainDataset.from_settings(settings)
    except USER_ERRORS as e:
        return [], f"**Error:** {e}"
    items = []
    for item, row in zip(dataset.items, dataset.preview(limit)):
        thumb = _thumbnail(item.path)
        if thumb is None:
            continue
        source = "" if row["caption_source"] == "file" else " (from the file name)"
        repeats = f" ×{row['repeats']}" if row["repeats"] != 1 else ""
        items.append((thumb, f"{row['bucket']}{repeats} · {row['caption']}{source}"))
    text = summary(dataset)
    if len(dataset.items) > limit:
        text += f" Showing the first {limit}."
    return items, text


# --------------------------------------------------------------------------------------------------------
# Progress


def loss_plot_value(losses: list[tuple[int, float]] | list[float], max_points: int = PLOT_POINTS) -> pd.DataFrame:
    """The loss plot's data: a DataFrame with columns ``step`` and ``loss`` from ``(step, loss)`` pairs (or
    plain losses, numbered from 1). Long runs are thinned to about ``max_points``, the last step kept."""
    pairs = [(int(p[0]), float(p[1])) if isinstance(p, (tuple, list)) else (i + 1, float(p))
             for i, p in enumerate(list(losses))]
    pairs = [(s, loss) for s, loss in pairs if math.isfinite(loss)]
    if len(pairs) > max_points > 0:
        stride = math.ceil(len(pairs) / max_points)
        thinned = pairs[::stride]
        if thinned[-1] != pairs[-1]:
            thinned.append(pairs[-1])
        pairs = thinned
    return pd.DataFrame({"step": [s for s, _ in pairs], "loss": [loss for _, loss in pairs]})


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def training_progress_html(state: Any, waiting: int = 0) -> str:
    """The progress bar of a training job: step/total, percent, ETA, and the job's status text."""
    info = f"<div class='train-info' style='font-size:12px;opacity:.8'>{_escape(state.textinfo)}</div>" \
        if state.textinfo else ""
    if not state.total:
        text = "Waiting in queue…" if waiting > 1 and not state.textinfo else "Preparing…"
        return f"<div class='studio-progress'><span>{text}</span></div>{info}"
    pct = 100.0 * min(1.0, state.step / state.total)
    loss = f" · loss {state.losses[-1][1]:.4f}" if state.losses else ""
    return (
        f"<div class='studio-progress'><div class='bar' style='width:{pct:.0f}%'></div>"
        f"<span>Step {state.step}/{state.total} · {pct:.0f}%{loss} · ETA {format_seconds(state.eta)}</span></div>"
        f"{info}"
    )


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def result_summary(result: Any) -> str:
    """What a finished run did, as markdown: the file, the steps, the loss first → last, the time, notes."""
    done = result.step - result.resumed_from
    head = "**Interrupted.**" if result.interrupted else "**Done.**"
    if result.saved:
        written = ", ".join(f"`{p}`" for p in result.saved)
        parts = [f"{head} Wrote {written}"]   # no period: Gradio puts it on a line of its own after a long path
    else:
        parts = [f"{head} Nothing was saved (no step was trained)."]
    steps = f"Step {result.step}"
    if result.resumed_from:
        steps += f" ({done} this run, resumed from {result.resumed_from})"
    else:
        steps = f"{done} steps"
    if result.losses:
        steps += f", loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}"
    steps += f", {format_seconds(result.seconds)}."
    parts.append(steps)
    if result.samples:
        parts.append(f"Samples in `{Path(result.samples[-1]).parent}`.")
    if result.notes:
        parts.append("_" + " ".join(n if n.rstrip().endswith((".", "!", "?")) else f"{n}." for n in result.notes)
                     + "_")
    return "\n\n".join(parts)


def stream_training(studio: Studio, submit: Callable[[], Any], poll: float = 0.5) -> Iterator[tuple]:
    """Submit a training job and yield ``(progress html, loss plot, sample image, result markdown)`` until
    it ends. A refused request yields only the error; nothing is queued."""
    try:
        job = submit()
    except USER_ERRORS as e:
        yield "", gr.update(), gr.update(), f"**Error:** {e}"
        return
    state = job.state
    shown_losses, shown_preview = -1, 0
    yield training_progress_html(state, studio.queue.job_count), loss_plot_value([]), gr.update(value=None), \
        "_Training…_"
    while not job.done.wait(poll):
        plot = gr.update()
        if len(state.losses) != shown_losses:
            shown_losses = len(state.losses)
            plot = loss_plot_value(state.losses)
        preview = gr.update()
        if state.preview is not None and state.preview_id != shown_preview:
            shown_preview = state.preview_id
            preview = state.preview
        yield training_progress_html(state, studio.queue.job_count), plot, preview, gr.update()
        time.sleep(0.05)
    try:
        result = job.wait()
    except USER_ERRORS as e:
        yield "", loss_plot_value(state.losses), gr.update(), f"**Error:** {e}"
        return
    except Exception as e:  # noqa: BLE001 - an engine failure is said in the tab, the server goes on
        yield "", loss_plot_value(state.losses), gr.update(), f"**Training failed:** {type(e).__name__}: {e}"
        return
    preview = state.preview if state.preview is not None and state.preview_id != shown_preview else gr.update()
    yield "", loss_plot_value(state.losses), preview, result_summary(result)


def interrupt_training(studio: Studio) -> str:
    """Stop the running training job (it saves what it has learned); other jobs are left alone."""
    current = studio.queue.current
    if current is None or not current.description.startswith("train "):
        return "_No training is running._"
    studio.queue.interrupt()
    return "_Interrupting: saving what was learned…_"


# --------------------------------------------------------------------------------------------------------
# Create embedding / hypernetwork and the lists of them


def embedding_choices(studio: Studio) -> list[str]:
    studio.embeddings.refresh()
    return sorted(studio.embeddings.embeddings, key=str.lower)


def hypernetwork_choices(studio: Studio) -> list[str]:
    studio.networks.hypernetworks.refresh()
    return sorted((info.name for info in studio.networks.hypernetworks.items()), key=str.lower)


def _keep(value: Any, choices: list[str]) -> Any:
    return value if value in choices else (choices[0] if choices else None)


def refresh_embeddings(studio: Studio, current: Any = None) -> Any:
    choices = embedding_choices(studio)
    return gr.update(choices=choices, value=_keep(current, choices))


def refresh_hypernetworks(studio: Studio, current: Any = None) -> Any:
    choices = hypernetwork_choices(studio)
    return gr.update(choices=choices, value=_keep(current, choices))


def create_embedding(studio: Studio, name: Any, init_text: Any, vectors: Any, overwrite: Any) -> tuple[str, Any]:
    """A1111's "Create embedding": ``(result markdown, embedding dropdown update)``; the new one is
    selected in the Train sub-tab."""
    try:
        count = _int(vectors, "vectors per token")
        path = studio.create_embedding(str(name or "").strip(), init_text if init_text is not None else "*",
                                       count, overwrite=bool(overwrite))
    except USER_ERRORS as e:
        return f"**Error:** {e}", gr.update()
    choices = embedding_choices(studio)
    return f"Created embedding `{path.stem}`: `{path}`", gr.update(choices=choices, value=_keep(path.stem, choices))


def create_hypernetwork(studio: Studio, name: Any, sizes: Any, layer_structure: Any, activation: Any,
                        weight_init: Any, layer_norm: Any, use_dropout: Any, dropout_structure: Any,
                        overwrite: Any) -> tuple[str, Any]:
    """A1111's "Create hypernetwork": ``(result markdown, hypernetwork dropdown update)``."""
    if not sizes:
        return "**Error:** choose at least one module size", gr.update()
    try:
        path = studio.create_hypernetwork(
            str(name or "").strip(), sizes=[int(s) for s in sizes], layer_structure=str(layer_structure or ""),
            activation=str(activation or "linear"), weight_init=str(weight_init or "Normal"),
            add_layer_norm=bool(layer_norm), use_dropout=bool(use_dropout),
            dropout_structure=str(dropout_structure or ""), overwrite=bool(overwrite))
    except USER_ERRORS as e:
        return f"**Error:** {e}", gr.update()
    choices = hypernetwork_choices(studio)
    return (f"Created hypernetwork `{path.stem}`: `{path}`",
            gr.update(choices=choices, value=_keep(path.stem, choices)))


# --------------------------------------------------------------------------------------------------------
# Layout


def _output_column(prefix: str, buttons: list[tuple[str, str]]) -> dict[str, Any]:
    """The right-hand column of a training sub-tab: start buttons ``(label, elem_id)``, Interrupt, the
    progress, the loss plot, the latest sample and the result."""
    out: dict[str, Any] = {}
    with gr.Row():
        for label, elem_id in buttons:
            out[elem_id] = gr.Button(label, variant="primary", elem_id=elem_id, scale=2)
        out["interrupt"] = gr.Button("Interrupt", elem_id=f"train_{prefix}_interrupt", scale=1)
    out["progress"] = gr.HTML("", elem_id=f"train_{prefix}_progress")
    out["loss"] = gr.LinePlot(loss_plot_value([]), x="step", y="loss", label="Loss", x_title="step",
                              y_title="loss", height=240, elem_id=f"train_{prefix}_loss")
    out["sample"] = gr.Image(label="Latest sample", interactive=False, height=256, type="pil",
                             elem_id=f"train_{prefix}_sample")
    out["result"] = gr.Markdown("", elem_id=f"train_{prefix}_result")
    return out


def _build_lora(studio: Studio) -> RequestForm:
    form = RequestForm(_schemas(studio).lora, "train_lora")
    at = {name: info.default for name, info in form.schema.model_fields.items()}   # controls start at these
    c: dict[str, Any] = {}   # field name -> its control
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row():
                c["output_name"] = gr.Textbox(label="Output name", placeholder="my_lora", elem_id="train_lora_name",
                                              info="saved as models/Lora/<name>.safetensors")
                c["train_data_dir"] = gr.Textbox(label="Dataset directory", placeholder="/path/to/images",
                                                 elem_id="train_lora_data_dir", scale=2,
                                                 info="images + .txt captions; kohya <repeats>_<name> sub-folders")
            with gr.Accordion("Dataset preview", open=True, elem_id="train_lora_dataset"):
                preview_button = gr.Button("Preview dataset", elem_id="train_lora_preview", size="sm")
                dataset_summary = gr.Markdown("", elem_id="train_lora_dataset_summary")
                gallery = gr.Gallery(label="Images (bucket · caption)", columns=6, height=300,
                                     object_fit="contain", elem_id="train_lora_gallery", format="png")
            with gr.Row():
                c["rank"] = gr.Number(at["rank"], label="Rank (dim)", precision=0, elem_id="train_lora_rank")
                c["alpha"] = gr.Number(at["alpha"], label="Alpha", elem_id="train_lora_alpha", info="0 = rank")
                c["train_unet"] = gr.Checkbox(at["train_unet"], label="Train UNet", elem_id="train_lora_train_unet")
                c["train_text_encoder"] = gr.Checkbox(at["train_text_encoder"], label="Train text encoder",
                                                      elem_id="train_lora_train_text_encoder")
            with gr.Row():
                c["learning_rate"] = gr.Textbox(f"{at['learning_rate']:g}", label="Learning rate",
                                                elem_id="train_lora_learning_rate")
                c["steps"] = gr.Number(at["steps"], label="Steps", precision=0, elem_id="train_lora_steps")
                c["batch_size"] = gr.Number(at["batch_size"], label="Batch size", precision=0,
                                            elem_id="train_lora_batch_size")
                c["resolution"] = gr.Number(at["resolution"], label="Resolution", precision=0, step=64,
                                            elem_id="train_lora_resolution")
            with gr.Row():
                c["save_every"] = gr.Number(at["save_every"], label="Save every N steps", precision=0,
                                            elem_id="train_lora_save_every", info="0 = at the end only")
                c["sample_every"] = gr.Number(at["sample_every"], label="Sample every N steps", precision=0,
                                              elem_id="train_lora_sample_every", info="0 = never")
                c["sample_prompt"] = gr.Textbox(label="Sample prompt", elem_id="train_lora_sample_prompt", scale=2,
                                                placeholder="empty: the first image's caption")
            with gr.Row():
                c["overwrite"] = gr.Checkbox(at["overwrite"], label="Overwrite an existing LoRA",
                                             elem_id="train_lora_overwrite")
                c["resume"] = gr.Checkbox(at["resume"], label="Resume from the last save", elem_id="train_lora_resume")
            with gr.Accordion("Network (advanced)", open=False, elem_id="train_lora_network_advanced"):
                with gr.Row():
                    c["conv_rank"] = gr.Number(at["conv_rank"], label="Conv rank", precision=0,
                                               elem_id="train_lora_conv_rank", info="0 = no conv layers (LoCon)")
                    c["conv_alpha"] = gr.Number(at["conv_alpha"], label="Conv alpha", elem_id="train_lora_conv_alpha")
                    c["dropout"] = gr.Number(at["dropout"], label="Network dropout", elem_id="train_lora_dropout")
                with gr.Row():
                    c["unet_lr"] = gr.Textbox("", label="UNet learning rate", placeholder="= learning rate",
                                              elem_id="train_lora_unet_lr")
                    c["text_encoder_lr"] = gr.Textbox("", label="Text encoder learning rate",
                                                      placeholder="= learning rate", elem_id="train_lora_te_lr")
            with gr.Accordion("Optimizer (advanced)", open=False, elem_id="train_lora_optimizer_advanced"):
                with gr.Row():
                    c["lr_scheduler"] = gr.Dropdown(list(LR_SCHEDULERS), value=at["lr_scheduler"],
                                                    label="LR scheduler", elem_id="train_lora_lr_scheduler")
                    c["lr_warmup_steps"] = gr.Number(at["lr_warmup_steps"], label="Warmup steps", precision=0,
                                                     elem_id="train_lora_warmup")
                    c["optimizer"] = gr.Dropdown(list(OPTIMIZERS), value=at["optimizer"], label="Optimizer",
                                                 elem_id="train_lora_optimizer")
                    c["mixed_precision"] = gr.Dropdown(list(MIXED_PRECISION), value=at["mixed_precision"],
                                                       label="Mixed precision", elem_id="train_lora_mixed_precision")
                with gr.Row():
                    c["gradient_accumulation"] = gr.Number(at["gradient_accumulation"], precision=0, minimum=1,
                                                           label="Gradient accumulation steps",
                                                           elem_id="train_lora_grad_accum")
                    c["max_grad_norm"] = gr.Number(at["max_grad_norm"], label="Max grad norm",
                                                   elem_id="train_lora_max_grad_norm", info="0 = no clipping")
                    c["noise_offset"] = gr.Number(at["noise_offset"], label="Noise offset",
                                                  elem_id="train_lora_noise_offset")
                    c["min_snr_gamma"] = gr.Number(at["min_snr_gamma"], label="Min-SNR gamma",
                                                   elem_id="train_lora_min_snr_gamma", info="0 = off; 5 is typical")
                with gr.Row():
                    c["clip_skip"] = gr.Slider(1, 12, value=at["clip_skip"], step=1, label="Clip skip",
                                               elem_id="train_lora_clip_skip")
                    c["seed"] = gr.Number(at["seed"], label="Seed", precision=0, elem_id="train_lora_seed")
                    c["sample_steps"] = gr.Number(at["sample_steps"], label="Sample steps", precision=0,
                                                  elem_id="train_lora_sample_steps")
            with gr.Accordion("Dataset (advanced)", open=False, elem_id="train_lora_dataset_advanced"):
                with gr.Row():
                    c["enable_bucket"] = gr.Checkbox(at["enable_bucket"], label="Aspect-ratio buckets",
                                                     elem_id="train_lora_enable_bucket")
                    c["min_bucket_reso"] = gr.Number(at["min_bucket_reso"], label="Min bucket resolution",
                                                     precision=0, step=64, elem_id="train_lora_min_bucket")
                    c["max_bucket_reso"] = gr.Number(at["max_bucket_reso"], label="Max bucket resolution",
                                                     precision=0, step=64, elem_id="train_lora_max_bucket")
                    c["caption_extension"] = gr.Textbox(at["caption_extension"], label="Caption extension",
                                                        elem_id="train_lora_caption_extension")
                with gr.Row():
                    c["shuffle_caption"] = gr.Checkbox(at["shuffle_caption"], label="Shuffle tags",
                                                       elem_id="train_lora_shuffle_caption")
                    c["keep_tokens"] = gr.Number(at["keep_tokens"], label="Keep first N tags", precision=0,
                                                 elem_id="train_lora_keep_tokens")
                    c["caption_dropout"] = gr.Slider(0, 1, value=at["caption_dropout"], step=0.01,
                                                     label="Caption dropout", elem_id="train_lora_caption_dropout")
                    c["tag_dropout"] = gr.Slider(0, 1, value=at["tag_dropout"], step=0.01, label="Tag dropout",
                                                 elem_id="train_lora_tag_dropout")
            converters = {"output_name": _text, "train_data_dir": lambda text: resolve_data_dir(studio, text),
                          "learning_rate": _text, "unet_lr": _optional, "text_encoder_lr": _optional,
                          "caption_extension": _extension, "sample_prompt": _text}
            for name, control in c.items():
                form.bind(name, control, converters.get(name))
            form.add_schema_controls()   # the schema's fields no control above sets
        with gr.Column(scale=2):
            out = _output_column("lora", [("Train LoRA", "train_lora_start")])

    def train(data: dict[Any, Any]):
        yield from stream_training(
            studio, lambda: studio.submit_training(lora_request_from_values(studio, form.values(data))))

    outputs = [out["progress"], out["loss"], out["sample"], out["result"]]
    out["train_lora_start"].click(train, form.inputs(), outputs)
    out["interrupt"].click(lambda: interrupt_training(studio), None, out["result"], queue=False)
    preview_button.click(
        lambda *a: preview_dataset(studio, *a),
        [c["train_data_dir"], c["resolution"], c["enable_bucket"], c["min_bucket_reso"], c["max_bucket_reso"],
         c["caption_extension"]],
        [gallery, dataset_summary])
    return form


def _build_create_embedding(studio: Studio) -> dict[str, Any]:
    with gr.Column():
        name = gr.Textbox(label="Name", elem_id="train_create_embedding_name")
        init_text = gr.Textbox("*", label="Initialization text", elem_id="train_create_embedding_init_text")
        vectors = gr.Slider(1, 75, value=1, step=1, label="Number of vectors per token",
                            elem_id="train_create_embedding_vectors")
        overwrite = gr.Checkbox(False, label="Overwrite old embedding", elem_id="train_create_embedding_overwrite")
        button = gr.Button("Create embedding", variant="primary", elem_id="train_create_embedding_button")
        result = gr.Markdown("", elem_id="train_create_embedding_result")
    return dict(inputs=[name, init_text, vectors, overwrite], button=button, result=result)


def _build_create_hypernetwork(studio: Studio) -> dict[str, Any]:
    with gr.Column():
        name = gr.Textbox(label="Name", elem_id="train_create_hn_name")
        sizes = gr.CheckboxGroup(list(HN_SIZES), value=list(HN_DEFAULT_SIZES), label="Modules",
                                 elem_id="train_create_hn_sizes")
        layer_structure = gr.Textbox("1, 2, 1", label="Hypernetwork layer structure",
                                     placeholder="1st and last digit must be 1. ex:'1, 2, 1'",
                                     elem_id="train_create_hn_layer_structure")
        with gr.Row():
            activation = gr.Dropdown(list(HN_ACTIVATIONS), value="linear", label="Select activation function",
                                     elem_id="train_create_hn_activation")
            weight_init = gr.Dropdown(list(HN_WEIGHT_INITS), value="Normal", label="Select layer weights "
                                      "initialization", elem_id="train_create_hn_weight_init")
        with gr.Row():
            layer_norm = gr.Checkbox(False, label="Add layer normalization", elem_id="train_create_hn_layer_norm")
            use_dropout = gr.Checkbox(False, label="Use dropout", elem_id="train_create_hn_use_dropout")
        dropout_structure = gr.Textbox("0, 0, 0", label="Dropout structure",
                                       placeholder="1st and last digit must be 0 and values should be between 0 "
                                       "and 1. ex:'0, 0.01, 0'", elem_id="train_create_hn_dropout_structure")
        overwrite = gr.Checkbox(False, label="Overwrite old hypernetwork", elem_id="train_create_hn_overwrite")
        button = gr.Button("Create hypernetwork", variant="primary", elem_id="train_create_hn_button")
        result = gr.Markdown("", elem_id="train_create_hn_result")
    return dict(inputs=[name, sizes, layer_structure, activation, weight_init, layer_norm, use_dropout,
                        dropout_structure, overwrite], button=button, result=result)


def _build_train_ti(studio: Studio) -> tuple[RequestForm, dict[str, Any]]:
    # one form for both kinds: the fields they share, plus each kind's name and learning rate
    schemas = _schemas(studio)
    form = RequestForm(schemas.embedding, "train_ti")
    default = {name: info.default for name, info in form.schema.model_fields.items()}
    learn_rate = {kind: schemas.of(kind).model_fields["learn_rate"].default for kind in TI_KINDS}
    c: dict[str, Any] = {}
    embeddings, hypernetworks = embedding_choices(studio), hypernetwork_choices(studio)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                c["embedding"] = gr.Dropdown(embeddings, value=embeddings[0] if embeddings else None,
                                             label="Embedding", elem_id="train_embedding_select", scale=4)
                refresh_emb = gr.Button("↻", elem_id="train_embedding_refresh", scale=0, min_width=40, size="sm")
                c["hypernetwork"] = gr.Dropdown(hypernetworks, value=hypernetworks[0] if hypernetworks else None,
                                                label="Hypernetwork", elem_id="train_hypernetwork_select", scale=4)
                refresh_hn = gr.Button("↻", elem_id="train_hypernetwork_refresh", scale=0, min_width=40,
                                       size="sm")
            with gr.Row():
                c["embedding_lr"] = gr.Textbox(learn_rate["embedding"], label="Embedding Learning rate",
                                               placeholder="Embedding Learning rate",
                                               elem_id="train_embedding_learn_rate")
                c["hypernetwork_lr"] = gr.Textbox(learn_rate["hypernetwork"], placeholder="Hypernetwork Learning rate",
                                                  label="Hypernetwork Learning rate",
                                                  elem_id="train_hypernetwork_learn_rate")
            with gr.Row():
                c["batch_size"] = gr.Number(1, label="Batch size", precision=0,
                                            elem_id="train_ti_batch_size")
                c["gradient_accumulation"] = gr.Number(1, label="Gradient accumulation steps", precision=0,
                                                       minimum=1, elem_id="train_ti_grad_accum")
            c["train_data_dir"] = gr.Textbox(label="Dataset directory", elem_id="train_ti_data_dir",
                                             placeholder="Path to directory with input images")
            with gr.Row():
                c["template"] = gr.Dropdown(list(DEFAULT_TEMPLATES), value=default["template"],
                                            label="Prompt template", elem_id="train_ti_template")
                c["resolution"] = gr.Number(512, label="Resolution", precision=0, step=64,
                                            elem_id="train_ti_resolution")
                c["enable_bucket"] = gr.Checkbox(True, label="Aspect-ratio buckets", elem_id="train_ti_enable_bucket")
            with gr.Row():
                c["steps"] = gr.Number(100000, label="Max steps", precision=0, elem_id="train_ti_steps")
                c["save_every"] = gr.Number(500, label="Save a copy every N steps, 0 to disable", precision=0,
                                            minimum=0, elem_id="train_ti_save_every")
                c["sample_every"] = gr.Number(500, label="Save an image every N steps, 0 to disable",
                                              precision=0, elem_id="train_ti_sample_every")
            c["sample_prompt"] = gr.Textbox(label="Sample prompt", elem_id="train_ti_sample_prompt",
                                            placeholder="empty: the first image's caption (with the embedding)")
            with gr.Row():
                c["shuffle_caption"] = gr.Checkbox(False, label="Shuffle tags by ',' when creating prompts",
                                                   elem_id="train_ti_shuffle_tags")
                c["tag_dropout"] = gr.Slider(0, 1, value=0, step=0.1, label="Drop out tags when creating prompts",
                                             elem_id="train_ti_tag_dropout")
            with gr.Row():
                c["clip_skip"] = gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id="train_ti_clip_skip")
                c["seed"] = gr.Number(0, label="Seed", precision=0, elem_id="train_ti_seed")
                c["resume"] = gr.Checkbox(True, label="Resume from the last save", elem_id="train_ti_resume")
            named = ("embedding", "hypernetwork", "embedding_lr", "hypernetwork_lr")
            # ti_request_from_values picks the clicked kind's name and rate
            form.bind_group(("output_name", "learn_rate"), [c[key] for key in named],
                            lambda values: dict(zip(named, values)))
            form.bind_group(("resolution", "min_bucket_reso", "max_bucket_reso"), [c["resolution"]],
                            lambda values: ti_buckets(values[0]))
            converters = {"train_data_dir": lambda text: resolve_data_dir(studio, text),
                          "template": template_text, "sample_prompt": _text}
            for name in ("batch_size", "gradient_accumulation", "train_data_dir", "template", "enable_bucket",
                         "steps", "save_every", "sample_every", "sample_prompt", "shuffle_caption", "tag_dropout",
                         "clip_skip", "seed", "resume"):
                form.bind(name, c[name], converters.get(name))
            form.add_schema_controls()   # the schema's fields no control above sets
        with gr.Column(scale=2):
            out = _output_column("ti", [("Train Embedding", "train_embedding_start"),
                                        ("Train Hypernetwork", "train_hypernetwork_start")])

    def runner(kind: str):
        def train(data: dict[Any, Any]):
            yield from stream_training(studio, lambda: studio.submit_training(
                ti_request_from_values(studio, kind, form.values(data))))
        return train

    outputs = [out["progress"], out["loss"], out["sample"], out["result"]]
    out["train_embedding_start"].click(runner("embedding"), form.inputs(), outputs)
    out["train_hypernetwork_start"].click(runner("hypernetwork"), form.inputs(), outputs)
    out["interrupt"].click(lambda: interrupt_training(studio), None, out["result"], queue=False)
    refresh_emb.click(lambda v: refresh_embeddings(studio, v), c["embedding"], c["embedding"], queue=False)
    refresh_hn.click(lambda v: refresh_hypernetworks(studio, v), c["hypernetwork"], c["hypernetwork"], queue=False)
    return form, c


def build_train_tab(studio: Studio) -> dict[str, RequestForm]:
    """The contents of the (already open) Train tab; returns its training forms (``lora``, ``ti``)."""
    with gr.Tabs(elem_id="train_tabs"):
        with gr.Tab("LoRA", id="train_lora", elem_id="train_lora_tab"):
            lora_form = _build_lora(studio)
        with gr.Tab("Create embedding", id="train_create_embedding", elem_id="train_create_embedding_tab"):
            create_emb = _build_create_embedding(studio)
        with gr.Tab("Create hypernetwork", id="train_create_hn", elem_id="train_create_hn_tab"):
            create_hn = _build_create_hypernetwork(studio)
        with gr.Tab("Train embedding / hypernetwork", id="train_ti", elem_id="train_ti_tab"):
            ti_form, ti = _build_train_ti(studio)
    create_emb["button"].click(lambda *a: create_embedding(studio, *a), create_emb["inputs"],
                               [create_emb["result"], ti["embedding"]])
    create_hn["button"].click(lambda *a: create_hypernetwork(studio, *a), create_hn["inputs"],
                              [create_hn["result"], ti["hypernetwork"]])
    return {"lora": lora_form, "ti": ti_form}
