"""SD3 / SD3.5 (Medium, Large, Large Turbo): Stability's MMDiT through diffusers' converter (it reads
the depth and norms from the keys), CLIP-L and OpenCLIP bigG with their projections + T5, the SD3 VAE,
unpacked latents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.devices import DevicePolicy
from studio.families.dit_engine import DiTEngine
from studio.models.state_dict import Shapes


class SD3Engine(DiTEngine):
    family_id = "sd3"
    vae_family = "sd3"
    clip_projection = True

    def variant(self, shapes: Shapes, prefix: str, name: str) -> str:
        """SD3.5 Large Turbo has exactly Large's tensors: its file name says it."""
        return "turbo" if "turbo" in name.lower() else "base"

    def build_transformer(self, weights: dict[str, torch.Tensor], shapes: Shapes, prefix: str,
                          policy: DevicePolicy, config_cache: Path, name: str) -> Any:
        from diffusers import SD3Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        from studio.models.dit_arch import sd3_transformer_config
        from studio.models.dit_modules import build_transformer, strip

        converted = convert_sd3_transformer_checkpoint_to_diffusers(strip(weights, prefix))
        return build_transformer(SD3Transformer2DModel, sd3_transformer_config(shapes, prefix), converted, policy,
                                 config_cache, name)

    def conditioner(self, model: Any) -> Any:
        from studio.prompts.dit_encode import SD3Conditioner

        return SD3Conditioner(model)

    def denoiser(self, model: Any) -> Any:
        from studio.generation.dit_denoisers import SD3Denoiser

        return SD3Denoiser(model.unet, model.policy.dtype)


ENGINE = SD3Engine()
