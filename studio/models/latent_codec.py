"""The sampler's latents and the VAE's input are related by a fixed map per family: ``z / scale + shift``
for SD, SD3 and FLUX (shift 0 for SD's VAEs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def shift_factor(vae: Any) -> float:
    """The 16-channel VAEs (SD3, FLUX) centre their latents: ``(z - shift) * scale``; SD's have no shift."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


class ScaleShiftCodec:
    """The sampler's latents <-> what the VAE takes: ``z / scale + shift`` and back. SD's VAEs have no shift,
    the 16-channel SD3/FLUX ones do; a family with another latent space (FLUX.2's normalised, patchified
    latents) gives its own codec (studio/families/<id>.py)."""

    def __init__(self, vae: Any):
        self.vae = vae

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor + shift_factor(self.vae)

    def from_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - shift_factor(self.vae)) * self.vae.config.scaling_factor
