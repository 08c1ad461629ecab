"""Tiny random FLUX.1 Redux files, SigLIP image encoders and XLabs FLUX IP-Adapters in the real file
layouts.

The encoder is a ``SiglipVisionModel`` saved with transformers' ``vision_model.*`` names, as ComfyUI's
``sigclip_vision_patch14_384.safetensors`` is (with its attention-pooling head, which Redux does not
use); the Redux file is BFL's ``flux1-redux-dev.safetensors`` layout (``redux_up`` / ``redux_down``
with biases), its output as wide as the tiny FLUX checkpoints' T5 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from studio.controlnet.clip_vision import clip_vision_heads
from studio.testing.dit_parts import T5_HIDDEN, randomised, seeded
from studio.testing.flux import FLUX_DOUBLE_BLOCKS, FLUX_HEAD_DIM, FLUX_HEADS


def build_siglip_vision(hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8,
                        seed: int = 0) -> Any:
    """A tiny ``SiglipVisionModel`` (heads by the loader's rule): a 4x4 patch grid by default."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                                num_attention_heads=clip_vision_heads(hidden), image_size=image_size,
                                patch_size=patch)
    return seeded(seed, lambda: randomised(SiglipVisionModel(config)))


def siglip_file_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's tensors under the file's names (``vision_model.…``, whatever level the class has)."""
    state = model.state_dict()
    return {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.contiguous() for k, v in state.items()}


def write_siglip_vision(path: str | Path, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8,
                        seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(siglip_file_state(build_siglip_vision(hidden, layers, image_size, patch, seed)), str(path))
    return path


def build_redux(redux_dim: int = 32, out_dim: int = T5_HIDDEN, seed: int = 0) -> Any:
    """diffusers' ``ReduxImageEncoder`` with seeded weights scaled so its tokens are of the order of
    a T5 prompt's (a tiny FLUX transformer then visibly follows them)."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    def build() -> Any:
        model = ReduxImageEncoder(redux_dim=redux_dim, txt_in_features=out_dim)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn_like(param) * (0.5 if param.ndim > 1 else 0.1))
        return model.eval()

    return seeded(seed, build)


def write_redux(path: str | Path, redux_dim: int = 32, out_dim: int = T5_HIDDEN, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Path:
    """BFL's file layout: four tensors, no prefix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in build_redux(redux_dim, out_dim, seed).state_dict().items()}
    save_file(state, str(path))
    return path


def flux_ip_adapter_state(clip_dim: int = 24, width: int = T5_HIDDEN, inner: int = FLUX_HEADS * FLUX_HEAD_DIM,
                          blocks: int = FLUX_DOUBLE_BLOCKS, tokens: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """XLabs-AI's FLUX IP-Adapter file layout (``ip_adapter.safetensors``) for the tiny FLUX transformer:
    the projection model (``ip_adapter_proj_model.proj`` + ``norm``: ``tokens`` tokens ``width`` wide
    from a ``clip_dim`` image embedding) and per double block the image keys/values."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "ip_adapter_proj_model.proj.weight": rand(tokens * width, clip_dim),
        "ip_adapter_proj_model.proj.bias": rand(tokens * width, scale=0.1),
        "ip_adapter_proj_model.norm.weight": 1 + rand(width, scale=0.1),
        "ip_adapter_proj_model.norm.bias": rand(width, scale=0.1),
    }
    for block in range(blocks):
        for kv in ("k", "v"):
            name = f"double_blocks.{block}.processor.ip_adapter_double_stream_{kv}_proj"
            state[f"{name}.weight"] = rand(inner, width)
            state[f"{name}.bias"] = rand(inner, scale=0.1)
    return state


def write_flux_ip_adapter(path: str | Path, clip_dim: int = 24, seed: int = 0, **sizes: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flux_ip_adapter_state(clip_dim, seed=seed, **sizes), str(path))
    return path
