"""Tiny random SD3 / SD3.5 models in Stability's single-file layout.

The MMDiT keeps the real structure of each variant and the shape conventions a loader
reads: ``x_embedder.proj`` gives patch size and latent channels, ``pos_embed`` the
``pos_embed_max_size`` (its square), ``context_embedder`` T5's width, ``y_embedder`` the
pooled CLIP-L + bigG width, the ``joint_blocks`` count the depth. As in every real SD3
(2B: 24 blocks x 64 = 1536 wide, 3.5 Large: 38 x 64 = 2432), the head count equals the
depth; the tiny heads are 32 wide, so 2 blocks are 64 wide. The variants:

* ``sd3-medium`` (SD3 Medium): no q/k norms;
* ``sd3.5-large`` (SD3.5 Large / Large Turbo): RMS q/k norms (``attn.ln_q``/``ln_k``);
* ``sd3.5-medium`` (SD3.5 Medium, MMDiT-X): q/k norms, a second self-attention
  (``x_block.attn2``) in the first blocks, and twice the position table.

The last block's context stream is "pre-only" (no ``attn.proj``, no ``mlp``), as in the
real models. ``write_sd3_configs`` writes the matching diffusers configs, which
``from_single_file(..., config=...)`` needs because diffusers identifies SD3 files by
full-size shapes only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor

from studio.testing.dit_parts import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    LATENT_CHANNELS_16,
    T5_HIDDEN,
    T5_PREFIX,
    TRANSFORMER_PREFIX,
    Rule,
    build_clip_g,
    build_clip_l,
    build_t5,
    build_vae16,
    cast,
    clip_g_config,
    clip_l_config,
    clip_state_dict,
    prefixed,
    randomised,
    save_safetensors,
    seeded,
    t5_config,
    t5_state_dict,
    to_original,
    vae16_config,
    vae16_state_dict,
    write_json,
)
from studio.testing.factory import UNET_SAMPLE_SIZE

SD3_VARIANTS = ("sd3-medium", "sd3.5-large", "sd3.5-medium")
VAE_PREFIX = "first_stage_model."

SD3_DEPTH = 2
SD3_HEAD_DIM = 32
SD3_PATCH_SIZE = 2
# Real: 192 (SD3 Medium, SD3.5 Large) and 384 (SD3.5 Medium).
SD3_POS_EMBED_MAX = 16


def _check(variant: str) -> str:
    if variant not in SD3_VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; expected one of {SD3_VARIANTS}")
    return variant


def sd3_transformer_config(variant: str = "sd3-medium") -> dict[str, Any]:
    """diffusers ``SD3Transformer2DModel`` config of the tiny ``variant``."""
    _check(variant)
    hidden = SD3_HEAD_DIM * SD3_DEPTH
    return {
        "sample_size": UNET_SAMPLE_SIZE,
        "patch_size": SD3_PATCH_SIZE,
        "in_channels": LATENT_CHANNELS_16,
        "out_channels": LATENT_CHANNELS_16,
        "num_layers": SD3_DEPTH,
        "attention_head_dim": SD3_HEAD_DIM,
        "num_attention_heads": SD3_DEPTH,
        "joint_attention_dim": T5_HIDDEN,
        "caption_projection_dim": hidden,
        "pooled_projection_dim": clip_l_config().hidden_size + clip_g_config().hidden_size,
        "pos_embed_max_size": SD3_POS_EMBED_MAX * (2 if variant == "sd3.5-medium" else 1),
        # SD3.5 Medium has the second attention in blocks 0-12 of 24.
        "dual_attention_layers": (0,) if variant == "sd3.5-medium" else (),
        "qk_norm": None if variant == "sd3-medium" else "rms_norm",
    }


def _build_transformer(variant: str) -> SD3Transformer2DModel:
    return randomised(SD3Transformer2DModel(**sd3_transformer_config(variant)))


def tiny_sd3_components(variant: str = "sd3-medium", seed: int = 0) -> dict[str, Any]:
    """Freshly built diffusers/transformers modules of a tiny SD3 ``variant``, named as in
    diffusers' ``StableDiffusion3Pipeline``: ``transformer``, ``vae``, ``text_encoder``
    (CLIP-L), ``text_encoder_2`` (bigG), ``text_encoder_3`` (T5). Weights depend only on
    ``variant`` and ``seed``; the global RNG is left untouched."""
    _check(variant)

    def build() -> dict[str, Any]:
        return {
            "transformer": _build_transformer(variant),
            "vae": build_vae16("sd3"),
            "text_encoder": build_clip_l(with_projection=True),
            "text_encoder_2": build_clip_g(),
            "text_encoder_3": build_t5(),
        }

    return seeded(seed, build)


# --------------------------------------------------------------------------- original names

_BLOCK = r"transformer_blocks\.(\d+)\."
_P = r"(weight|bias)"


def _qkv_rules(source: str, target: str) -> list[Rule]:
    """``source`` names the q/k/v linears with a ``{}`` for q, k or v."""
    return [(_BLOCK + source.format(x) + r"\." + _P, rf"joint_blocks.\1.{target}.\2#{i}/3")
            for i, x in enumerate("qkv")]


_SD3_RULES: list[Rule] = [
    (r"pos_embed\.pos_embed", "pos_embed"),
    (r"pos_embed\.proj\." + _P, r"x_embedder.proj.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_1\." + _P, r"t_embedder.mlp.0.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_2\." + _P, r"t_embedder.mlp.2.\1"),
    (r"time_text_embed\.text_embedder\.linear_1\." + _P, r"y_embedder.mlp.0.\1"),
    (r"time_text_embed\.text_embedder\.linear_2\." + _P, r"y_embedder.mlp.2.\1"),
    (r"context_embedder\." + _P, r"context_embedder.\1"),
    (r"proj_out\." + _P, r"final_layer.linear.\1"),
    (r"norm_out\.linear\." + _P, r"final_layer.adaLN_modulation.1.\1"),
    *_qkv_rules(r"attn\.to_{}", "x_block.attn.qkv"),
    *_qkv_rules(r"attn\.add_{}_proj", "context_block.attn.qkv"),
    *_qkv_rules(r"attn2\.to_{}", "x_block.attn2.qkv"),
    (_BLOCK + r"attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight"),
    (_BLOCK + r"attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight"),
    (_BLOCK + r"attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight"),
    (_BLOCK + r"attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight"),
    (_BLOCK + r"attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight"),
    (_BLOCK + r"attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight"),
    (_BLOCK + r"attn\.to_out\.0\." + _P, r"joint_blocks.\1.x_block.attn.proj.\2"),
    (_BLOCK + r"attn\.to_add_out\." + _P, r"joint_blocks.\1.context_block.attn.proj.\2"),
    (_BLOCK + r"attn2\.to_out\.0\." + _P, r"joint_blocks.\1.x_block.attn2.proj.\2"),
    (_BLOCK + r"norm1\.linear\." + _P, r"joint_blocks.\1.x_block.adaLN_modulation.1.\2"),
    (_BLOCK + r"norm1_context\.linear\." + _P, r"joint_blocks.\1.context_block.adaLN_modulation.1.\2"),
    (_BLOCK + r"ff\.net\.0\.proj\." + _P, r"joint_blocks.\1.x_block.mlp.fc1.\2"),
    (_BLOCK + r"ff\.net\.2\." + _P, r"joint_blocks.\1.x_block.mlp.fc2.\2"),
    (_BLOCK + r"ff_context\.net\.0\.proj\." + _P, r"joint_blocks.\1.context_block.mlp.fc1.\2"),
    (_BLOCK + r"ff_context\.net\.2\." + _P, r"joint_blocks.\1.context_block.mlp.fc2.\2"),
]


def sd3_transformer_to_original(state_dict: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """diffusers ``SD3Transformer2DModel`` weights -> SD3 reference names, without prefix.

    q/k/v are fused into ``qkv``; the final layer's modulation, and the pre-only last
    block's context modulation, go back to the reference (shift, scale) order."""
    last_context = f"joint_blocks.{num_layers - 1}.context_block.adaLN_modulation.1."

    def swapped(name: str) -> bool:
        return name.startswith(("final_layer.adaLN_modulation.1.", last_context))

    return to_original(state_dict, _SD3_RULES, swapped)


