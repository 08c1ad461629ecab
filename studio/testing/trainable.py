"""A tiny model for training tests that responds like a trained one.

Freshly initialised UNets predict almost nothing (outputs of std ~0.003) and barely listen to the
text, so a few dozen training steps cannot move the loss above the noise of random timesteps. Real
checkpoints predict unit-scale noise and are steered by the prompt. Two rescalings give the tiny model
both properties: ``conv_out`` so predictions have about unit scale, and every cross-attention output
projection so the text conditioning changes the prediction strongly (what textual inversion and
hypernetworks learn through).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from studio.testing.factory import make_checkpoint, tiny_components

OUTPUT_SCALE = 300.0
CROSS_ATTENTION_SCALE = 30.0


def responsive_components(family: str = "sd1", seed: int = 1) -> Mapping[str, Any]:
    components = tiny_components(family, seed)
    unet = components["unet"]
    with torch.no_grad():
        unet.conv_out.weight.mul_(OUTPUT_SCALE)
        unet.conv_out.bias.mul_(OUTPUT_SCALE)
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(CROSS_ATTENTION_SCALE)
    return components


def make_trainable_checkpoint(path: str | Path, family: str = "sd1", seed: int = 1) -> Path:
    return make_checkpoint(path, family, components=responsive_components(family, seed))
