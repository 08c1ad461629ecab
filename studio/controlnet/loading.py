"""One entry point for every kind of model a ControlNet unit can name, told apart by tensor names:

- IP-Adapters (``image_proj`` + ``ip_adapter``): weights the UNet takes in for a pass (ip_adapter.py);
- Control-LoRAs (a ``lora_controlnet`` marker): a ControlNet built from the loaded SDXL checkpoint's
  UNet plus the file's low-rank deltas and own layers (control_lora.py);
- ControlNet Union / ProMax (``task_embedding``, ``control_add_embedding``), files or diffusers folders
  (union.py);
- FLUX.1 ControlNets (InstantX / Shakker-Labs Union-Pro / jasperai, diffusers layout; flux_controlnet.py);
- FLUX.1 Redux (``redux_up`` / ``redux_down``): image tokens for the prompt (redux.py);
- XLabs' FLUX.1 IP-Adapter (``ip_adapter_proj_model`` + ``double_blocks.N.processor``; flux_ip_adapter.py);
- everything else, ControlNets and T2I-Adapters, by :func:`studio.controlnet.models.load_controlnet`.

It sits above those modules (they import ``models``), so the dispatch needs no import inside a
function.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from studio.controlnet.control_lora import build_control_lora, is_control_lora, probe_control_lora
from studio.controlnet.flux_controlnet import (
    is_flux_controlnet,
    is_xlabs_controlnet,
    load_flux_controlnet,
    probe_flux_controlnet,
    probe_flux_model,
    xlabs_refusal,
)
from studio.controlnet.flux_ip_adapter import is_flux_ip_adapter, load_flux_ip_adapter
from studio.controlnet.ip_adapter import IP_ADAPTER, is_ip_adapter_file, load_ip_adapter
from studio.controlnet.models import (
    ControlNetInfo,
    ControlNetProbe,
    LoadedControlNet,
    folder_class,
    load_controlnet,
    place_model,
)
from studio.controlnet.redux import is_redux_state_dict, load_redux, redux_probe
from studio.controlnet.union import is_union_state_dict, load_union, union_probe
from studio.models.state_dict import ModelFileError, load_state_dict, read_shapes

log = logging.getLogger(__name__)


def is_control_lora_file(info: ControlNetInfo) -> bool:
    """Cheap: a safetensors header (Control-LoRAs ship as safetensors only)."""
    path = info.weights_path
    return not info.is_diffusers and path.suffix.lower() == ".safetensors" and is_control_lora(read_shapes(path))


def load_control_model(info: ControlNetInfo, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                       config_cache: Path | None = None, base_unet: Any = None) -> LoadedControlNet:
    """Load what ``info`` names, offline. ``base_unet`` is the loaded checkpoint's UNet, which a
    Control-LoRA is built on."""
    if info.is_diffusers:
        if folder_class(info.path) == "FluxControlNetModel":
            model = load_flux_controlnet(info.path, dtype, device, info.name)
            return _loaded(LoadedControlNet(info, probe_flux_model(model), model))
        if folder_class(info.path) == "ControlNetUnionModel":
            from diffusers import ControlNetUnionModel

            try:
                model = ControlNetUnionModel.from_pretrained(info.path, local_files_only=True, torch_dtype=dtype)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise ModelFileError(f"{info.name}: incomplete or corrupt ControlNet Union folder: {e}") from e
            return _loaded(LoadedControlNet(info, union_probe(dict(model.config)), place_model(model, dtype, device)))
        return load_controlnet(info, dtype, device, config_cache)
    if is_ip_adapter_file(info.path):
        # no network of its own: the weights are installed into the UNet for each pass
        weights = load_ip_adapter(info.path, info.name)
        probe = ControlNetProbe(weights.family or "sd1", weights.probe.cross_attention_dim, 3, 0, kind=IP_ADAPTER)
        return _loaded(LoadedControlNet(info, probe, weights))
    shapes = read_shapes(info.path)
    if is_flux_ip_adapter(shapes):
        weights = load_flux_ip_adapter(info.path, info.name)
        return _loaded(LoadedControlNet(info, weights.probe, weights))
    if is_redux_state_dict(shapes):
        model = load_redux(info.path, dtype, device, info.name)
        return _loaded(LoadedControlNet(info, redux_probe(model), model))
    if is_flux_controlnet(shapes):
        model = load_flux_controlnet(load_state_dict(info.path), dtype, device, info.name)
        return _loaded(LoadedControlNet(info, probe_flux_controlnet(shapes, info.name), model))
    if is_xlabs_controlnet(shapes):
        raise xlabs_refusal(info.name)
    if is_control_lora(shapes):
        if base_unet is None:
            raise ModelFileError(f"{info.name}: a Control-LoRA is built on the loaded SDXL checkpoint; load one")
        sd = load_state_dict(info.path)
        probe = probe_control_lora({k: tuple(v.shape) for k, v in sd.items()}, info.name)
        return _loaded(LoadedControlNet(info, probe, build_control_lora(sd, base_unet, dtype, device, info.name)))
    if is_union_state_dict(shapes):
        model = load_union(load_state_dict(info.path), dtype, device, info.name)
        return _loaded(LoadedControlNet(info, union_probe(dict(model.config)), model))
    return load_controlnet(info, dtype, device, config_cache)


def _loaded(loaded: LoadedControlNet) -> LoadedControlNet:
    log.info("%s %s (%s) loaded", loaded.probe.kind, loaded.info.name, loaded.probe.label)
    return loaded
