"""A streaming ``.safetensors`` writer: the header first, then one tensor at a time.

``safetensors.torch.save_file`` takes the whole ``{name: tensor}`` dict, so saving a merged SDXL
model with it means holding all 7 GB of results in memory at once. The format needs only each
tensor's dtype and shape up front (they fix the offsets in the header), and those are known before
any weight is computed, so this writer takes them first, writes the header, and then accepts the
tensors one by one in header order, each dropped as soon as its bytes are on disk.

The layout is the one ``save_file`` writes (checked byte for byte in the tests): an 8-byte
little-endian header length; a compact JSON header with ``__metadata__`` first, then one
``{"dtype", "shape", "data_offsets"}`` entry per tensor in data order; spaces up to a multiple of
8 bytes; the raw little-endian tensor bytes. Tensors are laid out as safetensors lays them out,
widest dtype first, then by name, so every tensor starts at an offset aligned to its element size
(memory-mapping readers rely on that).
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

# safetensors' names and torch's; the order is that of safetensors' Rust ``Dtype`` enum, which
# ``save_file`` sorts by (descending) to lay the data out. Names, not dtypes: torch is imported when a
# merge writes, not when the studio starts.
_DTYPE_ORDER: tuple[tuple[str, str], ...] = (
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
)


@functools.cache
def _dtype_order() -> tuple[tuple[str, torch.dtype], ...]:
    import torch

    return tuple((name, getattr(torch, attr)) for name, attr in _DTYPE_ORDER)


@functools.cache
def dtypes() -> dict[str, torch.dtype]:
    """safetensors' dtype names -> torch dtypes."""
    return dict(_dtype_order())


@functools.cache
def dtype_names() -> dict[torch.dtype, str]:
    return {dtype: name for name, dtype in _dtype_order()}


@functools.cache
def _rank() -> dict[torch.dtype, int]:
    return {dtype: i for i, (_, dtype) in enumerate(_dtype_order())}


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of a tensor before its data exists."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        import torch
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def dtype_from_name(name: str) -> torch.dtype:
    """A torch dtype from a safetensors header's dtype name."""
    try:
        return dtypes()[name]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {name!r}") from None


class SafetensorsWriter:
    """Write ``specs`` to ``stream`` as a safetensors file, one :meth:`write` per tensor, in
    :attr:`order`. The header is written by the constructor; :meth:`finish` checks that every
    tensor came. ``metadata`` becomes the header's ``__metadata__`` (left out when None, as
    ``save_file`` does)."""

    def __init__(self, stream: BinaryIO, specs: Mapping[str, TensorSpec],
                 metadata: Mapping[str, str] | None = None):
        if sys.byteorder != "little":  # the format is little-endian; tensors are written as they lie in memory
            raise RuntimeError("the streaming safetensors writer needs a little-endian machine")
        for name, spec in specs.items():
            if spec.dtype not in _rank():
                raise ValueError(f"{name}: dtype {spec.dtype} cannot be stored in safetensors")
        if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("safetensors metadata values must be strings")
        self._stream = stream
        self.order: list[str] = sorted(specs, key=lambda n: (-_rank()[specs[n].dtype], n))
        self._specs = dict(specs)
        self._next = 0
        header: dict[str, object] = {}
        if metadata is not None:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name in self.order:
            spec = specs[name]
            header[name] = {"dtype": dtype_names()[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        stream.write(struct.pack("<Q", len(raw)))
        stream.write(raw)
        self.data_bytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor's data. It must be the one :attr:`order` names next, with its spec's
        dtype and shape: a file whose data disagrees with its header would load as garbage."""
        import torch
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing more"
            raise ValueError(f"tensor {name!r} written out of order (expected {expected!r})")
        spec = self._specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the header says "
                             f"{spec.dtype} {spec.shape}")
        if tensor.numel():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            self._stream.write(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self.order):
            raise ValueError(f"{len(self.order) - self._next} tensors were never written "
                             f"(next: {self.order[self._next]!r})")
