"""Tiny random Chroma models in the layout lodestones shares them in.

Chroma (lodestones' Chroma1-HD / -Base / -Flash) is FLUX.1 schnell with its per-block
modulation pruned away: one small MLP, the ``distilled_guidance_layer`` ("approximator"),
computes every block's shift/scale/gate from the timestep alone, and CLIP-L is gone (T5-XXL
is the only text encoder). Everything else keeps FLUX.1's BFL names, so a Chroma file holds
``double_blocks.N.img_attn.qkv`` / ``single_blocks.N.linear1`` / ``final_layer.linear``
but no ``img_mod`` / ``txt_mod`` / ``modulation`` / ``final_layer.adaLN_modulation``, no
``time_in`` / ``vector_in`` / ``guidance_in``, and adds:

* ``distilled_guidance_layer.in_proj`` (64 sinusoidal channels in: 16 timestep + 16 guidance
  + 32 for the index of the modulation vector it is computing);
* ``distilled_guidance_layer.layers.N.{in_layer,out_layer}`` and ``.norms.N.scale``
  (5 residual MLP layers, 5120 wide in the real model; 2 layers, 64 wide here);
* ``distilled_guidance_layer.out_proj`` (to the transformer's width).

The tiny transformer has FLUX.1's tiny shape (:mod:`studio.testing.flux`): 2 double and
4 single blocks (real 19 and 38), 2 heads of 32 (real 24 x 128), RoPE axes (4, 14, 14),
64 packed input channels (16-channel latent, 2 x 2 patches), T5's width as text input.

Files: :func:`make_chroma_transformer` (``Chroma1-HD.safetensors``; ComfyUI's
``models/diffusion_models``), :func:`make_chroma_t5xxl` (``t5xxl_fp16.safetensors``). The
VAE is FLUX.1's ``ae.safetensors``: :func:`studio.testing.flux.make_flux_vae` writes it
from these components too.

diffusers 0.42's ``convert_chroma_transformer_checkpoint_to_diffusers`` hard-codes the full
model's width (``inner_dim = 3072``) to split a single block's fused ``linear1`` into q, k,
v and the MLP, so it cannot load a tiny file as it is; with that one constant set to the
tiny width (64) it loads these files exactly. ``infer_diffusers_model_type`` calls them
"chroma".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ChromaTransformer2DModel
from torch import Tensor

from studio.testing.dit_parts import (
    T5_HIDDEN,
    Rule,
    build_t5,
    build_vae16,
    cast,
    prefixed,
    randomised,
    save_safetensors,
    seeded,
    t5_config,
    t5_state_dict,
    to_original,
    vae16_config,
    write_json,
)
from studio.testing.flux import (
    FLUX_DOUBLE_BLOCKS,
    FLUX_HEAD_DIM,
    FLUX_HEADS,
    FLUX_PACKED_CHANNELS,
    FLUX_ROPE_AXES,
    FLUX_SINGLE_BLOCKS,
    flux_transformer_to_bfl,
)

# The approximator's input: Chroma's fixed 64 sinusoidal channels (real and tiny alike).
CHROMA_APPROXIMATOR_CHANNELS = 64
CHROMA_APPROXIMATOR_HIDDEN = 64   # real 5120
CHROMA_APPROXIMATOR_LAYERS = 2    # real 5
CHROMA_WIDTH = FLUX_HEADS * FLUX_HEAD_DIM

def chroma_transformer_config() -> dict[str, Any]:
    """diffusers ``ChromaTransformer2DModel`` config of the tiny model."""
    return {
        "patch_size": 1,
        "in_channels": FLUX_PACKED_CHANNELS,
        "out_channels": None,
        "num_layers": FLUX_DOUBLE_BLOCKS,
        "num_single_layers": FLUX_SINGLE_BLOCKS,
        "attention_head_dim": FLUX_HEAD_DIM,
        "num_attention_heads": FLUX_HEADS,
        "joint_attention_dim": T5_HIDDEN,
        "axes_dims_rope": FLUX_ROPE_AXES,
        "approximator_num_channels": CHROMA_APPROXIMATOR_CHANNELS,
        "approximator_hidden_dim": CHROMA_APPROXIMATOR_HIDDEN,
        "approximator_layers": CHROMA_APPROXIMATOR_LAYERS,
    }


def tiny_chroma_components(seed: int = 0) -> dict[str, Any]:
    """Freshly built modules of a tiny Chroma, named as in diffusers' ``ChromaPipeline``:
    ``transformer``, ``vae`` (FLUX.1's 16-channel AE) and ``text_encoder`` (T5-XXL; the
    pipeline's ``tokenizer`` is :func:`studio.models.bundled_tokenizers.t5_tokenizer`).
    Weights depend only on ``seed``; the global RNG is left untouched."""

    def build() -> dict[str, Any]:
        return {
            "transformer": _build_transformer(),  # first: make_chroma_transformer(seed=) builds it alone
            "vae": build_vae16("flux"),
            "text_encoder": build_t5(),
        }

    return seeded(seed, build)


def _build_transformer() -> ChromaTransformer2DModel:
    return randomised(ChromaTransformer2DModel(**chroma_transformer_config()))


# --------------------------------------------------------------------------- original names

_P = r"(weight|bias)"
_A = "distilled_guidance_layer."
_APPROXIMATOR_RULES: list[Rule] = [
    (r"distilled_guidance_layer\.(in_proj|out_proj)\." + _P, _A + r"\1.\2"),
    (r"distilled_guidance_layer\.layers\.(\d+)\.linear_1\." + _P, _A + r"layers.\1.in_layer.\2"),
    (r"distilled_guidance_layer\.layers\.(\d+)\.linear_2\." + _P, _A + r"layers.\1.out_layer.\2"),
    # BFL's RMSNorm calls its weight "scale".
    (r"distilled_guidance_layer\.norms\.(\d+)\.weight", _A + r"norms.\1.scale"),
]


def chroma_transformer_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``ChromaTransformer2DModel`` weights -> Chroma's names, without prefix.

    The approximator gets its own names; everything else is named as in FLUX.1 (the
    blocks Chroma kept are FLUX.1's, so :func:`flux_transformer_to_bfl` renames and fuses
    them). Raises on any key neither knows."""
    approximator = {k: v for k, v in state_dict.items() if k.startswith(_A)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(_A)}
    return to_original(approximator, _APPROXIMATOR_RULES) | flux_transformer_to_bfl(rest)


# --------------------------------------------------------------------------- files


def make_chroma_transformer(
    path: str | Path,
    seed: int = 0,
    *,
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write the transformer in Chroma's layout, as lodestones' ``Chroma1-HD.safetensors``
    and the files in ComfyUI's ``models/diffusion_models`` (bf16, no prefix);
    ``prefix="model.diffusion_model."`` gives files cut from a ComfyUI checkpoint. Without
    ``components`` it writes the transformer ``tiny_chroma_components(seed)`` holds."""
    transformer = components["transformer"] if components is not None else seeded(seed, _build_transformer)
    state_dict = chroma_transformer_to_original(transformer.state_dict())
    return save_safetensors(path, cast(prefixed(prefix, state_dict), dtype))


def make_chroma_t5xxl(
    path: str | Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float16,
    embed_tokens_copy: bool = False,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write Chroma's text encoder as ComfyUI's ``models/text_encoders/t5xxl_fp16.safetensors``
    (the file FLUX.1 uses): T5-XXL's encoder in transformers names, fp16, without the tied
    ``encoder.embed_tokens.weight`` unless ``embed_tokens_copy``."""
    model = components["text_encoder"] if components is not None else seeded(seed, build_t5)
    return save_safetensors(path, cast(t5_state_dict(model, embed_tokens_copy), dtype))


def write_chroma_configs(path: str | Path) -> Path:
    """Write the diffusers configs of the tiny model in the folder layout of
    ``lodestones/Chroma1-HD``: ``transformer/``, ``vae/``, ``text_encoder/`` (T5), each with
    a ``config.json``: the ``config=`` (plus ``subfolder=``) of diffusers' offline
    ``from_single_file`` calls and of transformers' ``from_pretrained``."""
    path = Path(path)
    write_json(path / "transformer" / "config.json",
               {"_class_name": "ChromaTransformer2DModel", **chroma_transformer_config()})
    write_json(path / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae16_config("flux")})
    t5 = t5_config()
    t5.architectures = ["T5EncoderModel"]
    t5.save_pretrained(path / "text_encoder")
    return path
