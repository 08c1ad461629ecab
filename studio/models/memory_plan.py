"""How a model is placed on the GPU when no flag says: all of it, one component at a time (model
offload, A1111's --medvram), or block by block (--lowvram), from the free VRAM and the model's size,
the way Forge decides it from its "GPU Weights" budget. Pure arithmetic, so it is tested without a GPU.

- ``--medvram`` / ``--lowvram`` (and ``--medvram-sdxl`` for SDXL) always win;
- the "GPU weights" setting (MB, 0 = automatic) caps what the weights may occupy; automatic is the free
  VRAM less a reserve for activations (the VAE decode of a large image, attention at high resolution);
- everything fits: no offload; the largest component fits: model offload; else block by block.
On the CPU nothing moves: the weights stay in RAM in the file's dtype (studio/models/storage.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from studio.offload import OffloadMode

# What inference itself needs besides the weights at 1024² (FLUX/SDXL activations, VAE decode): the
# figure Forge reserves by default ("inference memory"), rounded.
INFERENCE_RESERVE_BYTES = 1536 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    mode: OffloadMode
    reason: str

    def describe(self) -> str:
        names = {OffloadMode.NONE: "all weights on the GPU", OffloadMode.MEDVRAM: "model offload",
                 OffloadMode.LOWVRAM: "block-by-block offload"}
        return f"{names[self.mode]} ({self.reason})"


def plan_placement(flag_mode: OffloadMode, device_type: str, component_bytes: Mapping[str, int],
                   free_bytes: int | None, gpu_weights_bytes: int = 0,
                   reserve_bytes: int = INFERENCE_RESERVE_BYTES) -> MemoryPlan:
    if flag_mode is not OffloadMode.NONE:
        return MemoryPlan(flag_mode, f"--{flag_mode.value}")
    if device_type == "cpu":
        return MemoryPlan(OffloadMode.NONE, "CPU: weights stay in RAM in their stored dtype")
    if gpu_weights_bytes > 0:
        budget, source = gpu_weights_bytes, f"GPU weights setting {gpu_weights_bytes / GIB:.1f} GB"
    elif free_bytes is None:
        return MemoryPlan(OffloadMode.NONE, "free VRAM unknown")
    else:
        budget = free_bytes - reserve_bytes
        source = f"{free_bytes / GIB:.1f} GB free, {reserve_bytes / GIB:.1f} GB kept for inference"
    total = sum(component_bytes.values())
    largest = max(component_bytes.values(), default=0)
    if total <= budget:
        return MemoryPlan(OffloadMode.NONE, f"{total / GIB:.1f} GB fit: {source}")
    if largest <= budget:
        return MemoryPlan(OffloadMode.MEDVRAM, f"{total / GIB:.1f} GB do not fit, the largest part "
                                               f"({largest / GIB:.1f} GB) does: {source}")
    return MemoryPlan(OffloadMode.LOWVRAM, f"even the largest part ({largest / GIB:.1f} GB) does not fit: "
                                           f"{source}")


def plan_fp8_storage(device_type: str, component_bytes: Mapping[str, int], denoiser: str, stored_bits: int,
                     free_bytes: int | None, gpu_weights_bytes: int = 0,
                     reserve_bytes: int = INFERENCE_RESERVE_BYTES) -> bool:
    """Whether to keep a 16-bit DiT transformer in fp8 on this GPU: when the model does not fit as it is
    but does with the transformer's weights halved (fp8 files users download make the same trade)."""
    if device_type != "cuda" or stored_bits != 16:
        return False
    budget = gpu_weights_bytes if gpu_weights_bytes > 0 else (None if free_bytes is None else free_bytes - reserve_bytes)
    if budget is None:
        return False
    total = sum(component_bytes.values())
    return total > budget and total - component_bytes[denoiser] // 2 <= budget

