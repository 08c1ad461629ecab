"""diffusers configs derived from a checkpoint's tensor shapes.

Full-size SD1.5, SD2.x and SDXL files give exactly the configs shipped in
``studio/models/configs/``; any other size (pruned, tiny test models, odd merges) gets a
config computed from its shapes, so every file takes the same loading path. Head counts
are not visible in shapes, so they follow the conventions of the real models: SD1 has 8
heads everywhere, SD2/SDXL/OpenCLIP/CLIP use 64-wide heads.
"""

from __future__ import annotations

import re
from typing import Any

from studio.models.probe import (
    REFINER_TE,
    SD1_TE,
    SD2_TE,
    SDXL_TE1,
    SDXL_TE2,
    UNET,
    VAE,
    CheckpointProbe,
)
from studio.models.state_dict import ModelFileError, Shapes

CLIP_VOCAB = 49408
CLIP_POSITIONS = 77


def unet_heads(family: str, channels: int) -> int:
    return 8 if family == "sd1" else max(1, channels // 64)


def te_heads(hidden: int) -> int:
    return max(1, hidden // 64)


def _indices(shapes: Shapes, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in shapes if (m := rx.match(k))}


def _transformer_depth(shapes: Shapes, block_prefix: str) -> int:
    return len(_indices(shapes, re.escape(block_prefix) + r"transformer_blocks\.(\d+)\."))


def derive_unet_config(shapes: Shapes, probe: CheckpointProbe) -> dict[str, Any]:
    conv_in = shapes[UNET + "input_blocks.0.0.weight"]
    input_ids = sorted(_indices(shapes, re.escape(UNET) + r"input_blocks\.(\d+)\."))
    down_ids = [i for i in input_ids if UNET + f"input_blocks.{i}.0.op.weight" in shapes]
    layers = down_ids[0] - 1 if down_ids else len(input_ids) - 1
    levels = len(down_ids) + 1
    if layers < 1:
        raise ModelFileError("UNet layout not recognised (no residual blocks before the first downsample)")

    channels, attn_depths, linear_proj, context_dim = [], [], None, None
    for level in range(levels):
        first = 1 + level * (layers + 1)
        out_w = shapes.get(UNET + f"input_blocks.{first}.0.out_layers.3.weight")
        if out_w is None:
            raise ModelFileError(f"UNet layout not recognised (input_blocks.{first} missing)")
        channels.append(out_w[0])
        attn_prefix = UNET + f"input_blocks.{first}.1."
        depth = _transformer_depth(shapes, attn_prefix)
        attn_depths.append(depth)
        if depth:
            linear_proj = len(shapes[attn_prefix + "proj_in.weight"]) == 2
            context_dim = shapes[attn_prefix + "transformer_blocks.0.attn2.to_k.weight"][1]
    if context_dim is None:
        raise ModelFileError("UNet has no cross-attention layers")
    mid_depth = _transformer_depth(shapes, UNET + "middle_block.1.")

    family = "sd1" if probe.family == "sd1" else "sdxl" if probe.family.startswith("sdxl") else "sd2"
    heads = [unet_heads(family, c) for c in channels]
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": heads[0] if family == "sd1" else heads,
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in attn_depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(attn_depths)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": conv_in[1],
        "out_channels": shapes[UNET + "out.2.weight"][0],
        "layers_per_block": layers,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "sample_size": {"sd1": 64, "sd2": 96 if probe.prediction_type == "v_prediction" else 64,
                        "sdxl": 128}[family],
        "use_linear_projection": bool(linear_proj),
        "upcast_attention": family == "sd2" and probe.prediction_type == "v_prediction",
    }
    if family != "sd1" or any(d > 1 for d in attn_depths):
        config["transformer_layers_per_block"] = [max(d, 1) for d in attn_depths]
        if mid_depth and mid_depth != config["transformer_layers_per_block"][-1]:
            config["transformer_layers_per_block"][-1] = mid_depth
    label = shapes.get(UNET + "label_emb.0.0.weight")
    if label is not None:
        adm_in = label[1]
        pooled = _sdxl_pooled_dim(shapes)
        config.update({
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": (adm_in - pooled) // sdxl_time_ids(probe.family),
            "projection_class_embeddings_input_dim": adm_in,
        })
    return config


def sdxl_time_ids(family: str) -> int:
    """How many numbers SDXL's added conditioning embeds besides the pooled text: original size,
    crop corner and target size (6) for the base model; the refiner has an aesthetic score in place
    of the target size (5: its 2560-wide ``label_emb`` input is 5 * 256 + 1280)."""
    return 5 if family == "sdxl-refiner" else 6


def _sdxl_pooled_dim(shapes: Shapes) -> int:
    for prefix in (SDXL_TE2, REFINER_TE):
        proj = shapes.get(prefix + "text_projection")
        if proj is not None:
            return proj[1]
    raise ModelFileError("SDXL checkpoint without an OpenCLIP text_projection")


def derive_vae_config(shapes: Shapes, prefix: str, scaling_factor: float) -> dict[str, Any]:
    conv_in = shapes.get(prefix + "encoder.conv_in.weight")
    if conv_in is None:
        raise ModelFileError("no VAE weights found")
    levels = sorted(_indices(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\."))
    channels = [shapes[prefix + f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    layers = len(_indices(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\."))
    latent = shapes[prefix + "post_quant_conv.weight"][0] if prefix + "post_quant_conv.weight" in shapes \
        else shapes[prefix + "decoder.conv_in.weight"][1]
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "in_channels": conv_in[1],
        "out_channels": shapes[prefix + "decoder.conv_out.weight"][0],
        "latent_channels": latent,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": scaling_factor,
    }


def _clip_hf_config(shapes: Shapes, prefix: str, act: str, projection: bool) -> dict[str, Any]:
    """Text encoder stored in transformers' layout (SD1, SDXL's CLIP-L)."""
    base = prefix + "text_model." if any(k.startswith(prefix + "text_model.") for k in shapes) else prefix
    hidden = shapes[base + "embeddings.token_embedding.weight"][1]
    layers = len(_indices(shapes, re.escape(base) + r"encoder\.layers\.(\d+)\."))
    cfg = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": shapes[base + "encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": layers,
        "num_attention_heads": te_heads(hidden),
        "max_position_embeddings": shapes[base + "embeddings.position_embedding.weight"][0],
        "vocab_size": shapes[base + "embeddings.token_embedding.weight"][0],
        "hidden_act": act,
        "projection_dim": hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "layer_norm_eps": 1e-05,
    }
    return cfg


def _open_clip_config(shapes: Shapes, prefix: str, drop_last_layer: bool, projection: bool) -> dict[str, Any]:
    """OpenCLIP layout (SD2, SDXL's bigG). SD2 conditions on the penultimate layer, so its
    last resblock is never used and the HF model is built one layer shorter, as in diffusers'
    own SD2 configs (23 of 24 layers)."""
    hidden = shapes[prefix + "token_embedding.weight"][1]
    blocks = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    proj = shapes.get(prefix + "text_projection")
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_hidden_layers": blocks - 1 if drop_last_layer else blocks,
        "num_attention_heads": te_heads(hidden),
        "max_position_embeddings": shapes[prefix + "positional_embedding"][0],
        "vocab_size": shapes[prefix + "token_embedding.weight"][0],
        "hidden_act": "gelu",
        "projection_dim": proj[1] if proj is not None else hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "layer_norm_eps": 1e-05,
    }


def derive_text_configs(shapes: Shapes, probe: CheckpointProbe) -> dict[str, dict[str, Any]]:
    if probe.family == "sd1":
        return {"text_encoder": _clip_hf_config(shapes, SD1_TE, "quick_gelu", projection=False)}
    if probe.family == "sd2":
        return {"text_encoder": _open_clip_config(shapes, SD2_TE, drop_last_layer=True, projection=False)}
    if probe.family == "sdxl":
        return {
            "text_encoder": _clip_hf_config(shapes, SDXL_TE1, "quick_gelu", projection=False),
            "text_encoder_2": _open_clip_config(shapes, SDXL_TE2, drop_last_layer=False, projection=True),
        }
    if probe.family == "sdxl-refiner":
        # OpenCLIP bigG alone, all its layers (the conditioning reads the penultimate hidden state,
        # the pooled vector the last); diffusers names it ``text_encoder_2`` in the refiner pipeline.
        return {"text_encoder_2": _open_clip_config(shapes, REFINER_TE, drop_last_layer=False, projection=True)}
    raise ModelFileError(f"{probe.label} checkpoints are not supported yet")


def scaling_factor(family: str) -> float:
    return 0.13025 if family.startswith("sdxl") else 0.18215


def derive_configs(shapes: Shapes, probe: CheckpointProbe) -> dict[str, dict[str, Any]]:
    """All component configs of a checkpoint, keyed by diffusers subfolder name."""
    configs = {"unet": derive_unet_config(shapes, probe)}
    configs["vae"] = derive_vae_config(shapes, VAE, scaling_factor(probe.family))
    configs.update(derive_text_configs(shapes, probe))
    return configs
