"""Device and dtype policy: the fastest correct choice per device, overridable by flags.

- CUDA: fp16 weights, PyTorch SDPA attention (xformers when installed and asked for);
  the VAE stays fp16 unless --no-half-vae (a NaN decode is retried in fp32 by the engine).
- CPU: bf16 when the CPU has native bf16 matmuls (AMX or AVX512-BF16): measured 3.1x per
  UNet step on this project's CI CPU; otherwise fp32, because emulated bf16 is slower.
- MPS: fp16.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    dtype: torch.dtype          # UNet and text encoders
    vae_dtype: torch.dtype
    attention: str              # "sdpa" | "xformers" | "sliced"
    reason: str
    # oneDNN's bf16 (AMX) convolutions want NHWC: measured on this project's CPU at 256²,
    # VAE decode 1.07 s -> 0.43 s and a UNet step 1.57 s -> 1.21 s; fp32 gains nothing.
    channels_last: bool = False

    @property
    def label(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        vae = str(self.vae_dtype).removeprefix("torch.")
        layout = " · channels_last" if self.channels_last else ""
        return f"{self.device.type} · {name} (VAE {vae}) · {self.attention}{layout} — {self.reason}"


def pick_device(requested: str | None) -> torch.device:
    import torch
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def resolve_policy(
    device: str | None = None,
    no_half: bool = False,
    no_half_vae: bool = False,
    precision: str = "autocast",
    want_xformers: bool = False,
    split_attention: bool = False,
    force_channels_last: bool = False,
) -> DevicePolicy:
    """``split_attention`` (--opt-split-attention) computes attention in slices to save memory; it
    replaces SDPA, which is already memory-efficient and faster, so it is never on by default."""
    import torch
    dev = pick_device(device)
    full = no_half or precision == "full"
    if dev.type == "cuda":
        dtype, reason = (torch.float32, "--no-half") if full else (torch.float16, "CUDA fp16")
        if precision == "bf16" and not full:
            dtype, reason = torch.bfloat16, "--precision bf16"
    elif dev.type == "mps":
        dtype, reason = (torch.float32, "--no-half") if full else (torch.float16, "MPS fp16")
    else:
        if full:
            dtype, reason = torch.float32, "--no-half"
        elif precision in ("bf16", "half") or cpu_has_fast_bf16():
            dtype, reason = torch.bfloat16, "CPU with native bf16 (AMX/AVX512-BF16)"
        else:
            dtype, reason = torch.float32, "CPU without native bf16"
    vae_dtype = torch.float32 if (no_half_vae or full) else dtype
    attention = "xformers" if (want_xformers and dev.type == "cuda" and xformers_available()) else "sdpa"
    if split_attention:
        attention = "sliced"
    channels_last = force_channels_last or (dev.type == "cpu" and dtype == torch.bfloat16)
    return DevicePolicy(device=dev, dtype=dtype, vae_dtype=vae_dtype, attention=attention, reason=reason,
                        channels_last=channels_last)


class DeferredPolicy:
    """The device policy, resolved the first time something asks for it (a model load, a generation,
    the footer): resolving imports torch and probes the device, which the server's start must not
    wait for. The choice is logged then. Safe to ask from several threads."""

    def __init__(self, resolve: Callable[[], DevicePolicy]) -> None:
        self._resolve = resolve
        self._policy: DevicePolicy | None = None
        self._lock = threading.Lock()

    @property
    def resolved(self) -> bool:
        return self._policy is not None

    def get(self) -> DevicePolicy:
        with self._lock:
            if self._policy is None:
                self._policy = self._resolve()
                log.info("Device policy: %s", self._policy.label)
            return self._policy


def memory_report(device: torch.device) -> dict:
    """The /sdapi/v1/memory shape (A1111)."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    report: dict = {"ram": {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}}
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        report["cuda"] = {
            "system": {"free": free, "used": total - free, "total": total},
            "active": {"current": stats.get("active_bytes.all.current", 0),
                       "peak": stats.get("active_bytes.all.peak", 0)},
            "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                          "peak": stats.get("allocated_bytes.all.peak", 0)},
            "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                         "peak": stats.get("reserved_bytes.all.peak", 0)},
            "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                         "peak": stats.get("inactive_split_bytes.all.peak", 0)},
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
    else:
        report["cuda"] = {"error": f"no CUDA device (running on {device.type})"}
    return report
