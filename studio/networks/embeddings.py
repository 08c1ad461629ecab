"""Textual-inversion embedding files: reading every common layout and keeping a library of them.

This is the FILE side only (what A1111's ``modules/textual_inversion/textual_inversion.py`` does
before anything touches the text encoder). Semantics follow A1111:

- the prompt token is the file **stem** (not ``data["name"]``);
- layouts: A1111 ``.pt`` (``string_to_param`` with one entry, including the old
  ``nn.ParameterDict`` variant), SDXL ``{"clip_l", "clip_g"}``, and any dict holding a single
  tensor ("diffuser concepts": diffusers ``learned_embeds`` and kohya ``emb_params``), plus a bare
  tensor saved with ``torch.save``;
- embeddings whose width does not fit the loaded model are "skipped", not errors; files that are
  not usable at all (a refused pickle, an unreadable file, an unknown layout) are listed as
  skipped too, each with the ``reason`` (A1111 leaves them out of the list);
- the TI hash is the sha256 of the whole file, first 12 hex characters.

Pickles are only ever opened with ``torch.load(weights_only=True)``; the one extra class we allow
(``nn.ParameterDict``, for embeddings saved by torch 1.11-era A1111) carries no code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.models.catalog import sha256_file
from studio.networks.files import (
    load_weights_only,
    optional_int,
    optional_str,
    pickle_failure_message,
    scan_files,
)

if TYPE_CHECKING:
    import torch

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
TI_HASH_LENGTH = 12  # A1111 shows LoRA / TI hashes with 12 hex characters
DEFAULT_ENCODER = "default"  # key for single-text-encoder files (SD1 / SD2)
SDXL_ENCODERS = ("clip_l", "clip_g")


class EmbeddingFileError(ValueError):
    """A file that is not a readable textual-inversion embedding (the message names the file)."""


@dataclass
class Embedding:
    """One embedding file, its vectors per text encoder as float32 CPU tensors ``[n_vectors, width]``."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    _hash: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {key: int(vec.shape[-1]) for key, vec in self.vectors.items()}

    @property
    def shape(self) -> int:
        # A1111 reports one number; for SDXL it is clip_l + clip_g widths (768 + 1280 = 2048).
        return sum(self.widths.values())

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = sha256_file(self.path)[:TI_HASH_LENGTH]
        return self._hash

    def api_dict(self) -> dict[str, Any]:
        """The entry of A1111's ``/sdapi/v1/embeddings`` for this embedding."""
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape,
            "vectors": self.n_vectors,
        }


def unreadable_api_dict(reason: str) -> dict[str, Any]:
    """The ``skipped`` entry of a file that could not be read as an embedding: A1111's keys, with
    0 for ``shape`` and ``vectors`` (integers in A1111's schema, so typed clients still parse it),
    and why."""
    return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0, "vectors": 0,
            "reason": reason}


# ---------------------------------------------------------------------------------------------
# Reading one file


def read_embedding(path: Path) -> Embedding:
    """Read an embedding file; raise :class:`EmbeddingFileError` for anything that is not one."""
    path = Path(path)
    data = _load_raw(path)
    vectors = _vectors_from_data(data, path)
    meta = data if isinstance(data, Mapping) else {}
    return Embedding(
        name=path.stem,
        path=path,
        vectors=vectors,
        step=optional_int(meta.get("step")),
        sd_checkpoint=optional_str(meta.get("sd_checkpoint")),
        sd_checkpoint_name=optional_str(meta.get("sd_checkpoint_name")),
    )


def _load_raw(path: Path) -> Any:
    from safetensors.torch import load_file as load_safetensors
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise EmbeddingFileError(f"{path}: not a valid safetensors file ({exc})") from exc
    if suffix in (".pt", ".bin"):
        return _load_pickle(path)
    raise EmbeddingFileError(f"{path}: unsupported embedding file type {path.suffix!r}")


def _load_pickle(path: Path) -> Any:
    import torch
    try:
        return load_weights_only(path)
    except Exception as exc:
        if "ParameterDict" not in str(exc):
            raise EmbeddingFileError(_pickle_failure_message(path, exc)) from exc
    # Old A1111 files hold an nn.ParameterDict: allow exactly that container (and Parameter),
    # which torch rebuilds from tensors without running any code from the file.
    if not hasattr(torch.serialization, "safe_globals"):
        raise EmbeddingFileError(
            f"{path}: old-style embedding (nn.ParameterDict) needs torch >= 2.5 to load safely; "
            "re-save it with a newer trainer"
        )
    try:
        return load_weights_only(path, [torch.nn.ParameterDict, torch.nn.Parameter])
    except Exception as exc:
        raise EmbeddingFileError(_pickle_failure_message(path, exc)) from exc


