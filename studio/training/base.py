"""What every trainer shares: the settings of a run, the errors, and the :class:`Trainable` protocol
that a LoRA, an embedding or a hypernetwork implements so that one loop (studio.training.loop)
trains all three.

:class:`TrainSettings` is a typed schema like the generation requests (studio.generation.request):
ranges and choices live on its fields, so the API (a 422), the CLI and the Train tab refuse the same
mistake with pydantic's same words, and their flags and controls are derived from it. Checks that need
the files (the dataset folder, the output name, an existing output) are made when a run is prepared
(a 400).

The loop owns the dataset, the noise, the loss, the optimizer, Accelerate, progress, sampling,
saving and resuming; a trainable owns only what differs: which parameters learn, how captions
become text conditioning (an embedding is spliced into the prompt, a LoRA may train the text
encoders), and the file format it is saved in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from studio.errors import RequestError
from studio.generation.request import MAX_SEED, door

if TYPE_CHECKING:
    import torch

LrScheduler = Literal["constant", "constant_with_warmup", "cosine", "linear"]
Optimizer = Literal["AdamW", "AdamW8bit"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LR_SCHEDULERS: tuple[str, ...] = get_args(LrScheduler)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
MIXED_PRECISION: tuple[str, ...] = get_args(MixedPrecision)

MAX_TRAIN_STEPS = 1_000_000
MAX_TRAIN_BATCH = 64
MAX_GRADIENT_ACCUMULATION = 256
MAX_PROCESSES = 64           # data-parallel processes of one run (studio.training.distributed)
MIN_RESOLUTION, MAX_RESOLUTION = 64, 4096
MAX_EVERY = 1_000_000           # save_every / sample_every
MAX_SAMPLE_STEPS = 150
# the built-in prompt templates (studio.training.dataset.DEFAULT_TEMPLATES' names)
TEMPLATE_NAMES = ("subject", "subject_filewords", "style", "style_filewords", "none")

# CLI argument groups (door(group=...)) of the training flags
_LEARNING, _DATASET, _OUTPUT = "learning", "dataset and captions", "saving and samples"


class TrainingError(RequestError):
    """A run that cannot start or go on because of the user's input: said in the UI, a 4xx in the API."""


def settings_error(message: str) -> PydanticCustomError:
    """A check across fields, raised from a field validator: pydantic reports it under that field
    with exactly this text (no "Value error," prefix), a 422 in the API like a range."""
    return PydanticCustomError("training_settings", message)


