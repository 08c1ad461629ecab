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

__all__ = [
    "FAMILIES",
    "base_family",
    "heads_for",
    "make_checkpoint",
    "make_diffusers_folder",
    "make_vae",
    "pipeline_class",
    "prediction_type",
    "te_heads",
    "tiny_components",
    "to_ldm_state_dict",
]
