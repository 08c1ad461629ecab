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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from studio.generation.step_callbacks import ModelCall, StepCallback

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
SOFT_DECAY = 0.825


@dataclass
class ControlUnit:
    """One enabled unit, ready for the loop: the model and its preprocessed map."""

    model: Any                       # diffusers ControlNetModel on the device
    image: torch.Tensor              # [1, 3, H, W] in [0, 1], at the generation size
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int = 0            # index into CONTROL_MODES

    def active(self, step: int, total: int) -> bool:
        # the extension skips a step when step/total < start or > end
        fraction = step / max(total, 1)
        return self.weight != 0 and self.guidance_start <= fraction <= self.guidance_end

    def scales(self, count: int) -> list[float]:
        if self.control_mode == 1:
            return [self.weight * SOFT_DECAY ** (12 - i) for i in range(count)]
        return [self.weight] * count


def control_residuals(units: list[ControlUnit], x: torch.Tensor, t: Any, context: torch.Tensor,
                      added: dict | None, step: int, total: int, groups: int, batch: int,
                      has_uncond: bool) -> dict[str, Any]:
    """UNet keyword arguments with the summed residuals of the units active at ``step``
    ({} when none is). ``x`` is the UNet input batch: ``groups`` blocks of ``batch`` images,
    the first block unconditional when ``has_uncond``."""
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for unit in units:
        if not unit.active(step, total):
            continue
        model = unit.model
        dtype = next(model.parameters()).dtype
        cond = unit.image.to(x.device, dtype).expand(x.shape[0], -1, -1, -1)
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        out_down, out_mid = model(x[:, :model.config.in_channels].to(dtype), t, encoder_hidden_states=context,
                                  controlnet_cond=cond, conditioning_scale=1.0, return_dict=False, **kwargs)
        residuals = [*out_down, out_mid]
        scales = unit.scales(len(residuals))
        residuals = [r * s for r, s in zip(residuals, scales)]
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
    if down is None:
        return {}
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class ControlNetGuidance(StepCallback):
    """The units as a step callback: their residuals go into every UNet call of the pass."""

    def __init__(self, units: list[ControlUnit]):
        self.units = units

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        return control_residuals(self.units, call.x, call.timestep, call.context, call.added, call.step,
                                 call.steps, call.groups, call.batch, call.has_uncond)
