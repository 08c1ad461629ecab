"""Parts shared by the tiny SD3 and FLUX.1 files: text encoders, the 16-channel VAE,
and the diffusers -> original renaming with fused tensors.

Both families ship the same text encoders (CLIP-L, plus OpenCLIP bigG for SD3, plus
T5-XXL) and a 16-channel version of SD's VAE. The tiny encoders keep what a loader
reads from tensor shapes (vocabularies, widths, layer counts, T5's head count in
``relative_attention_bias``) and shrink the rest:

* CLIP-L is 32 wide and OpenCLIP bigG 64 wide, the same tiny encoders SDXL's tiny
  models use (:func:`studio.testing.factory.text_encoder_config`);
* T5 keeps its real 32,128-token vocabulary (the T5 tokenizer's ids go up to 32,099)
  and is 96 wide, because SD3 pads the concatenated CLIP-L + bigG embeddings
  (32 + 64) up to T5's width: the width of T5 must be at least their sum.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from studio.models.ldm_keys import clip_to_ldm, vae_to_ldm
from studio.testing.factory import (
    _randomise_constants,
    text_encoder_config,
    vae_architecture,
)

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
TRANSFORMER_PREFIX = "model.diffusion_model."

LATENT_CHANNELS_16 = 16
T5_VOCAB_SIZE = 32128
T5_HIDDEN = 96
T5_HEADS = 2
T5_LAYERS = 2
# T5-XXL's relative position buckets, as in its config.
T5_BUCKETS = 32
T5_MAX_DISTANCE = 128

# The latent statistics of the two 16-channel VAEs (their diffusers configs).
VAE_FACTORS = {
    "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
    "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},
}


# --------------------------------------------------------------------------- configs


def clip_l_config():
    """CLIP-L (OpenAI, quick_gelu): SD3's ``text_encoder`` and FLUX's ``text_encoder``."""
    return text_encoder_config("sdxl", 1)


def clip_g_config():
    """OpenCLIP bigG (gelu, with a text projection): SD3's ``text_encoder_2``."""
    return text_encoder_config("sdxl", 2)


def t5_config() -> T5Config:
    """T5-XXL v1.1 encoder (gated GELU, no biases, RMS norms), at tiny width."""
    return T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=T5_HIDDEN,
        d_kv=T5_HIDDEN // T5_HEADS,
        d_ff=2 * T5_HIDDEN,
        num_layers=T5_LAYERS,
        num_heads=T5_HEADS,
        relative_attention_num_buckets=T5_BUCKETS,
        relative_attention_max_distance=T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        layer_norm_epsilon=1e-6,
    )


def vae16_config(family: str) -> dict[str, Any]:
    """SD's VAE with a 16-channel latent and no quant convs (SD3 and FLUX.1 drop them)."""
    if family not in VAE_FACTORS:
        raise ValueError(f"unknown 16-channel VAE family {family!r}; expected one of {tuple(VAE_FACTORS)}")
    return {
        **vae_architecture(LATENT_CHANNELS_16),
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        **VAE_FACTORS[family],
    }


# --------------------------------------------------------------------------- models


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Run ``build`` under ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in eval mode with its constant-initialised vectors made random, as
    :mod:`studio.testing.factory` does, so that swapped norms or biases show up."""
    _randomise_constants(module)
    return module.eval()


def build_clip_l(with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """CLIP-L; ``with_projection`` gives SD3's ``text_encoder``, whose projection is the
    identity that diffusers installs (the files carry none)."""
    if not with_projection:
        return randomised(CLIPTextModel(clip_l_config()))
    model = randomised(CLIPTextModelWithProjection(clip_l_config()))
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(model.config.hidden_size))
    return model


def build_clip_g() -> CLIPTextModelWithProjection:
    return randomised(CLIPTextModelWithProjection(clip_g_config()))


def build_t5() -> T5EncoderModel:
    return randomised(T5EncoderModel(t5_config()))


def build_vae16(family: str) -> AutoencoderKL:
    return randomised(AutoencoderKL(**vae16_config(family)))


# --------------------------------------------------------------------------- file layouts


def tensor(value: Tensor) -> Tensor:
    """A fresh contiguous copy: safetensors refuses shared or strided storage."""
    return value.detach().clone().contiguous()


def prefixed(prefix: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state_dict.items()}


def vae16_state_dict(vae: AutoencoderKL) -> dict[str, Tensor]:
    """LDM names without prefix, as in BFL's ``ae.safetensors``."""
    return vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))


