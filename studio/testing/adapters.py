"""Tiny random T2I-Adapters in the file layouts they are shared in.

A T2I-Adapter is a small CNN that turns the control map into one feature map per UNet down
block; the features are added inside those blocks. The tiny ones here have one level per tiny
UNet down block (:data:`studio.testing.factory.UNET_CHANNELS`), so their features fit the tiny
UNets at any size that is a multiple of 64 px. They are written as diffusers folders, as single
files with diffusers' names (how SDXL adapters are shared), and in TencentARC's original flat
layout (``conv_in.*``, ``body.N.block1.*``; the SD1.4/1.5 ``t2iadapter_*.pth`` files).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import T2IAdapter
from torch import Tensor

from studio.models.ldm_keys import base_family
from studio.testing.factory import UNET_CHANNELS, _save

RES_BLOCKS = 2
ADAPTER_TYPES = {"sd1": "full_adapter", "sdxl": "full_adapter_xl"}
DOWNSCALE = {"sd1": 8, "sdxl": 16}


def build_adapter(family: str = "sd1", seed: int = 0, in_channels: int = 3) -> T2IAdapter:
    """A tiny diffusers T2I-Adapter for the tiny ``family`` UNet ("sd1" or "sdxl")."""
    base = base_family(family)
    if base not in ADAPTER_TYPES:
        raise ValueError(f"no T2I-Adapter for {family!r}; expected sd1 or sdxl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        model = T2IAdapter(in_channels=in_channels, channels=list(UNET_CHANNELS), num_res_blocks=RES_BLOCKS,
                           downscale_factor=DOWNSCALE[base], adapter_type=ADAPTER_TYPES[base])
    return model.eval()


def adapter_to_original(model: T2IAdapter) -> dict[str, Tensor]:
    """diffusers full-adapter weights -> TencentARC's flat names: level L's resnet J is
    ``body.{L * res_blocks + J}``, and a level's width-changing 1x1 conv is that level's first
    entry's ``in_conv``."""
    if model.config.adapter_type != "full_adapter":
        raise ValueError("the original layout exists for SD1 full adapters only")
    nrb = model.config.num_res_blocks
    out = {}
    for key, value in model.state_dict().items():
        name = key.removeprefix("adapter.")
        if m := re.fullmatch(r"body\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            name = f"body.{int(m[1]) * nrb + int(m[2])}.{m[3]}"
        elif m := re.fullmatch(r"body\.(\d+)\.in_conv\.(.+)", name):
            name = f"body.{int(m[1]) * nrb}.in_conv.{m[2]}"
        out[name] = value.detach().clone().contiguous()
    return out


def make_adapter(path: str | Path, family: str = "sd1", seed: int = 0, original: bool = True,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny T2I-Adapter single file (.safetensors, .pth). ``original=True`` (SD1 only) uses
    TencentARC's names, else diffusers' (``adapter.body.0.resnets.0.block1.weight``)."""
    model = build_adapter(family, seed)
    state_dict = adapter_to_original(model) if original else model.state_dict()
    return _save(Path(path), {k: v.detach().to(dtype).contiguous() for k, v in state_dict.items()})


def make_adapter_folder(path: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """A diffusers ``save_pretrained`` T2I-Adapter folder."""
    path = Path(path)
    build_adapter(family, seed).save_pretrained(path, safe_serialization=True)
    return path
