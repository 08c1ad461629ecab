"""diffusers / transformers configs of SD3, SD3.5, FLUX.1 and Chroma single files, from tensor
names and shapes only.

diffusers' single-file loader identifies these models by full-size widths (9216 for
SD3's modulation, 3072 for FLUX's width) and then fetches the matching config from the
hub. Here every config is computed from the shapes instead, so real files, pruned or
odd-sized ones and the tiny test models all take the same, offline path. Only what no
shape carries follows the real models' conventions, each said where it is used.

All functions read logical shapes (out, in, ...). A GGUF file's quantized tensors have
byte shapes along their last dimension: read those files' shapes from the GGUF header
(or ``GGUFParameter.quant_shape``), not from the loaded tensors.
"""

from __future__ import annotations

import math
import re
from typing import Any

from studio.models.arch import _clip_hf_config, _indices, derive_vae_config
from studio.models.state_dict import ModelFileError, Shapes

# Where a DiT's weights sit: Stability / ComfyUI all-in-one files, or the bare transformer
# (BFL's flux1-*.safetensors, Stability's and ComfyUI's diffusion_models files).
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "")

SD3_VAE_PREFIX = "first_stage_model."
FLUX_VAE_PREFIX = "vae."
TEXT_ENCODER_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}

# One tensor that only each family has (diffusers' CHECKPOINT_KEY_NAMES), in the order they
# must be tried: Chroma and FLUX.2 files also carry FLUX.1's double blocks.
_FAMILY_MARKERS = (
    ("flux2", ("single_stream_modulation.lin.weight",)),
    ("chroma", ("distilled_guidance_layer.in_proj.bias",)),
    ("flux1", ("double_blocks.0.img_attn.norm.key_norm.scale",)),
    ("sd3", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",)),
    # Lumina 2 has cap_embedder too, but a SiLU before its modulation linear (".1.").
    ("zimage", ("layers.0.adaLN_modulation.0.weight", "cap_embedder.")),
)

# The latent statistics of the two 16-channel VAEs, from their published diffusers configs.
_VAE16_FACTORS = {
    "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
    "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},
}
# Families that use FLUX.1's autoencoder (BFL's ae.safetensors).
_FLUX_VAE_FAMILIES = ("flux", "flux1", "chroma")

# FLUX.1's packed inputs: 16 latent channels x 2 x 2 = 64; Fill adds the masked image (64)
# and the 8x8-unshuffled, packed mask (256); Depth and Canny add the control image (64).
_FLUX_INPUTS = {64: "dev", 384: "fill", 128: "control"}

# Neither is in any shape. SD3's default latent size is that of its 1024 px training
# resolution; the VAEs' sample_size (their tiling tile) is that of the published configs.
SD3_SAMPLE_SIZE = 128
VAE16_SAMPLE_SIZE = 1024
# T5's relative positions: the bucket count is a tensor shape, the distance is not.
T5_MAX_DISTANCE = 128


# --------------------------------------------------------------------------- what a file holds


def _has(shapes: Shapes, prefix: str, marker: str) -> bool:
    """``marker`` (a full name, or a name prefix ending in ".") is in ``shapes`` under ``prefix``."""
    if marker.endswith("."):
        return any(k.startswith(prefix + marker) for k in shapes)
    return prefix + marker in shapes


def _family_at(shapes: Shapes, prefix: str) -> str | None:
    for family, markers in _FAMILY_MARKERS:
        if all(_has(shapes, prefix, m) for m in markers):
            return family
    return None


def _transformer_prefix(shapes: Shapes) -> str | None:
    for prefix in TRANSFORMER_PREFIXES:
        if _family_at(shapes, prefix) is not None:
            return prefix
    return None


def dit_family(shapes: Shapes) -> str | None:
    """"sd3", "flux1", "flux2", "chroma" or "zimage" for a DiT's weights (with or without
    the ``model.diffusion_model.`` prefix); None for anything else."""
    prefix = _transformer_prefix(shapes)
    return None if prefix is None else _family_at(shapes, prefix)


def _vae_prefix(shapes: Shapes, has_transformer: bool) -> str | None:
    for prefix in (SD3_VAE_PREFIX, FLUX_VAE_PREFIX):
        if prefix + "encoder.conv_in.weight" in shapes or prefix + "decoder.conv_in.weight" in shapes:
            return prefix
    # A bare autoencoder (ae.safetensors); a transformer's own names never start so.
    bare = "encoder.conv_in.weight" in shapes or "decoder.conv_in.weight" in shapes
    return "" if bare and not has_transformer else None


def component_prefixes(shapes: Shapes) -> dict[str, str]:
    """Which of "transformer", "vae", "clip_l", "clip_g", "t5xxl" the file holds, each
    with the prefix its names start with. Absent components are left out."""
    found: dict[str, str] = {}
    transformer = _transformer_prefix(shapes)
    if transformer is not None:
        found["transformer"] = transformer
    vae = _vae_prefix(shapes, transformer is not None)
    if vae is not None:
        found["vae"] = vae
    for name, prefix in TEXT_ENCODER_PREFIXES.items():
        if any(k.startswith(prefix) for k in shapes):
            found[name] = prefix
    return found


def _shape(shapes: Shapes, name: str) -> tuple[int, ...]:
    try:
        return shapes[name]
    except KeyError:
        raise ModelFileError(f"tensor {name!r} missing: not the layout expected") from None


def _count(shapes: Shapes, prefix: str, blocks: str) -> int:
    """Number of ``blocks.N.`` entries (the highest index + 1, so a gap shows up as an error later)."""
    found = _indices(shapes, re.escape(prefix + blocks) + r"\.(\d+)\.")
    return max(found) + 1 if found else 0


# --------------------------------------------------------------------------- FLUX.1


def flux_variant(shapes: Shapes, prefix: str) -> str:
    """"dev", "schnell", "fill" or "control" (Depth and Canny: their shapes are the same).
    Kontext has dev's shapes and is reported as "dev"."""
    in_channels = _shape(shapes, prefix + "img_in.weight")[1]
    variant = _FLUX_INPUTS.get(in_channels)
    if variant is None:
        raise ModelFileError(f"FLUX.1 transformer with {in_channels} input channels: variant not known")
    if variant == "dev" and prefix + "guidance_in.in_layer.weight" not in shapes:
        return "schnell"
    return variant


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE's split of a head over (index, row, column): FLUX.1's 128 are (16, 56, 56), an
    eighth for the index and the rest halved; smaller heads keep the proportions."""
    index = head_dim // 8
    row = (head_dim - index) // 2
    return index, row, head_dim - index - row


def flux_transformer_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """diffusers ``FluxTransformer2DModel`` config of the BFL-named transformer at ``prefix``."""
    width, in_channels = _shape(shapes, prefix + "img_in.weight")
    head_dim = _shape(shapes, prefix + "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if width % head_dim:
        raise ModelFileError(f"FLUX.1 width {width} is not a whole number of {head_dim}-wide heads")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, prefix + "final_layer.linear.weight")[0],
        "num_layers": _count(shapes, prefix, "double_blocks"),
        "num_single_layers": _count(shapes, prefix, "single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": _shape(shapes, prefix + "txt_in.weight")[1],
        "pooled_projection_dim": _shape(shapes, prefix + "vector_in.in_layer.weight")[1],
        "guidance_embeds": prefix + "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": flux_rope_axes(head_dim),
    }


def _bfl_blocks(shapes: Shapes, prefix: str, label: str) -> dict[str, Any]:
    """The geometry every BFL-named transformer after FLUX.1 shares (Chroma, FLUX.2): channels in and out
    (out None = as many as in, what the published configs say), double/single block counts, heads from
    the q-norm width, the text width."""
    width, in_channels = _shape(shapes, prefix + "img_in.weight")
    head_dim = _shape(shapes, prefix + "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if width % head_dim:
        raise ModelFileError(f"{label} width {width} is not a whole number of {head_dim}-wide heads")
    out_channels = _shape(shapes, prefix + "final_layer.linear.weight")[0]
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": _count(shapes, prefix, "double_blocks"),
        "num_single_layers": _count(shapes, prefix, "single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": _shape(shapes, prefix + "txt_in.weight")[1],
    }


# --------------------------------------------------------------------------- Chroma


def chroma_transformer_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """diffusers ``ChromaTransformer2DModel`` config of the Chroma transformer at ``prefix``
    (FLUX.1's BFL block names without their modulation, plus the ``distilled_guidance_layer``
    that computes every block's modulation from the timestep)."""
    blocks = _bfl_blocks(shapes, prefix, "Chroma")
    head_dim = blocks["attention_head_dim"]
    hidden, channels = _shape(shapes, prefix + "distilled_guidance_layer.in_proj.weight")
    return {
        **blocks,
        # Chroma kept FLUX.1's RoPE split
        "axes_dims_rope": flux_rope_axes(head_dim),
        "approximator_num_channels": channels,
        "approximator_hidden_dim": hidden,
        "approximator_layers": _count(shapes, prefix, "distilled_guidance_layer.layers"),
    }


# --------------------------------------------------------------------------- SD3 / SD3.5


def _sd3_qk_norm(shapes: Shapes, prefix: str) -> str | None:
    block = prefix + "joint_blocks.0.x_block.attn."
    if block + "ln_q.weight" not in shapes:
        return None
    # SD3.5's q/k norms are RMS norms: a scale and no bias.
    return "layer_norm" if block + "ln_q.bias" in shapes else "rms_norm"


def sd3_transformer_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """diffusers ``SD3Transformer2DModel`` config of the SD3-reference-named MMDiT at ``prefix``."""
    width, in_channels, patch, _ = _shape(shapes, prefix + "x_embedder.proj.weight")
    depth = _count(shapes, prefix, "joint_blocks")
    # Head counts are in no shape. Every SD3 has as many 64-wide heads as blocks (Medium and
    # 3.5 Medium: 24 x 64 = 1536, 3.5 Large: 38 x 64 = 2432), MMDiT's own sizing rule.
    if depth == 0 or width % depth:
        raise ModelFileError(f"SD3 width {width} is not a whole number of heads for {depth} blocks")
    positions = _shape(shapes, prefix + "pos_embed")[1]
    max_size = math.isqrt(positions)
    if max_size * max_size != positions:
        raise ModelFileError(f"SD3 position table of {positions} entries is not square")
    dual = _indices(shapes, re.escape(prefix + "joint_blocks.") + r"(\d+)\.x_block\.attn2\.")
    return {
        "sample_size": SD3_SAMPLE_SIZE,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, prefix + "final_layer.linear.weight")[0] // (patch * patch),
        "num_layers": depth,
        "attention_head_dim": width // depth,
        "num_attention_heads": depth,
        "joint_attention_dim": _shape(shapes, prefix + "context_embedder.weight")[1],
        "caption_projection_dim": _shape(shapes, prefix + "context_embedder.weight")[0],
        "pooled_projection_dim": _shape(shapes, prefix + "y_embedder.mlp.0.weight")[1],
        "pos_embed_max_size": max_size,
        "dual_attention_layers": tuple(sorted(dual)),
        "qk_norm": _sd3_qk_norm(shapes, prefix),
    }


# --------------------------------------------------------------------------- text encoders


def t5_encoder_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """Keyword arguments of ``transformers.T5Config`` for a ``T5EncoderModel`` stored in
    transformers' names (``shared.weight``, ``encoder.block.N...``) under ``prefix``."""
    vocab, d_model = _shape(shapes, prefix + "shared.weight")
    attention = prefix + "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = _shape(shapes, attention + "relative_attention_bias.weight")
    inner = _shape(shapes, attention + "q.weight")[0]
    ff = prefix + "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in shapes
    return {
        "architectures": ["T5EncoderModel"],
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": _shape(shapes, ff + ("wi_0.weight" if gated else "wi.weight"))[0],
        "num_layers": _count(shapes, prefix, "encoder.block"),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": T5_MAX_DISTANCE,
        # v1.1 (T5-XXL in SD3 and FLUX) gates a GELU; the original T5 has one ReLU layer.
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
        "layer_norm_epsilon": 1e-6,
        # The encoder's embedding is the shared one. The hub's v1.1 configs say False, which
        # is about the LM head; in transformers 5 it would also untie encoder.embed_tokens,
        # which ComfyUI's files do not carry.
        "tie_word_embeddings": True,
    }


def _clip_activation(shapes: Shapes, prefix: str, config: dict[str, Any]) -> str:
    """OpenAI CLIP-L uses quick_gelu, OpenCLIP bigG gelu. The all-in-one files name the
    encoder; a bare file is told by size (CLIP-L is 12 layers of 768)."""
    if "clip_g" in prefix:
        return "gelu"
    if "clip_l" in prefix:
        return "quick_gelu"
    bigger = config["num_hidden_layers"] > 12 or config["hidden_size"] > 768
    return "gelu" if bigger else "quick_gelu"


def clip_text_config(shapes: Shapes, prefix: str, projection: bool) -> dict[str, Any]:
    """``CLIPTextConfig`` dict of a CLIP-L or OpenCLIP bigG text encoder stored in
    transformers' names under ``prefix``; ``projection`` picks
    ``CLIPTextModelWithProjection`` (SD3's two CLIPs) over ``CLIPTextModel`` (FLUX's)."""
    config = _clip_hf_config(shapes, prefix, "quick_gelu", projection)
    config["hidden_act"] = _clip_activation(shapes, prefix, config)
    projection_weight = shapes.get(prefix + "text_projection.weight")
    if projection_weight is not None:
        config["projection_dim"] = projection_weight[0]
    return config


# --------------------------------------------------------------------------- VAE


def vae16_config(shapes: Shapes, prefix: str, family: str) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config of SD3's or FLUX.1's 16-channel VAE (LDM names
    under ``prefix``); ``family`` ("sd3", or "flux" / "flux1" / "chroma") gives the latent
    statistics, which no shape carries."""
    key = "flux" if family in _FLUX_VAE_FAMILIES else family
    if key not in _VAE16_FACTORS:
        raise ModelFileError(f"no 16-channel VAE known for {family!r}")
    config = derive_vae_config(shapes, prefix, _VAE16_FACTORS[key]["scaling_factor"])
    return config | {
        "shift_factor": _VAE16_FACTORS[key]["shift_factor"],
        "sample_size": VAE16_SAMPLE_SIZE,
        # Both VAEs dropped SD's 1x1 quant convs; keep whatever the file has.
        "use_quant_conv": prefix + "quant_conv.weight" in shapes,
        "use_post_quant_conv": prefix + "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": prefix + "encoder.mid.attn_1.q.weight" in shapes,
    }


# --------------------------------------------------------------------------- Z-Image

# Not in any shape: Z-Image's one patch size (2 x 2 latent cells, 1 frame: the "2-1" of
# diffusers' module names), its RoPE base and table lengths, its norm epsilon and timestep
# scale, as Tongyi-MAI/Z-Image-Turbo's transformer/config.json (and ComfyUI) give them.
ZIMAGE_PATCH = 2
ZIMAGE_ROPE_THETA = 256.0
ZIMAGE_AXES_LENS = [1536, 512, 512]


def zimage_rope_axes(head_dim: int) -> list[int]:
    """RoPE's split of a head over (caption/frame index, row, column): Z-Image's 128 are
    (32, 48, 48), a quarter for the index and the rest halved; smaller heads keep the proportions."""
    index = head_dim // 4
    row = (head_dim - index) // 2
    return [index, row, head_dim - index - row]


def zimage_transformer_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """diffusers ``ZImageTransformer2DModel`` config of the ComfyUI-named (NextDiT) transformer at
    ``prefix``: widths from the embedders, heads from the q/k norm's width, key/value heads from
    the fused qkv's rows."""
    width, patch_in = _shape(shapes, prefix + "x_embedder.weight")
    head_dim = _shape(shapes, prefix + "layers.0.attention.q_norm.weight")[0]
    if width % head_dim:
        raise ModelFileError(f"Z-Image width {width} is not a whole number of {head_dim}-wide heads")
    heads = width // head_dim
    qkv_rows = _shape(shapes, prefix + "layers.0.attention.qkv.weight")[0]
    kv_heads, odd = divmod(qkv_rows // head_dim - heads, 2)
    if odd or kv_heads <= 0:
        raise ModelFileError(f"Z-Image fused qkv of {qkv_rows} rows does not fit {heads} heads of {head_dim}")
    return {
        "all_patch_size": [ZIMAGE_PATCH],
        "all_f_patch_size": [1],
        "in_channels": patch_in // (ZIMAGE_PATCH * ZIMAGE_PATCH),
        "dim": width,
        "n_layers": _count(shapes, prefix, "layers"),
        "n_refiner_layers": _count(shapes, prefix, "noise_refiner"),
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": _shape(shapes, prefix + "cap_embedder.1.weight")[1],
        "rope_theta": ZIMAGE_ROPE_THETA,
        "t_scale": 1000.0,
        "axes_dims": zimage_rope_axes(head_dim),
        "axes_lens": list(ZIMAGE_AXES_LENS),
    }


# --------------------------------------------------------------------------- FLUX.2

# Not in any shape: FLUX.2's RoPE base and norm epsilon (black-forest-labs/FLUX.2-klein-4B's
# transformer/config.json), and its VAE's BatchNorm settings and tile size (AutoencoderKLFlux2's).
FLUX2_ROPE_THETA = 2000
FLUX2_EPS = 1e-6
FLUX2_VAE_BN_EPS = 1e-4
FLUX2_VAE_BN_MOMENTUM = 0.1
FLUX2_VAE_PATCH = [2, 2]
FLUX2_VAE_SAMPLE_SIZE = 1024


def flux2_rope_axes(head_dim: int) -> list[int]:
    """RoPE's split of a head over (time, row, column, sequence): four equal quarters
    (FLUX.2's 128 are (32, 32, 32, 32))."""
    if head_dim % 4:
        raise ModelFileError(f"FLUX.2 head width {head_dim} does not split over 4 RoPE axes")
    return [head_dim // 4] * 4


def flux2_transformer_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """diffusers ``Flux2Transformer2DModel`` config of the BFL-named FLUX.2 transformer at
    ``prefix`` (Klein 4B / 9B, and dev with its guidance input)."""
    blocks = _bfl_blocks(shapes, prefix, "FLUX.2")
    width = _shape(shapes, prefix + "img_in.weight")[0]
    head_dim = blocks["attention_head_dim"]
    # SwiGLU: the MLP's input linear holds the gate and the value, each mlp_ratio x width
    mlp_in = _shape(shapes, prefix + "double_blocks.0.img_mlp.0.weight")[0]
    return {
        **blocks,
        "timestep_guidance_channels": _shape(shapes, prefix + "time_in.in_layer.weight")[1],
        "mlp_ratio": mlp_in / 2 / width,
        "axes_dims_rope": flux2_rope_axes(head_dim),
        "rope_theta": FLUX2_ROPE_THETA,
        "eps": FLUX2_EPS,
        "guidance_embeds": prefix + "guidance_in.in_layer.weight" in shapes,
    }


def flux2_vae_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """diffusers ``AutoencoderKLFlux2`` config of FLUX.2's VAE in LDM names under ``prefix``, with
    its quant convs at the top level (``quant_conv.*``; BFL's file nests them in the encoder and
    decoder: lift them first) and its latent BatchNorm (``bn.running_mean``: 2 x 2 x latent wide)."""
    config = derive_vae_config(shapes, prefix, 1.0)
    for key in ("_class_name", "scaling_factor", "sample_size"):
        config.pop(key)
    statistics = _shape(shapes, prefix + "bn.running_mean")[0]
    patch = FLUX2_VAE_PATCH[0] * FLUX2_VAE_PATCH[1]
    if statistics != config["latent_channels"] * patch:
        raise ModelFileError(f"FLUX.2 VAE: {statistics} latent statistics for {config['latent_channels']} channels")
    levels = range(len(config["block_out_channels"]))
    decoder = [_shape(shapes, prefix + f"decoder.up.{i}.block.0.conv2.weight")[0] for i in levels]
    return config | {
        "decoder_block_out_channels": None if decoder == config["block_out_channels"] else decoder,
        "sample_size": FLUX2_VAE_SAMPLE_SIZE,
        "use_quant_conv": prefix + "quant_conv.weight" in shapes,
        "use_post_quant_conv": prefix + "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": prefix + "encoder.mid.attn_1.q.weight" in shapes,
        "batch_norm_eps": FLUX2_VAE_BN_EPS,
        "batch_norm_momentum": FLUX2_VAE_BN_MOMENTUM,
        "patch_size": list(FLUX2_VAE_PATCH),
    }