def _pickle_failure_message(path: Path, exc: Exception) -> str:
    return pickle_failure_message(path, exc, "an embedding")


def _vectors_from_data(data: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch
    if isinstance(data, torch.Tensor):
        return {DEFAULT_ENCODER: _as_matrix(data, path, "tensor")}
    if not isinstance(data, Mapping):
        raise EmbeddingFileError(f"{path}: holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:
        return {DEFAULT_ENCODER: _a1111_vector(data["string_to_param"], path)}
    if all(key in data for key in SDXL_ENCODERS):
        return _sdxl_vectors(data, path)
    if len(data) == 1:
        key, value = next(iter(data.items()))
        if isinstance(value, torch.Tensor):  # diffusers learned_embeds / kohya emb_params
            return {DEFAULT_ENCODER: _as_matrix(value, path, str(key))}
    if len(data) > 1 and any(isinstance(value, torch.Tensor) for value in data.values()):
        raise EmbeddingFileError(f"{path}: embedding file has multiple terms in it ({_keys(data)})")
    raise EmbeddingFileError(
        f"{path}: neither a textual inversion embedding nor a diffusers concept (keys: {_keys(data)})"
    )


def _a1111_vector(param_dict: Any, path: Path) -> torch.Tensor:
    # nn.ParameterDict from old files keeps its tensors in _parameters (what A1111 unwraps too).
    params = getattr(param_dict, "_parameters", param_dict)
    if not isinstance(params, Mapping) or len(params) != 1:
        raise EmbeddingFileError(f"{path}: string_to_param must hold exactly one term")
    key, value = next(iter(params.items()))
    return _as_matrix(value, path, f"string_to_param[{key!r}]")


def _sdxl_vectors(data: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    vectors = {key: _as_matrix(data[key], path, key) for key in SDXL_ENCODERS}
    counts = {key: vec.shape[0] for key, vec in vectors.items()}
    if len(set(counts.values())) != 1:
        # Each prompt slot needs one vector per encoder, so the counts must agree.
        raise EmbeddingFileError(f"{path}: clip_l and clip_g have different vector counts {counts}")
    return vectors


def _as_matrix(value: Any, path: Path, label: str) -> torch.Tensor:
    import torch
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFileError(f"{path}: {label} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise EmbeddingFileError(f"{path}: {label} has dtype {value.dtype}, expected floating point")
    tensor = value.detach().to(device="cpu", dtype=torch.float32)
    if tensor.ndim == 1:  # single-vector diffusers files store [width]
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        shape = list(value.shape)
        raise EmbeddingFileError(f"{path}: {label} has shape {shape}, expected [n_vectors, width]")
    return tensor.contiguous()


def _keys(data: Mapping[Any, Any]) -> str:
    names = [str(key) for key in list(data)[:8]]
    return ", ".join(names) + (", …" if len(data) > 8 else "")


# ---------------------------------------------------------------------------------------------
# Compatibility with a model


def mismatch_reason(embedding: Embedding, widths: Mapping[str, int]) -> str | None:
    """Why ``embedding`` cannot be used with text encoders of ``widths``, or None if it can.

    A model with one text encoder takes only single-encoder files of its width; SDXL files are
    skipped there even though their clip_l part would fit (A1111 compares the summed width).
    A model with several encoders needs a file with exactly those parts and widths.
    """
    have = embedding.widths
    if len(widths) == 1:
        expected = next(iter(widths.values()))
        if DEFAULT_ENCODER in have and have[DEFAULT_ENCODER] == expected:
            return None
        if DEFAULT_ENCODER in have:
            return f"width {have[DEFAULT_ENCODER]} does not match this model (expects {expected})"
        return f"SDXL embedding ({_describe(have)}) does not match this model (expects {expected})"
    if have == dict(widths):
        return None
    if DEFAULT_ENCODER in have:
        return (
            f"single-encoder embedding of width {have[DEFAULT_ENCODER]} does not match this model "
            f"(expects {_describe(widths)})"
        )
    return f"widths {_describe(have)} do not match this model (expects {_describe(widths)})"


def _describe(widths: Mapping[str, int]) -> str:
    return " + ".join(f"{key} {width}" for key, width in widths.items())


# ---------------------------------------------------------------------------------------------
# The library of embedding folders


@dataclass
class _CachedFile:
    stamp: tuple[int, int]  # (mtime_ns, size): re-read only when either changes
    embedding: Embedding | None
    error: str | None


class EmbeddingLibrary:
    """All embedding files under some folders, re-scanned on :meth:`refresh`.

    ``embeddings`` maps names to every readable file regardless of model; :meth:`resolve` splits
    them into loaded / skipped for one model. ``errors`` maps names to why a file was not usable.
    """

    def __init__(self, folders: list[Path]) -> None:
        self.folders = [Path(folder) for folder in folders]
        self.embeddings: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}
        self._cache: dict[Path, _CachedFile] = {}
        self._lock = threading.Lock()  # the API and the UI may refresh at the same time

    def refresh(self) -> None:
        """Re-scan the folders; read new or changed files, forget removed ones. Never raises."""
        with self._lock:
            embeddings: dict[str, Embedding] = {}
            errors: dict[str, str] = {}
            cache: dict[Path, _CachedFile] = {}
            for path, stamp in self._scan():
                entry = self._cache.get(path)
                if entry is None or entry.stamp != stamp:
                    entry = _read_cached(path, stamp)
                cache[path] = entry
                _register(entry, path, embeddings, errors)
            # Swap whole dicts so readers never see a half-built library.
            self._cache, self.embeddings, self.errors = cache, embeddings, errors

    def resolve(self, widths: Mapping[str, int]) -> tuple[dict[str, Embedding], dict[str, str]]:
        """(usable embeddings, skipped name -> reason) for text encoders of ``widths``.

        ``widths`` is e.g. ``{"default": 768}`` (SD1), ``{"default": 1024}`` (SD2) or
        ``{"clip_l": 768, "clip_g": 1280}`` (SDXL).
        """
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, str] = {}
        for name, embedding in self.embeddings.items():
            reason = mismatch_reason(embedding, widths)
            if reason is None:
                loaded[name] = embedding
            else:
                skipped[name] = reason
        return loaded, skipped

    def api_dict(self, widths: Mapping[str, int]) -> dict[str, dict[str, dict[str, Any]]]:
        """A1111's ``GET /sdapi/v1/embeddings`` body for a model with text encoders of ``widths``.

        Every ``skipped`` entry has a ``reason`` beside A1111's keys: the width mismatch, or why the
        file could not be used at all (see :func:`unreadable_api_dict`). A name that is loaded is
        never also listed as skipped: a second file with a taken name stays in :attr:`errors` only.
        """
        embeddings, errors = self.embeddings, self.errors  # refresh() swaps both whole
        loaded, skipped = self.resolve(widths)
        body: dict[str, dict[str, dict[str, Any]]] = {
            "loaded": {name: emb.api_dict() for name, emb in loaded.items()},
            "skipped": {name: {**embeddings[name].api_dict(), "reason": reason} for name, reason in skipped.items()},
        }
        for name, reason in errors.items():
            if name not in embeddings:
                body["skipped"][name] = unreadable_api_dict(reason)
        return body

    def _scan(self) -> Iterator[tuple[Path, tuple[int, int]]]:
        # Sorted walk order across the folders in turn: _register lets the first file of a stem win.
        return scan_files(self.folders, EMBEDDING_SUFFIXES)


def _read_cached(path: Path, stamp: tuple[int, int]) -> _CachedFile:
    try:
        return _CachedFile(stamp, read_embedding(path), None)
    except EmbeddingFileError as exc:
        return _CachedFile(stamp, None, str(exc))
    except Exception as exc:  # OS errors and the like: one bad file must not break the scan
        return _CachedFile(stamp, None, f"{path}: {type(exc).__name__}: {exc}")


def _register(
    entry: _CachedFile, path: Path, embeddings: dict[str, Embedding], errors: dict[str, str]
) -> None:
    name = path.stem
    if entry.embedding is None:
        errors.setdefault(name, entry.error or f"{path}: unreadable")
        return
    if name in embeddings:
        # Same stem twice: the first one in folder order wins, as the prompt token is the stem.
        winner = embeddings[name].path
        errors.setdefault(name, f"{path}: ignored, the name {name!r} is already used by {winner}")
        return
    embeddings[name] = entry.embedding
