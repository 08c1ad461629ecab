"""Loading the DiT families (SD3/SD3.5, FLUX.1) from the files users have, fully offline.

A checkpoint may hold everything (Stability's SD3.5 files with ``text_encoders.*``, ComfyUI's
all-in-one FLUX files) or only the transformer (BFL's ``flux1-dev.safetensors``, files in
``models/diffusion_models`` / ``models/unet``, GGUF); what it lacks comes from the separate text
encoder and VAE files (studio/models/modules.py picks them: automatically when one of a kind
exists, else by the ``forge_additional_modules`` option). Every config is derived from tensor
shapes (studio/models/dit_arch.py); FLUX's keys are converted by studio/models/flux_keys.py
(diffusers' converter assumes the full 3072 width), SD3's and the VAE's by diffusers' own converters.

Modules are built on the meta device and take the file's tensors as they are (``assign=True``):
no copy, no cast. Linear weights stored in another dtype than the compute dtype (fp8, or bf16 on
a float32 CPU) stay in it and are upcast layer by layer (studio/models/storage.py); GGUF files
load through diffusers' GGUF quantizer and dequantize per layer too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from studio.devices import DevicePolicy
from studio.families.spec import FamilySpec, family_spec
from studio.models.catalog import CheckpointInfo
from studio.models.dit_arch import (
    clip_text_config,
    component_prefixes,
    dit_family,
    flux_transformer_config,
    flux_variant,
    sd3_transformer_config,
    t5_encoder_config,
    vae16_config,
)
from studio.models.flux_keys import flux_to_diffusers
from studio.models.loader import LoadedModel, Timer, write_config_dir
from studio.models.modules import ModuleChoiceError, ModuleFile, pick_modules
from studio.models.probe import CheckpointProbe
from studio.models.state_dict import ModelFileError, Shapes, load_state_dict, read_shapes
from studio.models.storage import is_quantized, keep_storage_dtype, storage_label

log = logging.getLogger(__name__)

# Text encoders as they are stored inside all-in-one files and as separate files.
_MODULE_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                    "text_encoders.t5xxl.transformer.", "conditioner.embedders.0.transformer.",
                    "cond_stage_model.transformer.", "first_stage_model.", "vae.")


def is_dit_file(path: Path) -> bool:
    try:
        return dit_family(read_shapes(path)) is not None
    except ModelFileError:
        return False


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _module_prefix(shapes: Shapes) -> str:
    """The prefix a separate module file keeps (files cut from all-in-one checkpoints keep theirs)."""
    for prefix in _MODULE_PREFIXES:
        if any(k.startswith(prefix) for k in shapes):
            return prefix
    return ""


def _shapes(weights: dict[str, torch.Tensor]) -> Shapes:
    return {k: tuple(getattr(v, "quant_shape", None) or v.shape) for k, v in weights.items()}


def _assign(module: torch.nn.Module, weights: dict[str, torch.Tensor], name: str,
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


def _meta(build) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _finish_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    keep_storage_dtype(module, dtype)
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------- components


def build_transformer(family: str, weights: dict[str, torch.Tensor], shapes: Shapes, prefix: str,
                      policy: DevicePolicy, config_cache: Path, name: str) -> Any:
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel

    if family == "flux1":
        cls, config = FluxTransformer2DModel, flux_transformer_config(shapes, prefix)
        converted = flux_to_diffusers(weights, prefix)
    else:
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        cls, config = SD3Transformer2DModel, sd3_transformer_config(shapes, prefix)
        converted = convert_sd3_transformer_checkpoint_to_diffusers(_strip(weights, prefix))
    if any(is_quantized(v) for v in converted.values()):
        # diffusers' GGUF quantizer swaps in its dequantizing linears; the dict is already in its layout
        folder = write_config_dir({"transformer": {"_class_name": cls.__name__, **config}}, config_cache)
        model = cls.from_single_file(converted, config=str(folder), subfolder="transformer", local_files_only=True,
                                     quantization_config=GGUFQuantizationConfig(compute_dtype=policy.dtype),
                                     torch_dtype=policy.dtype)
        return model.eval().requires_grad_(False)
    model = _assign(_meta(lambda: cls.from_config(config)), converted, name)
    return _finish_module(model, policy.dtype)


def build_vae(weights: dict[str, torch.Tensor], prefix: str, family: str, policy: DevicePolicy, name: str) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    bare = _strip(weights, prefix)
    config = vae16_config(_shapes(bare), "", family)
    converted = convert_ldm_vae_checkpoint(bare, config)
    vae = _assign(_meta(lambda: AutoencoderKL.from_config(config)), converted, name)
    vae = vae.to(policy.vae_dtype)
    return vae.eval().requires_grad_(False)


def build_clip(weights: dict[str, torch.Tensor], prefix: str, projection: bool, policy: DevicePolicy,
               name: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    bare = _strip(weights, prefix)
    shapes = _shapes(bare)
    config = CLIPTextConfig(**clip_text_config(shapes, "", projection))
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = _meta(lambda: cls(config))
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        bare = {k.removeprefix("text_model."): v for k, v in bare.items()}
    own = set(model.state_dict())
    bare = {k: v for k, v in bare.items() if k in own}  # logit_scale and the like belong to the full CLIP
    identity = projection and "text_projection.weight" not in bare
    if identity:
        # SD3's CLIP-L files carry no projection; SD3 was trained with an identity there (diffusers does the same)
        width = config.hidden_size
        bare["text_projection.weight"] = torch.eye(width, config.projection_dim or width)
    model = _assign(model, bare, name, optional=("position_ids",))
    return _finish_module(model, policy.dtype)


def build_t5(weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy, name: str) -> Any:
    from transformers import T5Config, T5EncoderModel

    bare = _strip(weights, prefix)
    if any(is_quantized(v) for v in bare.values()) or "token_embd.weight" in bare:
        raise ModelFileError(f"{name}: GGUF T5 text encoders are not supported yet; use a .safetensors T5 "
                             "(t5xxl_fp16 or t5xxl_fp8_e4m3fn)")
    config = T5Config(**t5_encoder_config(_shapes(bare), ""))
    model = _meta(lambda: T5EncoderModel(config))
    # ComfyUI's T5 files hold ``shared`` only; the encoder's embedding is the same (tied) tensor
    bare.pop("encoder.embed_tokens.weight", None)
    model = _assign(model, bare, name, optional=("embed_tokens.weight",))
    model.encoder.embed_tokens = model.shared
    return _finish_module(model, policy.dtype)


# --------------------------------------------------------------------------- the model


def _source(kind: str, checkpoint: dict, prefixes: dict[str, str], picked: dict[str, ModuleFile],
            timer: Timer) -> tuple[dict[str, torch.Tensor], str, str]:
    """(weights, prefix, file name) of one component: from the checkpoint when it holds it, else its file."""
    component = "vae" if kind == "vae16" else kind
    if component in prefixes:
        return checkpoint, prefixes[component], "the checkpoint"
    module = picked[kind]
    weights = load_state_dict(module.path)
    timer.record("load weights from disk")
    return weights, _module_prefix(_shapes(weights)), module.name


def needed_modules(spec: FamilySpec, prefixes: dict[str, str]) -> tuple[list[str], list[str]]:
    """(required, optional) module kinds a checkpoint lacks."""
    missing = [k for k in spec.text_encoders if k not in prefixes]
    if "vae" not in prefixes:
        missing.append("vae16")
    return ([k for k in missing if k not in spec.optional_encoders],
            [k for k in missing if k in spec.optional_encoders])


def pick_for(spec: FamilySpec, prefixes: dict[str, str], available: Sequence[ModuleFile],
             chosen: Sequence[str]) -> dict[str, ModuleFile]:
    required, optional = needed_modules(spec, prefixes)
    picked = pick_modules(required, available, chosen)
    for kind in optional:
        try:
            picked |= pick_modules([kind], available, chosen)
        except ModuleChoiceError as e:
            if any(m.kind == kind for m in available):
                raise  # several to choose from, or a wrong choice: the user must say
            log.info("%s: running without %s (%s)", spec.label, kind, e)
    return picked


def dit_variant(family: str, shapes: Shapes, prefix: str, name: str) -> str:
    """The variant, from shapes where they tell it (FLUX's schnell / Fill / Control), else from the file
    name: FLUX.1 Kontext has exactly dev's tensors, SD3.5 Large Turbo exactly Large's."""
    lowered = name.lower()
    if family == "flux1":
        variant = flux_variant(shapes, prefix)
        return "kontext" if variant == "dev" and "kontext" in lowered else variant
    return "turbo" if "turbo" in lowered else "base"


def planned_modules(path: Path, available: Sequence[ModuleFile], chosen: Sequence[str]) -> dict[str, str]:
    """kind -> file name of the separate modules a checkpoint would be loaded with now."""
    shapes = read_shapes(path)
    family = dit_family(shapes)
    if family is None or not family_spec(family).supported:
        return {}
    picked = pick_for(family_spec(family), component_prefixes(shapes), available, chosen)
    return {kind: module.name for kind, module in picked.items()}


def load_dit(info: CheckpointInfo, policy: DevicePolicy, config_cache: Path,
             available: Sequence[ModuleFile] = (), chosen: Sequence[str] = ()) -> LoadedModel:
    from studio.models.bundled_tokenizers import t5_tokenizer
    from studio.models.tokenizer import make_clip_tokenizer

    timer = Timer()
    shapes = read_shapes(info.path)
    family = dit_family(shapes)
    if family is None:
        raise ModelFileError(f"{info.name}: not an SD3 or FLUX model")
    spec = family_spec(family)
    if not spec.supported:
        raise ModelFileError(f"{info.name}: {spec.label} is {spec.unsupported_reason}")
    prefixes = component_prefixes(shapes)
    picked = pick_for(spec, prefixes, available, chosen)
    checkpoint = load_state_dict(info.path)
    timer.record("load weights from disk")
    prefix = prefixes["transformer"]
    variant = dit_variant(family, shapes, prefix, info.name)
    try:
        transformer = build_transformer(family, checkpoint, shapes, prefix, policy, config_cache, info.name)
        timer.record("create transformer")
        weights, vae_prefix, source = _source("vae16", checkpoint, prefixes, picked, timer)
        vae = build_vae(weights, vae_prefix, "flux" if family == "flux1" else "sd3", policy, source)
        encoders, tokenizers = [], []
        for kind in spec.text_encoders:
            if kind not in prefixes and kind not in picked:
                continue  # an optional encoder the user does not have (SD3 without T5)
            weights, enc_prefix, source = _source(kind, checkpoint, prefixes, picked, timer)
            if kind == "t5xxl":
                encoders.append(build_t5(weights, enc_prefix, policy, source))
                tokenizers.append(t5_tokenizer())
            else:
                encoders.append(build_clip(weights, enc_prefix, family == "sd3", policy, source))
                tokenizers.append(make_clip_tokenizer(pad_token="!" if kind == "clip_g" else "<|endoftext|>"))
            del weights
        timer.record("create text encoders")
    except (KeyError, RuntimeError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{info.name}: weights do not fit the detected {spec.label} layout: {e}") from e
    finally:
        checkpoint.clear()
    probe = CheckpointProbe(family=family, variant=variant, in_channels=int(transformer.config.in_channels),
                            prediction_type="flow", has_vae=True, has_text_encoder=True)
    model = LoadedModel(info, probe, transformer, vae, encoders, tokenizers, "flow", policy, timer.phases,
                        arch_key=("dit", str(info.path)),
                        modules_used={kind: module.name for kind, module in picked.items()})
    log.info("Model %s (%s, %s) loaded in %s%s", info.title, model.label, storage_label(transformer),
             timer.summary(), "".join(f"; {k}: {v}" for k, v in model.modules_used.items()))
    return model
