"""Tiny FLUX.1 ControlNets for the tiny FLUX transformer of :mod:`studio.testing.flux`, in diffusers'
layout as InstantX, Shakker-Labs and jasperai share them: ``diffusion_pytorch_model.safetensors``
alone (how many users download it) or in a folder with its ``config.json``.

Three kinds: a plain ControlNet (1 double and 2 single blocks, as InstantX's 5/10 against FLUX's
19/38: every transformer block reads one, two blocks share a sample), a Union (2 double blocks, no
single ones, ``num_mode`` 10: Union-Pro's control-mode embedding) and an XLabs-style one
(``input_hint_block`` on the pixels, 1 double block cycled over the transformer's). The layers that
training starts at zero (``controlnet_blocks``, ``controlnet_x_embedder``) are random here so that a
unit changes the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import FluxControlNetModel

from studio.testing.dit_parts import cast, randomised, save_safetensors, seeded, write_json
from studio.testing.flux import flux_transformer_config

FLUX_CONTROLNET_KINDS = ("plain", "union", "xlabs")
UNION_NUM_MODE = 10
# (double, single) blocks per kind
_BLOCKS = {"plain": (1, 2), "union": (2, 0), "xlabs": (1, 0)}
_ZERO_INIT = ("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.")


def tiny_flux_controlnet_config(kind: str = "plain", guidance: bool = True) -> dict[str, Any]:
    """``FluxControlNetModel`` config of a tiny ControlNet for the tiny FLUX.1 dev transformer."""
    if kind not in FLUX_CONTROLNET_KINDS:
        raise ValueError(f"unknown tiny FLUX ControlNet kind {kind!r}; expected one of {FLUX_CONTROLNET_KINDS}")
    base = flux_transformer_config("dev")
    double, single = _BLOCKS[kind]
    return {
        # XLabs' hint encoder gives 16 channels per 8x8 pixels, packed 2x2 into 64-wide tokens
        "patch_size": 2 if kind == "xlabs" else 1,
        "in_channels": base["out_channels"],
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": base["attention_head_dim"],
        "num_attention_heads": base["num_attention_heads"],
        "joint_attention_dim": base["joint_attention_dim"],
        "pooled_projection_dim": base["pooled_projection_dim"],
        "guidance_embeds": guidance,
        "axes_dims_rope": list(base["axes_dims_rope"]),
        "num_mode": UNION_NUM_MODE if kind == "union" else None,
        "conditioning_embedding_channels": 16 if kind == "xlabs" else None,
    }


def tiny_flux_controlnet(kind: str = "plain", seed: int = 0, guidance: bool = True) -> FluxControlNetModel:
    """A freshly built tiny FLUX ControlNet; weights depend on ``kind`` and ``seed`` only."""
    config = tiny_flux_controlnet_config(kind, guidance)

    def build() -> FluxControlNetModel:
        model = randomised(FluxControlNetModel(**config))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith(_ZERO_INIT):
                    param.normal_(0.0, 0.2)
        return model

    return seeded(seed, build)


def make_flux_controlnet_file(path: str | Path, kind: str = "plain", seed: int = 0, *,
                              dtype: torch.dtype = torch.bfloat16,
                              model: FluxControlNetModel | None = None) -> Path:
    """Write ``diffusion_pytorch_model.safetensors`` of a tiny FLUX ControlNet alone (no config)."""
    model = model if model is not None else tiny_flux_controlnet(kind, seed)
    return save_safetensors(path, cast(model.state_dict(), dtype))


def make_flux_controlnet_folder(path: str | Path, kind: str = "plain", seed: int = 0, *,
                                dtype: torch.dtype = torch.bfloat16,
                                model: FluxControlNetModel | None = None) -> Path:
    """Write a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
    path = Path(path)
    model = model if model is not None else tiny_flux_controlnet(kind, seed)
    write_json(path / "config.json", {"_class_name": "FluxControlNetModel", "_diffusers_version": "0.30.0",
                                      **dict(model.config)})
    make_flux_controlnet_file(path / "diffusion_pytorch_model.safetensors", kind, seed, dtype=dtype, model=model)
    return path
