"""fp8 and GGUF re-saves of tiny model files, as such files are shared.

* :func:`make_fp8_variant`: the same names with the weights stored as
  ``torch.float8_e4m3fn`` or ``float8_e5m2`` (Kijai's ``flux1-dev-fp8.safetensors``,
  ComfyUI's ``*_fp8_e4m3fn.safetensors`` and fp8 checkpoints).
* :func:`make_gguf_variant`: a GGUF file written with the ``gguf`` package, as city96's
  FLUX/SD3 GGUF conversions are (``flux1-dev-Q8_0.gguf``, ``flux1-dev-Q4_0.gguf``):
  original tensor names without any prefix, ``general.architecture`` naming the model,
  matrices quantized and vectors (biases, norm scales) kept in F32.

The ``gguf`` package quantizes only the legacy block types (Q8_0, Q5_x, Q4_x) and BF16;
it can read but not write the K-quants (Q4_K, Q6_K ...), so those are not offered.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from studio.testing.dit_parts import TRANSFORMER_PREFIX, save_safetensors

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The types gguf-py can write and diffusers' GGUF loader can read.
GGUF_QTYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16")


def _read(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    return load_file(str(path)), metadata


def make_fp8_variant(
    src: str | Path,
    dst: str | Path,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    only_prefix: str = "",
    vectors: bool = False,
) -> Path:
    """Re-save the safetensors file ``src`` as ``dst`` with its weights in ``fp8_dtype``.

    Only tensors whose names start with ``only_prefix`` are cast (``"model.diffusion_model."``
    keeps the VAE and text encoders of an all-in-one file as they are, as ComfyUI's fp8
    checkpoints do). Matrices (2-D and up) are cast; vectors (biases, norm scales) keep
    their dtype unless ``vectors``, the two flavours such files come in.
    """
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be one of {FP8_DTYPES}, not {fp8_dtype}")
    tensors, metadata = _read(src)

    def converted(name: str, value: Tensor) -> Tensor:
        selected = name.startswith(only_prefix) and value.is_floating_point()
        return value.to(fp8_dtype) if selected and (value.ndim >= 2 or vectors) else value

    return save_safetensors(dst, {k: converted(k, v) for k, v in tensors.items()}, metadata)


def _gguf_type(value: np.ndarray, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """F32 for vectors (and scalars); F16 for what the block type cannot hold (a row
    that is not a whole number of blocks, or more than 2 dimensions); else ``qtype``."""
    if value.ndim <= 1:
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if value.ndim > 2 or value.shape[-1] % block_size:
        return gguf.GGMLQuantizationType.F16
    return qtype


def make_gguf_variant(
    src: str | Path,
    dst: str | Path,
    qtype: str = "Q8_0",
    *,
    arch: str = "flux",
) -> Path:
    """Write the transformer in the safetensors file ``src`` as the GGUF file ``dst``.

    Names lose a ``model.diffusion_model.`` prefix (GGUF files hold the bare
    transformer, in the original names). ``qtype`` is one of :data:`GGUF_QTYPES`;
    ``arch`` goes into ``general.architecture`` (``"flux"``, ``"sd3"``) as city96's
    converter writes it. The file is a pure function of ``src``.
    """
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype must be one of {GGUF_QTYPES}, not {qtype!r}")
    quant = gguf.GGMLQuantizationType[qtype]
    tensors, _ = _read(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(dst), arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    for name, value in tensors.items():
        data = value.float().numpy()
        tensor_type = _gguf_type(data, quant)
        writer.add_tensor(name.removeprefix(TRANSFORMER_PREFIX), gguf.quants.quantize(data, tensor_type),
                          raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
