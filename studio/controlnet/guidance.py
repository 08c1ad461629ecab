"""ControlNet units inside the sampling loop, with sd-webui-controlnet's semantics.

Per step, every unit whose [guidance_start, guidance_end] covers ``step / total`` runs its
ControlNet on the same latents, timestep and text context as the UNet; the residuals of all
units are added up and handed to the UNet (``down_block_additional_residuals`` /
``mid_block_additional_residual``). Control modes (the extension's ``hook.py``):

- "Balanced": every one of the 13 residuals scaled by the weight (10 for SDXL);
- "My prompt is more important": residual i scaled by ``weight * 0.825 ** (12 - i)``, so the
  deep, semantic layers get the least control;
- "ControlNet is more important": the weight everywhere, but only on the conditional half of
  the CFG batch (the unconditional prediction gets no control), so guidance pushes towards the
  control.

A T2I-Adapter unit runs its adapter once, on the control map alone (its features depend on
neither latents, timestep nor text), and within the same window adds the features, scaled by
the weight, inside the UNet's down blocks (``down_intrablock_additional_residuals``) on both
halves of the CFG batch; "My prompt is more important" scales its 4 features by
``weight * (0.25, 0.62, 0.825, 1.0)``, as the extension does. Features whose size differs
from the block's (odd sizes; UNets laid out unlike the adapter's model) are resized to it,
nearest neighbour, as the extension's ``aligned_adding`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from studio.controlnet.union import is_union_model, union_residuals
from studio.controlnet.units import in_guidance_window
from studio.errors import RequestError
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback

SOFT_DECAY = 0.825
ADAPTER_SOFT_SCALES = (0.25, 0.62, 0.825, 1.0)


def is_adapter(model: Any) -> bool:
    """A diffusers ``T2IAdapter`` (its config has an ``adapter_type``), not a ControlNet."""
    config = getattr(model, "config", None)
    return config is not None and "adapter_type" in config


@dataclass
class ControlUnit:
    """One enabled unit, ready for the loop: the model and its preprocessed map."""

    model: Any                       # diffusers ControlNetModel or T2IAdapter on the device
    image: torch.Tensor              # [1, 3, H, W] in [0, 1], at the generation size; a 4th channel
                                     # is an inpaint unit's mask (1 = generate)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int = 0            # index into units.CONTROL_MODES
    union_type: int = -1             # a ControlNet Union's control type (union.UNION_TYPES index)
    region: torch.Tensor | None = None   # [1, 1, H, W] in [0, 1]: where the unit acts (effective region mask)
    advanced_weighting: tuple[float, ...] | None = None   # one scale per residual, replacing weight and mode
    _features: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def active(self, step: int, total: int) -> bool:
        return self.weight != 0 and in_guidance_window(step, total, self.guidance_start, self.guidance_end)

    def scales(self, count: int) -> list[float]:
        if self.advanced_weighting is not None:
            # the extension's rule: these replace the weight and the control mode's scales
            if len(self.advanced_weighting) < count:
                raise RequestError(f"advanced_weighting has {len(self.advanced_weighting)} values; this "
                                   f"{'T2I-Adapter' if is_adapter(self.model) else 'ControlNet'} adds {count} "
                                   f"residuals and needs one weight each")
            return list(self.advanced_weighting[:count])
        if self.control_mode == 1:
            if is_adapter(self.model):
                return [self.weight * s for s in ADAPTER_SOFT_SCALES[:count]] + [self.weight] * (count - 4)
            return [self.weight * SOFT_DECAY ** (12 - i) for i in range(count)]
        return [self.weight] * count

    def adapter_features(self) -> list[torch.Tensor]:
        """The adapter's features of the map, [1, C, h, w] each, computed on first use only."""
        if self._features is None:
            model = self.model
            param = next(model.parameters())
            image = self.image.to(param.device, param.dtype)
            if model.config.in_channels == 1:  # sketch/canny adapters read one grey channel
                image = image.mean(dim=1, keepdim=True)
            # Pixel unshuffling needs whole 8x8 (16x16 for SDXL) cells; rounding up matches the
            # UNet's own rounding of odd latent sizes at its downsamplers.
            f = model.config.downscale_factor
            h, w = image.shape[-2:]
            size = (-(-h // f) * f, -(-w // f) * f)
            if size != (h, w):
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            self._features = list(model(image))
        return self._features


def in_region(residual: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """A residual kept only where the unit acts: the region mask bilinearly resized to the residual's
    size, as the extension's ``apply_effective_region_mask``."""
    if region is None:
        return residual
    mask = F.interpolate(region.to(residual.device, residual.dtype), size=residual.shape[-2:], mode="bilinear")
    return residual * mask


def intrablock_sizes(down_block_types: tuple[str, ...], height: int, width: int) -> list[tuple[int, int]]:
    """Where diffusers' UNet adds adapter features, from the latent size: a cross-attention down
    block adds before its downsampler, a plain one after it; one more feature may go to the
    middle block, at the last size."""
    sizes = []
    for i, kind in enumerate(down_block_types):
        attention = "CrossAttn" in kind
        if attention:
            sizes.append((height, width))
        if i < len(down_block_types) - 1:  # the last block does not downsample
            height, width = -(-height // 2), -(-width // 2)
        if not attention:
            sizes.append((height, width))
    return [*sizes, (height, width)]


def control_residuals(units: list[ControlUnit], x: torch.Tensor, t: Any, context: torch.Tensor,
                      added: dict | None, step: int, total: int, groups: int, batch: int,
                      has_uncond: bool, down_block_types: tuple[str, ...] | None = None) -> dict[str, Any]:
    """UNet keyword arguments with the summed residuals of the units active at ``step``
    ({} when none is). ``x`` is the UNet input batch: ``groups`` blocks of ``batch`` images,
    the first block unconditional when ``has_uncond``. ``down_block_types`` (the UNet's) lets
    adapter features be resized to the blocks they go to."""
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    intrablock: list[torch.Tensor] | None = None
    for unit in units:
        if not unit.active(step, total):
            continue
        if is_adapter(unit.model):
            features = _adapter_residuals(unit, x, batch, has_uncond, down_block_types)
            intrablock = features if intrablock is None else [a + b for a, b in zip(intrablock, features)]
            continue
        model = unit.model
        dtype = next(model.parameters()).dtype
        cond = unit.image.to(x.device, dtype)
        if cond.shape[1] == 4:
            # the inpaint ControlNets' protocol: masked pixels are -1, the rest the image (0-1)
            colour, masked = cond[:, :3], (cond[:, 3:] > 0.5).to(dtype)
            cond = colour * (1 - masked) - masked
        cond = cond.expand(x.shape[0], -1, -1, -1)
        if is_union_model(model):
            out_down, out_mid = union_residuals(model, x, t, context, added, cond, unit.union_type)
        else:
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            out_down, out_mid = model(x[:, :model.config.in_channels].to(dtype), t, encoder_hidden_states=context,
                                      controlnet_cond=cond, conditioning_scale=1.0, return_dict=False, **kwargs)
        residuals = [*out_down, out_mid]
        scales = unit.scales(len(residuals))
        residuals = [in_region(r * s, unit.region) for r, s in zip(residuals, scales)]
        if unit.control_mode == 2 and has_uncond:
            # no control on the unconditional predictions
            mask = torch.ones(groups * batch, 1, 1, 1, device=x.device, dtype=residuals[0].dtype)
            mask[:batch] = 0
            residuals = [r * mask for r in residuals]
        if down is None:
            down, mid = residuals[:-1], residuals[-1]
        else:
            down = [a + b for a, b in zip(down, residuals[:-1])]
            mid = mid + residuals[-1]
    out: dict[str, Any] = {}
    if down is not None:
        out |= {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    if intrablock is not None:
        # a fresh list per call: the UNet pops the features off it
        out["down_intrablock_additional_residuals"] = list(intrablock)
    return out


def _adapter_residuals(unit: ControlUnit, x: torch.Tensor, batch: int, has_uncond: bool,
                       down_block_types: tuple[str, ...] | None) -> list[torch.Tensor]:
    features = unit.adapter_features()
    features = [f.to(x.device) * s for f, s in zip(features, unit.scales(len(features)))]
    if down_block_types is not None:
        sizes = intrablock_sizes(down_block_types, x.shape[-2], x.shape[-1])
        features = [f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="nearest")
                    for f, size in zip(features, sizes)]
    features = [in_region(f.expand(x.shape[0], -1, -1, -1), unit.region) for f in features]
    if unit.control_mode == 2 and has_uncond:
        mask = torch.ones(x.shape[0], 1, 1, 1, device=x.device, dtype=features[0].dtype)
        mask[:batch] = 0
        features = [f * mask for f in features]
    return features


class ControlNetGuidance(StepCallback):
    """The units as a step callback: their residuals go into every UNet call of the pass."""

    def __init__(self, units: list[ControlUnit]):
        self.units = units
        self.down_block_types: tuple[str, ...] | None = None

    def on_pass_start(self, run: PassInfo) -> None:
        unet = getattr(run.model, "unet", None)
        types = getattr(getattr(unet, "config", None), "down_block_types", None)
        self.down_block_types = tuple(types) if types is not None else None

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        return control_residuals(self.units, call.x, call.timestep, call.context, call.added, call.step,
                                 call.steps, call.groups, call.batch, call.has_uncond, self.down_block_types)
