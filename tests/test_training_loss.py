"""The training objective: targets, Min-SNR weights, noise offset."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def test_snr_and_min_snr_weights():
    sched = train_scheduler(SD_CONFIG)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t]
    values = snr(sched.alphas_cumprod, t)
    assert torch.allclose(values, a / (1 - a))
    assert values[0] > 5 > values[2]        # early steps are nearly clean, late ones nearly noise
    w_eps = min_snr_weights(values, 5.0, v_prediction=False)
    w_v = min_snr_weights(values, 5.0, v_prediction=True)
    assert torch.isclose(w_eps[0], 5.0 / values[0]) and torch.isclose(w_eps[2], torch.tensor(1.0))
    assert torch.isclose(w_v[0], 5.0 / (values[0] + 1)) and torch.isclose(w_v[2], values[2] / (values[2] + 1))


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
    sched = train_scheduler(SD_CONFIG)
    t = torch.tensor([5, 400, 990])
    assert torch.isclose(diffusion_loss(pred, target, t, sched), F.mse_loss(pred, target))
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    w = min_snr_weights(snr(sched.alphas_cumprod, t), 5.0, False)
    assert torch.isclose(diffusion_loss(pred, target, t, sched, min_snr_gamma=5.0), (per * w).mean())


def test_offset_noise():
    plain = offset_noise((2, 4, 8, 8), 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)))
    shifted = offset_noise((2, 4, 8, 8), 0.1, torch.Generator().manual_seed(3))
    diff = shifted - plain
    # one constant per sample and channel
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff)) and diff.abs().max() > 0
