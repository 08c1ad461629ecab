"""LoRA / LoCon training: peft adapters on the loaded model, saved as a kohya-ss ``networks.lora`` file.

What is trained is what kohya's ``networks.lora`` trains (formats.md §2.1):

- UNet: every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside a ``Transformer2DModel`` (``proj_in``,
  ``proj_out``, ``attn1``/``attn2`` ``to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2``), at
  ``rank`` / ``alpha``. With ``conv_rank > 0`` (LoCon, kohya's ``conv_dim``) also the layers of
  ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D``: their 3x3 convs (``conv1``, ``conv2``, the
  down/upsampler ``conv``) at ``conv_rank`` / ``conv_alpha``, their ``time_emb_proj`` and 1x1
  ``conv_shortcut`` at ``rank`` / ``alpha``, exactly as kohya splits them.
- Text encoders (all of them, when trained): the ``nn.Linear`` layers of ``CLIPAttention`` and
  ``CLIPMLP`` (``q/k/v/out_proj``, ``fc1``, ``fc2``).

The adapters are peft ``LoraConfig`` layers (kohya's initialisation: down kaiming-uniform, up
zeros, so an untrained LoRA changes nothing), kept in float32 whatever the model's dtype; every
other parameter is frozen while attached. ``scale = alpha / rank`` in both peft and kohya, so the
saved file reproduces the trained outputs when merged at weight 1. :meth:`LoraTrainable.detach`
puts the original layer objects back, untouched.

Files are kohya-format safetensors: ``<kohya name>.lora_down.weight`` (``[r, in]`` or the conv's
own kernel ``[r, in, kh, kw]``), ``.lora_up.weight`` (``[out, r]`` or ``[out, r, 1, 1]``) and
``.alpha`` (0-dim), named as sd-scripts names them: diffusers-style UNet names for SD1/SD2,
LDM-style (``input_blocks_…``) for SDXL, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` +
``text_model_…`` for the text encoders; with kohya's ``ss_*`` and ``modelspec.*`` metadata and
the ``sshs_*`` hashes that sd-scripts precomputes for sd-webui-additional-networks.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from studio.config import atomic_write
from studio.networks.lora_keys import (
    TEXT_ENCODER,
    UNET,
    components_by_name,
    text_encoder_names,
    unet_ldm_names,
)
from studio.training.base import TrainingError
from studio.training.lora_settings import LoraSettings

__all__ = ["ADAPTER_NAME", "LoraSettings", "LoraTrainable", "kohya_key_names"]

ADAPTER_NAME = "studio_train"

_UNET_BLOCKS = ("Transformer2DModel",)
_UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
_LAYER_TYPES = (nn.Linear, nn.Conv2d)
_TEXT_MODEL = "text_model."

_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0",
                       "sdxl-refiner": "sdxl_refiner_v1-0"}
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                 "sdxl": "stable-diffusion-xl-v1-base", "sdxl-refiner": "stable-diffusion-xl-v1-refiner"}
_DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024, "sdxl-refiner": 1024}
_IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"
_IMPL_DIFFUSERS = "diffusers"
_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000



# --------------------------------------------------------------------------- settings


# --------------------------------------------------------------------------- names


def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _base_layers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every Linear / Conv2d, seen through peft wrappers: a wrapped layer is
    reported under its own name, and the adapters' internal layers are not reported at all."""
    skip: str | None = None
    for name, module in root.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        skip = None
        if _is_tuner_layer(module):
            skip = name + "."
            base = module.get_base_layer()
            if isinstance(base, _LAYER_TYPES):
                yield name, base
        elif isinstance(module, _LAYER_TYPES):
            yield name, module


def _ldm_names(unet: nn.Module) -> dict[str, str]:
    # unet_ldm_names lists layers by type; on a UNet with adapters the wrapped layers show up as
    # "<name>.base_layer", whose LDM name carries the same suffix.
    suffix = ".base_layer"
    return {k.removesuffix(suffix): v.removesuffix(suffix) for k, v in unet_ldm_names(unet).items()}


