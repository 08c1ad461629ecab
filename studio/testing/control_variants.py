"""Tiny random SDXL ControlNet variants in the layouts they are shared in.

- Control-LoRA (Stability's ``control-lora-*-rank*.safetensors``): original (ldm) names, a
  ``lora_controlnet`` marker, ``<module>.up``/``.down`` pairs for every matrix copied from the
  UNet, full tensors for the rest (norms and biases as trained values, the hint CNN, zero convs).
- ControlNet Union / ProMax (xinsir's ``controlnet-union-sdxl-1.0``): a diffusers
  ``ControlNetUnionModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``);
  the weights file alone is the config-less form users also download.

Both are built from a tiny UNet of :mod:`studio.testing.factory`, so they fit it exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, ControlNetUnionModel
from torch import Tensor

from studio.controlnet.control_lora import MARKER, controlnet_ldm_name
from studio.testing.controlnets import CONDITIONING_CHANNELS
from studio.testing.factory import _save

# Trained zero convs and projections are small but not zero: random ones make the model visibly act.
_ZERO_CONV_SCALE = 0.05
# LoRA factors: small updates, as a fine-tune's are, yet far above float rounding.
_LORA_SCALE = 0.1
# How far the file's norms and biases move from the UNet's.
_FULL_NOISE = 0.05
_CONTROLNET_ONLY = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
UNION_TRANS_HEADS = 8  # xinsir's value; not recoverable from tensor shapes
_UNION_EXTRAS = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")


def _lora_pair(weight: Tensor, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(up, down) shaped as Stability's files: linear [out, r] / [r, in]; conv [out, r, 1, 1] /
    [r, in, kh, kw]."""
    out_features, fan_in = weight.shape[0], weight[0].numel()
    up = torch.randn(out_features, rank, generator=generator) * _LORA_SCALE
    down = torch.randn(rank, fan_in, generator=generator) * _LORA_SCALE
    if weight.ndim == 4:
        return up[:, :, None, None], down.reshape(rank, *weight.shape[1:])
    return up, down


def control_lora_state_dict(base_unet: Any, rank: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """A Control-LoRA for ``base_unet`` (an SDXL ``UNet2DConditionModel``), ldm-named."""
    generator = torch.Generator().manual_seed(seed)
    model = ControlNetModel.from_unet(base_unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    layers = model.config.layers_per_block
    hint_blocks = len(model.controlnet_cond_embedding.blocks)
    out: dict[str, Tensor] = {MARKER: torch.tensor([])}
    for key, value in model.state_dict().items():
        name = controlnet_ldm_name(key, layers, hint_blocks)
        value = value.detach().float()
        if key.startswith(_CONTROLNET_ONLY):
            out[name] = (torch.randn(value.shape, generator=generator) * _ZERO_CONV_SCALE).contiguous()
        elif value.ndim >= 2:
            module = name.rpartition(".")[0]
            out[module + ".up"], out[module + ".down"] = (t.contiguous() for t in _lora_pair(value, rank, generator))
        else:
            out[name] = (value + torch.randn(value.shape, generator=generator) * _FULL_NOISE).contiguous()
    return out


def write_control_lora(path: str | Path, base_unet: Any, rank: int = 4, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny Control-LoRA for ``base_unet`` (``.safetensors``, as Stability's)."""
    state_dict = control_lora_state_dict(base_unet, rank, seed)
    state_dict = {k: v if k == MARKER else v.to(dtype) for k, v in state_dict.items()}
    return _save(Path(path), state_dict)


def build_union(base_unet: Any, seed: int = 0, num_control_type: int = 8) -> ControlNetUnionModel:
    """A tiny ControlNet Union (``num_control_type`` 8 is ProMax's, with tile and repaint) whose
    encoder is ``base_unet``'s; the union transformer is as wide as the UNet's first level, since
    its tokens are mean hint features plus task embeddings of that width."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        plain = ControlNetUnionModel.from_unet(base_unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
        width = base_unet.config.block_out_channels[0]
        # not from_config: the config lists the union sizes as defaulted (``_use_default_values``),
        # and from_config would put the defaults back
        config = {k: v for k, v in plain.config.items() if not k.startswith("_")}
        config |= {"num_control_type": num_control_type, "num_trans_channel": width, "num_proj_channel": width,
                   "num_trans_head": UNION_TRANS_HEADS, "num_trans_layer": 1}
        model = ControlNetUnionModel(**config)
        kept = {k: v for k, v in plain.state_dict().items() if not k.startswith(_UNION_EXTRAS)}
        model.load_state_dict(kept, strict=False)
        with torch.no_grad():
            for layer in (*model.controlnet_down_blocks, model.controlnet_mid_block, model.spatial_ch_projs,
                          model.controlnet_cond_embedding.conv_out):
                layer.weight.copy_(torch.randn_like(layer.weight) * _ZERO_CONV_SCALE)
                layer.bias.copy_(torch.randn_like(layer.bias) * _ZERO_CONV_SCALE)
    return model.eval()


def write_union(path: str | Path, base_unet: Any, seed: int = 0, num_control_type: int = 8) -> Path:
    """A diffusers ``save_pretrained`` Union folder; its ``diffusion_pytorch_model.safetensors``
    alone is the config-less single file."""
    path = Path(path)
    build_union(base_unet, seed, num_control_type).save_pretrained(path, safe_serialization=True)
    return path
