"""Tiny random FLUX.1 models in the layouts they are shared in.

The transformer keeps FLUX.1's structure and the shape conventions a loader reads:
``img_in`` gives the packed input channels (64 = 16 latent channels x 2 x 2; Fill 384 =
image 64 + masked image 64 + the 8x8-unshuffled, packed mask 256; Depth/Canny 128 =
image 64 + control image 64), ``txt_in`` T5's width, ``vector_in`` CLIP-L's width,
``time_in`` the 256 sinusoidal channels, ``guidance_in`` is there for the guidance-
distilled models (dev, Fill, Depth) and not for schnell, ``*.norm.query_norm.scale``
gives the head width. The tiny model has 2 double and 4 single blocks (real 19 and 38),
64 wide with 2 heads of 32 (real 24 x 128), RoPE axes (4, 14, 14) (real (16, 56, 56),
the same eighth/seven-sixteenths split of a head).

Files: :func:`make_flux_transformer` (BFL's ``flux1-dev.safetensors``),
:func:`make_flux_checkpoint` (ComfyUI's all-in-one), :func:`make_flux_vae`
(``ae.safetensors``), :func:`make_clip_l` / :func:`make_t5xxl` (ComfyUI's
``models/text_encoders``), :func:`make_flux_lora` (a kohya sd-scripts LoRA).

diffusers 0.42's FLUX single-file and kohya-LoRA converters hard-code the full model's
width (3072 and 4 x 3072 in ``convert_flux_transformer_checkpoint_to_diffusers`` and
``_convert_kohya_flux_lora_to_diffusers``), so they cannot split a tiny single block's
``linear1``; every other step of their loading works on these files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor

from studio.testing.dit_parts import (
    CLIP_L_PREFIX,
    LATENT_CHANNELS_16,
    T5_HIDDEN,
    T5_PREFIX,
    TRANSFORMER_PREFIX,
    Rule,
    build_clip_l,
    build_t5,
    build_vae16,
    cast,
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

FLUX_VARIANTS = ("dev", "schnell", "fill", "depth")
# ComfyUI saves FLUX's VAE under "vae." (SD's "first_stage_model." is for SD-style files).
FLUX_VAE_PREFIX = "vae."

FLUX_DOUBLE_BLOCKS = 2
FLUX_SINGLE_BLOCKS = 4
FLUX_HEAD_DIM = 32
FLUX_HEADS = 2
FLUX_ROPE_AXES = (4, 14, 14)
# 2x2 patches of the 16-channel latent.
FLUX_PACKED_CHANNELS = LATENT_CHANNELS_16 * 4
_IN_CHANNELS = {
    "dev": FLUX_PACKED_CHANNELS,
    "schnell": FLUX_PACKED_CHANNELS,
    # Fill: latents + masked-image latents (64 each) + the mask, pixel-unshuffled 8x8
    # to the latent grid (64) and packed 2x2 (256).
    "fill": 2 * FLUX_PACKED_CHANNELS + 64 * 4,
    # Depth / Canny: latents + control-image latents.
    "depth": 2 * FLUX_PACKED_CHANNELS,
}


def _check(variant: str) -> str:
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"unknown FLUX.1 variant {variant!r}; expected one of {FLUX_VARIANTS}")
    return variant


def flux_transformer_config(variant: str = "dev") -> dict[str, Any]:
    """diffusers ``FluxTransformer2DModel`` config of the tiny ``variant``."""
    return {
        "patch_size": 1,
        "in_channels": _IN_CHANNELS[_check(variant)],
        "out_channels": FLUX_PACKED_CHANNELS,
        "num_layers": FLUX_DOUBLE_BLOCKS,
        "num_single_layers": FLUX_SINGLE_BLOCKS,
        "attention_head_dim": FLUX_HEAD_DIM,
        "num_attention_heads": FLUX_HEADS,
        "joint_attention_dim": T5_HIDDEN,
        "pooled_projection_dim": clip_l_config().hidden_size,
        "guidance_embeds": variant != "schnell",
        "axes_dims_rope": FLUX_ROPE_AXES,
    }


def _build_transformer(variant: str) -> FluxTransformer2DModel:
    return randomised(FluxTransformer2DModel(**flux_transformer_config(variant)))


def tiny_flux_components(variant: str = "dev", seed: int = 0) -> dict[str, Any]:
    """Freshly built modules of a tiny FLUX.1 ``variant``, named as in diffusers'
    ``FluxPipeline``: ``transformer``, ``vae``, ``text_encoder`` (CLIP-L),
    ``text_encoder_2`` (T5). Weights depend only on ``variant`` and ``seed``; the
    global RNG is left untouched."""
    _check(variant)

    def build() -> dict[str, Any]:
        return {
            "transformer": _build_transformer(variant),
            "vae": build_vae16("flux"),
            "text_encoder": build_clip_l(),
            "text_encoder_2": build_t5(),
        }

    return seeded(seed, build)


# --------------------------------------------------------------------------- BFL names

_DOUBLE = r"transformer_blocks\.(\d+)\."
_SINGLE = r"single_transformer_blocks\.(\d+)\."
_P = r"(weight|bias)"


def _fused(block: str, sources: list[str], target: str) -> list[Rule]:
    """Parts ``sources`` (in order) of the fused ``target`` linear."""
    count = len(sources)
    return [(block + source + r"\." + _P, rf"{target}.\2#{i}/{count}") for i, source in enumerate(sources)]


def _linear(block: str, source: str, target: str) -> Rule:
    return (block + source + r"\." + _P, rf"{target}.\2")


def _norm(block: str, source: str, target: str) -> Rule:
    # BFL's RMSNorm calls its weight "scale".
    return (block + source + r"\.weight", rf"{target}.scale")


_D = r"double_blocks.\1."
_S = r"single_blocks.\1."

_FLUX_RULES: list[Rule] = [
    (r"time_text_embed\.timestep_embedder\.linear_1\." + _P, r"time_in.in_layer.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_2\." + _P, r"time_in.out_layer.\1"),
    (r"time_text_embed\.text_embedder\.linear_1\." + _P, r"vector_in.in_layer.\1"),
    (r"time_text_embed\.text_embedder\.linear_2\." + _P, r"vector_in.out_layer.\1"),
    (r"time_text_embed\.guidance_embedder\.linear_1\." + _P, r"guidance_in.in_layer.\1"),
    (r"time_text_embed\.guidance_embedder\.linear_2\." + _P, r"guidance_in.out_layer.\1"),
    (r"context_embedder\." + _P, r"txt_in.\1"),
    (r"x_embedder\." + _P, r"img_in.\1"),
    (r"proj_out\." + _P, r"final_layer.linear.\1"),
    (r"norm_out\.linear\." + _P, r"final_layer.adaLN_modulation.1.\1"),
    _linear(_DOUBLE, r"norm1\.linear", _D + "img_mod.lin"),
    _linear(_DOUBLE, r"norm1_context\.linear", _D + "txt_mod.lin"),
    *_fused(_DOUBLE, [r"attn\.to_q", r"attn\.to_k", r"attn\.to_v"], _D + "img_attn.qkv"),
    *_fused(_DOUBLE, [r"attn\.add_q_proj", r"attn\.add_k_proj", r"attn\.add_v_proj"], _D + "txt_attn.qkv"),
    _norm(_DOUBLE, r"attn\.norm_q", _D + "img_attn.norm.query_norm"),
    _norm(_DOUBLE, r"attn\.norm_k", _D + "img_attn.norm.key_norm"),
    _norm(_DOUBLE, r"attn\.norm_added_q", _D + "txt_attn.norm.query_norm"),
    _norm(_DOUBLE, r"attn\.norm_added_k", _D + "txt_attn.norm.key_norm"),
    _linear(_DOUBLE, r"attn\.to_out\.0", _D + "img_attn.proj"),
    _linear(_DOUBLE, r"attn\.to_add_out", _D + "txt_attn.proj"),
    _linear(_DOUBLE, r"ff\.net\.0\.proj", _D + "img_mlp.0"),
    _linear(_DOUBLE, r"ff\.net\.2", _D + "img_mlp.2"),
    _linear(_DOUBLE, r"ff_context\.net\.0\.proj", _D + "txt_mlp.0"),
    _linear(_DOUBLE, r"ff_context\.net\.2", _D + "txt_mlp.2"),
    _linear(_SINGLE, r"norm\.linear", _S + "modulation.lin"),
    # One linear computes q, k, v and the MLP's hidden layer at once.
    *_fused(_SINGLE, [r"attn\.to_q", r"attn\.to_k", r"attn\.to_v", r"proj_mlp"], _S + "linear1"),
    _norm(_SINGLE, r"attn\.norm_q", _S + "norm.query_norm"),
    _norm(_SINGLE, r"attn\.norm_k", _S + "norm.key_norm"),
    _linear(_SINGLE, r"proj_out", _S + "linear2"),
]


def flux_transformer_to_bfl(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``FluxTransformer2DModel`` weights -> BFL names, without prefix: q/k/v
    (and in single blocks the MLP input) fused, the final modulation in BFL's
    (shift, scale) order."""
    def swapped(name: str) -> bool:
        return name.startswith("final_layer.adaLN_modulation.1.")

    return to_original(state_dict, _FLUX_RULES, swapped)


