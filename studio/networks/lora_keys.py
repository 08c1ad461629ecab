"""Which layer of a loaded model a LoRA module name refers to.

LoRA files name layers after the code that trained them, not after our diffusers modules, so
the table is built from the loaded model itself: every ``nn.Linear`` / ``nn.Conv2d`` gets each
name a file may use for it.

- UNet, all families: kohya's diffusers-style name (``lora_unet_down_blocks_0_attentions_0_…``,
  what sd-scripts writes for SD1/SD2) and the LDM-style name (``lora_unet_input_blocks_1_1_…``,
  what it writes for SDXL, and what some converters write for SD1), plus PEFT's ``unet.<module>``.
- Text encoders: kohya names were made on transformers 4's ``CLIPTextModel``, whose layers sit
  under ``text_model.``; transformers 5 flattened ``CLIPTextModel`` (but not
  ``CLIPTextModelWithProjection``), so the ``text_model.`` part is added or kept as needed.
  SD1/SD2 use ``lora_te_``, SDXL ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (OpenCLIP bigG).
  PEFT files use ``text_encoder.`` / ``text_encoder_2.`` with or without ``text_model.``.

Not supported: SD2 text-encoder names in OpenCLIP's LDM layout
(``lora_te_model_transformer_resblocks_N_…``, written by a few early SD2 trainers), whose
attention is one fused ``in_proj`` that our separate q/k/v layers do not have; such modules are
reported as unmatched. A LoRA for the SDXL refiner's only text encoder (OpenCLIP bigG) is read
with the ``lora_te2_`` / ``text_encoder_2.`` names, as diffusers names that encoder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from studio.models.ldm_keys import _unet_key

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"

_KOHYA_UNET = "lora_unet_"
_TEXT_MODEL = "text_model."
_TARGET_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """One parameter of the loaded model: ``component`` is a diffusers component name."""

    component: str
    module: str
    param: str = "weight"

    @property
    def is_text_encoder(self) -> bool:
        return self.component != UNET

    def with_param(self, param: str) -> Target:
        return Target(self.component, self.module, param)


def text_encoder_names(family: str, count: int) -> list[str]:
    """Component names of the model's text encoders, in ``text_encoders`` order."""
    if family == "sdxl-refiner":
        return [TEXT_ENCODER_2][:count]
    return [TEXT_ENCODER, TEXT_ENCODER_2][:count]


def _kohya_te_prefix(component: str, is_sdxl: bool) -> str:
    if not is_sdxl:
        return "lora_te_"
    return "lora_te1_" if component == TEXT_ENCODER else "lora_te2_"


def unet_ldm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers UNet module name -> LDM module name, for each Linear/Conv2d that has one.

    The two numbers the LDM numbering needs are read off the model the way
    :func:`studio.models.ldm_keys.unet_to_ldm` reads them off a state dict.
    """
    layers = getattr(unet.config, "layers_per_block", None)
    if not isinstance(layers, int):
        return {}  # per-level counts have no LDM numbering
    names = [name for name, module in unet.named_modules() if isinstance(module, _TARGET_TYPES)]
    with_attention = {int(m[1]) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n))}
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = _unet_key(f"{name}.weight", layers, with_attention).removesuffix(".weight")
        except KeyError:
            continue  # a layer LDM checkpoints do not have
    return out


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _aliases_for_unet(unet: nn.Module) -> Iterable[tuple[str, Target]]:
    ldm = unet_ldm_names(unet)
    for name, module in unet.named_modules():
        if not isinstance(module, _TARGET_TYPES):
            continue
        target = Target(UNET, name)
        yield _KOHYA_UNET + _underscored(name), target
        if name in ldm:
            yield _KOHYA_UNET + _underscored(ldm[name]), target
        yield f"{UNET}.{name}", target


def _aliases_for_text_encoder(model: nn.Module, component: str, is_sdxl: bool) -> Iterable[tuple[str, Target]]:
    kohya = _kohya_te_prefix(component, is_sdxl)
    for name, module in model.named_modules():
        if not isinstance(module, _TARGET_TYPES):
            continue
        target = Target(component, name)
        bare = name.removeprefix(_TEXT_MODEL)
        yield kohya + _underscored(_TEXT_MODEL + bare), target
        yield f"{component}.{bare}", target
        yield f"{component}.{_TEXT_MODEL}{bare}", target


def build_alias_table(unet: nn.Module, text_encoders: Sequence[Any], family: str) -> dict[str, Target]:
    """Every module name a LoRA file may use -> the parameter it patches (its ``weight``).

    A name that two different layers would claim is left out rather than guessed.
    """
    is_sdxl = family.startswith("sdxl")
    pairs: list[tuple[str, Target]] = list(_aliases_for_unet(unet))
    for component, model in zip(text_encoder_names(family, len(text_encoders)), text_encoders):
        pairs.extend(_aliases_for_text_encoder(model, component, is_sdxl))
    table: dict[str, Target] = {}
    ambiguous: set[str] = set()
    for alias, target in pairs:
        if table.setdefault(alias, target) != target:
            ambiguous.add(alias)
    for alias in ambiguous:
        del table[alias]
    return table


def components_by_name(unet: nn.Module, text_encoders: Sequence[Any], family: str) -> dict[str, nn.Module]:
    names = text_encoder_names(family, len(text_encoders))
    return {UNET: unet, **dict(zip(names, text_encoders))}
