"""Turning a prompt's extra-network tags into changes to a loaded model, for one generation.

- ``<lora:name:te[:unet]>`` (and A1111's ``<lyco:…>`` spelling): merged into the weights by the
  model's :class:`NetworkPatcher` (:class:`DiTLoraPatcher` for FLUX.1 / SD3); it stays merged
  after the generation, so the next request with the same set does no work, and a different set
  restores and re-merges.
- ``<hypernet:name:strength>``: forward hooks on the UNet's attention k/v, installed for this
  generation only (``close()`` removes them).

Names that don't resolve, files that don't fit the model and unknown tag kinds become notes
for the user; they never stop a generation (A1111 logs them the same way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from studio.prompts.parser import ExtraNetworkTag

log = logging.getLogger(__name__)

LORA_KINDS = ("lora", "lyco")
HYPERNET_KINDS = ("hypernet",)


@dataclass
class NetworkActivation:
    notes: list[str] = field(default_factory=list)
    lora_hashes: dict[str, str] = field(default_factory=dict)   # alias -> addnet short hash
    hypernets: list[tuple[str, float]] = field(default_factory=list)
    hooks: Any = None

    def infotext_params(self) -> dict[str, str | None]:
        return {"Lora hashes": ", ".join(f"{k}: {v}" for k, v in self.lora_hashes.items()) or None}

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None


def lora_patcher(model: Any) -> Any:
    """The model's patcher, made on first use (each loaded model owns its backups): the SD one,
    or for the DiT families (FLUX.1, SD3) the one that knows their layers and weight storage."""
    if model.lora_patcher is None:
        if model.spec.is_flow:
            from studio.networks.dit_lora import DiTLoraPatcher

            model.lora_patcher = DiTLoraPatcher(model.unet, model.text_encoders, model.spec.id, model.policy.dtype)
        else:
            from studio.networks.lora import NetworkPatcher

            model.lora_patcher = NetworkPatcher(model.unet, model.text_encoders, model.family, model.is_sdxl)
    return model.lora_patcher


@dataclass
class ExtraNetworks:
    """The LoRA and hypernetwork libraries, as the engine sees them."""

    loras: Any
    hypernetworks: Any

    def refresh(self) -> None:
        self.loras.refresh()
        self.hypernetworks.refresh()

    def activate(self, model: Any, tags: list[ExtraNetworkTag]) -> NetworkActivation:
        return activate_networks(model, tags, self.loras, self.hypernetworks)


def activate_networks(model: Any, tags: list[ExtraNetworkTag], loras: Any, hypernetworks: Any) -> NetworkActivation:
    from studio.networks.lora import ActiveNetwork

    result = NetworkActivation()
    wanted: list[ActiveNetwork] = []
    missing: list[str] = []
    hyper: list[tuple[Any, float]] = []
    for tag in tags:
        if tag.kind in LORA_KINDS:
            info = loras.find(tag.name) if tag.name else None
            if info is None:
                missing.append(tag.name or "(no name)")
                continue
            wanted.append(ActiveNetwork(info, tag.te_multiplier, tag.unet_multiplier, tag.dyn))
        elif tag.kind in HYPERNET_KINDS:
            info = hypernetworks.find(tag.name) if tag.name else None
            if info is None:
                missing.append(tag.name or "(no name)")
                continue
            hyper.append((info, tag.multiplier))
        else:
            result.notes.append(f"Unknown extra network <{tag.kind}:…> ignored.")
    if missing:
        result.notes.append("Networks not found: " + ", ".join(missing))

    patcher = lora_patcher(model) if (wanted or model.lora_patcher is not None) else None
    if patcher is not None:
        report = patcher.apply(wanted, loras)  # unreadable or unfitting files come back as warnings
        result.notes.extend(report.warnings)
        model.conditioner.set_weights_key(patcher.current)
        applied = set(report.applied)
        for active in wanted:
            if active.info.name in applied:
                result.lora_hashes[active.info.alias] = loras.hash(active.info)[:12]

    if hyper:
        from studio.networks.hypernetworks import HypernetworkFileError, apply_hypernetworks

        loaded = []
        for info, strength in hyper:
            try:
                loaded.append((hypernetworks.load(info), strength))
                result.hypernets.append((info.name, strength))
            except HypernetworkFileError as e:
                result.notes.append(str(e))
        if loaded:
            result.hooks = apply_hypernetworks(model.unet, loaded, model.policy.dtype, model.policy.device)
    return result
