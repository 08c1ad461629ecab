"""Reading model files safely.

.safetensors headers are read without touching the tensors, so probing a 7 GB SDXL file
costs one small read. Pickled .ckpt/.pt files are opened only with
``torch.load(weights_only=True)``: a pickle that holds anything but tensors and plain
containers is refused, never executed.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

if TYPE_CHECKING:
    import torch

Shapes = dict[str, tuple[int, ...]]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
GGUF_SUFFIXES = (".gguf",)


class ModelFileError(ValueError):
    """A model file that is missing, truncated, corrupt, unsafe or of an unknown kind."""


def read_safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path.name}: file is truncated (no safetensors header)")
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:
                raise ModelFileError(f"{path.name}: not a safetensors file (header size {size})")
            raw = f.read(size)
            if len(raw) < size:
                raise ModelFileError(f"{path.name}: file is truncated inside its header")
            f.seek(0, 2)
            file_size = f.tell()
    except OSError as e:
        raise ModelFileError(f"{path.name}: cannot read file: {e}") from e
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ModelFileError(f"{path.name}: corrupt safetensors header") from e
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name}: corrupt safetensors header")
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + size + data_end > file_size:
        raise ModelFileError(
            f"{path.name}: file is truncated ({file_size} bytes, header promises {8 + size + data_end})"
        )
    return header


def safetensors_metadata(path: Path) -> dict[str, str]:
    return read_safetensors_header(path).get("__metadata__") or {}


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    # Lightning / A1111 checkpoints nest the weights under "state_dict" (sometimes twice).
    import torch
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path.name}: does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"{path.name}: refused to load: the pickle contains objects other than tensors "
            f"({str(e).splitlines()[0][:200]}). Convert it to .safetensors with a trusted tool."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelFileError(f"{path.name}: corrupt or truncated checkpoint ({e})") from e
    return _unwrap(obj, path)


def load_file(path: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, imported on the first read (it imports torch), not at start-up."""
    from safetensors.torch import load_file as load

    return load(path)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        read_safetensors_header(path)  # clear messages for truncation before safetensors' own
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{path.name}: corrupt safetensors file ({e})") from e
    if suffix in PICKLE_SUFFIXES:
        return load_pickle_weights(path)
    if suffix in GGUF_SUFFIXES:
        return load_gguf_weights(path)
    raise ModelFileError(f"{path.name}: unsupported file type {suffix!r}")


def load_gguf_weights(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors as diffusers reads them: quantized ones stay quantized (``GGUFParameter``,
    dequantized layer by layer when they run), F16/F32 ones are plain tensors."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path), return_tensors=True)
    except (ValueError, OSError, KeyError) as e:
        raise ModelFileError(f"{path.name}: cannot read this GGUF file ({str(e).splitlines()[0][:300]})") from e


def read_gguf_shapes(path: Path) -> Shapes:
    """Tensor names and logical shapes (GGUF stores dimensions innermost first)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise ModelFileError(f"{path.name}: not a readable GGUF file ({e})") from e
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def tensor_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The logical shape of a tensor, also for quantized GGUF data (stored as bytes per row)."""
    return tuple(getattr(tensor, "quant_shape", None) or tensor.shape)


def read_shapes(path: Path) -> Shapes:
    """Tensor names and shapes, read as cheaply as the format allows."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header = read_safetensors_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if path.suffix.lower() in GGUF_SUFFIXES:
        return read_gguf_shapes(path)
    return {k: tuple(v.shape) for k, v in load_state_dict(path).items()}
