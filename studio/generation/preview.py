"""Live previews from latents without any extra weights: a fixed linear map from the 4
latent channels to RGB (A1111's "Approx cheap"), costing one tiny matmul per preview; and the
step callback that reports a pass's progress and previews to its job."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from studio.generation.step_callbacks import PassInfo, StepCallback, StepEnd
from studio.jobs import JobState

# Least-squares fits of latent channel -> RGB published with A1111's cheap approximation.
SD_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])
SDXL_LATENT_RGB = torch.tensor([
    [0.3448, 0.4168, 0.4395],
    [-0.1953, -0.0290, 0.0250],
    [0.1074, 0.0886, -0.0163],
    [-0.3730, -0.2499, -0.2088],
])


def latent_preview(latent: torch.Tensor, sdxl: bool = False) -> Image.Image:
    """``latent``: [4, h, w] (one image). Returns an RGB image 8x the latent size."""
    coefs = SDXL_LATENT_RGB if sdxl else SD_LATENT_RGB
    rgb = torch.einsum("chw,cr->hwr", latent[:4].detach().float().cpu(), coefs)
    arr = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    return img.resize((img.width * 8, img.height * 8), Image.Resampling.NEAREST)


class JobProgress(StepCallback):
    """Counts the pass's sampler steps on the job (what /sdapi/v1/progress shows) and, every
    ``preview_every`` steps but the last, puts a preview of the first image on it."""

    tensor_inputs = ("latents",)

    def __init__(self, state: JobState, preview_every: int = 0, sdxl: bool = False):
        self.state, self.preview_every, self.sdxl = state, preview_every, sdxl

    def on_pass_start(self, run: PassInfo) -> None:
        self.state.set_total(run.steps)

    def on_step_end(self, step: StepEnd, tensors: dict[str, torch.Tensor]) -> None:
        done = step.index + 1
        show = self.preview_every > 0 and done % self.preview_every == 0 and done < step.total
        latents = tensors["latents"]
        self.state.advance((lambda: latent_preview(latents[0], self.sdxl)) if show else None)
