"""What every trainer shares: the settings of a run, the errors, and the :class:`Trainable` protocol
that a LoRA, an embedding or a hypernetwork implements so that one loop (studio.training.loop)
trains all three.

The loop owns the dataset, the noise, the loss, the optimizer, Accelerate, progress, sampling,
saving and resuming; a trainable owns only what differs: which parameters learn, how captions
become text conditioning (an embedding is spliced into the prompt, a LoRA may train the text
encoders), and the file format it is saved in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from studio.generation.request import RequestError

LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
OPTIMIZERS = ("AdamW", "AdamW8bit")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


class TrainingError(RequestError):
    """A run that cannot start or go on because of the user's input: said in the UI, a 4xx in the API."""


@dataclass(frozen=True)
class TrainSettings:
    """Settings every kind of training has (kohya / A1111 names in the comments)."""

    data_dir: str                          # images + .txt captions (kohya <repeats>_<name> sub-folders)
    output_name: str                       # file name without extension
    checkpoint: str | None = None          # None = the loaded / chosen checkpoint
    steps: int = 1000                      # max_train_steps
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "AdamW"
    mixed_precision: str = "auto"          # auto: fp16 on CUDA, none on the CPU
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0           # caption_dropout_rate: the whole caption
    tag_dropout: float = 0.0               # caption_tag_dropout_rate: each comma-separated tag
    template: str | None = None            # prompt template lines with [name] / [filewords] (TI, HN)
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0             # 0 = off; 5 is the paper's value
    clip_skip: int = 1
    max_grad_norm: float = 1.0             # 0 = no clipping
    seed: int = 0
    save_every: int = 0                    # steps; 0 = only at the end
    sample_every: int = 0                  # steps; 0 = never
    sample_prompt: str = ""
    sample_steps: int = 20
    overwrite: bool = False
    resume: bool = True                    # continue from the last save of the same output when there is one


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
