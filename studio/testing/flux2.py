"""Tiny random FLUX.2 Klein models in the layouts Black Forest Labs and ComfyUI share them in.

FLUX.2 keeps FLUX.1's double/single-stream plan and BFL names, but:

* the modulation is shared: three model-level linears (``double_stream_modulation_img.lin``,
  ``double_stream_modulation_txt.lin``, ``single_stream_modulation.lin``) replace every
  block's ``img_mod`` / ``txt_mod`` / ``modulation``;
* no linear has a bias, the MLPs are SwiGLU (``img_mlp.0`` twice the hidden width), and a
  single block's ``linear1`` fuses q, k, v and the two MLP halves (diffusers keeps it fused
  as ``attn.to_qkv_mlp_proj``, so nothing is split on loading);
* the latent has 32 channels, patchified 2 x 2 into 128 (``img_in``), RoPE has four axes
  (time, height, width, sequence), and the text input (``txt_in``) is three Qwen3 hidden
  states stacked: layers 9, 18 and 27 of Qwen3-4B (Klein 4B, 7680 = 3 x 2560 wide) or
  Qwen3-8B (Klein 9B);
* Klein is guidance-free (no ``guidance_in``; FLUX.2 dev, with a Mistral encoder, has one).

The tiny transformer: 2 double and 4 single blocks (real Klein 4B: 5 and 20), 2 heads of 32
(real 24 x 128), RoPE axes (8, 8, 8, 8) (real (32, 32, 32, 32)), MLP ratio 3, text input
3 x 32 = 96 (the tiny Qwen3 of :mod:`studio.testing.zimage`, 36 layers as the real ones,
so the pipeline's default layers (9, 18, 27) exist).

The VAE, ``AutoencoderKLFlux2``, is SD's VAE with a 32-channel latent, quant convs, and a
BatchNorm over the 2 x 2-patchified latent (128 channels, no affine) whose running mean and
variance normalise the latents. BFL's file (``flux2-vae.safetensors`` / ``ae.safetensors``)
uses LDM names with the quant convs inside the encoder and decoder
(``encoder.quant_conv.*``, ``decoder.post_quant_conv.*``), plus ``bn.running_mean`` /
``bn.running_var``; ComfyUI also reads files with top-level ``quant_conv`` / ``post_quant_conv``.

Files: :func:`make_flux2_transformer` (``flux-2-klein-4b.safetensors``, ComfyUI's
``models/diffusion_models``), :func:`make_flux2_vae`, and the Qwen3 text encoder with
:func:`studio.testing.zimage.make_qwen3` (``qwen_3_4b.safetensors``).

What diffusers 0.42 can load:

* the transformer, with ``Flux2Transformer2DModel.from_single_file`` (no width is
  hard-coded), exactly, when its names have no prefix; with ``model.diffusion_model.`` its
  converter, which never strips the prefix, fails (``KeyError``) on the first block. Its
  ``infer_diffusers_model_type`` calls every FLUX.2 file "flux-2-dev" (it has no Klein
  type), so a Klein file needs ``config=``;
* not the VAE file: ``AutoencoderKLFlux2`` has no single-file converter in 0.42. Its
  encoder/decoder names are those of SD's VAE, so ``convert_ldm_vae_checkpoint`` (the
  ``AutoencoderKL`` converter) reads them once the quant convs are lifted to the top level;
  the two ``bn`` buffers keep their names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from torch import Tensor

from studio.models.ldm_keys import vae_to_ldm
from studio.testing.dit_parts import (
    Rule,
    cast,
    prefixed,
    randomised,
    save_safetensors,
    seeded,
    tensor,
    to_original,
    write_json,
)
from studio.testing.factory import vae_architecture
from studio.testing.zimage import QWEN3_HIDDEN, build_qwen3, write_qwen3_config

FLUX2_DOUBLE_BLOCKS = 2
FLUX2_SINGLE_BLOCKS = 4
FLUX2_HEAD_DIM = 32
FLUX2_HEADS = 2
FLUX2_ROPE_AXES = (8, 8, 8, 8)
FLUX2_LATENT_CHANNELS = 32
# 2 x 2 patches of the 32-channel latent: the transformer's input and the VAE's BatchNorm.
FLUX2_PACKED_CHANNELS = FLUX2_LATENT_CHANNELS * 4
# The Qwen3 layers whose hidden states Flux2KleinPipeline stacks (its default).
KLEIN_TEXT_LAYERS = (9, 18, 27)

_BN = "bn."


# --------------------------------------------------------------------------- configs


def flux2_transformer_config() -> dict[str, Any]:
    """diffusers ``Flux2Transformer2DModel`` config of the tiny Klein."""
    return {
        "patch_size": 1,
        "in_channels": FLUX2_PACKED_CHANNELS,
        "out_channels": None,
        "num_layers": FLUX2_DOUBLE_BLOCKS,
        "num_single_layers": FLUX2_SINGLE_BLOCKS,
        "attention_head_dim": FLUX2_HEAD_DIM,
        "num_attention_heads": FLUX2_HEADS,
        "joint_attention_dim": len(KLEIN_TEXT_LAYERS) * QWEN3_HIDDEN,
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": FLUX2_ROPE_AXES,
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": False,
    }


def flux2_vae_config() -> dict[str, Any]:
    """diffusers ``AutoencoderKLFlux2`` config: the tiny SD VAE's shape with FLUX.2's
    32-channel latent, quant convs and latent BatchNorm."""
    return {
        **vae_architecture(FLUX2_LATENT_CHANNELS),
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "batch_norm_eps": 1e-4,
        "batch_norm_momentum": 0.1,
        "patch_size": (2, 2),
    }


# --------------------------------------------------------------------------- models


def _build_vae() -> AutoencoderKLFlux2:
    vae = randomised(AutoencoderKLFlux2(**flux2_vae_config()))
    # The latent statistics are buffers, which randomised() leaves at 0 and 1: make them
    # random too, so a file that lost or swapped them shows.
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def tiny_flux2_klein_components(seed: int = 0) -> dict[str, Any]:
    """Freshly built modules of a tiny FLUX.2 Klein, named as in diffusers'
    ``Flux2KleinPipeline``: ``transformer``, ``vae`` (``AutoencoderKLFlux2``) and
    ``text_encoder`` (Qwen3, as the pipeline's declared ``Qwen3ForCausalLM``; its
    ``tokenizer`` is :func:`studio.models.bundled_tokenizers.qwen3_tokenizer`). Weights
    depend only on ``seed``; the global RNG is left untouched."""

    def build() -> dict[str, Any]:
        return {
            "transformer": _build_transformer(),  # first: make_flux2_transformer(seed=) builds it alone
            "vae": _build_vae(),
            "text_encoder": build_qwen3(causal_lm=True),
        }

    return seeded(seed, build)


def _build_transformer() -> Flux2Transformer2DModel:
    return randomised(Flux2Transformer2DModel(**flux2_transformer_config()))


# --------------------------------------------------------------------------- BFL names

_DOUBLE = r"transformer_blocks\.(\d+)\."
_SINGLE = r"single_transformer_blocks\.(\d+)\."
_D = r"double_blocks.\1."
_S = r"single_blocks.\1."


def _qkv(sources: str, target: str) -> list[Rule]:
    """q, k, v linears (``sources`` with a ``{}`` for q, k or v) fused into ``target``."""
    return [(_DOUBLE + sources.format(x) + r"\.weight", rf"{_D}{target}.weight#{i}/3") for i, x in enumerate("qkv")]


_FLUX2_RULES: list[Rule] = [
    (r"x_embedder\.weight", "img_in.weight"),
    (r"context_embedder\.weight", "txt_in.weight"),
    (r"time_guidance_embed\.timestep_embedder\.linear_1\.weight", "time_in.in_layer.weight"),
    (r"time_guidance_embed\.timestep_embedder\.linear_2\.weight", "time_in.out_layer.weight"),
    (r"time_guidance_embed\.guidance_embedder\.linear_1\.weight", "guidance_in.in_layer.weight"),
    (r"time_guidance_embed\.guidance_embedder\.linear_2\.weight", "guidance_in.out_layer.weight"),
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.weight",
     r"\1.lin.weight"),
    (r"norm_out\.linear\.weight", "final_layer.adaLN_modulation.1.weight"),
    (r"proj_out\.weight", "final_layer.linear.weight"),
    *_qkv(r"attn\.to_{}", "img_attn.qkv"),
    *_qkv(r"attn\.add_{}_proj", "txt_attn.qkv"),
    # BFL's RMSNorm calls its weight "scale".
    (_DOUBLE + r"attn\.norm_q\.weight", _D + "img_attn.norm.query_norm.scale"),
    (_DOUBLE + r"attn\.norm_k\.weight", _D + "img_attn.norm.key_norm.scale"),
    (_DOUBLE + r"attn\.norm_added_q\.weight", _D + "txt_attn.norm.query_norm.scale"),
    (_DOUBLE + r"attn\.norm_added_k\.weight", _D + "txt_attn.norm.key_norm.scale"),
    (_DOUBLE + r"attn\.to_out\.0\.weight", _D + "img_attn.proj.weight"),
    (_DOUBLE + r"attn\.to_add_out\.weight", _D + "txt_attn.proj.weight"),
    (_DOUBLE + r"ff\.linear_in\.weight", _D + "img_mlp.0.weight"),
    (_DOUBLE + r"ff\.linear_out\.weight", _D + "img_mlp.2.weight"),
    (_DOUBLE + r"ff_context\.linear_in\.weight", _D + "txt_mlp.0.weight"),
    (_DOUBLE + r"ff_context\.linear_out\.weight", _D + "txt_mlp.2.weight"),
    (_SINGLE + r"attn\.to_qkv_mlp_proj\.weight", _S + "linear1.weight"),
    (_SINGLE + r"attn\.to_out\.weight", _S + "linear2.weight"),
    (_SINGLE + r"attn\.norm_q\.weight", _S + "norm.query_norm.scale"),
    (_SINGLE + r"attn\.norm_k\.weight", _S + "norm.key_norm.scale"),
]


def flux2_transformer_to_bfl(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``Flux2Transformer2DModel`` weights -> BFL names, without prefix: the
    double blocks' q/k/v fused, the final modulation in BFL's (shift, scale) order. Raises
    on any key no rule covers."""
    def swapped(name: str) -> bool:
        return name == "final_layer.adaLN_modulation.1.weight"

    return to_original(state_dict, _FLUX2_RULES, swapped)


