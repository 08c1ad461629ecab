"""diffusers -> original (LDM / A1111) key layout: used to write test checkpoints and to
name UNet modules the way SDXL kohya LoRA files name them.

The reverse of diffusers' ``convert_ldm_*`` single-file converters, written for
any block count and ``layers_per_block`` (diffusers' own
``scripts/convert_diffusers_to_original_*`` hard-code the full-size layout), so
that tiny test models can be written as real-looking checkpoints.

Every function returns fresh, contiguous tensors (safetensors refuses shared or
strided storage) and raises on any key it does not know, so a layout change in
diffusers or transformers shows up as an error instead of a silently missing
weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
V_PRED_KEY = "v_pred"

BASE_FAMILIES = ("sd1", "sd2", "sdxl")

# OpenCLIP initialises logit_scale to log(1/0.07); real files carry the
# trained value, but nothing in SD uses it.
_OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)
# Fixed seed for the few tensors that exist only in the original layout
# (SD2's unused last resblock and its text_projection), so that a checkpoint
# stays a pure function of the diffusers components.
_ORIGINAL_ONLY_SEED = 1234


def base_family(family: str) -> str:
    """``"sd1-inpaint"`` -> ``"sd1"``, ``"sd2-v"`` -> ``"sd2"``, ``"sdxl-inpaint"`` -> ``"sdxl"``."""
    base = family.split("-", 1)[0]
    if base not in BASE_FAMILIES:
        raise ValueError(f"unknown model family {family!r}")
    return base


def _tensor(value: Tensor) -> Tensor:
    return value.detach().clone().contiguous()


# --------------------------------------------------------------------------- UNet

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's pooled-text + size conditioning MLP.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}

_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _unet_resnet_tail(tail: str) -> str:
    module, _, param = tail.partition(".")
    if module not in _UNET_RESNET_NAMES:
        raise KeyError(f"unknown UNet resnet parameter {tail!r}")
    return f"{_UNET_RESNET_NAMES[module]}.{param}"


def _unet_inner(kind: str, tail: str) -> str:
    """Resnets are renamed; transformer blocks keep their names in both layouts."""
    return f"0.{_unet_resnet_tail(tail)}" if kind == "resnets" else f"1.{tail}"


def _unet_key(key: str, layers: int, up_blocks_with_attention: set[int]) -> str:
    # LDM numbers the blocks sequentially: each level has ``layers`` resnets
    # (+ attention) and then, except the last level, one downsample entry, so
    # a level spans layers + 1 indices. input_blocks.0 is conv_in.
    stride = layers + 1
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP_LEVEL:
        return f"{_UNET_TOP_LEVEL[module]}.{param}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{stride * level + j + 1}.{_unet_inner(kind, tail)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"

    # middle_block alternates resnet, attention, resnet.
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_unet_resnet_tail(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1]) + 1}.{m[2]}"

    # Up levels have layers + 1 resnets and no separate upsample entry: the
    # upsampler is appended to the level's last block, after its attention.
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{stride * level + j}.{_unet_inner(kind, tail)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if level in up_blocks_with_attention else 1
        return f"output_blocks.{stride * level + layers}.{slot}.conv.{m[2]}"

    raise KeyError(f"no LDM name known for UNet parameter {key!r}")


def unet_to_ldm(state_dict: Mapping[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` weights -> LDM names, without prefix.

    SD1's ``proj_in``/``proj_out`` are 1x1 convs and SD2/SDXL's are linears in
    both layouts, so shapes are kept as they are.
    """
    if not isinstance(layers_per_block, int):
        raise ValueError("per-level layers_per_block is not supported by the LDM layout")
    with_attention = {int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {_unet_key(k, layers_per_block, with_attention): _tensor(v) for k, v in state_dict.items()}


# --------------------------------------------------------------------------- VAE

_VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_key(key: str, num_levels: int) -> str:
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.[a-z]+", key):
        return key
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # The LDM decoder numbers its levels from the lowest resolution, the
    # diffusers one from the highest, so the up path is reversed.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = num_levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] in _VAE_ATTENTION_NAMES:
            return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_NAMES[m[2]]}.{m[3]}"
    raise KeyError(f"no LDM name known for VAE parameter {key!r}")


