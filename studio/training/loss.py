"""The diffusion training objective, as sd-scripts and diffusers' training examples compute it.

- target: the noise for epsilon models, the velocity ``alpha_t * noise - sigma_t * x0`` for
  v-prediction models (SD2-768, some SDXL fine-tunes);
- loss: mean squared error per sample, optionally weighted by Min-SNR-γ (Hang et al. 2023):
  ``min(snr, γ) / snr`` for epsilon and ``min(snr, γ) / (snr + 1)`` for v-prediction;
- noise offset (crosslabs' trick): ``noise + offset * N(0, 1)`` per sample and channel, so the model
  can learn very dark and very bright images.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def train_scheduler(scheduler_config: dict[str, Any]) -> Any:
    """The DDPM noise schedule the model was trained with (kohya: scaled_linear 0.00085–0.012 over
    1000 steps), with the model's prediction type."""
    from diffusers import DDPMScheduler

    config = dict(scheduler_config)
    return DDPMScheduler(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.00085)), beta_end=float(config.get("beta_end", 0.012)),
        beta_schedule=config.get("beta_schedule", "scaled_linear"), clip_sample=False,
        prediction_type=config.get("prediction_type", "epsilon"))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    clipped = torch.clamp(snr_values, max=gamma)
    return clipped / (snr_values + 1.0) if v_prediction else clipped / snr_values


def offset_noise(shape: torch.Size | tuple[int, ...], offset: float, generator: torch.Generator | None = None,
                 device: Any = "cpu") -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise.to(device)


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler: Any,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean over the batch of the per-sample MSE, Min-SNR weighted when ``min_snr_gamma > 0``."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        v_pred = scheduler.config.prediction_type == "v_prediction"
        per_sample = per_sample * min_snr_weights(snr(scheduler.alphas_cumprod, timesteps), min_snr_gamma, v_pred)
    return per_sample.mean()
