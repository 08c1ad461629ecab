"""Building the parts of DiT models (transformers, 16-channel VAEs, CLIP and T5 encoders) from a file's
tensors: configs from shapes (models/dit_arch.py), modules made on the meta device and given the file's
tensors as they are (``assign=True``: no copy, no cast), then the storage rule of models/storage.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from studio.devices import DevicePolicy
from studio.models.config_dir import write_config_dir
from studio.models.dit_arch import clip_text_config, t5_encoder_config, vae16_config
from studio.models.state_dict import ModelFileError, Shapes
from studio.models.storage import is_quantized, keep_storage_dtype


def strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def shapes_of(weights: dict[str, torch.Tensor]) -> Shapes:
    """Logical shapes, also of quantized GGUF data (stored as bytes per row)."""
    return {k: tuple(getattr(v, "quant_shape", None) or v.shape) for k, v in weights.items()}


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def assign(module: torch.nn.Module, weights: dict[str, torch.Tensor], name: str,
           optional: tuple[str, ...] = ()) -> torch.nn.Module:
    """Give a meta-built module the file's tensors (no copy); every parameter must get one."""
    own = dict(module.state_dict())
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise ModelFileError(f"{name}: unexpected weights {unexpected[:3]} for the derived architecture")
    module.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k, p in (*module.named_parameters(), *module.named_buffers())
               if p.is_meta and not k.endswith(optional)]
    if missing:
        raise ModelFileError(f"{name}: weights missing from the file: {missing[:3]}")
    return module


def finish(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    keep_storage_dtype(module, dtype)
    return module.eval().requires_grad_(False)


def has_quantized(weights: dict[str, torch.Tensor]) -> bool:
    return any(is_quantized(v) for v in weights.values())


def build_transformer(cls: Any, config: dict[str, Any], converted: dict[str, torch.Tensor], policy: DevicePolicy,
                      config_cache: Path, name: str) -> Any:
    """A diffusers transformer from weights already in its layout: GGUF through diffusers' quantizer
    (its dequantizing linears), everything else assigned on the meta device."""
    if has_quantized(converted):
        from diffusers import GGUFQuantizationConfig

        folder = write_config_dir({"transformer": {"_class_name": cls.__name__, **config}}, config_cache)
        model = cls.from_single_file(converted, config=str(folder), subfolder="transformer", local_files_only=True,
                                     quantization_config=GGUFQuantizationConfig(compute_dtype=policy.dtype),
                                     torch_dtype=policy.dtype)
        return model.eval().requires_grad_(False)
    return finish(assign(on_meta(lambda: cls.from_config(config)), converted, name), policy.dtype)


def build_vae16(weights: dict[str, torch.Tensor], prefix: str, family: str, policy: DevicePolicy, name: str) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    bare = strip(weights, prefix)
    config = vae16_config(shapes_of(bare), "", family)
    converted = convert_ldm_vae_checkpoint(bare, config)
    vae = assign(on_meta(lambda: AutoencoderKL.from_config(config)), converted, name)
    return vae.to(policy.vae_dtype).eval().requires_grad_(False)


def build_clip(weights: dict[str, torch.Tensor], prefix: str, projection: bool, policy: DevicePolicy,
               name: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    bare = strip(weights, prefix)
    config = CLIPTextConfig(**clip_text_config(shapes_of(bare), "", projection))
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = on_meta(lambda: cls(config))
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        bare = {k.removeprefix("text_model."): v for k, v in bare.items()}
    own = set(model.state_dict())
    bare = {k: v for k, v in bare.items() if k in own}  # logit_scale and the like belong to the full CLIP
    if projection and "text_projection.weight" not in bare:
        # SD3's CLIP-L files carry no projection; SD3 was trained with an identity there (diffusers does the same)
        width = config.hidden_size
        bare["text_projection.weight"] = torch.eye(width, config.projection_dim or width)
    return finish(assign(model, bare, name, optional=("position_ids",)), policy.dtype)


def build_t5(weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy, name: str) -> Any:
    from transformers import T5Config, T5EncoderModel

    bare = strip(weights, prefix)
    if has_quantized(bare) or "token_embd.weight" in bare:
        raise ModelFileError(f"{name}: GGUF T5 text encoders are not supported yet; use a .safetensors T5 "
                             "(t5xxl_fp16 or t5xxl_fp8_e4m3fn)")
    config = T5Config(**t5_encoder_config(shapes_of(bare), ""))
    model = on_meta(lambda: T5EncoderModel(config))
    # ComfyUI's T5 files hold ``shared`` only; the encoder's embedding is the same (tied) tensor
    bare.pop("encoder.embed_tokens.weight", None)
    model = assign(model, bare, name, optional=("embed_tokens.weight",))
    model.encoder.embed_tokens = model.shared
    return finish(model, policy.dtype)