def _te_prefix(component: str, is_sdxl: bool) -> str:
    if not is_sdxl:
        return "lora_te_"
    return "lora_te1_" if component == TEXT_ENCODER else "lora_te2_"


def kohya_key_names(model: Any) -> dict[str, str]:
    """``"<component>.<module path>"`` -> kohya module name, for every Linear / Conv2d of the
    UNet and text encoders (components are diffusers' ``unet``, ``text_encoder``,
    ``text_encoder_2``; module paths are the model's own, also while adapters are attached).

    SD1/SD2 UNet: ``lora_unet_`` + the diffusers path (sd-scripts' own UNet mirrors diffusers);
    SDXL UNet: ``lora_unet_`` + the LDM path (``input_blocks_4_1_…``); text encoders:
    ``lora_te_`` (SD1/SD2) or ``lora_te1_`` / ``lora_te2_`` (SDXL) + ``text_model_…``, the
    ``text_model.`` part added where transformers 5 flattened it away.
    """
    is_sdxl = model.family.startswith("sdxl")
    out: dict[str, str] = {}
    ldm = _ldm_names(model.unet) if is_sdxl else {}
    for name, _ in _base_layers(model.unet):
        out[f"{UNET}.{name}"] = "lora_unet_" + ldm.get(name, name).replace(".", "_")
    encoders = model.text_encoders
    for component, encoder in zip(text_encoder_names(model.family, len(encoders)), encoders):
        prefix = _te_prefix(component, is_sdxl)
        for name, _ in _base_layers(encoder):
            bare = name.removeprefix(_TEXT_MODEL)
            out[f"{component}.{name}"] = prefix + (_TEXT_MODEL + bare).replace(".", "_")
    return out


# --------------------------------------------------------------------------- targets


@dataclass
class _Target:
    component: str
    module: str
    kohya: str
    rank: int
    alpha: float
    layer: Any = None  # the peft LoRA layer while attached

    @property
    def key(self) -> str:
        return f"{self.component}.{self.module}"


def _layers_in(root: nn.Module, block_classes: tuple[str, ...]) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for name, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_name, child in block.named_modules():
            if isinstance(child, _LAYER_TYPES):
                found.setdefault(f"{name}.{child_name}" if name else child_name, child)
    return found


def _is_pointwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1)


def _select_targets(model: Any, settings: LoraSettings) -> list[_Target]:
    names = kohya_key_names(model)
    components = components_by_name(model.unet, model.text_encoders, model.family)
    targets: list[_Target] = []
    if settings.train_unet:
        blocks = _UNET_BLOCKS + (_UNET_CONV_BLOCKS if settings.conv_rank > 0 else ())
        for name, layer in _layers_in(model.unet, blocks).items():
            if _is_pointwise(layer):
                rank, alpha = settings.rank, settings.effective_alpha
            elif settings.conv_rank > 0:
                rank, alpha = settings.conv_rank, settings.effective_conv_alpha
            else:
                continue
            targets.append(_Target(UNET, name, names[f"{UNET}.{name}"], rank, alpha))
        if not any(t.component == UNET for t in targets):
            raise TrainingError("the UNet has no layers a LoRA can train (no transformer blocks found)")
    if settings.train_text_encoder:
        for component, encoder in components.items():
            if component == UNET:
                continue
            layers = [n for n, m in _layers_in(encoder, _TE_BLOCKS).items() if isinstance(m, nn.Linear)]
            if not layers:
                raise TrainingError(f"{component} has no attention / MLP layers a LoRA can train")
            targets += [_Target(component, n, names[f"{component}.{n}"], settings.rank,
                                settings.effective_alpha) for n in layers]
    return targets


# --------------------------------------------------------------------------- hashes and files


