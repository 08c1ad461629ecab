"""The denoising loop shared by txt2img, img2img, inpainting and (later) hires fix.

One batch of images: noise drawn on the CPU per seed, the prompt plan looked up per step,
classifier-free guidance over AND sub-prompts, interrupt/skip between steps, throttled
previews. img2img enters the schedule part-way (A1111's step count: ``int(strength * steps) + 1``
of ``steps``) from the init latents noised to that point; inpainting keeps the unmasked area
on the init latents, re-noised to the current step after every step (as diffusers' inpaint
pipeline does for 4-channel models), and 9-channel models also get mask + masked-image
latents as extra input channels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from studio.controlnet.guidance import control_residuals
from studio.generation.noise import make_noise
from studio.generation.preview import latent_preview
from studio.generation.samplers import SamplerSpec, ScheduleSpec, make_scheduler
from studio.jobs import JobState
from studio.prompts.schedule import ConditioningPlan


@dataclass
class BatchSpec:
    """Everything one batch of the loop needs besides the model."""

    plan: ConditioningPlan
    sampler: SamplerSpec
    schedule: ScheduleSpec
    steps: int
    cfg_scale: float
    eta: float | None
    width: int                              # pixels
    height: int
    seeds: list[int]
    preview_every: int = 0
    subseeds: list[int] | None = None           # variation seeds, with subseed_strength > 0
    subseed_strength: float = 0.0
    resize_from: tuple[int, int] | None = None  # "resize seed from" size in pixels
    init_latents: torch.Tensor | None = None    # [B, C, h, w] scaled latents: img2img
    strength: float = 1.0                       # denoising strength for init_latents
    mask: torch.Tensor | None = None            # [B or 1, 1, h, w], 1 = repaint: inpainting
    image_conditioning: torch.Tensor | None = None  # [B, 5, h, w] for 9-channel UNets
    latent_fill: str | None = None              # "latent noise" | "latent nothing" in the masked area
    controlnets: list[Any] | None = None        # ControlUnit list (studio.controlnet.guidance)


def guide(preds: tuple[torch.Tensor, ...], weights: list[float], cfg_scale: float, has_uncond: bool) -> torch.Tensor:
    """Classifier-free guidance over AND sub-prompts (A1111's composable diffusion):
    uncond + cfg * sum_i w_i * (cond_i - uncond)."""
    if not has_uncond:
        return preds[0]
    uncond, conds = preds[0], preds[1:]
    total = torch.zeros_like(uncond)
    for cond, weight in zip(conds, weights):
        total += weight * (cond - uncond)
    return uncond + cfg_scale * total


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first of ``steps`` schedule steps that img2img runs. A1111 runs
    ``int(min(strength, 0.999) * steps) + 1`` steps, so 0.75 of 20 runs 16 and 1.0 runs all."""
    run = min(steps, int(min(strength, 0.999) * steps) + 1)
    return steps - run


def sample(model: Any, spec: BatchSpec, state: JobState) -> torch.Tensor:
    """Denoise one batch; returns float32 latents (scaled, as the VAE decoder takes them)."""
    policy = model.policy
    device, dtype = policy.device, policy.dtype
    unet = model.unet
    latent_ch = model.vae.config.latent_channels
    h, w = spec.height // 8, spec.width // 8
    plan = spec.plan
    use_uncond = spec.cfg_scale != 1.0 or len(plan.weights) > 1
    batch = len(spec.seeds)
    added_time_ids = None
    if model.is_sdxl:
        added_time_ids = torch.tensor([[spec.height, spec.width, 0, 0, spec.height, spec.width]], dtype=dtype,
                                      device=device)

    scheduler = make_scheduler(spec.sampler, spec.schedule, model.scheduler_config)
    scheduler.set_timesteps(spec.steps, device=device)
    start = 0
    if spec.init_latents is not None:
        start = img2img_start(spec.steps, spec.strength) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    timesteps = scheduler.timesteps[start:]
    step_params = inspect.signature(scheduler.step).parameters
    resize = None
    if spec.resize_from and spec.resize_from[0] > 0 and spec.resize_from[1] > 0:
        resize = (spec.resize_from[0] // 8, spec.resize_from[1] // 8)
    noise, gens = make_noise(spec.seeds, (latent_ch, h, w), spec.subseeds, spec.subseed_strength, resize)
    noise = noise.to(device)
    init = spec.init_latents.to(device) if spec.init_latents is not None else None
    if init is not None:
        if spec.mask is not None and spec.latent_fill == "latent noise":
            init = init * (1 - spec.mask) + noise * spec.mask
        elif spec.mask is not None and spec.latent_fill == "latent nothing":
            init = init * (1 - spec.mask)
        latents = scheduler.add_noise(init, noise, timesteps[:1]) if len(timesteps) else init
    else:
        latents = noise * scheduler.init_noise_sigma
    extra_step: dict[str, Any] = {}
    if "generator" in step_params:
        extra_step["generator"] = gens if len(gens) > 1 else gens[0]
    if "eta" in step_params and spec.sampler.uses_eta:
        extra_step["eta"] = spec.eta if spec.eta is not None else 0.0

    cond_image = spec.image_conditioning
    if cond_image is None and unet.config.in_channels == latent_ch + 5:
        cond_image = txt2img_image_conditioning(model, batch, spec.height, spec.width)
    if cond_image is not None:
        cond_image = cond_image.to(device)

    state.set_total(len(timesteps))
    last_embeds = None
    # A1111 counts prompt-schedule steps from 0 in img2img too, over the steps actually run
    steps_run = spec.steps - start // scheduler.order
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            if state.interrupted or state.skipped:
                break
            # second-order samplers call the model twice per step; prompt schedules count steps
            embeds, pooled = plan.at(i * steps_run // len(timesteps))
            if embeds is not last_embeds:  # the plan returns the same tensors until the text changes
                last_embeds = embeds
                if not use_uncond:
                    embeds, pooled = embeds[1:], (pooled[1:] if pooled is not None else None)
                groups = embeds.shape[0]
                context = embeds.to(device, dtype).repeat_interleave(batch, dim=0)
                added = None
                if added_time_ids is not None:
                    added = {"text_embeds": pooled.to(device, dtype).repeat_interleave(batch, dim=0),
                             "time_ids": added_time_ids.repeat(groups * batch, 1)}
            x = scheduler.scale_model_input(latents.repeat(groups, 1, 1, 1), t)
            if cond_image is not None:
                x = torch.cat([x, cond_image.repeat(groups, 1, 1, 1)], dim=1)
            control = {}
            if spec.controlnets:
                control = control_residuals(spec.controlnets, x, t, context, added, i * steps_run // len(timesteps),
                                            steps_run, groups, batch, use_uncond)
            pred = unet(x.to(dtype), t, encoder_hidden_states=context, added_cond_kwargs=added,
                        **control).sample.float()
            pred = guide(pred.chunk(groups), plan.weights, spec.cfg_scale, use_uncond)
            latents = scheduler.step(pred, t, latents, **extra_step).prev_sample
            if spec.mask is not None and init is not None:
                # keep the unmasked area on the init image, noised to where the sampler now is
                keep = init
                if i + 1 < len(timesteps):
                    keep = scheduler.add_noise(init, noise, timesteps[i + 1:i + 2])
                latents = keep * (1 - spec.mask) + latents * spec.mask
            show = spec.preview_every > 0 and (i + 1) % spec.preview_every == 0 and i + 1 < len(timesteps)
            state.advance((lambda lat=latents: latent_preview(lat[0], model.is_sdxl)) if show else None)
    return latents


def encode_images(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> scaled latents (the distribution's mean: deterministic)."""
    from studio.generation.txt2img import vae_tiling

    vae = model.vae
    with torch.inference_mode(), vae_tiling(vae, pixels.shape[-1], pixels.shape[-2]):
        x = pixels.to(model.policy.device, vae.dtype)
        lat = vae.encode(x).latent_dist.mode()
        if torch.isnan(lat).any() and vae.dtype != torch.float32:
            vae.to(torch.float32)
            lat = vae.encode(x.float()).latent_dist.mode()
    return lat.float() * vae.config.scaling_factor


def txt2img_image_conditioning(model: Any, batch: int, height: int, width: int) -> torch.Tensor:
    """9-channel UNets in txt2img get a full mask over a neutral gray image (A1111's
    ``txt2img_image_conditioning``): channel order mask(1) + masked-image latents(4)."""
    gray = torch.zeros(1, 3, height, width)
    lat = encode_images(model, gray)
    mask = torch.ones(1, 1, height // 8, width // 8, device=lat.device, dtype=lat.dtype)
    return torch.cat([mask, lat], dim=1).expand(batch, -1, -1, -1).float()
