"""Preprocessors whose work continues inside sampling, after each UNet call: sd-webui-controlnet's
``tile_colorfix`` / ``tile_colorfix+sharp`` and ``inpaint_only`` (``hook.py``'s post-processing).

Both turn the UNet's prediction into the predicted clean latents ``x0``, change ``x0``, and turn it
back into a prediction, blended with the original by the unit's weight clamped to [0, 1]:

- colour fix: ``x0`` keeps its own detail but takes the low frequencies (a box blur of radius
  ``Variation`` latent cells, doubled in the hires pass) from the control image's latents, so a tile
  upscale keeps the original colours; "+sharp" also blends a blurred ``x0`` into the unconditional
  rows by ``Sharpness / 100``, which sharpens through CFG;
- inpaint_only: outside the mask ``x0`` is the control image's latents, so only the masked area is
  generated; afterwards the original pixels are laid back outside a dilated, blurred mask.

The UNet input ``x`` is ``sqrt(a) * x0 + sqrt(1 - a) * eps`` with ``a = 1 / (1 + sigma^2)`` for
every scheduler the loop drives (k-diffusion scaling and DDPM-style alike), which is what makes the
conversions below exact for epsilon and v-prediction models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback
from studio.generation.txt2img import encode_images

if TYPE_CHECKING:
    import torch

COLORFIX_MODULES = ("tile_colorfix", "tile_colorfix+sharp")
INPAINT_ONLY_MODULES = ("inpaint_only", "inpaint_only+lama")
# sd-webui-controlnet's ``control_net_inpaint_blur_sigma`` default: how far the pasted-back original
# stays away from the generated area, in pixels
INPAINT_BLUR_SIGMA = 7


def _alpha(sigma: float) -> float:
    return 1.0 / (1.0 + float(sigma) ** 2)


def predicted_x0(x: torch.Tensor, pred: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    a = _alpha(sigma)
    if prediction_type == "v_prediction":
        return a ** 0.5 * x - (1 - a) ** 0.5 * pred
    return (x - (1 - a) ** 0.5 * pred) / a ** 0.5


def prediction_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    a = _alpha(sigma)
    eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
    if prediction_type == "v_prediction":
        return a ** 0.5 * eps - (1 - a) ** 0.5 * x0
    return eps


def box_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """The extension's ``blur``: a (2k+1)-wide box filter with replicated edges."""
    import torch.nn.functional as F
    y = F.pad(x, (k, k, k, k), mode="replicate")
    return F.avg_pool2d(y, (k * 2 + 1, k * 2 + 1), stride=(1, 1))


@dataclass
class LatentFixUnit:
    module: str
    image: torch.Tensor                 # [1, 3, H, W] in [0, 1] at the pass's size
    weight: float
    variation: float = 8.0             # colour fix: threshold A
    sharpness: float = 1.0             # colour fix +sharp: threshold B
    mask: torch.Tensor | None = None   # inpaint_only: [1, 1, H, W], 1 = generate
    latents: torch.Tensor | None = field(default=None, repr=False)


class LatentFixes(StepCallback):
    """The colour-fix and inpaint_only units of one pass."""

    def __init__(self, units: list[LatentFixUnit], hires: bool = False):
        self.units = units
        self.hires = hires
        self._prediction = "epsilon"
        self._channels = 4

    def on_pass_start(self, run: PassInfo) -> None:
        model = run.model
        self._prediction = model.prediction_type or "epsilon"
        for unit in self.units:
            unit.latents = encode_images(model, unit.image * 2.0 - 1.0).float()
            self._channels = unit.latents.shape[1]

    def unet_output(self, call: ModelCall, pred: torch.Tensor) -> torch.Tensor | None:
        import torch
        import torch.nn.functional as F
        x = call.x[:, :self._channels].to(pred.device, torch.float32)
        for unit in self.units:
            w = max(0.0, min(1.0, float(unit.weight)))
            if w == 0:
                continue
            origin = unit.latents.to(pred.device)
            x0 = predicted_x0(x, pred, call.sigma, self._prediction)
            if unit.module in COLORFIX_MODULES:
                k = int(unit.variation) * (2 if self.hires else 1)
                x0 = x0 - box_blur(x0, k) + box_blur(origin, k)
                if unit.module == "tile_colorfix+sharp":
                    detail = float(unit.sharpness) * 0.01
                    soft = detail * box_blur(x0, k) + (1 - detail) * x0
                    cond = torch.ones(x0.shape[0], 1, 1, 1, device=x0.device)
                    if call.has_uncond:
                        cond[:call.batch] = 0
                    x0 = cond * x0 + (1 - cond) * soft
            else:
                m = F.max_pool2d(unit.mask.to(pred.device, torch.float32), (10, 10), stride=(8, 8), padding=1)
                if m.shape[-2:] != x0.shape[-2:]:
                    m = F.interpolate(m, size=x0.shape[-2:], mode="nearest")
                x0 = x0 * m + origin * (1 - m)
            pred = prediction_from_x0(x, x0, call.sigma, self._prediction) * w + pred * (1 - w)
        return pred

    def on_pass_end(self, run: PassInfo) -> None:
        for unit in self.units:
            unit.latents = None


def paste_outside_mask(image: Image.Image, original: Image.Image, mask: Image.Image,
                       sigma: int = INPAINT_BLUR_SIGMA) -> Image.Image:
    """inpaint_only's last step: the original pixels outside the mask, dilated by ``sigma`` and
    box-blurred as wide so the seam fades (the extension's ``inpaint_only_post_processing``)."""
    import cv2

    size = image.size
    m = np.asarray(mask.convert("L").resize(size, Image.NEAREST), dtype=np.float32) / 255.0
    m = (m > 0.5).astype(np.float32)
    if sigma > 0:
        m = cv2.dilate(m, np.ones((sigma, sigma), dtype=np.uint8))
        m = cv2.blur(m, (sigma, sigma))
    raw = np.asarray(original.convert("RGB").resize(size, Image.LANCZOS), dtype=np.float32)
    out = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = m[:, :, None] * out + (1 - m[:, :, None]) * raw
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
