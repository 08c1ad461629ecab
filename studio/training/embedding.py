"""Textual inversion: A1111's "Create embedding", the trainable that learns its vectors, and the
learning-rate schedule strings A1111 accepts for embeddings and hypernetworks.

Files are written in the layouts our :mod:`studio.networks.embeddings` reads back (formats.md 3.1):

- SD1 / SD2: an A1111 ``.pt`` ``{"string_to_token": {"*": 265}, "string_to_param": {"*": [n, dim]},
  "name", "step", "sd_checkpoint", "sd_checkpoint_name"}`` (A1111, ComfyUI and diffusers read it);
- SDXL: a ``.safetensors`` ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (A1111 and kohya's layout).

No ``.safetensors`` twin is written for SD1 / SD2: the prompt token is the file stem, so a twin
beside the ``.pt`` would be a second file claiming the same name in the embeddings folder.

Every save is atomic (a hidden temporary file in the target folder, then ``os.replace``), so a
failed or interrupted save leaves the previous file as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.config import atomic_write
from studio.networks.embeddings import (
    DEFAULT_ENCODER,
    EMBEDDING_SUFFIXES,
    SDXL_ENCODERS,
    Embedding,
    EmbeddingFileError,
    mismatch_reason,
    read_embedding,
)
from studio.training.base import TrainingError, check_output_name

MAX_VECTORS_PER_TOKEN = 75          # one prompt chunk
A1111_PLACEHOLDER = {"*": 265}      # string_to_token as A1111 writes it (the id of "*" in CLIP's vocabulary)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules ("0.005:100, 1e-3:1000, 1e-5")


def parse_lr_schedule(text: str | float, steps: int) -> list[tuple[float, int]]:
    """A1111's learning-rate schedule: ``[(rate, last_step), ...]``.

    ``"0.005:100, 1e-3:1000, 1e-5"`` means 0.005 up to step 100, then 1e-3 up to step 1000, then
    1e-5 up to ``steps``. A single number is a constant rate; a step of ``-1`` means ``steps``.
    Only the last rate may leave out its step. Entries past ``steps`` are cut there (A1111 stops
    training where the schedule ends, so ``schedule[-1][1]`` is the last step to train).
    """
    if isinstance(text, bool):
        raise TrainingError(f"learning rate {text!r} is not a number")
    if isinstance(text, (int, float)):
        text = repr(float(text))
    if steps < 1:
        raise TrainingError(f"the number of steps must be at least 1, got {steps}")
    parts = [part.strip() for part in str(text).split(",")]
    if not any(parts):
        raise TrainingError("give a learning rate")
    schedule: list[tuple[float, int]] = []
    previous = 0
    for index, part in enumerate(parts):
        rate_text, has_step, step_text = part.partition(":")
        rate = _rate(rate_text, text)
        if has_step:
            end = _end_step(step_text, text, steps)
        elif index == len(parts) - 1:
            end = steps
        else:
            raise TrainingError(f"learning rate schedule {text!r}: only the last rate may leave out its step")
        if end <= previous:
            raise TrainingError(
                f"learning rate schedule {text!r}: the steps must increase ({end} after {previous})")
        schedule.append((rate, min(end, steps)))
        previous = end
        if end >= steps:
            break  # what follows can never be reached
    return schedule


def _rate(value: str, text: Any) -> float:
    try:
        rate = float(value.strip())
    except ValueError:
        raise TrainingError(f"learning rate schedule {text!r}: {value.strip()!r} is not a number") from None
    if not math.isfinite(rate) or rate <= 0:
        raise TrainingError(f"learning rate schedule {text!r}: the rate {value.strip()} must be above 0")
    return rate


def _end_step(value: str, text: Any, steps: int) -> int:
    try:
        end = int(value.strip())
    except ValueError:
        raise TrainingError(
            f"learning rate schedule {text!r}: {value.strip()!r} is not a whole step number") from None
    if end == -1:
        return steps
    if end < 1:
        raise TrainingError(f"learning rate schedule {text!r}: step {end} must be at least 1")
    return end


def lr_at(schedule: list[tuple[float, int]], step: int) -> float:
    """The rate for optimizer step ``step`` (1-based): the first entry with ``step <= last_step``;
    past the end of the schedule, its last rate."""
    if not schedule:
        raise TrainingError("empty learning rate schedule")
    for rate, end in schedule:
        if step <= end:
            return rate
    return schedule[-1][0]


# ---------------------------------------------------------------------------------------------
# Shared helpers (hypernetwork.py uses these too)


def freeze_model(model: Any) -> list[nn.Parameter]:
    """Turn off gradients for every weight of ``model``; return those that had them on, for
    :func:`unfreeze_model`."""
    was_on: list[nn.Parameter] = []
    for module in _model_modules(model):
        for param in module.parameters():
            if param.requires_grad:
                was_on.append(param)
                param.requires_grad_(False)
    return was_on


def unfreeze_model(params: list[nn.Parameter]) -> None:
    for param in params:
        param.requires_grad_(True)


def _model_modules(model: Any) -> list[nn.Module]:
    modules = getattr(model, "modules", None)
    if isinstance(modules, (list, tuple)):
        return [m for m in modules if isinstance(m, nn.Module)]
    found = [getattr(model, "unet", None), getattr(model, "vae", None), *getattr(model, "text_encoders", [])]
    return [m for m in found if isinstance(m, nn.Module)]


def model_device(model: Any) -> torch.device:
    policy = getattr(model, "policy", None)
    if policy is not None and getattr(policy, "device", None) is not None:
        return torch.device(policy.device)
    return next(model.unet.parameters()).device


def checkpoint_fields(metadata: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """``(sd_checkpoint, sd_checkpoint_name)`` from the loop's metadata (kohya's names accepted too)."""
    metadata = metadata or {}

    def first(*keys: str) -> str | None:
        for key in keys:
            value = metadata.get(key)
            if value not in (None, ""):
                return str(value)
        return None

    return (first("sd_checkpoint", "ss_new_sd_model_hash", "ss_sd_model_hash"),
            first("sd_checkpoint_name", "ss_sd_model_name"))


def check_free_name(
    folder: Path, name: str, suffixes: tuple[str, ...], overwrite: bool, what: str
) -> list[Path]:
    """The files named ``name`` with one of ``suffixes`` in ``folder``; an error if there are any
    and ``overwrite`` is off."""
    existing = [folder / f"{name}{suffix}" for suffix in suffixes if (folder / f"{name}{suffix}").exists()]
    if existing and not overwrite:
        raise TrainingError(f"{what} {existing[0].name} already exists (tick overwrite to replace it)")
    return existing


# ---------------------------------------------------------------------------------------------
# Creating an embedding


def _encoder_keys(model: Any) -> list[str]:
    return list(SDXL_ENCODERS) if model.is_sdxl else [DEFAULT_ENCODER]


def _token_embedding(encoder: nn.Module) -> nn.Embedding:
    return getattr(encoder, "text_model", encoder).embeddings.token_embedding


def embedding_suffix(model: Any) -> str:
    """The file type an embedding for ``model`` is saved as."""
    return ".safetensors" if model.is_sdxl else ".pt"


def _with_suffix(path: Path, suffix: str) -> Path:
    path = Path(path)
    if path.suffix.lower() in EMBEDDING_SUFFIXES:
        return path.with_suffix(suffix)
    return path.with_name(path.name + suffix)


def initial_vectors(model: Any, init_text: str, vectors_per_token: int) -> dict[str, torch.Tensor]:
    """A1111's initialisation: row ``i`` of ``n`` is the token embedding of init-text token
    ``i * tokens // n`` (so short texts repeat their tokens, long ones are sampled evenly); an
    empty text gives zeros. One float32 CPU matrix ``[n, width]`` per text encoder."""
    vectors: dict[str, torch.Tensor] = {}
    for index, key in enumerate(_encoder_keys(model)):
        encoder = model.text_encoders[index]
        tokenizer = model.tokenizers[min(index, len(model.tokenizers) - 1)]
        table = _token_embedding(encoder).weight
        ids = tokenizer(init_text or "", add_special_tokens=False)["input_ids"][:MAX_VECTORS_PER_TOKEN]
        vec = torch.zeros(vectors_per_token, table.shape[1], dtype=torch.float32)
        if ids:
            with torch.no_grad():
                rows = table[torch.tensor(ids, device=table.device)].detach().to("cpu", torch.float32)
            for i in range(vectors_per_token):
                vec[i] = rows[i * len(ids) // vectors_per_token]
        vectors[key] = vec
    return vectors


def create_embedding(
    model: Any,
    name: str,
    init_text: str = "*",
    vectors_per_token: int = 1,
    overwrite: bool = False,
    *,
    folder: Path,
) -> Path:
    """A1111's "Create embedding": write ``folder/<name>.pt`` (SDXL: ``.safetensors``) holding
    ``vectors_per_token`` vectors initialised from ``init_text`` (see :func:`initial_vectors`)."""
    name = check_output_name(name)
    if isinstance(vectors_per_token, bool) or not isinstance(vectors_per_token, int):
        raise TrainingError(f"vectors per token must be a whole number, got {vectors_per_token!r}")
    if not 1 <= vectors_per_token <= MAX_VECTORS_PER_TOKEN:
        raise TrainingError(f"vectors per token must be 1-{MAX_VECTORS_PER_TOKEN}, got {vectors_per_token}")
    folder = Path(folder)
    suffix = embedding_suffix(model)
    existing = check_free_name(folder, name, EMBEDDING_SUFFIXES, overwrite, "embedding")
    vectors = initial_vectors(model, init_text, vectors_per_token)
    path = folder / f"{name}{suffix}"
    write_embedding_file(path, vectors, name=name, step=0)
    for other in existing:
        if other != path:  # the same name with another suffix would shadow or be shadowed by the new file
            other.unlink(missing_ok=True)
    return path


def write_embedding_file(
    path: Path,
    vectors: Mapping[str, torch.Tensor],
    *,
    name: str,
    step: int | None,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
) -> Path:
    """Write ``vectors`` atomically: A1111 ``.pt`` for one encoder, ``clip_l`` / ``clip_g``
    ``.safetensors`` for SDXL (the suffix of ``path`` is set to match)."""
    cpu = {key: vec.detach().to("cpu", torch.float32).contiguous().clone() for key, vec in vectors.items()}
    if set(cpu) == set(SDXL_ENCODERS):
        from safetensors.torch import save_file

        path = _with_suffix(path, ".safetensors")
        meta = {"name": name, "step": str(step if step is not None else 0)}
        if sd_checkpoint:
            meta["sd_checkpoint"] = sd_checkpoint
        if sd_checkpoint_name:
            meta["sd_checkpoint_name"] = sd_checkpoint_name
        tensors = {key: cpu[key] for key in SDXL_ENCODERS}
        return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=meta))
    if set(cpu) != {DEFAULT_ENCODER}:
        raise TrainingError(f"cannot save an embedding with parts {sorted(cpu)}")
    path = _with_suffix(path, ".pt")
    data = {
        "string_to_token": dict(A1111_PLACEHOLDER),
        "string_to_param": {"*": cpu[DEFAULT_ENCODER]},
        "name": name,
        "step": step,
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }
    return atomic_write(path, lambda temp: torch.save(data, temp))


# ---------------------------------------------------------------------------------------------
# Training an embedding


class EmbeddingTrainable:
    """Learns the vectors of an existing embedding file (made with :func:`create_embedding`).

    While attached, the embedding is in the model's prompt encoder under :attr:`name` (the stem
    of ``output_path``), replacing any embedding of that name; captions use that name to reach
    it. The other embeddings stay usable and are restored exactly on :meth:`detach`.
    """

    kind = "embedding"

    def __init__(self, path: Path, output_path: Path, lr: float) -> None:
        self.path = Path(path)
        self.output_path = Path(output_path)
        self.lr = float(lr)
        self.name = check_output_name(self.output_path.stem if self.output_path.suffix.lower()
                                      in EMBEDDING_SUFFIXES else self.output_path.name)
        self.embedding: Embedding | None = None
        self.params: dict[str, nn.Parameter] = {}
        self.initial_step = 0           # the step stored in the source file (A1111 continues from it)
        self._model: Any = None
        self._previous: dict[str, Any] | None = None
        self._frozen: list[nn.Parameter] = []

    # -- installing ------------------------------------------------------------------------
    def attach(self, model: Any) -> list[dict[str, Any]]:
        if self._model is not None:
            raise TrainingError("this embedding is already attached to a model")
        try:
            source = read_embedding(self.path)
        except (EmbeddingFileError, OSError) as exc:
            raise TrainingError(f"cannot read the embedding to train: {exc}") from exc
        reason = mismatch_reason(source, model.text_widths)
        if reason is not None:
            raise TrainingError(f"embedding {self.path.name} cannot be trained on this model: {reason}")
        device = model_device(model)
        self.params = {key: nn.Parameter(vec.to(device=device, dtype=torch.float32).clone())
                       for key, vec in source.vectors.items()}
        # The path stays the source file (which exists) so infotext hashes of sample images work.
        self.embedding = Embedding(name=self.name, path=source.path, vectors=dict(self.params),
                                   step=source.step, sd_checkpoint=source.sd_checkpoint,
                                   sd_checkpoint_name=source.sd_checkpoint_name)
        self.initial_step = source.step or 0
        self.output_path = _with_suffix(self.output_path, embedding_suffix(model))
        self._frozen = freeze_model(model)
        self._previous = model.conditioner.embeddings
        self._model = model
        self._install(model, self._previous)
        return [{"params": list(self.params.values()), "lr": self.lr}]

    def _install(self, model: Any, others: dict[str, Any] | None) -> None:
        embeddings = {name: emb for name, emb in (others or {}).items() if name != self.name}
        embeddings[self.name] = self.embedding
        model.conditioner.set_embeddings(embeddings)

    def encode(
        self, model: Any, captions: list[str], clip_skip: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        conditioner = model.conditioner
        if conditioner.embeddings.get(self.name) is not self.embedding:
            # Something (a library refresh) handed the prompt encoder other embeddings: put ours back.
            self._install(model, conditioner.embeddings)
        # The vectors change with every optimizer step: conditioning cached for sample images is stale.
        cache = getattr(conditioner, "_cache", None)
        if cache is not None:
            cache.clear()
        return conditioner.encode_for_training(captions, clip_skip)

    # -- saving and resuming ---------------------------------------------------------------
    def save(self, path: Path, step: int, metadata: dict[str, str]) -> Path:
        if not self.params:
            raise TrainingError("attach the embedding before saving it")
        sd_checkpoint, sd_checkpoint_name = checkpoint_fields(metadata)
        path = Path(path)
        name = path.stem if path.suffix.lower() in EMBEDDING_SUFFIXES else path.name
        return write_embedding_file(path, self.params, name=name, step=int(step),
                                    sd_checkpoint=sd_checkpoint, sd_checkpoint_name=sd_checkpoint_name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: param.detach().to("cpu").clone() for key, param in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.params):
            raise TrainingError(
                f"saved training state holds {sorted(state)}, this embedding {sorted(self.params)}")
        for key, param in self.params.items():
            value = state[key]
            if tuple(value.shape) != tuple(param.shape):
                raise TrainingError(f"saved training state {key} has shape {list(value.shape)}, "
                                    f"the embedding {list(param.shape)}")
            with torch.no_grad():
                param.copy_(value.to(device=param.device, dtype=param.dtype))
        cache = getattr(getattr(self._model, "conditioner", None), "_cache", None)
        if cache is not None:
            cache.clear()

    # -- removing --------------------------------------------------------------------------
    def detach(self, model: Any) -> None:
        if self._model is None:
            return
        model.conditioner.set_embeddings(self._previous if self._previous is not None else {})
        unfreeze_model(self._frozen)
        self._frozen = []
        self._previous = None
        self._model = None
