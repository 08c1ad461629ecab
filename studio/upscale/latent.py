"""Hires-fix "latent" upscalers: resizing the latent tensor itself, before the second pass.

A1111 keeps these apart from the pixel upscalers (``shared.latent_upscale_modes``); each name maps
to a ``torch.nn.functional.interpolate`` mode and whether to antialias.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from studio.upscale.errors import UpscalerError

if TYPE_CHECKING:
    from torch import Tensor

# A1111's order: clients show the list as they get it.
_MODES: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {
        "Latent": ("bilinear", False),
        "Latent (antialiased)": ("bilinear", True),
        "Latent (bicubic)": ("bicubic", False),
        "Latent (bicubic antialiased)": ("bicubic", True),
        "Latent (nearest)": ("nearest", False),
        "Latent (nearest-exact)": ("nearest-exact", False),
    }
)

LATENT_MODES: tuple[str, ...] = tuple(_MODES)


def latent_mode(name: str) -> str | None:
    """The canonical A1111 spelling of a latent mode name (any case), or None if it is not one."""
    if name in _MODES:
        return name
    folded = name.strip().lower()
    for mode in LATENT_MODES:
        if mode.lower() == folded:
            return mode
    return None


def is_latent_mode(name: str | None) -> bool:
    """Whether hires fix should resize latents (True) or decoded pixels (False) for ``name``."""
    return name is not None and latent_mode(name) is not None


def latent_upscale(latents: Tensor, mode: str, height: int, width: int) -> Tensor:
    """``latents`` ([B, C, h, w]) resized to ``height`` x ``width`` latent pixels.

    ``mode`` is one of :data:`LATENT_MODES` (case-insensitive). The result keeps the input's
    dtype and device.
    """
    import torch
    import torch.nn.functional as F
    canonical = latent_mode(mode)
    if canonical is None:
        raise UpscalerError(
            f"unknown latent upscale mode {mode!r}; expected one of {', '.join(LATENT_MODES)}"
        )
    if latents.ndim != 4:
        raise UpscalerError(
            f"latents must be [batch, channels, height, width], got shape {tuple(latents.shape)}"
        )
    if height < 1 or width < 1:
        raise UpscalerError(f"latent size must be positive, got {height}x{width}")
    interpolation, antialias = _MODES[canonical]
    # float32/64: the dtypes every interpolate mode supports on every device; half precision
    # bicubic/antialias has no CPU kernel, and the resize is far too cheap for the round trip to matter.
    source = latents if latents.dtype in (torch.float32, torch.float64) else latents.float()
    # align_corners only exists for the linear family; A1111 leaves it at False.
    extra = {"align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
    resized = F.interpolate(source, size=(height, width), mode=interpolation, antialias=antialias, **extra)
    return resized.to(latents.dtype)


def latent_modes_api() -> list[dict]:
    """A1111's ``GET /sdapi/v1/latent-upscale-modes`` body."""
    return [{"name": name} for name in LATENT_MODES]
