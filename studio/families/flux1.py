"""FLUX.1 (dev, schnell, Fill, Kontext): BFL's transformer (widths from shapes, our key renaming),
CLIP-L's unprojected pooled vector + T5, the FLUX VAE, 2x2-packed latents with RoPE position ids and
the distilled guidance input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.devices import DevicePolicy
from studio.families.dit_engine import DiTEngine
from studio.models.state_dict import Shapes


class Flux1Engine(DiTEngine):
    family_id = "flux1"
    vae_family = "flux"
    clip_projection = False

    def variant(self, shapes: Shapes, prefix: str, name: str) -> str:
        """schnell / Fill / Control from the tensors; Kontext has exactly dev's, so its file name says it."""
        from studio.models.dit_arch import flux_variant

        variant = flux_variant(shapes, prefix)
        return "kontext" if variant == "dev" and "kontext" in name.lower() else variant

    def build_transformer(self, weights: dict[str, torch.Tensor], shapes: Shapes, prefix: str,
                          policy: DevicePolicy, config_cache: Path, name: str) -> Any:
        from diffusers import FluxTransformer2DModel

        from studio.models.dit_arch import flux_transformer_config
        from studio.models.dit_modules import build_transformer
        from studio.models.flux_keys import flux_to_diffusers

        return build_transformer(FluxTransformer2DModel, flux_transformer_config(shapes, prefix),
                                 flux_to_diffusers(weights, prefix), policy, config_cache, name)

    def conditioner(self, model: Any) -> Any:
        from studio.prompts.dit_encode import FluxConditioner

        return FluxConditioner(model)

    def denoiser(self, model: Any) -> Any:
        from studio.generation.dit_denoisers import FluxDenoiser

        return FluxDenoiser(model.unet, model.policy.dtype)


ENGINE = Flux1Engine()
