"""One engine per DiT family: what differs between SD3, FLUX.1 and the families after them --
how the transformer is built from a file, which text encoders and VAE it takes, how prompts become
its conditioning, and how its transformer is called. The flow sampling loop, the loader's file
handling and the doors are shared; a family is a module ``studio.families.<id>`` exposing ``ENGINE``.

The defaults here serve the families whose parts are the common ones (CLIP, T5, the 16-channel VAE);
a family overrides what it does differently.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from studio.devices import DevicePolicy
from studio.families.spec import FamilySpec, family_spec
from studio.models.state_dict import Shapes


class DiTEngine:
    family_id = ""
    vae_family = "flux"          # which published 16-channel VAE statistics the family's VAE uses

    @property
    def spec(self) -> FamilySpec:
        return family_spec(self.family_id)

    def variant(self, shapes: Shapes, prefix: str, name: str) -> str:
        return "base"

    def build_transformer(self, weights: dict[str, torch.Tensor], shapes: Shapes, prefix: str,
                          policy: DevicePolicy, config_cache: Path, name: str) -> Any:
        raise NotImplementedError

    def build_vae(self, weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy, name: str) -> Any:
        from studio.models.dit_modules import build_vae16

        return build_vae16(weights, prefix, self.vae_family, policy, name)

    def build_text_encoder(self, kind: str, weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy,
                           name: str) -> tuple[Any, Any]:
        """(encoder, tokenizer) of one module kind ("clip_l", "clip_g", "t5xxl", ...)."""
        from studio.models.bundled_tokenizers import t5_tokenizer
        from studio.models.dit_modules import build_clip, build_t5
        from studio.models.tokenizer import make_clip_tokenizer

        if kind == "t5xxl":
            return build_t5(weights, prefix, policy, name), t5_tokenizer()
        if kind in ("clip_l", "clip_g"):
            encoder = build_clip(weights, prefix, self.clip_projection, policy, name)
            return encoder, make_clip_tokenizer(pad_token="!" if kind == "clip_g" else "<|endoftext|>")
        raise ValueError(f"{self.spec.label} has no text encoder of kind {kind!r}")

    clip_projection = False      # SD3 reads CLIP-L's projected pooled vector, FLUX the unprojected one

    def latent_codec(self, model: Any) -> Any:
        """The sampler's latents <-> the VAE's; None = scale and shift (generation/txt2img.ScaleShiftCodec)."""
        return None

    def conditioner(self, model: Any) -> Any:
        raise NotImplementedError

    def denoiser(self, model: Any) -> Any:
        raise NotImplementedError


def dit_engine(family_id: str) -> DiTEngine:
    """The engine of a DiT family (``studio/families/<id>.py``)."""
    module = importlib.import_module(f"studio.families.{family_id.replace('-', '_')}")
    return module.ENGINE
