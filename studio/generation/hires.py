"""Hires. fix: a second, img2img-like pass at a larger size (A1111's txt2img ``enable_hr``).

The first pass runs at the request's width × height. Its result is brought to the target
size either in latent space (the "Latent …" modes: the latents are interpolated) or in pixel
space (Lanczos, Nearest, ESRGAN-family files: decode, upscale, encode), then denoised again
from ``int(strength · hires steps) + 1`` steps before the end of the schedule, with the same
seeds, and optionally another sampler and prompt. The infotext records all of it, with
A1111's keys; ``Size`` stays the first pass's size, as in A1111.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from studio.generation.denoise import denoise
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.generation.sampling import BatchSpec
from studio.generation.txt2img import encode_images
from studio.jobs import JobState


@dataclass(frozen=True)
class HiresPlan:
    width: int
    height: int
    upscaler: str
    steps: int
    strength: float
    sampler: Any
    schedule: Any


def target_size(req: Txt2ImgRequest, multiple: int = 8) -> tuple[int, int]:
    """A1111's rules: ``hr_resize_x/y`` win over ``hr_scale``; with only one of them the other
    follows the first pass's aspect ratio; sizes are rounded down to multiples of 8 (of 16 for the
    families whose transformer takes 2x2 latent patches)."""
    w, h = req.width, req.height
    if req.hr_resize_x > 0 and req.hr_resize_y > 0:
        tw, th = req.hr_resize_x, req.hr_resize_y
    elif req.hr_resize_x > 0:
        tw, th = req.hr_resize_x, round(req.hr_resize_x * h / w)
    elif req.hr_resize_y > 0:
        tw, th = round(req.hr_resize_y * w / h), req.hr_resize_y
    else:
        tw, th = round(w * req.hr_scale), round(h * req.hr_scale)
    return max(64, tw - tw % multiple), max(64, th - th % multiple)


def infotext_params(req: Txt2ImgRequest, plan: HiresPlan, checkpoint: str | None = None) -> dict[str, Any]:
    """A1111's hires keys; ``checkpoint``: the hires checkpoint's short title when it is another one."""
    params: dict[str, Any] = {"Denoising strength": f"{plan.strength:g}"}
    if req.hr_resize_x > 0 or req.hr_resize_y > 0:
        params["Hires resize"] = f"{plan.width}x{plan.height}"
    else:
        params["Hires upscale"] = f"{req.hr_scale:g}"
    if req.hr_second_pass_steps:
        params["Hires steps"] = req.hr_second_pass_steps
    params["Hires upscaler"] = plan.upscaler
    if checkpoint:
        params["Hires checkpoint"] = checkpoint
    if req.hr_sampler_name and req.hr_sampler_name != req.sampler_name:
        params["Hires sampler"] = req.hr_sampler_name
    if req.hr_scheduler and req.hr_scheduler != req.scheduler:
        params["Hires schedule type"] = req.hr_scheduler
    if req.hr_prompt and req.hr_prompt != req.prompt:
        params["Hires prompt"] = req.hr_prompt
    if req.hr_negative_prompt and req.hr_negative_prompt != req.negative_prompt:
        params["Hires negative prompt"] = req.hr_negative_prompt
    return params


def make_plan(req: Txt2ImgRequest, upscalers: Any, family: Any = None) -> HiresPlan:
    from studio.generation.samplers import effective_schedule, split_sampler_name
    from studio.upscale import is_latent_mode, latent_mode

    name = req.hr_upscaler or "Latent"
    if is_latent_mode(name):
        name = latent_mode(name)
    elif upscalers is None or upscalers.find(name) is None:
        known = ", ".join([*(u.name for u in (upscalers.items() if upscalers else [])), "Latent …"])
        raise RequestError(f"hr_upscaler {name!r} not found. Available: {known}")
    sampler, schedule = split_sampler_name(req.hr_sampler_name or req.sampler_name,
                                           req.hr_scheduler or req.scheduler)
    flow = family is not None and family.is_flow
    width, height = target_size(req, family.size_multiple if family is not None else 8)
    return HiresPlan(width, height, name, req.hr_second_pass_steps or req.steps, req.hr_denoising_strength,
                     sampler, schedule if flow else effective_schedule(sampler, schedule))


def second_pass(model: Any, plan: HiresPlan, spec: BatchSpec, latents: torch.Tensor, images_first: Any,
                state: JobState, upscalers: Any) -> torch.Tensor:
    """The upscaled, re-denoised latents of one batch. ``spec`` is the first pass's, with the hires
    prompt and the hires pass's step callbacks already in; the sampler, size and start change here."""
    from studio.upscale import is_latent_mode, latent_upscale

    scale = model.spec.latent.downscale
    h, w = plan.height // scale, plan.width // scale
    if is_latent_mode(plan.upscaler):
        init = latent_upscale(latents, plan.upscaler, h, w)
    else:
        pixels = []
        for image in images_first():
            big = upscalers.upscale(image, plan.upscaler, size=(plan.width, plan.height))
            arr = np.asarray(big.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            pixels.append(torch.from_numpy(arr).permute(2, 0, 1))
        init = encode_images(model, torch.stack(pixels))
    state.textinfo = f"Hires fix: {plan.width}x{plan.height}"
    # the hires noise is the seeds' own at the new size; "resize seed from" shapes the first pass only
    spec = replace(spec, sampler=plan.sampler, schedule=plan.schedule, steps=plan.steps, width=plan.width,
                   height=plan.height, resize_from=None, init_latents=init, strength=plan.strength)
    return denoise(model, spec, state)
