"""Tiny random ControlNets in the file layouts they are shared in.

A ControlNet is a copy of the UNet's encoder plus a small "hint" CNN for the
conditioning image and one zero-initialised 1x1 conv per residual. The tiny
ones here are built from the tiny UNets of :mod:`studio.testing.factory`, so
they fit those models exactly, and are written in the original (lllyasviel /
A1111 extension) layout that most ``.pth``/``.safetensors`` files use.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel
from torch import Tensor

from studio.controlnet.control_lora import controlnet_ldm_name
from studio.models.ldm_keys import base_family
from studio.testing.factory import _save, tiny_components

CONDITIONING_CHANNELS = (16, 32, 96, 256)
ORIGINAL_PREFIX = "control_model."
# Zero convs start at zero in training; random ones make the ControlNet visibly act.
_ZERO_CONV_SCALE = 0.05


def build_controlnet(family: str = "sd1", seed: int = 0,
                     components: Mapping[str, Any] | None = None) -> ControlNetModel:
    """A tiny diffusers ControlNet matching the tiny ``family`` UNet."""
    components = components if components is not None else tiny_components(family, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = ControlNetModel.from_unet(components["unet"],
                                          conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
        with torch.no_grad():
            for conv in (*model.controlnet_down_blocks, model.controlnet_mid_block,
                         model.controlnet_cond_embedding.conv_out):
                conv.weight.copy_(torch.randn_like(conv.weight) * _ZERO_CONV_SCALE)
                conv.bias.copy_(torch.randn_like(conv.bias) * _ZERO_CONV_SCALE)
    return model.eval()


def controlnet_to_ldm(model: ControlNetModel, prefix: bool = False) -> dict[str, Tensor]:
    """diffusers ControlNet weights -> original layout names."""
    state_dict = model.state_dict()
    layers = model.config.layers_per_block
    hint_blocks = len(model.controlnet_cond_embedding.blocks)
    head = ORIGINAL_PREFIX if prefix else ""
    return {head + controlnet_ldm_name(k, layers, hint_blocks): v.detach().clone().contiguous()
            for k, v in state_dict.items()}


def make_controlnet(path: str | Path, family: str = "sd1", seed: int = 0,
                    components: Mapping[str, Any] | None = None, prefix: bool = False,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny ControlNet in the original layout (.safetensors, .pth, .pt, .ckpt).

    ``prefix=True`` writes the ``control_model.`` names of files cut from training
    checkpoints; without it the names are bare, as in most shared files.
    """
    base_family(family)
    model = build_controlnet(family, seed, components)
    state_dict = {k: v.to(dtype) for k, v in controlnet_to_ldm(model, prefix).items()}
    return _save(Path(path), state_dict)


def make_controlnet_folder(path: str | Path, family: str = "sd1", seed: int = 0,
                           components: Mapping[str, Any] | None = None) -> Path:
    """A diffusers ``save_pretrained`` ControlNet folder."""
    path = Path(path)
    build_controlnet(family, seed, components).save_pretrained(path, safe_serialization=True)
    return path