def _data_section_sha256(blob: bytes) -> str:
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as sd-scripts precomputes them: the file is
    serialised with only the ``ss_*`` metadata; the model hash is the sha256 of everything after
    the header (A1111's "addnet" hash, so it equals that of the written file), the legacy hash
    the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (empty for small files)."""
    blob = safetensors.torch.save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    window = blob[_LEGACY_HASH_OFFSET:_LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]
    legacy = hashlib.sha256(window).hexdigest()[:8]
    return _data_section_sha256(blob), legacy


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp), metadata=metadata))


# --------------------------------------------------------------------------- the trainable


class LoraTrainable:
    """A kohya-style LoRA / LoCon trained through peft adapters (see the module docstring)."""

    kind = "lora"

    def __init__(self, settings: LoraSettings, output_path: Path, base_lr: float):
        self.settings = settings
        self.output_path = Path(output_path)
        self.base_lr = float(base_lr)
        self._model: Any = None
        self._targets: list[_Target] = []
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []
        self._configured: list[tuple[nn.Module, bool]] = []   # (root, had a peft_config before)
        self._snapshot: dict[str, torch.Tensor] | None = None  # the weights at detach, for a late save
        self._family = "sd1"
        self._v_prediction = False
        self._checkpoint_name = ""
        self._checkpoint_hash: str | None = None

    # ---------------------------------------------------------------- attach / detach

    @property
    def attached(self) -> bool:
        return self._model is not None

    def attach(self, model: Any) -> list[dict[str, Any]]:
        if self._model is not None:
            raise TrainingError("this LoRA is already attached to a model")
        settings = self.settings
        # Train on the checkpoint itself, not on whatever prompt LoRAs the last generation merged.
        patcher = getattr(model, "lora_patcher", None)
        if patcher is not None:
            patcher.restore()
            model.conditioner.set_weights_key(patcher.current)
        targets = _select_targets(model, settings)
        self._family = model.family
        self._v_prediction = getattr(model, "prediction_type", "epsilon") == "v_prediction"
        info = getattr(model, "info", None)
        self._checkpoint_name = Path(str(getattr(info, "path", "") or getattr(info, "name", ""))).name
        self._checkpoint_hash = getattr(info, "sha256", None)
        self._model = model
        self._targets = targets
        self._snapshot = None
        try:
            self._inject(model)
        except BaseException:
            self._remove(model)
            raise
        if settings.train_text_encoder:
            self._clear_prompt_cache(model)
        unet = [p for t in targets if t.component == UNET for p in self._factors(t)]
        text = [p for t in targets if t.component != UNET for p in self._factors(t)]
        groups = []
        for label, params, lr in (("unet", unet, settings.unet_lr),
                                  ("text_encoder", text, settings.text_encoder_lr)):
            if params:
                lr = float(lr if lr is not None else self.base_lr)
                groups.append({"params": params, "lr": lr, "name": label})
        return groups

    def _inject(self, model: Any) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        roots = components_by_name(model.unet, model.text_encoders, model.family)
        frozen = [model.unet, *model.text_encoders]
        if getattr(model, "vae", None) is not None:
            frozen.append(model.vae)
        seen: set[int] = set()
        for module in frozen:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    self._grad_flags.append((p, p.requires_grad))
                    p.requires_grad_(False)
        s = self.settings
        for component, root in roots.items():
            targets = [t for t in self._targets if t.component == component]
            if not targets:
                continue
            default = (s.rank, s.effective_alpha)
            odd = {re.escape(t.module): t for t in targets if (t.rank, t.alpha) != default}
            config = LoraConfig(
                r=s.rank,
                lora_alpha=s.effective_alpha,
                lora_dropout=s.dropout,
                target_modules=[t.module for t in targets],
                rank_pattern={k: t.rank for k, t in odd.items()},
                alpha_pattern={k: t.alpha for k, t in odd.items()},
                init_lora_weights=True,   # kohya's: A kaiming-uniform(a=√5), B zeros
                bias="none",
            )
            self._configured.append((root, hasattr(root, "peft_config")))
            inject_adapter_in_model(config, root, adapter_name=ADAPTER_NAME)
            for t in targets:
                layer = root.get_submodule(t.module)
                if not _is_tuner_layer(layer) or ADAPTER_NAME not in getattr(layer, "lora_A", {}):
                    raise TrainingError(f"could not add a LoRA to {component}.{t.module}")
                t.layer = layer
                for factor in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                    factor.to(torch.float32)  # in place: float32 adapters even on a half-precision model
                    factor.weight.requires_grad_(True)
                scale, expected = layer.scaling[ADAPTER_NAME], t.alpha / t.rank
                if not math.isclose(scale, expected, rel_tol=1e-6):
                    raise TrainingError(f"{t.key}: LoRA scale {scale} is not alpha/rank {expected}")

    def detach(self, model: Any) -> None:
        if self._model is None:
            return
        if model is not self._model:
            raise TrainingError("this LoRA is attached to another model")
        self._snapshot = self.state_dict()
        self._remove(model)
        # A prompt-LoRA patcher first used while the adapters were in (samples during training)
        # indexed the wrapped layers under the wrong names: un-merge and drop it, the next
        # generation makes a fresh one.
        patcher = getattr(model, "lora_patcher", None)
        if patcher is not None:
            patcher.restore()
            model.lora_patcher = None
            model.conditioner.set_weights_key(())
        if self.settings.train_text_encoder:
            self._clear_prompt_cache(model)

    def _remove(self, model: Any) -> None:
        """Put every original layer back and restore what attach changed; safe on a half-done attach."""
        roots = components_by_name(model.unet, model.text_encoders, model.family)
        for root in roots.values():
            wrapped = [(name, m) for name, m in root.named_modules()
                       if _is_tuner_layer(m) and ADAPTER_NAME in getattr(m, "lora_A", {})]
            for name, layer in wrapped:
                if set(layer.lora_A) != {ADAPTER_NAME}:
                    layer.delete_adapter(ADAPTER_NAME)  # someone else's adapters stay
                    continue
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, child, layer.get_base_layer())
        for root, had_config in self._configured:
            config = getattr(root, "peft_config", None)
            if had_config and isinstance(config, dict):
                config.pop(ADAPTER_NAME, None)
            elif not had_config and hasattr(root, "peft_config"):
                delattr(root, "peft_config")
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._grad_flags = []
        self._configured = []
        for t in self._targets:
            t.layer = None
        self._model = None

    @staticmethod
    def _clear_prompt_cache(model: Any) -> None:
        clear = getattr(getattr(model, "conditioner", None), "clear_cache", None)
        if callable(clear):
            clear()

    @staticmethod
    def _factors(t: _Target) -> tuple[nn.Parameter, nn.Parameter]:
        """(down, up) = (lora_A, lora_B) weights of an attached target."""
        return t.layer.lora_A[ADAPTER_NAME].weight, t.layer.lora_B[ADAPTER_NAME].weight

    # ---------------------------------------------------------------- conditioning

    def encode(self, model: Any, captions: list[str],
               clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, pooled = model.conditioner.encode_for_training(list(captions), clip_skip)
        if not self.settings.train_text_encoder:
            # frozen encoders: nothing needs a graph through them
            context = context.detach()
            pooled = pooled.detach() if pooled is not None else None
        return context, pooled

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``"<component>.<module>.lora_A.weight"`` / ``"….lora_B.weight"`` (peft's names, per
        diffusers component), float32 copies on the CPU."""
        if self._model is None:
            if self._snapshot is None:
                raise TrainingError("the LoRA is not attached to a model")
            return {k: v.clone() for k, v in self._snapshot.items()}
        out: dict[str, torch.Tensor] = {}
        for t in self._targets:
            down, up = self._factors(t)
            out[f"{t.key}.lora_A.weight"] = down.detach().to("cpu", torch.float32, copy=True)
            out[f"{t.key}.lora_B.weight"] = up.detach().to("cpu", torch.float32, copy=True)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self._model is None:
            raise TrainingError("attach the LoRA to a model before loading its state")
        wanted = {f"{t.key}.lora_{part}.weight": (t, i) for t in self._targets for i, part in enumerate("AB")}
        missing = sorted(set(wanted) - set(state))
        unexpected = sorted(set(state) - set(wanted))
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise TrainingError(f"the saved LoRA state does not fit these settings ({len(missing)} missing, "
                                f"{len(unexpected)} unexpected tensors, e.g. {example})")
        for key, (t, index) in wanted.items():
            param = self._factors(t)[index]
            value = state[key]
            if tuple(value.shape) != tuple(param.shape):
                raise TrainingError(f"the saved LoRA state does not fit: {key} is {list(value.shape)}, "
                                    f"expected {list(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))

    # ---------------------------------------------------------------- saving

    def kohya_tensors(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The kohya-format tensors of the current weights, in ``dtype``."""
        state = self.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for t in self._targets:
            down = state[f"{t.key}.lora_A.weight"]
            up = state[f"{t.key}.lora_B.weight"]
            tensors[f"{t.kohya}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{t.kohya}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{t.kohya}.alpha"] = torch.tensor(t.alpha, dtype=dtype)
        return tensors

    def default_metadata(self, path: Path, step: int) -> dict[str, str]:
        s = self.settings
        family = self._family
        base = "sdxl" if family.startswith("sdxl") else family.split("-", 1)[0]
        version = _BASE_MODEL_VERSION.get(family, _BASE_MODEL_VERSION.get(base, base))
        architecture = _ARCHITECTURE.get(family, _ARCHITECTURE.get(base, base))
        resolution = _DEFAULT_RESOLUTION.get(family, 512)
        if base in ("sd1", "sd2") and self._v_prediction:
            version += "_v"
            if base == "sd2":
                architecture, resolution = "stable-diffusion-v2-768-v", 768
        network_args: dict[str, str] = {}
        if s.train_unet and s.conv_rank > 0:
            network_args = {"conv_dim": str(s.conv_rank), "conv_alpha": _number(s.effective_conv_alpha)}
        now = int(time.time())
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(s.rank),
            "ss_network_alpha": _number(s.effective_alpha),
            "ss_base_model_version": version,
            "ss_v2": str(base == "sd2"),
            "ss_output_name": Path(path).stem,
            "ss_steps": str(int(step)),
            "ss_training_comment": "trained with studio",
            "ss_sd_model_name": self._checkpoint_name,
            "ss_network_train_unet_only": str(not s.train_text_encoder),
            "ss_network_train_text_encoder_only": str(not s.train_unet),
            "ss_learning_rate": str(self.base_lr),
            "ss_unet_lr": str(s.unet_lr if s.unet_lr is not None else self.base_lr),
            "ss_text_encoder_lr": str(s.text_encoder_lr if s.text_encoder_lr is not None else self.base_lr),
            "ss_network_dropout": str(s.dropout),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": _IMPL_STABILITY if base == "sdxl" else _IMPL_DIFFUSERS,
            "modelspec.title": Path(path).stem,
            "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.prediction_type": "v" if self._v_prediction else "epsilon",
            "modelspec.date": datetime.datetime.fromtimestamp(now).isoformat(),
        }
        if network_args:
            metadata["ss_network_args"] = json.dumps(network_args)
        if self._checkpoint_hash:
            metadata["ss_new_sd_model_hash"] = self._checkpoint_hash
        return metadata

    def save(self, path: Path, step: int, metadata: dict[str, str] | None = None,
             dtype: torch.dtype = torch.float16) -> Path:
        """Write a kohya ``networks.lora`` safetensors file atomically; ``metadata`` (stringified)
        goes over the defaults; the ``sshs_*`` hashes are computed last, over the result."""
        path = Path(path)
        tensors = self.kohya_tensors(dtype)
        merged = self.default_metadata(path, step)
        merged.update({str(k): str(v) for k, v in (metadata or {}).items()})
        merged["sshs_model_hash"], merged["sshs_legacy_hash"] = kohya_hashes(tensors, merged)
        _write_atomically(path, tensors, merged)
        return path


def _number(value: float) -> str:
    """kohya writes dims as ints and alphas as given: 8 -> "8.0" stays a float string."""
    return str(float(value))

