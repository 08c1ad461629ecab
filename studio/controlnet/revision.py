"""SDXL Revision: the sd-webui-controlnet modules ``revision_clipvision`` and ``revision_ignore_prompt``.

Stability's Revision steers SDXL with a picture instead of (or beside) words: the CLIP ViT-bigG image
embedding of the unit's image takes the place of the pooled text embedding in SDXL's added
conditioning. As the extension does it, with no model file (the encoder comes from
``models/clip_vision``, picked by SDXL's pooled width, 1280):

- each active unit's embedding, noise-augmented unCLIP-style by its "Noise Augmentation" slider (the
  ``q_sample`` of a 1000-step linear schedule from 1e-4 to 2e-2, at step ``round(value * 1000)``),
  times its weight, is summed and written over the pooled text embedding of the prompt's rows; the
  negative prompt's rows get zeros;
- ``revision_ignore_prompt`` (or both prompts empty) also zeroes the text context of every row, so the
  picture alone leads.

The noise of the augmentation is drawn from the job's seed, so a seed still reproduces the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from studio.controlnet.clip_vision import ClipVisionEncoders
from studio.controlnet.ip_adapter import compute_placement, encode_reference
from studio.controlnet.preprocessors import REVISION_MODULES
from studio.controlnet.units import in_guidance_window
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback

_TIMESTEPS = 1000


def is_revision(module: str) -> bool:
    return module in REVISION_MODULES


def noise_augment(embeds: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """unCLIP's noise augmentation as the extension applies it: ``q_sample`` at step
    ``amount * 1000`` of LDM's "linear" schedule (betas from 1e-4 to 2e-2, spaced in square root)."""
    step = min(max(int(amount * _TIMESTEPS), 0), _TIMESTEPS - 1)
    betas = torch.linspace(1e-4 ** 0.5, 2e-2 ** 0.5, _TIMESTEPS, dtype=torch.float64) ** 2
    keep = torch.cumprod(1 - betas, dim=0)[step]
    noise = torch.randn(embeds.shape, generator=generator, dtype=torch.float32).to(embeds)
    return embeds * float(keep.sqrt()) + noise * float((1 - keep).sqrt())


@dataclass
class RevisionUnit:
    """One enabled Revision unit."""

    image: Image.Image
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    noise_augmentation: float = 0.0
    ignore_prompt: bool = False

    def active(self, step: int, total: int) -> bool:
        return self.weight != 0 and in_guidance_window(step, total, self.guidance_start, self.guidance_end)


class RevisionGuidance(StepCallback):
    """The Revision units of a pass: SDXL's pooled ``text_embeds`` replaced by the units' image
    embeddings in every UNet call where one is active (and the text context zeroed when asked)."""

    def __init__(self, units: Sequence[RevisionUnit], encoders: ClipVisionEncoders, seed: int = 0,
                 empty_prompts: bool = False):
        if not units:
            raise ValueError("RevisionGuidance needs at least one unit")
        self.units = list(units)
        self.encoders = encoders
        self.seed = seed
        self.zero_context = empty_prompts or any(u.ignore_prompt for u in self.units)
        self._embeds: list[torch.Tensor] | None = None
        self._placed: tuple[torch.device, torch.dtype] | None = None

    def on_pass_start(self, run: PassInfo) -> None:
        self._placed = compute_placement(run.model)
        self._embeds = None

    def _encode(self, width: int) -> list[torch.Tensor]:
        """Each unit's augmented embedding, [1, width]: encoded on the first UNet call, when the
        pooled width is known (bigG's 1280 on SDXL)."""
        device, dtype = self._placed or (torch.device("cpu"), torch.float32)
        file = self.encoders.pick(width, False, "clip_g", adapter="Revision")
        encoder = self.encoders.load(file, dtype, device)
        generator = torch.Generator().manual_seed(int(self.seed))
        out = []
        for unit in self.units:
            embeds, _ = encode_reference(encoder, [unit.image], False)
            out.append(noise_augment(embeds.float(), unit.noise_augmentation, generator))
        return out

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        if call.added is None or "text_embeds" not in call.added:
            raise ValueError("Revision needs SDXL's added conditioning (text_embeds)")
        active = [i for i, unit in enumerate(self.units) if unit.active(call.step, call.steps)]
        if not active:
            return {}
        pooled = call.added["text_embeds"]
        if self._embeds is None:
            self._embeds = self._encode(pooled.shape[-1])
        mixed = sum(self._embeds[i] * self.units[i].weight for i in active)
        rows = mixed.to(pooled.device, pooled.dtype).expand(pooled.shape[0], -1).clone()
        if call.has_uncond:
            rows[:call.batch] = 0   # the extension's cond mark: the negative rows get no picture
        extra: dict[str, Any] = {"added_cond_kwargs": {"text_embeds": rows}}
        if self.zero_context:
            extra["encoder_hidden_states"] = torch.zeros_like(call.context)
        return extra

    def on_pass_end(self, run: PassInfo) -> None:
        self._embeds = None