def _transformer_state_dict(components: Mapping[str, Any]) -> dict[str, Tensor]:
    return flux_transformer_to_bfl(components["transformer"].state_dict())


def _components(components: Mapping[str, Any] | None, variant: str, seed: int) -> Mapping[str, Any]:
    return components if components is not None else tiny_flux_components(variant, seed)


# --------------------------------------------------------------------------- files


def make_flux_transformer(
    path: str | Path,
    variant: str = "dev",
    seed: int = 0,
    *,
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write the transformer alone in BFL's layout, as ``flux1-dev.safetensors`` /
    ``flux1-schnell.safetensors`` / ``flux1-fill-dev.safetensors`` /
    ``flux1-depth-dev.safetensors`` (bf16, no prefix) and the finetunes in ComfyUI's
    ``models/diffusion_models``; ``prefix="model.diffusion_model."`` gives files cut
    from a full checkpoint."""
    components = _components(components, variant, seed)
    return save_safetensors(path, cast(prefixed(prefix, _transformer_state_dict(components)), dtype))


def flux_checkpoint_state_dict(components: Mapping[str, Any]) -> dict[str, Tensor]:
    """ComfyUI's all-in-one FLUX layout: ``model.diffusion_model.*`` (BFL names),
    ``vae.*`` (LDM names), ``text_encoders.clip_l.transformer.*`` and
    ``text_encoders.t5xxl.transformer.*`` (transformers names; ComfyUI's T5 has no
    tied ``encoder.embed_tokens`` copy)."""
    out = prefixed(TRANSFORMER_PREFIX, _transformer_state_dict(components))
    out |= prefixed(FLUX_VAE_PREFIX, vae16_state_dict(components["vae"]))
    out |= prefixed(CLIP_L_PREFIX, clip_state_dict(components["text_encoder"]))
    out |= prefixed(T5_PREFIX, t5_state_dict(components["text_encoder_2"], embed_tokens_copy=False))
    return out


def make_flux_checkpoint(
    path: str | Path,
    variant: str = "dev",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write a ComfyUI all-in-one FLUX file (``Save Checkpoint`` output, the layout of
    Comfy-Org's ``flux1-dev-fp8.safetensors`` / ``flux1-schnell-fp8.safetensors`` and
    of Forge's all-in-one FLUX files). diffusers' single-file code recognises each part:
    ``model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale`` (FLUX),
    the ``vae.`` prefix, ``text_encoders.clip_l...position_embedding.weight`` and
    ``text_encoders.t5xxl.transformer.shared.weight``. For the fp8 flavour pass this
    file to :func:`studio.testing.quantized.make_fp8_variant` with
    ``only_prefix="model.diffusion_model."``."""
    components = _components(components, variant, seed)
    return save_safetensors(path, cast(flux_checkpoint_state_dict(components), dtype))


def make_flux_vae(
    path: str | Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write BFL's ``ae.safetensors``: the 16-channel VAE in LDM names with no prefix
    and no quant convs, fp32."""
    vae = components["vae"] if components is not None else seeded(seed, lambda: build_vae16("flux"))
    return save_safetensors(path, cast(vae16_state_dict(vae), dtype))


def make_clip_l(
    path: str | Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write ComfyUI's ``models/text_encoders/clip_l.safetensors``: CLIP-L alone in
    transformers 4 names (``text_model.*``), fp16."""
    model = components["text_encoder"] if components is not None else seeded(seed, build_clip_l)
    return save_safetensors(path, cast(clip_state_dict(model), dtype))


def make_t5xxl(
    path: str | Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float16,
    embed_tokens_copy: bool = False,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write ComfyUI's ``models/text_encoders/t5xxl_fp16.safetensors``: the T5-XXL
    encoder alone in transformers names (``shared.weight``, ``encoder.block.N...``),
    fp16. ``embed_tokens_copy`` adds the tied ``encoder.embed_tokens.weight`` that
    files converted from transformers' own checkpoints carry."""
    model = components["text_encoder_2"] if components is not None else seeded(seed, build_t5)
    return save_safetensors(path, cast(t5_state_dict(model, embed_tokens_copy), dtype))


def flux_lora_targets(bfl_state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """kohya module name -> (out, in) of every linear in the double and single blocks,
    the layers sd-scripts' ``networks.lora_flux`` trains, fused qkv included."""
    targets: dict[str, tuple[int, int]] = {}
    for key, value in bfl_state_dict.items():
        in_block = key.startswith(("double_blocks.", "single_blocks."))
        if in_block and key.endswith(".weight") and value.ndim == 2:
            targets["lora_unet_" + key.removesuffix(".weight").replace(".", "_")] = tuple(value.shape)
    return targets


def make_flux_lora(
    path: str | Path,
    variant: str = "dev",
    seed: int = 0,
    *,
    rank: int = 4,
    alpha: float = 2.0,
    dtype: torch.dtype = torch.bfloat16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write a kohya sd-scripts FLUX.1 LoRA (``networks.lora_flux``) for the tiny
    transformer: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` /
    ``.lora_up.weight`` / ``.alpha`` for every linear of every block (the fused
    ``img_attn_qkv``, ``txt_attn_qkv`` and single-block ``linear1`` get one LoRA each,
    sd-scripts' default), with sd-scripts' metadata. Up weights are random and
    non-zero (training starts them at zero) so that a test sees an effect. The LoRA's
    weights depend on ``seed``, not on the transformer's; only shapes are read."""
    components = _components(components, variant, seed)
    targets = flux_lora_targets(_transformer_state_dict(components))
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for name, (out_dim, in_dim) in targets.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=generator) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    metadata = {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "flux1",
        "ss_output_name": Path(path).stem,
    }
    return save_safetensors(path, cast(tensors, dtype), metadata)


def write_flux_configs(path: str | Path, variant: str = "dev") -> Path:
    """Write the diffusers configs of a tiny ``variant`` in the folder layout of
    ``black-forest-labs/FLUX.1-dev``: ``transformer/``, ``vae/``, ``text_encoder/``
    (CLIP-L), ``text_encoder_2/`` (T5), each with a ``config.json``: the ``config=``
    (plus ``subfolder=``) of diffusers' offline ``from_single_file`` calls."""
    path = Path(path)
    write_json(path / "transformer" / "config.json",
                {"_class_name": "FluxTransformer2DModel", **flux_transformer_config(variant)})
    write_json(path / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae16_config("flux")})
    clip_l = clip_l_config()
    clip_l.architectures = ["CLIPTextModel"]
    clip_l.save_pretrained(path / "text_encoder")
    t5 = t5_config()
    t5.architectures = ["T5EncoderModel"]
    t5.save_pretrained(path / "text_encoder_2")
    return path
