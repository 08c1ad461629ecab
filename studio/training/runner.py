"""A training request from any front door (Train tab, API, CLI) to a job on the studio's queue.

:func:`prepare` checks everything that can be checked before queueing (settings, names, the dataset
folder: a bad folder is refused at once, not after the model has loaded); :func:`execute` runs in the
job: loads the checkpoint, builds the trainable, trains (:func:`train_here`, or with ``processes > 1``
the same on several processes: studio.training.distributed), and refreshes the library the result
belongs to, so a trained LoRA / embedding / hypernetwork is usable the moment the job ends.
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.jobs import JobState
from studio.training.base import TrainingError, TrainSettings, check_output_name
from studio.training.lora_settings import LoraSettings
from studio.training.schemas import EMBEDDING_LR, HYPERNETWORK_LR, TrainEmbeddingRequest

if TYPE_CHECKING:
    from studio.engine import Engine
    from studio.training.loop import TrainResult

log = logging.getLogger(__name__)

KINDS = ("lora", "embedding", "hypernetwork")


@dataclass(frozen=True)
class TrainingRequest:
    """A run of ``kind`` with ``settings`` (validated: a schema of studio.training.schemas or a plain
    TrainSettings). A LoRA's own settings are ``lora``, or the settings themselves when they are a
    TrainLoraRequest; an embedding's or hypernetwork's schedule is ``learn_rate``, or the settings'."""

    kind: str                              # "lora" | "embedding" | "hypernetwork"
    settings: TrainSettings
    lora: LoraSettings | None = None
    learn_rate: str | None = None          # A1111 schedule for embeddings / hypernetworks: "0.005:100, 1e-5"


    def to_json(self) -> dict[str, Any]:
        """The request as JSON (each settings object with the class that validates it again): how a
        multi-process run (studio.training.distributed) hands it to its processes."""
        return {"kind": self.kind, "settings_class": _class_path(type(self.settings)),
                "settings": self.settings.model_dump(mode="json"), "learn_rate": self.learn_rate,
                "lora_class": _class_path(type(self.lora)) if self.lora is not None else None,
                "lora": self.lora.model_dump(mode="json") if self.lora is not None else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingRequest:
        from studio.training.schemas import training_schemas

        kind = data["kind"]
        settings = _rebuild(data["settings_class"], data["settings"], training_schemas().of(kind))
        lora = _rebuild(data["lora_class"], data["lora"], LoraSettings) if data.get("lora") is not None else None
        return cls(kind, settings, lora=lora, learn_rate=data.get("learn_rate"))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _rebuild(path: str, data: dict[str, Any], fallback: type) -> Any:
    """``data`` validated by the class at ``path`` (a schema subclass a test or a later feature made),
    or by ``fallback`` with the fields it knows when that class cannot be imported here."""
    module, _, name = path.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        log.warning("Training settings class %s cannot be imported here; using %s", path, fallback.__name__)
        found = fallback
    return found.model_validate({k: v for k, v in data.items() if k in found.model_fields})


def request_for(kind: str, settings: TrainSettings) -> TrainingRequest:
    """The request for settings built from the kind's schema: a LoRA's settings are its own
    (``TrainLoraRequest`` is both), an embedding's or hypernetwork's schedule is their ``learn_rate``."""
    lora = settings if isinstance(settings, LoraSettings) else None
    learn_rate = settings.learn_rate if isinstance(settings, TrainEmbeddingRequest) else None
    return TrainingRequest(kind, settings, lora=lora, learn_rate=learn_rate)


@dataclass
class PreparedTraining:
    request: TrainingRequest
    dataset: Any
    output_path: Path
    source_path: Path | None               # the embedding / hypernetwork file being trained
    lr_at: Any = None


def _lora_output(studio: Engine, name: str) -> Path:
    return Path(studio.paths.lora_dirs[0]) / f"{name}.safetensors"


def _resumable(studio: Engine, kind: str, name: str, output: Path) -> bool:
    from studio.training.loop import load_resume_state, work_dir

    return load_resume_state(work_dir(studio.paths.data, kind, name), kind, output) is not None


def prepare(studio: Engine, req: TrainingRequest) -> PreparedTraining:
    from studio.training.dataset import DEFAULT_TEMPLATES, TrainDataset

    if req.kind not in KINDS:
        raise TrainingError(f"unknown training kind {req.kind!r}; use one of {', '.join(KINDS)}")
    settings = req.settings
    if settings.processes > 1:
        from studio.training.distributed import check_processes

        check_processes(settings.processes, studio.models.policy.device)
    name = check_output_name(settings.output_name)
    settings = settings.model_copy(update={"output_name": name})
    if settings.seed < 0:  # A1111's -1 = random
        settings = settings.model_copy(update={"seed": random.randrange(2**31)})
    source = None
    lr_at = None
    if req.kind == "lora":
        lora = req.lora or (settings if isinstance(settings, LoraSettings) else LoraSettings())
        output = _lora_output(studio, name)
        if (output.exists() and not settings.overwrite
                and not (settings.resume and _resumable(studio, "lora", name, output))):
            raise TrainingError(f"a LoRA named {name!r} already exists ({output}); tick overwrite or choose "
                                "another name")
        req = replace(req, lora=lora)
    else:
        source = _find_source(studio, req.kind, name)
        output = source
        if req.learn_rate is None and isinstance(settings, TrainEmbeddingRequest):
            req = replace(req, learn_rate=settings.learn_rate)
        if not (req.learn_rate or "").strip():
            # A1111's defaults for the two
            req = replace(req, learn_rate=EMBEDDING_LR if req.kind == "embedding" else HYPERNETWORK_LR)
        if req.learn_rate:
            from studio.training.embedding import lr_at as schedule_lr
            from studio.training.embedding import parse_lr_schedule

            schedule = parse_lr_schedule(req.learn_rate, settings.steps)
            # A1111 stops where the schedule's last rate ends
            settings = settings.model_copy(update={"learning_rate": schedule[0][0],
                                                   "steps": min(settings.steps, schedule[-1][1])})

            def lr_at(index: int, schedule=schedule) -> float:
                # the LR scheduler counts from 0, A1111's schedule from step 1
                return schedule_lr(schedule, index + 1)
        if not settings.template:
            kind_templates = DEFAULT_TEMPLATES["subject" if req.kind == "embedding" else "style"]
            settings = settings.model_copy(update={"template": "\n".join(kind_templates)})
    dataset = TrainDataset.from_settings(settings, name=name)
    return PreparedTraining(replace(req, settings=settings), dataset, output, source, lr_at)


def _find_source(studio: Engine, kind: str, name: str) -> Path:
    if kind == "embedding":
        studio.embeddings.refresh()
        found = studio.embeddings.embeddings.get(name)
        if found is None:
            raise TrainingError(f"no embedding named {name!r}; create it first (Create embedding)")
        return Path(found.path)
    studio.networks.hypernetworks.refresh()
    info = studio.networks.hypernetworks.find(name)
    if info is None:
        raise TrainingError(f"no hypernetwork named {name!r}; create it first (Create hypernetwork)")
    return Path(info.path)


def _metadata(model: Any, prepared: PreparedTraining) -> dict[str, str]:
    s = prepared.request.settings
    info = model.info
    return {
        "ss_sd_model_name": info.name_for_extra, "ss_sd_model_hash": info.shorthash or "",
        "sd_checkpoint": info.shorthash or "", "sd_checkpoint_name": info.model_name,
        "ss_output_name": s.output_name, "ss_learning_rate": str(s.learning_rate),
        "ss_lr_scheduler": s.lr_scheduler, "ss_lr_warmup_steps": str(s.lr_warmup_steps),
        "ss_max_train_steps": str(s.steps), "ss_batch_size_per_device": str(s.batch_size),
        "ss_gradient_accumulation_steps": str(s.gradient_accumulation), "ss_optimizer": s.optimizer,
        "ss_mixed_precision": s.mixed_precision, "ss_resolution": f"({s.resolution}, {s.resolution})",
        "ss_enable_bucket": str(s.enable_bucket), "ss_min_bucket_reso": str(s.min_bucket_reso),
        "ss_max_bucket_reso": str(s.max_bucket_reso), "ss_noise_offset": str(s.noise_offset),
        "ss_min_snr_gamma": str(s.min_snr_gamma), "ss_clip_skip": str(s.clip_skip), "ss_seed": str(s.seed),
        "ss_shuffle_caption": str(s.shuffle_caption), "ss_keep_tokens": str(s.keep_tokens),
        "ss_caption_dropout_rate": str(s.caption_dropout), "ss_caption_tag_dropout_rate": str(s.tag_dropout),
        "ss_num_train_images": str(len(prepared.dataset)),
        "ss_training_started_at": str(int(datetime.now(timezone.utc).timestamp())),
        "ss_v2": str(model.family.startswith("sd2")),
    }


def _trainable(prepared: PreparedTraining) -> Any:
    req = prepared.request
    if req.kind == "lora":
        from studio.training.lora import LoraTrainable

        return LoraTrainable(req.lora, prepared.output_path, req.settings.learning_rate)
    if req.kind == "embedding":
        from studio.training.embedding import EmbeddingTrainable

        return EmbeddingTrainable(prepared.source_path, prepared.output_path, req.settings.learning_rate)
    from studio.training.hypernetwork import HypernetworkTrainable

    return HypernetworkTrainable(prepared.source_path, prepared.output_path, req.settings.learning_rate)


def _sampler(studio: Engine, model: Any, prepared: PreparedTraining, state: JobState,
             on_sample: Callable[[int, Path], None] | None = None):
    """Sample images during training with the weights as they are, into the run's folder; the
    latest one is the job's live preview (``on_sample`` hears of each saved one)."""
    from studio.generation.outputs import save_image
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import run_generation
    from studio.training.loop import work_dir

    s = prepared.request.settings
    prompt = s.sample_prompt or (prepared.dataset.items[0].caption if prepared.dataset.items else "")
    if prepared.request.kind == "embedding" and s.output_name not in prompt:
        prompt = f"{prompt}, {s.output_name}" if prompt else s.output_name
    folder = work_dir(studio.paths.data, prepared.request.kind, s.output_name) / "samples"

    def sample(step: int) -> Path | None:
        size = min(s.resolution, 1024)
        req = Txt2ImgRequest(prompt=prompt, steps=s.sample_steps, width=size, height=size, seed=s.seed,
                             sampler_name="Euler a", save_images=False, clip_skip=s.clip_skip)
        model.conditioner.clear_cache()
        sub = JobState(job_id=state.job_id, description="training sample")
        result = run_generation(model, req, sub)
        model.conditioner.clear_cache()
        if not result.images:
            return None
        state.preview = result.images[0]
        state.preview_id += 1
        path = save_image(result.images[0], result.infotexts[0], folder, step, dated=False)
        if on_sample is not None and path is not None:
            on_sample(step, Path(path))
        return path

    return sample


def train_here(studio: Engine, prepared: PreparedTraining, state: JobState, checkpoint: str | None = None,
               on_sample: Callable[[int, Path], None] | None = None) -> TrainResult:
    """The run in this process: load the checkpoint (``checkpoint``, else the settings', else the
    studio's), build the trainable and train. A launched process of a multi-process run calls this too."""
    from studio.training.loop import run_training

    settings = prepared.request.settings
    state.textinfo = "Loading model for training"
    model = studio.models.load(checkpoint or settings.checkpoint or studio.initial_checkpoint())
    studio.sync_embeddings()
    trainable = _trainable(prepared)
    sample = _sampler(studio, model, prepared, state, on_sample) if settings.sample_every else None
    try:
        return run_training(model, trainable, settings, prepared.dataset, state, studio.paths.data,
                            metadata=_metadata(model, prepared), sample=sample, lr_at=prepared.lr_at)
    finally:
        model.conditioner.clear_cache()


def execute(studio: Engine, prepared: PreparedTraining, state: JobState) -> TrainResult:
    settings = prepared.request.settings
    if settings.processes > 1:
        from studio.training.distributed import run

        result = run(studio, prepared, state)
    else:
        result = train_here(studio, prepared, state)
    if prepared.request.kind == "lora":
        studio.networks.refresh()
    elif prepared.request.kind == "hypernetwork":
        studio.networks.hypernetworks.refresh()
    studio.sync_embeddings()
    log.info("Training %s %s: %d steps in %.1fs, loss %s → %s", prepared.request.kind, settings.output_name,
             result.step, result.seconds, f"{result.losses[0]:.4f}" if result.losses else "-",
             f"{result.losses[-1]:.4f}" if result.losses else "-")
    return result


def create_embedding_job(studio: Engine, name: str, init_text: str = "*", vectors_per_token: int = 1,
                         overwrite: bool = False) -> Path:
    """A1111's "Create embedding": a new embedding file in the embeddings folder, initialised from
    the loaded model's token embeddings of ``init_text`` (on the worker: it needs the model)."""
    from studio.training.embedding import create_embedding

    folder = Path(studio.paths.embedding_dirs[0]) if studio.paths.embedding_dirs else studio.paths.data / "embeddings"

    def job(state: JobState) -> Path:
        model = studio.load(studio.initial_checkpoint())
        path = create_embedding(model, name, init_text, vectors_per_token, overwrite, folder=folder)
        studio.sync_embeddings()
        return path

    return studio.queue.run(job, f"create embedding {name}")


def create_hypernetwork_file(studio: Engine, name: str, **options: Any) -> Path:
    """A1111's "Create hypernetwork" into the hypernetworks folder (options: sizes, layer_structure,
    activation, weight_init, add_layer_norm, use_dropout, dropout_structure, overwrite)."""
    from studio.training.hypernetwork import create_hypernetwork

    path = create_hypernetwork(name, folder=Path(studio.paths.hypernetwork_dirs[0]), **options)
    studio.networks.hypernetworks.refresh()
    return path