def _transformer_state_dict(components: Mapping[str, Any]) -> dict[str, Tensor]:
    transformer = components["transformer"]
    return sd3_transformer_to_original(transformer.state_dict(), transformer.config.num_layers)


def sd3_state_dict(components: Mapping[str, Any], text_encoders: bool = True) -> dict[str, Tensor]:
    """A whole Stability single file: ``model.diffusion_model.*``, ``first_stage_model.*``
    and, with ``text_encoders``, ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``."""
    out = prefixed(TRANSFORMER_PREFIX, _transformer_state_dict(components))
    out |= prefixed(VAE_PREFIX, vae16_state_dict(components["vae"]))
    if text_encoders:
        out |= prefixed(CLIP_L_PREFIX, clip_state_dict(components["text_encoder"]))
        out |= prefixed(CLIP_G_PREFIX, clip_state_dict(components["text_encoder_2"], with_projection=True))
        out |= prefixed(T5_PREFIX, t5_state_dict(components["text_encoder_3"], embed_tokens_copy=True))
    return out


# --------------------------------------------------------------------------- files


def make_sd3_checkpoint(
    path: str | Path,
    variant: str = "sd3-medium",
    seed: int = 0,
    *,
    text_encoders: bool = True,
    dtype: torch.dtype = torch.float16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny all-in-one SD3 file in Stability's layout.

    With ``text_encoders`` it mimics ``sd3_medium_incl_clips_t5xxlfp16.safetensors``
    (MMDiT, VAE, CLIP-L, bigG and T5 in one fp16 file); without, the
    ``sd3.5_large.safetensors`` / ``sd3.5_medium.safetensors`` layout (MMDiT and VAE).
    Pass ``components`` (from :func:`tiny_sd3_components`) to reuse built models.
    """
    components = components if components is not None else tiny_sd3_components(variant, seed)
    return save_safetensors(path, cast(sd3_state_dict(components, text_encoders), dtype))


def make_sd3_transformer(
    path: str | Path,
    variant: str = "sd3-medium",
    seed: int = 0,
    *,
    prefix: str = "",
    dtype: torch.dtype = torch.float16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write the MMDiT alone, SD3 reference names after ``prefix`` (none by default, as in
    transformer-only finetunes and ComfyUI's ``models/diffusion_models``;
    ``"model.diffusion_model."`` for files cut from a full checkpoint)."""
    components = components if components is not None else tiny_sd3_components(variant, seed)
    return save_safetensors(path, cast(prefixed(prefix, _transformer_state_dict(components)), dtype))


def write_sd3_configs(path: str | Path, variant: str = "sd3-medium") -> Path:
    """Write the diffusers configs of a tiny ``variant`` in the folder layout of
    ``stabilityai/stable-diffusion-3-medium-diffusers``: ``transformer/``, ``vae/``,
    ``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (bigG), ``text_encoder_3/`` (T5), each
    with a ``config.json``. It is the ``config=`` (plus ``subfolder=``) of diffusers'
    offline ``from_single_file`` calls."""
    path = Path(path)
    write_json(path / "transformer" / "config.json",
                {"_class_name": "SD3Transformer2DModel", **sd3_transformer_config(variant)})
    write_json(path / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae16_config("sd3")})
    clip_l = clip_l_config()
    clip_l.architectures = ["CLIPTextModelWithProjection"]
    clip_l.save_pretrained(path / "text_encoder")
    clip_g = clip_g_config()
    clip_g.architectures = ["CLIPTextModelWithProjection"]
    clip_g.save_pretrained(path / "text_encoder_2")
    t5 = t5_config()
    t5.architectures = ["T5EncoderModel"]
    t5.save_pretrained(path / "text_encoder_3")
    return path
