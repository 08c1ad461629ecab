"""Weights kept in the file's dtype (fp8, bf16, fp16) and upcast one layer at a time while it runs.

A FLUX.1 transformer is 12 B parameters: 24 GB in bf16, 12 GB in fp8, 48 GB if everything were
cast to float32 for the CPU. So the big matrices stay as they are stored and each ``Linear`` casts
its own weight to the compute dtype inside its forward; the small tensors (norms, embeddings, biases)
are cast once. ComfyUI and Forge do the same ("fp8 weights, compute in bf16/fp32").

diffusers' ``enable_layerwise_casting`` would cast biases and other parameters of each layer to the
storage dtype as well, which for an fp8 file turns its bf16 biases into 3-bit-mantissa values; the
file's own dtypes are kept here instead, so a layer computes exactly what the file holds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def _upcasting_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight.to(x.dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    return forward


def is_quantized(tensor: torch.Tensor) -> bool:
    """GGUF data (diffusers' ``GGUFParameter``) manages its own dequantization."""
    return hasattr(tensor, "quant_type")


def keep_storage_dtype(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Make every ``Linear`` whose weight is stored in another floating dtype than ``compute_dtype``
    upcast it per call; cast every other floating parameter and buffer to ``compute_dtype``.
    Returns how many layers compute from stored weights."""
    kept = 0
    stored: set[int] = set()
    for child in module.modules():
        if isinstance(child, nn.Linear) and not is_quantized(child.weight) \
                and child.weight.dtype != compute_dtype and child.weight.is_floating_point():
            child.forward = _upcasting_forward(child)
            stored.add(id(child.weight))
            kept += 1
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) in stored or is_quantized(tensor) or not tensor.is_floating_point():
                continue
            if tensor.dtype != compute_dtype:
                tensor.data = tensor.data.to(compute_dtype)
    return kept


def storage_label(module: nn.Module) -> str:
    """The dominant dtype of a module's weight matrices, as users name files ("fp8_e4m3fn", "bf16")."""
    counts: dict[str, int] = {}
    for param in module.parameters():
        if param.ndim < 2:
            continue
        if is_quantized(param):
            name = f"gguf {param.quant_type.name}"
        else:
            name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
                param.dtype, str(param.dtype).removeprefix("torch.").replace("float8_", "fp8_"))
        counts[name] = counts.get(name, 0) + param.numel()
    return max(counts, key=counts.get) if counts else "empty"


def to_fp8_storage(module: nn.Module, compute_dtype: torch.dtype, fp8: torch.dtype | None = None) -> int:
    """Store every floating ``Linear`` weight of ``module`` as fp8 (e4m3fn) and compute from it layer by
    layer, as an fp8 file would be: half of bf16's memory, for a model that does not fit the GPU otherwise.
    Returns how many matrices were converted."""
    fp8 = fp8 or torch.float8_e4m3fn
    converted = 0
    with torch.no_grad():
        for child in module.modules():
            weight = getattr(child, "weight", None)
            if isinstance(child, nn.Linear) and weight is not None and not is_quantized(weight) \
                    and weight.is_floating_point() and weight.dtype not in FP8_DTYPES:
                weight.data = weight.data.to(fp8)
                converted += 1
    keep_storage_dtype(module, compute_dtype)
    return converted

