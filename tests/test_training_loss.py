"""The training objective: targets, Min-SNR weights, noise offset.

References are independent of studio.training.loss: the SNR is diffusers' own
(``diffusers.training_utils.compute_snr``), and the Min-SNR-γ weights are computed as diffusers'
train_text_to_image example does (``stack([snr, γ]).min() / snr``, ``/ (snr + 1)`` for v-prediction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from studio.training.loss import (
    diffusion_loss,
    min_snr_weights,
    offset_noise,
    snr,
    train_scheduler,
    training_target,
)

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def test_scheduler_follows_the_model_config():
    eps = train_scheduler(SD_CONFIG)
    v = train_scheduler({**SD_CONFIG, "prediction_type": "v_prediction"})
    assert eps.config.prediction_type == "epsilon" and v.config.prediction_type == "v_prediction"
    assert eps.config.num_train_timesteps == 1000 and not eps.config.clip_sample
    # scaled_linear: sqrt-linear betas from 0.00085 to 0.012
    assert torch.isclose(eps.betas[0], torch.tensor(0.00085)) and torch.isclose(eps.betas[-1], torch.tensor(0.012))


def reference_min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights as diffusers' train_text_to_image example computes them."""
    values = compute_snr(scheduler, timesteps)
    weights = torch.stack([values, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (values + 1)
    return weights / values


def test_snr_and_min_snr_weights():
    sched = train_scheduler(SD_CONFIG)
    v_sched = train_scheduler({**SD_CONFIG, "prediction_type": "v_prediction"})
    t = torch.arange(0, 1000, 37)
    values = snr(sched.alphas_cumprod, t)
    assert torch.allclose(values, compute_snr(sched, t), rtol=1e-5)
    assert values[0] > 5 > values[-1]        # early steps are nearly clean, late ones nearly noise
    for gamma in (1.0, 5.0):
        w_eps = min_snr_weights(values, gamma, v_prediction=False)
        w_v = min_snr_weights(values, gamma, v_prediction=True)
        assert torch.allclose(w_eps, reference_min_snr_weights(sched, t, gamma), rtol=1e-5)
        assert torch.allclose(w_v, reference_min_snr_weights(v_sched, t, gamma), rtol=1e-5)
    # epsilon: noisy steps (snr below γ) keep their full weight
    assert (min_snr_weights(values, 5.0, v_prediction=False)[values < 5] == 1).all()


def test_targets():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    eps = train_scheduler(SD_CONFIG)
    assert torch.equal(training_target(eps, x0, noise, t), noise)
    v = train_scheduler({**SD_CONFIG, "prediction_type": "v_prediction"})
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(training_target(v, x0, noise, t), expected, atol=1e-5)


def test_loss_plain_and_weighted():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 990])
    for config in (SD_CONFIG, {**SD_CONFIG, "prediction_type": "v_prediction"}):
        sched = train_scheduler(config)
        assert torch.isclose(diffusion_loss(pred, target, t, sched), F.mse_loss(pred, target))
        # diffusers' example: per-sample MSE times the weights, then the batch mean
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.ndim)))
        expected = (per_sample * reference_min_snr_weights(sched, t, 5.0)).mean()
        assert torch.isclose(diffusion_loss(pred, target, t, sched, min_snr_gamma=5.0), expected)


def test_offset_noise():
    plain = offset_noise((2, 4, 8, 8), 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)))
    shifted = offset_noise((2, 4, 8, 8), 0.1, torch.Generator().manual_seed(3))
    diff = shifted - plain
    # one constant per sample and channel
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff)) and diff.abs().max() > 0
