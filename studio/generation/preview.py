"""Live previews from latents without any extra weights: a fixed linear map from the latent
channels to RGB (A1111's "Approx cheap"), costing one tiny matmul per preview; and the
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


def latent_preview(latent: torch.Tensor, sdxl: bool = False, coefs: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, scale: int = 8) -> Image.Image:
    """``latent``: [C, h, w] (one image). Returns an RGB image 8x the latent size. ``coefs`` [C, 3] (and
    ``bias`` [3]) map the channels to RGB; by default A1111's published fits for SD / SDXL."""
    if coefs is None:
        coefs = SDXL_LATENT_RGB if sdxl else SD_LATENT_RGB
    rgb = torch.einsum("chw,cr->hwr", latent[:coefs.shape[0]].detach().float().cpu(), coefs)
    if bias is not None:
        rgb = rgb + bias
    arr = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def fit_latent_rgb(vae, to_vae, channels: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A least-squares fit of latent channels -> RGB for a VAE without published factors (the 16-channel
    SD3/FLUX VAEs): random latents are decoded once, the images averaged over each latent cell's 8x8
    pixels, and the linear map (plus bias) that best predicts those colours is solved for. One decode of
    four 64x64 images, made when the first preview is shown. ``to_vae`` maps the sampler's latents to the
    VAE's input (the model's latent codec)."""
    channels = channels or vae.config.latent_channels   # the sampler's channels, when its latents are not the VAE's
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, channels, 8, 8, generator=generator)
    param = next(vae.parameters())
    with torch.inference_mode():
        x = to_vae(latents).to(param.device, param.dtype)
        pixels = vae.decode(x).sample.float().cpu()
    cell = pixels.shape[-1] // latents.shape[-1]                            # pixels per latent cell: 8, 16
    colours = torch.nn.functional.avg_pool2d(pixels, cell)                  # [4, 3, 8, 8]
    inputs = torch.cat([latents, torch.ones(4, 1, 8, 8)], dim=1)           # a constant for the bias
    a = inputs.permute(0, 2, 3, 1).reshape(-1, channels + 1)
    b = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(a, b).solution                            # [C + 1, 3]
    return solution[:channels], solution[channels]


class LatentPreviewer:
    """Turns a model's latents into the cheap preview: A1111's factors for 4-channel latents, a fit
    of the model's own VAE for 16-channel ones (made once, on first use)."""

    def __init__(self, model):
        self.model = model
        self._fit: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, latent: torch.Tensor) -> Image.Image:
        vae = self.model.vae
        if self.model.spec.latent.channels == 4:
            return latent_preview(latent, self.model.is_sdxl)
        if self._fit is None:
            self._fit = fit_latent_rgb(vae, self.model.latent_codec.to_vae, self.model.spec.latent.channels)
        coefs, bias = self._fit
        return latent_preview(latent, coefs=coefs, bias=bias, scale=self.model.spec.latent.downscale)


class JobProgress(StepCallback):
    """Counts the pass's sampler steps on the job (what /sdapi/v1/progress shows) and, every
    ``preview_every`` steps but the last, puts a preview of the first image on it."""

    tensor_inputs = ("latents",)

    def __init__(self, state: JobState, preview_every: int = 0, previewer=None):
        self.state, self.preview_every = state, preview_every
        self.previewer = previewer or latent_preview

    def on_pass_start(self, run: PassInfo) -> None:
        self.state.set_total(run.steps)

    def on_step_end(self, step: StepEnd, tensors: dict[str, torch.Tensor]) -> None:
        done = step.index + 1
        show = self.preview_every > 0 and done % self.preview_every == 0 and done < step.total
        latents = tensors["latents"]
        self.state.advance((lambda: self.previewer(latents[0])) if show else None)
