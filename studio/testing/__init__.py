"""Tiny random Stable Diffusion models for tests and the built-in demo model."""

from studio.models.ldm_keys import base_family, to_ldm_state_dict
from studio.testing.factory import (
    FAMILIES,
    heads_for,
    make_checkpoint,
    make_diffusers_folder,
    make_vae,
    pipeline_class,
    prediction_type,
    te_heads,
    tiny_components,
)
from studio.testing.flux import (
    FLUX_VARIANTS,
    make_clip_l,
    make_flux_checkpoint,
    make_flux_lora,
    make_flux_transformer,
    make_flux_vae,
    make_t5xxl,
    tiny_flux_components,
    write_flux_configs,
)
from studio.testing.quantized import (
    make_fp8_variant,
    make_gguf_variant,
)
from studio.testing.sd3 import (
    SD3_VARIANTS,
    make_sd3_checkpoint,
    make_sd3_transformer,
    tiny_sd3_components,
    write_sd3_configs,
)

__all__ = [
    "FAMILIES",
    "FLUX_VARIANTS",
    "SD3_VARIANTS",
    "base_family",
    "heads_for",
    "make_checkpoint",
    "make_clip_l",
    "make_diffusers_folder",
    "make_flux_checkpoint",
    "make_flux_lora",
    "make_flux_transformer",
    "make_flux_vae",
    "make_fp8_variant",
    "make_gguf_variant",
    "make_sd3_checkpoint",
    "make_sd3_transformer",
    "make_t5xxl",
    "make_vae",
    "pipeline_class",
    "prediction_type",
    "te_heads",
    "tiny_components",
    "tiny_flux_components",
    "tiny_sd3_components",
    "to_ldm_state_dict",
    "write_flux_configs",
    "write_sd3_configs",
]
