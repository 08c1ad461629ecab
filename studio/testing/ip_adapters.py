"""Tiny random IP-Adapters and CLIP vision encoders in the real file layouts.

The encoder is a ``CLIPVisionModelWithProjection`` saved with transformers' names, as ComfyUI's
``clip_vision_h.safetensors`` is. The adapters follow h94/IP-Adapter: ``.safetensors`` with flat
``image_proj.*`` / ``ip_adapter.N.to_k_ip|to_v_ip.weight`` names, ``.bin`` as the pickled nested
``{"image_proj": …, "ip_adapter": …}`` dict; the image projection uses the original module names
(the Resampler's ``layers.N.0.to_kv``, ``layers.N.1.3``…), which diffusers converts on load.
Weights are seeded and small, so an adapter at weight 1 visibly changes a tiny UNet's output
without swamping it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from studio.controlnet.clip_vision import clip_vision_heads

# The Resampler's fixed sizes in diffusers' IPAdapterPlusImageProjection (it reads only the head
# count from the file): 64-wide heads, 4 layers, a 4x feed-forward.
RESAMPLER_HEAD_DIM = 64
RESAMPLER_DEPTH = 4
RESAMPLER_FF_MULT = 4
BASE_TOKENS = 4
FACEID_ID_DIM = 16


def build_clip_vision(hidden: int = 32, layers: int = 2, proj: int = 24, image_size: int = 32, patch: int = 8,
                      seed: int = 0) -> Any:
    """A tiny ``CLIPVisionModelWithProjection`` (heads by the loader's rule)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                              num_attention_heads=clip_vision_heads(hidden), image_size=image_size,
                              patch_size=patch, projection_dim=proj, hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1:  # norms and biases: not constant, so swaps would show
                    param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def write_clip_vision(path: str | Path, hidden: int = 32, layers: int = 2, proj: int = 24, image_size: int = 32,
                      patch: int = 8, seed: int = 0, prefix: str = "") -> Path:
    """Save a tiny encoder with transformers' key names (``prefix`` prepended, e.g. ``clip_vision.``);
    ``.safetensors`` or a pickled ``.pth``/``.bin``/``.pt`` by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_clip_vision(hidden, layers, proj, image_size, patch, seed)
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def unet_layers(unet: Any) -> list[tuple[int, int]]:
    """(hidden size, cross-attention width) of each cross-attention layer, in diffusers' order."""
    from diffusers import UNet2DConditionModel

    if isinstance(unet, dict):
        with torch.device("meta"):  # only the layout is read: full-size configs cost nothing
            unet = UNet2DConditionModel(**unet)
    config = unet.config
    out = []
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(config.block_out_channels))[int(name.split(".")[1])]
        else:
            hidden = config.block_out_channels[int(name.split(".")[1])]
        out.append((hidden, config.cross_attention_dim))
    return out


class _Random:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def linear(self, out: int, inp: int, gain: float = 1.0) -> Tensor:
        return torch.randn(out, inp, generator=self.gen) * gain / inp ** 0.5

    def norm(self, size: int) -> tuple[Tensor, Tensor]:
        return 1 + torch.randn(size, generator=self.gen) * 0.02, torch.randn(size, generator=self.gen) * 0.02

    def bias(self, size: int) -> Tensor:
        return torch.randn(size, generator=self.gen) * 0.02


