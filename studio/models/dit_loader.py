"""Loading the DiT families (SD3/SD3.5, FLUX.1, and the families after them) from the files users have,
fully offline.

A checkpoint may hold everything (Stability's SD3.5 files with ``text_encoders.*``, ComfyUI's
all-in-one FLUX files) or only the transformer (BFL's ``flux1-dev.safetensors``, files in
``models/diffusion_models`` / ``models/unet``, GGUF); what it lacks comes from the separate text
encoder and VAE files (studio/models/modules.py picks them: automatically when one of a kind
exists, else by the ``forge_additional_modules`` option). What differs between families -- the
transformer's layout, its text encoders, its VAE -- is the family engine's (studio/families/<id>.py);
the modules are built by studio/models/dit_modules.py from configs derived from shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from studio.devices import DevicePolicy
from studio.families.dit_engine import dit_engine
from studio.families.spec import FamilySpec, family_spec
from studio.models.catalog import CheckpointInfo
from studio.models.dit_arch import component_prefixes, dit_family
from studio.models.dit_modules import shapes_of
from studio.models.loader import LoadedModel, Timer
from studio.models.modules import ModuleChoiceError, ModuleFile, pick_modules
from studio.models.probe import CheckpointProbe
from studio.models.state_dict import ModelFileError, load_state_dict, read_shapes
from studio.models.storage import storage_label

log = logging.getLogger(__name__)

# Text encoders and VAEs as they are stored inside all-in-one files and as separate files.
_MODULE_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                    "text_encoders.t5xxl.transformer.", "conditioner.embedders.0.transformer.",
                    "cond_stage_model.transformer.", "first_stage_model.", "vae.")


def is_dit_file(path: Path) -> bool:
    try:
        return dit_family(read_shapes(path)) is not None
    except ModelFileError:
        return False


def _module_prefix(shapes) -> str:
    """The prefix a separate module file keeps (files cut from all-in-one checkpoints keep theirs)."""
    for prefix in _MODULE_PREFIXES:
        if any(k.startswith(prefix) for k in shapes):
            return prefix
    return ""


def _source(kind: str, checkpoint: dict, prefixes: dict[str, str], picked: dict[str, ModuleFile],
            timer: Timer) -> tuple[dict, str, str]:
    """(weights, prefix, file name) of one component: from the checkpoint when it holds it, else its file."""
    component = "vae" if kind.startswith("vae") else kind
    if component in prefixes:
        return checkpoint, prefixes[component], "the checkpoint"
    module = picked[kind]
    weights = load_state_dict(module.path)
    timer.record("load weights from disk")
    return weights, _module_prefix(shapes_of(weights)), module.name


def needed_modules(spec: FamilySpec, prefixes: dict[str, str]) -> tuple[list[str], list[str]]:
    """(required, optional) module kinds a checkpoint lacks."""
    missing = [k for k in spec.text_encoders if k not in prefixes]
    if "vae" not in prefixes:
        missing.append(spec.vae_kind)
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


def refuse_nf4(shapes, name: str, policy: DevicePolicy) -> None:
    """bitsandbytes NF4/FP4 files (Forge's flux1-dev-bnb-nf4) hold 4-bit data plus quant-state tensors that
    only bitsandbytes' CUDA kernels read."""
    if not any(".quant_state.bitsandbytes__" in k or k.endswith(".absmax") for k in shapes):
        return
    if policy.device.type != "cuda":
        raise ModelFileError(f"{name}: a bitsandbytes NF4/FP4 file runs only on a CUDA GPU with bitsandbytes; "
                             "on this machine use the fp8 (e4m3fn) or a GGUF (Q8_0, Q5_K, Q4_K) file of the model")
    raise ModelFileError(f"{name}: bitsandbytes NF4/FP4 files are not supported yet; use the fp8 or a GGUF file")


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
    timer = Timer()
    shapes = read_shapes(info.path)
    family = dit_family(shapes)
    if family is None:
        raise ModelFileError(f"{info.name}: not a DiT model this studio knows")
    spec = family_spec(family)
    if not spec.supported:
        raise ModelFileError(f"{info.name}: {spec.label} is {spec.unsupported_reason}")
    refuse_nf4(shapes, info.name, policy)
    engine = dit_engine(family)
    prefixes = component_prefixes(shapes)
    picked = pick_for(spec, prefixes, available, chosen)
    checkpoint = load_state_dict(info.path)
    timer.record("load weights from disk")
    prefix = prefixes["transformer"]
    variant = engine.variant(shapes, prefix, info.name)
    try:
        transformer = engine.build_transformer(checkpoint, shapes, prefix, policy, config_cache, info.name)
        timer.record("create transformer")
        weights, vae_prefix, source = _source(spec.vae_kind, checkpoint, prefixes, picked, timer)
        vae = engine.build_vae(weights, vae_prefix, policy, source)
        encoders, tokenizers = [], []
        for kind in spec.text_encoders:
            if kind not in prefixes and kind not in picked:
                continue  # an optional encoder the user does not have (SD3 without T5)
            weights, enc_prefix, source = _source(kind, checkpoint, prefixes, picked, timer)
            encoder, tokenizer = engine.build_text_encoder(kind, weights, enc_prefix, policy, source)
            encoders.append(encoder)
            tokenizers.append(tokenizer)
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


# diffusers pipeline classes -> family, for pipeline folders (model_index.json + transformer/ ...)
_PIPELINE_FAMILIES = {"FluxPipeline": "flux1", "FluxFillPipeline": "flux1", "FluxKontextPipeline": "flux1",
                      "StableDiffusion3Pipeline": "sd3"}


def load_dit_folder(info: CheckpointInfo, policy: DevicePolicy) -> LoadedModel:
    """A diffusers pipeline folder of a DiT family (what ``save_pretrained`` writes and the hub holds): each
    component through its own ``from_pretrained``, local files only; the tokenizers are the studio's own."""
    import json

    import transformers

    timer = Timer()
    root = info.path
    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{info.name}: unreadable model_index.json: {e}") from e
    family = _PIPELINE_FAMILIES.get(index.get("_class_name", ""))
    if family is None:
        raise ModelFileError(f"{info.name}: diffusers folders of {index.get('_class_name')!r} are not supported; "
                             f"supported: {', '.join(sorted(_PIPELINE_FAMILIES))}")
    spec = family_spec(family)
    import diffusers

    kw = {"local_files_only": True}
    try:
        def component(name: str, dtype):
            library, cls_name = index[name]
            module = getattr(diffusers if library == "diffusers" else transformers, cls_name)
            loaded = module.from_pretrained(root / name, **({"torch_dtype": dtype} if library == "diffusers"
                                                             else {"dtype": dtype}), **kw)
            return loaded.eval().requires_grad_(False)

        transformer = component("transformer", policy.dtype)
        vae = component("vae", policy.vae_dtype)
        names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if index.get(n, [None])[0]]
        encoders = [component(n, policy.dtype) for n in names]
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ModelFileError(f"{info.name}: incomplete or corrupt diffusers folder: {e}") from e
    timer.record("load weights from disk")
    tokenizers = [_folder_tokenizer(kind) for kind in spec.text_encoders[:len(encoders)]]
    name = root.name.lower()
    variant = "fill" if int(transformer.config.in_channels) == 384 else (
        "kontext" if "Kontext" in index["_class_name"] or "kontext" in name else
        "schnell" if family == "flux1" and not transformer.config.guidance_embeds else "dev" if family == "flux1"
        else ("turbo" if "turbo" in name else "base"))
    probe = CheckpointProbe(family=family, variant=variant, in_channels=int(transformer.config.in_channels),
                            prediction_type="flow", has_vae=True, has_text_encoder=True)
    model = LoadedModel(info, probe, transformer, vae, encoders, tokenizers, "flow", policy, timer.phases,
                        arch_key=("dit", str(info.path)))
    log.info("Model %s (%s, diffusers folder) loaded in %s", info.title, model.label, timer.summary())
    return model


def _folder_tokenizer(kind: str):
    from studio.models.bundled_tokenizers import t5_tokenizer
    from studio.models.tokenizer import make_clip_tokenizer

    if kind == "t5xxl":
        return t5_tokenizer()
    return make_clip_tokenizer(pad_token="!" if kind == "clip_g" else "<|endoftext|>")