def clip_state_dict(model: CLIPTextModel | CLIPTextModelWithProjection,
                    with_projection: bool = False) -> dict[str, Tensor]:
    """transformers 4 names (``text_model.*``, ``position_ids``), plus ``text_projection.weight``
    if ``with_projection`` (bigG): the layout of the ``text_encoders.clip_*.transformer.``
    parts of SD3/FLUX files and of ComfyUI's ``clip_l.safetensors``/``clip_g.safetensors``.

    CLIP-L is written without a projection: SD3 never uses it (diffusers puts an identity
    there when it reads these files) and FLUX's CLIP-L has none."""
    out = clip_to_ldm(model)
    if with_projection:
        out["text_projection.weight"] = tensor(model.text_projection.weight)
    return out


def t5_state_dict(model: T5EncoderModel, embed_tokens_copy: bool) -> dict[str, Tensor]:
    """The T5 encoder in transformers' names. ``embed_tokens_copy`` keeps
    ``encoder.embed_tokens.weight``, the tied copy of ``shared.weight``: Stability's SD3
    files carry both (A1111 tests for the copy to see whether T5 is in the file);
    ComfyUI's own T5 module has only ``shared``, so the files it saves lack the copy."""
    state_dict = model.state_dict()
    return {k: tensor(v) for k, v in state_dict.items()
            if embed_tokens_copy or k != "encoder.embed_tokens.weight"}


def cast(state_dict: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    # Integer buffers (position_ids) keep their dtype.
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def write_json(path: Path, config: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_safetensors(path: str | Path, state_dict: Mapping[str, Tensor],
                     metadata: Mapping[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(state_dict), str(path), metadata=dict(metadata or {"format": "pt"}))
    return path


# --------------------------------------------------------------------------- renaming

# A renaming rule: (regex over a diffusers key, template of the original key). A template
# may end in "#i/n" to say the tensor is part i of n of a fused tensor (q/k/v, or FLUX's
# q/k/v/mlp), concatenated in part order along dim 0.
Rule = tuple[str, str]


def _rename(key: str, rules: list[Rule]) -> tuple[str, int, int]:
    """(original name, part index, part count) of a diffusers key."""
    for pattern, template in rules:
        if m := re.fullmatch(pattern, key):
            name, _, part = m.expand(template).partition("#")
            index, _, count = part.partition("/")
            return (name, int(index), int(count)) if part else (name, 0, 1)
    raise KeyError(f"no original name known for {key!r}")


def swap_halves(weight: Tensor) -> Tensor:
    """(scale, shift) <-> (shift, scale): diffusers' AdaLayerNormContinuous orders the
    modulation the other way round from the original final layers."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original(state_dict: Mapping[str, Tensor], rules: list[Rule],
                swapped: Callable[[str], bool] = lambda _: False) -> dict[str, Tensor]:
    """Rename diffusers weights by ``rules``, fuse the split parts, and swap the halves of
    the keys ``swapped`` names. Raises on any key no rule covers."""
    parts: dict[str, dict[int, Tensor]] = {}
    counts: dict[str, int] = {}
    for key, value in state_dict.items():
        name, part, counts[name] = _rename(key, rules)
        if part in parts.setdefault(name, {}):
            raise KeyError(f"{key!r} and another key both map to part {part} of {name!r}")
        parts[name][part] = value
    out: dict[str, Tensor] = {}
    for name, pieces in parts.items():
        if sorted(pieces) != list(range(counts[name])):
            raise KeyError(f"{name!r} needs {counts[name]} fused parts, has {sorted(pieces)}")
        fused = torch.cat([pieces[i] for i in range(counts[name])], dim=0)
        out[name] = tensor(swap_halves(fused) if swapped(name) else fused)
    return out
