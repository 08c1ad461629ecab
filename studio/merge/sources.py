"""The merger's inputs: which file each name is, what family it holds, and its tensors one at a time.

A safetensors input is described from its header alone and each tensor is read with a positioned
file read of its bytes, one tensor per call, so a merge never has a whole model in memory (not even
mapped: ``safe_open`` maps the file, and every page a merge touches would stay in the process's
resident memory until the file is closed). A pickled ``.ckpt`` is opened with
``torch.load(weights_only=True, mmap=True)`` (studio.models.state_dict): its tensors stay in the
mapped file until read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import RequestError
from studio.families.spec import family_label
from studio.merge.safetensors_writer import TensorSpec, dtype_from_name
from studio.models.catalog import CheckpointInfo, sha256_file
from studio.models.dit_arch import component_prefixes, dit_family
from studio.models.probe import probe_checkpoint
from studio.models.state_dict import (
    GGUF_SUFFIXES,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    ModelFileError,
    load_pickle_weights,
    read_safetensors_header,
)

if TYPE_CHECKING:
    import torch

# A1111's ``model_hash``: the sha256 of 64 KiB at 1 MiB, first 8 hex digits ("legacy_hash").
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000

Resolver = Callable[[str], Path | CheckpointInfo]


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint the merger reads, with A1111's names for it: ``name`` (the list's file name,
    written in ``sd_merge_models``) and ``model_name`` (used in the default output name)."""

    role: str                 # "A", "B" or "C"
    path: Path
    name: str
    model_name: str
    sha256: str | None = None

    @property
    def label(self) -> str:
        return f"model {self.role} ({self.name})"

    def full_hash(self) -> str:
        """The whole file's sha256 (the catalog's cached one when the resolver gave it)."""
        return self.sha256 or sha256_file(self.path)

    def legacy_hash(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(_LEGACY_OFFSET)
            return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]


def model_ref(role: str, query: str, resolve: Resolver) -> ModelRef:
    """``query`` through the caller's resolver (the catalog lookup, which raises RequestError for
    unknown names). The resolver may give the catalog entry, whose names and cached hash are
    A1111's, or a bare path."""
    found = resolve(query)
    if isinstance(found, (str, Path)):
        path = Path(found)
        return ModelRef(role, path, path.name, path.stem)
    if getattr(found, "is_diffusers", False):
        raise RequestError(f"model {role} ({found.name}) is a diffusers folder: the merger reads single-file "
                           "checkpoints (.safetensors or .ckpt)")
    return ModelRef(role, Path(found.path), found.name, found.model_name, found.sha256)


def read_metadata(path: Path) -> dict[str, Any]:
    """A file's safetensors metadata as A1111's ``read_metadata_from_safetensors`` gives it: values
    that look like JSON objects are parsed (so a merged model's recipe nests as an object)."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    out: dict[str, Any] = {}
    for key, value in (read_safetensors_header(path).get("__metadata__") or {}).items():
        out[key] = value
        if isinstance(value, str) and value.startswith("{"):
            with contextlib.suppress(ValueError):
                out[key] = json.loads(value)
    return out


class TensorSource:
    """One input file: tensor names, dtypes and shapes up front; data one tensor per :meth:`get`,
    inside :meth:`reading`."""

    def __init__(self, ref: ModelRef):
        self.ref = ref
        path = ref.path
        suffix = path.suffix.lower()
        if not path.is_file():
            raise RequestError(f"{ref.label}: file not found: {path}")
        self._tensors: dict[str, torch.Tensor] | None = None
        self._handle: Any = None
        self._offsets: dict[str, tuple[int, int]] = {}
        self._data_start = 0
        try:
            if suffix in SAFETENSORS_SUFFIXES:
                header = read_safetensors_header(path)
                self.specs = {k: TensorSpec(dtype_from_name(v["dtype"]), tuple(v["shape"]))
                              for k, v in header.items() if k != "__metadata__"}
                self._offsets = {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
                with open(path, "rb") as f:
                    self._data_start = 8 + int.from_bytes(f.read(8), "little")
            elif suffix in PICKLE_SUFFIXES:
                self._tensors = load_pickle_weights(path)
                self.specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in self._tensors.items()}
            elif suffix in GGUF_SUFFIXES:
                raise RequestError(f"{ref.label}: GGUF files are quantized and cannot be merged; merge the "
                                   "16-bit .safetensors files")
            else:
                raise RequestError(f"{ref.label}: cannot merge {suffix or 'extension-less'} files; use "
                                   ".safetensors or .ckpt")
        except (ModelFileError, ValueError) as e:
            if isinstance(e, RequestError):
                raise
            raise RequestError(f"{ref.label}: {e}") from e
        self.family = _family(self.specs, ref)
        # where a DiT's transformer weights sit: "model.diffusion_model." or "" (bare transformer files)
        self.transformer_prefix = component_prefixes(self.shapes).get("transformer", "model.diffusion_model.")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s.shape for k, s in self.specs.items()}

    @property
    def family_label(self) -> str:
        return family_label(self.family)

    @contextlib.contextmanager
    def reading(self) -> Iterator[TensorSource]:
        if self._tensors is not None:
            yield self
            return
        try:
            with open(self.ref.path, "rb") as handle:
                self._handle = handle
                yield self
        finally:
            self._handle = None

    def get(self, key: str) -> torch.Tensor:
        import torch
        if self._tensors is not None:
            return self._tensors[key]
        if self._handle is None:
            raise RuntimeError("TensorSource.get outside reading()")
        spec, (begin, end) = self.specs[key], self._offsets[key]
        if end == begin:
            return torch.empty(spec.shape, dtype=spec.dtype)
        data = torch.empty(end - begin, dtype=torch.uint8)   # not zero-filled: the read fills it
        self._handle.seek(self._data_start + begin)
        if self._handle.readinto(memoryview(data.numpy())) != end - begin:
            raise ModelFileError(f"{self.ref.path.name}: truncated safetensors file (tensor {key!r})")
        # safetensors stores little-endian, as torch on every platform the studio runs on
        return data.view(spec.dtype).reshape(spec.shape)

    def key_for(self, key: str, other: TensorSource) -> str:
        """``key`` of ``other`` as this file names it: DiT transformers come bare (BFL's files) or
        under ``model.diffusion_model.`` (all-in-one files) and merge with each other."""
        mine, theirs = self.transformer_prefix, other.transformer_prefix
        if mine == theirs or not key.startswith(theirs):
            return key
        return mine + key[len(theirs):]


def _family(specs: dict[str, TensorSpec], ref: ModelRef) -> str:
    shapes = {k: s.shape for k, s in specs.items()}
    family = dit_family(shapes)
    if family is not None:
        return family
    try:
        return probe_checkpoint(shapes, ref.name).family
    except ModelFileError as e:
        raise RequestError(f"model {ref.role}: {e}") from e


def check_same_family(a: TensorSource, other: TensorSource) -> None:
    if a.family != other.family:
        raise RequestError(
            f"Cannot merge {a.ref.label}, a {a.family_label} model, with {other.ref.label}, a "
            f"{other.family_label} model: their weights do not correspond. Merge models of one family.")