def flux2_vae_state_dict(vae: AutoencoderKLFlux2, nested_quant_convs: bool = True) -> dict[str, Tensor]:
    """The FLUX.2 VAE in BFL's names: LDM encoder/decoder names, the quant convs inside the
    encoder/decoder (``nested_quant_convs``, BFL's file) or at the top level, and the
    BatchNorm's ``bn.running_mean`` / ``bn.running_var`` (its step counter, a training
    leftover, is not written)."""
    state_dict = vae.state_dict()
    autoencoder = {k: v for k, v in state_dict.items() if not k.startswith(_BN)}
    out = vae_to_ldm(autoencoder, len(vae.config.block_out_channels))
    if nested_quant_convs:
        out = {_nest_quant_conv(k): v for k, v in out.items()}
    for name in ("running_mean", "running_var"):
        out[_BN + name] = tensor(state_dict[_BN + name])
    return out


def _nest_quant_conv(key: str) -> str:
    if key.startswith("quant_conv."):
        return "encoder." + key
    if key.startswith("post_quant_conv."):
        return "decoder." + key
    return key


# --------------------------------------------------------------------------- files


def make_flux2_transformer(
    path: str | Path,
    seed: int = 0,
    *,
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write the transformer in BFL's layout, as ``flux-2-klein-4b.safetensors`` and the files
    in ComfyUI's ``models/diffusion_models`` (bf16, no prefix). ``prefix="model.diffusion_model."``
    gives files cut from a ComfyUI checkpoint (which diffusers 0.42 cannot load). Without
    ``components`` it writes the transformer ``tiny_flux2_klein_components(seed)`` holds."""
    transformer = components["transformer"] if components is not None else seeded(seed, _build_transformer)
    state_dict = flux2_transformer_to_bfl(transformer.state_dict())
    return save_safetensors(path, cast(prefixed(prefix, state_dict), dtype))


def make_flux2_vae(
    path: str | Path,
    seed: int = 0,
    *,
    nested_quant_convs: bool = True,
    dtype: torch.dtype = torch.float32,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``flux2-vae.safetensors`` (ComfyUI's ``models/vae``; BFL's ``ae.safetensors`` in
    the FLUX.2 repositories), fp32, named as in :func:`flux2_vae_state_dict`."""
    vae = components["vae"] if components is not None else seeded(seed, _build_vae)
    return save_safetensors(path, cast(flux2_vae_state_dict(vae, nested_quant_convs), dtype))


def write_flux2_klein_configs(path: str | Path) -> Path:
    """Write the diffusers configs of the tiny Klein in the folder layout of
    ``black-forest-labs/FLUX.2-klein-4B``: ``transformer/``, ``vae/``, ``text_encoder/``
    (Qwen3ForCausalLM), each with a ``config.json``: the ``config=`` (plus ``subfolder=``) of
    diffusers' offline ``from_single_file`` calls and of transformers' ``from_pretrained``."""
    path = Path(path)
    write_json(path / "transformer" / "config.json",
               {"_class_name": "Flux2Transformer2DModel", **flux2_transformer_config()})
    write_json(path / "vae" / "config.json", {"_class_name": "AutoencoderKLFlux2", **flux2_vae_config()})
    write_qwen3_config(path / "text_encoder", causal_lm=True)
    return path