class TrainSettings(BaseModel):
    """Settings every kind of training has: kohya ``train_network.py`` names (A1111's where kohya has
    none). Frozen: a changed copy is ``settings.model_copy(update={...})``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    train_data_dir: str = Field(
        validation_alias=AliasChoices("train_data_dir", "data_dir"),   # data_dir: the API's name before
        description="the images and their .txt captions (kohya <repeats>_<name> sub-folders work)",
        json_schema_extra=door(cli=("--data",), label="Dataset directory"))
    output_name: str = Field(description="the file name to write, without extension (for an embedding or a "
                                         "hypernetwork: the one to train)",
                             json_schema_extra=door(cli=("--name",), label="Output name"))
    checkpoint: str | None = Field(None, description="title, name or hash of the checkpoint to train on; "
                                   "empty = the loaded one", json_schema_extra=door(cli=("-m",), ui=False))
    steps: int = Field(1000, ge=1, le=MAX_TRAIN_STEPS, description="optimizer steps (kohya max_train_steps)")
    batch_size: int = Field(1, ge=1, le=MAX_TRAIN_BATCH, description="images per step")
    learning_rate: float = Field(1e-4, gt=0, le=10, description="learning rate",
                                 json_schema_extra=door(cli=("--lr",)))
    gradient_accumulation: int = Field(
        1, ge=1, le=MAX_GRADIENT_ACCUMULATION, description="gradient accumulation steps "
        "(kohya gradient_accumulation_steps)", json_schema_extra=door(group=_LEARNING, cli=("--grad-accum",)))
    lr_scheduler: LrScheduler = Field("constant", description="learning-rate schedule: "
                                      + ", ".join(LR_SCHEDULERS),
                                      json_schema_extra=door(group=_LEARNING, cli=("--scheduler",),
                                                             label="LR scheduler"))
    lr_warmup_steps: int = Field(0, ge=0, le=MAX_TRAIN_STEPS, validate_default=True,
                                 description="learning-rate warmup steps (at most steps)",
                                 json_schema_extra=door(group=_LEARNING, cli=("--warmup",)))
    optimizer: Optimizer = Field("AdamW", description="AdamW, or AdamW8bit (bitsandbytes, CUDA only)",
                                 json_schema_extra=door(group=_LEARNING))
    mixed_precision: MixedPrecision = Field("auto", description="auto (fp16 on CUDA, none on the CPU), no, "
                                            "fp16 or bf16", json_schema_extra=door(group=_LEARNING))
    processes: int = Field(1, ge=1, le=MAX_PROCESSES, description="data-parallel processes on this machine, one "
                           "per GPU (accelerate launch; on a CPU-only machine, CPU processes over gloo); the "
                           "effective batch is batch_size x processes",
                           json_schema_extra=door(group=_LEARNING, label="Processes (GPUs)"))
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="gradient clipping; 0 = none",
                                 json_schema_extra=door(group=_LEARNING))
    noise_offset: float = Field(0.0, ge=0, le=1, description="offset noise (darker darks, brighter brights); "
                                "0 = off", json_schema_extra=door(group=_LEARNING))
    min_snr_gamma: float = Field(0.0, ge=0, le=100, description="Min-SNR-γ loss weighting; 0 = off, 5 is the "
                                 "paper's value", json_schema_extra=door(group=_LEARNING, label="Min-SNR gamma"))
    clip_skip: int = Field(1, ge=1, le=12, description="train on the n-th last layer of CLIP",
                           json_schema_extra=door(group=_LEARNING))
    seed: int = Field(0, ge=-1, le=MAX_SEED, description="-1 = random", json_schema_extra=door(group=_LEARNING))
    resolution: int = Field(512, ge=MIN_RESOLUTION, le=MAX_RESOLUTION, multiple_of=8,
                            description="training resolution (a multiple of 8)",
                            json_schema_extra=door(group=_DATASET))
    enable_bucket: bool = Field(True, description="aspect-ratio buckets; off: every image is cropped square",
                                json_schema_extra=door(group=_DATASET, cli=("--no-bucket",),
                                                       label="Aspect-ratio buckets"))
    min_bucket_reso: int = Field(256, ge=MIN_RESOLUTION, le=MAX_RESOLUTION, description="smallest bucket side",
                                 json_schema_extra=door(group=_DATASET, cli=("--min-bucket",)))
    max_bucket_reso: int = Field(1024, ge=MIN_RESOLUTION, le=MAX_RESOLUTION, validate_default=True,
                                 description="largest bucket side",
                                 json_schema_extra=door(group=_DATASET, cli=("--max-bucket",)))
    caption_extension: str = Field(".txt", min_length=1, description="the caption files' extension",
                                   json_schema_extra=door(group=_DATASET))
    shuffle_caption: bool = Field(False, description="shuffle the comma-separated tags of captions",
                                  json_schema_extra=door(group=_DATASET, cli=("--shuffle-tags",),
                                                         label="Shuffle tags"))
    keep_tokens: int = Field(0, ge=0, le=1000, description="tags at the start that are never shuffled",
                             json_schema_extra=door(group=_DATASET))
    caption_dropout: float = Field(0.0, ge=0, le=1, description="chance to train without the caption "
                                   "(kohya caption_dropout_rate)", json_schema_extra=door(group=_DATASET))
    tag_dropout: float = Field(0.0, ge=0, le=1, description="chance to drop each tag "
                               "(kohya caption_tag_dropout_rate)", json_schema_extra=door(group=_DATASET))
    template: str | None = Field(None, description=f"prompt template: a built-in one "
                                 f"({', '.join(TEMPLATE_NAMES)}) or lines with [name] and [filewords]; empty = "
                                 "the captions as they are (LoRA) or the kind's default",
                                 json_schema_extra=door(group=_DATASET))
    save_every: int = Field(0, ge=0, le=MAX_EVERY, description="save every N steps; 0 = at the end only",
                            json_schema_extra=door(group=_OUTPUT))
    sample_every: int = Field(0, ge=0, le=MAX_EVERY, description="sample an image every N steps; 0 = never",
                              json_schema_extra=door(group=_OUTPUT))
    sample_prompt: str = Field("", description="the samples' prompt; empty = the first image's caption",
                               json_schema_extra=door(group=_OUTPUT))
    sample_steps: int = Field(20, ge=1, le=MAX_SAMPLE_STEPS, description="the samples' sampling steps",
                              json_schema_extra=door(group=_OUTPUT))
    overwrite: bool = Field(False, description="replace an existing output of that name",
                            json_schema_extra=door(group=_OUTPUT))
    resume: bool = Field(True, description="continue from the last save of the same output when there is one",
                         json_schema_extra=door(group=_OUTPUT))

    @field_validator("lr_warmup_steps")
    @classmethod
    def _warmup_within_steps(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and value > steps:
            raise settings_error(f"must be at most steps ({steps})")
        return value

    @field_validator("max_bucket_reso")
    @classmethod
    def _buckets_in_order(cls, value: int, info: ValidationInfo) -> int:
        smallest = info.data.get("min_bucket_reso")
        if smallest is not None and value < smallest:
            raise settings_error(f"must be at least min_bucket_reso ({smallest})")
        return value


@dataclass
class Batch:
    """One training batch as the trainable sees it."""

    captions: list[str]
    pixels: torch.Tensor                   # [B, 3, H, W] in [-1, 1]
    original_sizes: list[tuple[int, int]] = field(default_factory=list)   # (h, w), SDXL time ids
    crops: list[tuple[int, int]] = field(default_factory=list)            # (top, left)


class Trainable(Protocol):
    """A thing that learns: a LoRA, an embedding, a hypernetwork."""

    kind: str                  # "lora" | "embedding" | "hypernetwork"
    output_path: Path          # where it is saved (the final file)

    def attach(self, model: Any) -> list[dict[str, Any]]:
        """Install into ``model`` (adapters, hooks, spliced vectors) and return optimizer param groups
        (``{"params": [...], "lr": float}``). Everything else in the model stays frozen."""
        ...

    def encode(self, model: Any, captions: list[str], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning for a batch, with gradients where this trainable learns:
        ``(context [B, 77*k, D], pooled [B, D'] or None)``."""
        ...

    def save(self, path: Path, step: int, metadata: dict[str, str]) -> Path:
        """Write the trained weights to ``path`` in the format A1111 / ComfyUI read; atomically, so an
        interrupted or failed save leaves the previous file intact."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (for resuming)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ...

    def detach(self, model: Any) -> None:
        """Take everything out of ``model`` again: after this it generates exactly as before."""
        ...


def check_output_name(name: str) -> str:
    """A file name the user typed: no folders, no hidden files, not empty."""
    name = (name or "").strip()
    if not name:
        raise TrainingError("give the output a name")
    if any(c in name for c in '/\\:*?"<>|') or name.startswith(".") or name in ("..",):
        raise TrainingError(f"{name!r} is not a valid file name (no folders or special characters)")
    return name