def vae_to_ldm(state_dict: Mapping[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` weights -> LDM names, without prefix.

    The LDM mid-block attention is made of 1x1 convs, so its linear weights
    become 4-D.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        ldm_key = _vae_key(key, num_levels)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and ".norm." not in ldm_key:
            value = value[:, :, None, None]
        out[ldm_key] = _tensor(value)
    return out


# --------------------------------------------------------------------------- text encoders


def _text_model(model: Any) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model`` wrapper);
    # CLIPTextModelWithProjection still has one.
    return model.text_model if hasattr(model, "text_model") else model


def clip_to_ldm(model: Any) -> dict[str, Tensor]:
    """An HF CLIP text model in the layout A1111 files use: transformers 4
    names (with ``text_model.``), plus the ``position_ids`` buffer that real
    files carry and transformers 5 no longer saves."""
    text_model = _text_model(model)
    out = {f"text_model.{k}": _tensor(v) for k, v in text_model.state_dict().items()}
    positions = text_model.config.max_position_embeddings
    out["text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None, :]
    return out


_OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _open_clip_layer(layer: Mapping[str, Tensor], index: int) -> dict[str, Tensor]:
    """One HF encoder layer -> one OpenCLIP resblock (q/k/v fused into in_proj)."""
    prefix = f"transformer.resblocks.{index}."
    out: dict[str, Tensor] = {}
    for param in ("weight", "bias"):
        fused = [layer[f"self_attn.{p}_proj.{param}"] for p in "qkv"]
        out[f"{prefix}attn.in_proj_{param}"] = _tensor(torch.cat(fused, dim=0))
    for key, value in layer.items():
        module, _, param = key.rpartition(".")
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            continue
        if module not in _OPEN_CLIP_LAYER_NAMES:
            raise KeyError(f"no OpenCLIP name known for text encoder parameter {key!r}")
        out[f"{prefix}{_OPEN_CLIP_LAYER_NAMES[module]}.{param}"] = _tensor(value)
    return out


def _dummy_layer(width: int, intermediate: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random HF-named encoder layer, the stand-in for SD2's unused last resblock."""

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    layer = {f"self_attn.{p}_proj.weight": randn(width, width) for p in "qkv"}
    layer |= {f"self_attn.{p}_proj.bias": randn(width) for p in "qkv"}
    layer |= {
        "self_attn.out_proj.weight": randn(width, width),
        "self_attn.out_proj.bias": randn(width),
        "layer_norm1.weight": 1 + randn(width),
        "layer_norm1.bias": randn(width),
        "layer_norm2.weight": 1 + randn(width),
        "layer_norm2.bias": randn(width),
        "mlp.fc1.weight": randn(intermediate, width),
        "mlp.fc1.bias": randn(intermediate),
        "mlp.fc2.weight": randn(width, intermediate),
        "mlp.fc2.bias": randn(width),
    }
    return layer


def open_clip_to_ldm(model: Any, *, sd2: bool) -> dict[str, Tensor]:
    """An HF CLIP text model in OpenCLIP layout, without prefix.

    ``sd2=False`` (SDXL's bigG, a ``CLIPTextModelWithProjection``): every
    resblock is used and ``text_projection`` is stored ``[width, proj]``, the
    transpose of the HF Linear weight.

    ``sd2=True``: SD2 conditions on the *penultimate* OpenCLIP layer, so real
    checkpoints have 24 resblocks of which diffusers keeps 23
    (``num_hidden_layers=23`` in its SD2 configs). diffusers 0.42's
    ``convert_open_clip_checkpoint`` does not drop "the last" block generically:
    it skips the hard-coded keys ``resblocks.23.*`` and ``text_projection``
    (``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``), and for a smaller model the extra
    block's converted keys (``encoder.layers.N.*``) simply match no parameter
    and are skipped by ``load_model_dict_into_meta``. So we write the HF layers
    plus one dummy final resblock: that is the real layout (resblocks =
    num_hidden_layers + 1, which the studio's loader relies on) and it still
    round-trips exactly through diffusers. ``text_projection`` (unused by SD2,
    but diffusers reads its ``shape[0]`` as the width to split ``in_proj``)
    is a ``[width, width]`` near-identity matrix.
    """
    text_model = _text_model(model)
    config = text_model.config
    flat = text_model.state_dict()
    out: dict[str, Tensor] = {
        "token_embedding.weight": _tensor(flat["embeddings.token_embedding.weight"]),
        "positional_embedding": _tensor(flat["embeddings.position_embedding.weight"]),
        "ln_final.weight": _tensor(flat["final_layer_norm.weight"]),
        "ln_final.bias": _tensor(flat["final_layer_norm.bias"]),
        "logit_scale": torch.tensor(_OPEN_CLIP_LOGIT_SCALE),
    }
    layers: dict[int, dict[str, Tensor]] = {}
    for key, value in flat.items():
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            layers.setdefault(int(m[1]), {})[m[2]] = value
        elif not key.startswith(("embeddings.", "final_layer_norm.")):
            raise KeyError(f"no OpenCLIP name known for text encoder parameter {key!r}")
    if sorted(layers) != list(range(config.num_hidden_layers)):
        raise ValueError("text encoder layers are not numbered 0..num_hidden_layers-1")

    width = config.hidden_size
    if sd2:
        generator = torch.Generator().manual_seed(_ORIGINAL_ONLY_SEED)
        layers[len(layers)] = _dummy_layer(width, config.intermediate_size, generator)
        out["text_projection"] = torch.eye(width) + torch.randn(width, width, generator=generator) * 0.02
    else:
        if not hasattr(model, "text_projection"):
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection")
        out["text_projection"] = _tensor(model.text_projection.weight.T)
    for index, layer in sorted(layers.items()):
        out.update(_open_clip_layer(layer, index))
    return out


# --------------------------------------------------------------------------- whole checkpoint


def _prefixed(prefix: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state_dict.items()}


def to_ldm_state_dict(components: Mapping[str, Any], family: str) -> dict[str, Tensor]:
    """A full single-file (A1111 / original) state dict from diffusers components.

    ``components`` is what :func:`studio.testing.factory.tiny_components`
    returns (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` for SDXL,
    ``prediction_type``). v-prediction models get ComfyUI's ``v_pred`` marker key.
    """
    base = base_family(family)
    unet, vae = components["unet"], components["vae"]
    out = _prefixed(UNET_PREFIX, unet_to_ldm(unet.state_dict(), unet.config.layers_per_block))
    out |= _prefixed(VAE_PREFIX, vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    if base == "sd1":
        out |= _prefixed(SD1_TE_PREFIX, clip_to_ldm(components["text_encoder"]))
    elif base == "sd2":
        out |= _prefixed(SD2_TE_PREFIX, open_clip_to_ldm(components["text_encoder"], sd2=True))
    else:
        out |= _prefixed(SDXL_TE1_PREFIX, clip_to_ldm(components["text_encoder"]))
        out |= _prefixed(SDXL_TE2_PREFIX, open_clip_to_ldm(components["text_encoder_2"], sd2=False))
    if components.get("prediction_type", "epsilon") == "v_prediction":
        # ComfyUI writes an empty tensor under this key into v-prediction
        # checkpoints it saves; only its presence matters.
        out[V_PRED_KEY] = torch.tensor([])
    return out