def _image_proj(rand: _Random, kind: str, embed: int, cross: int, tokens: int, hidden: int) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if kind == "base":
        out["proj.weight"], out["proj.bias"] = rand.linear(cross * tokens, embed), rand.bias(cross * tokens)
        out["norm.weight"], out["norm.bias"] = rand.norm(cross)
    elif kind == "full_face":
        out["proj.0.weight"], out["proj.0.bias"] = rand.linear(embed, embed), rand.bias(embed)
        out["proj.2.weight"], out["proj.2.bias"] = rand.linear(cross, embed), rand.bias(cross)
        out["proj.3.weight"], out["proj.3.bias"] = rand.norm(cross)
    elif kind == "faceid":
        mid = embed * 2
        out["proj.0.weight"], out["proj.0.bias"] = rand.linear(mid, FACEID_ID_DIM), rand.bias(mid)
        out["proj.2.weight"], out["proj.2.bias"] = rand.linear(cross * tokens, mid), rand.bias(cross * tokens)
        out["norm.weight"], out["norm.bias"] = rand.norm(cross)
    elif kind in ("plus", "plus_face"):
        inner = RESAMPLER_HEAD_DIM  # one head
        out["latents"] = torch.randn(1, tokens, hidden, generator=rand.gen) / hidden ** 0.5
        out["proj_in.weight"], out["proj_in.bias"] = rand.linear(hidden, embed), rand.bias(hidden)
        out["proj_out.weight"], out["proj_out.bias"] = rand.linear(cross, hidden), rand.bias(cross)
        out["norm_out.weight"], out["norm_out.bias"] = rand.norm(cross)
        for i in range(RESAMPLER_DEPTH):
            attn, ff = f"layers.{i}.0.", f"layers.{i}.1."
            out[attn + "norm1.weight"], out[attn + "norm1.bias"] = rand.norm(hidden)
            out[attn + "norm2.weight"], out[attn + "norm2.bias"] = rand.norm(hidden)
            out[attn + "to_q.weight"] = rand.linear(inner, hidden)
            out[attn + "to_kv.weight"] = rand.linear(2 * inner, hidden)
            out[attn + "to_out.weight"] = rand.linear(hidden, inner)
            out[ff + "0.weight"], out[ff + "0.bias"] = rand.norm(hidden)
            out[ff + "1.weight"] = rand.linear(hidden * RESAMPLER_FF_MULT, hidden)
            out[ff + "3.weight"] = rand.linear(hidden, hidden * RESAMPLER_FF_MULT)
    else:
        raise ValueError(f"unknown IP-Adapter kind {kind!r}")
    return out


def ip_adapter_state_dict(unet: Any, kind: str = "base", image_embed_dim: int = 24, seed: int = 0,
                          tokens: int = BASE_TOKENS, resampler_dim: int = 32,
                          gain: float = 1.0) -> dict[str, dict[str, Tensor]]:
    """The nested two-part state dict for ``unet`` (a UNet2DConditionModel or its config dict).
    ``kind``: "base", "plus", "plus_face", "full_face" or "faceid" (refused by the studio)."""
    rand = _Random(seed)
    layers = unet_layers(unet)
    cross = layers[0][1]
    image_proj = _image_proj(rand, kind, image_embed_dim, cross, tokens, resampler_dim)
    attn: dict[str, Tensor] = {}
    for i, (hidden, width) in enumerate(layers):
        # the original counts every attention layer: self-attention even, cross-attention odd
        attn[f"{2 * i + 1}.to_k_ip.weight"] = rand.linear(hidden, width, gain)
        attn[f"{2 * i + 1}.to_v_ip.weight"] = rand.linear(hidden, width, gain)
        if kind == "faceid":
            attn[f"{2 * i + 1}.to_k_lora.down.weight"] = rand.linear(4, hidden)
    return {"image_proj": image_proj, "ip_adapter": attn}


def write_ip_adapter(path: str | Path, unet: Any, kind: str = "base", image_embed_dim: int = 24, seed: int = 0,
                     fmt: str | None = None, tokens: int = BASE_TOKENS, resampler_dim: int = 32,
                     gain: float = 1.0) -> Path:
    """Write an IP-Adapter as h94 ships them: ``fmt`` "safetensors" (flat names) or "bin" (nested
    pickle); by default from the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or ("safetensors" if path.suffix.lower() == ".safetensors" else "bin")
    nested = ip_adapter_state_dict(unet, kind, image_embed_dim, seed, tokens, resampler_dim, gain)
    if fmt == "safetensors":
        save_file({f"{part}.{k}": v.contiguous() for part, sd in nested.items() for k, v in sd.items()}, str(path))
    elif fmt == "bin":
        torch.save(nested, path)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return path
