"""The denoising loop shared by txt2img, img2img, inpainting and hires fix.

One batch of images: noise drawn on the CPU per seed, the prompt plan looked up per step,
classifier-free guidance over AND sub-prompts, interrupt/skip between model calls, and step
callbacks (generation/step_callbacks.py) for everything else: job progress and previews,
ControlNet, token merging, extensions. img2img enters the schedule part-way (A1111's step count:
``int(strength * steps) + 1`` of ``steps``) from the init latents noised to that point;
inpainting keeps the unmasked area on the init latents, re-noised to the current step after every
step (as diffusers' inpaint pipeline does for 4-channel models), and 9-channel models also get
mask + masked-image latents as extra input channels.

Steps are counted as diffusers counts them (``len(timesteps) // scheduler.order``): Heun at 20
steps calls the UNet 39 times and reports 20 steps.

A1111's refiner (``refiner_checkpoint`` + ``refiner_switch_at``, :class:`RefinerSwitch`): once the
denoising is far enough along, the loop goes on with another model's UNet, text conditioning and
added conditioning, under the same scheduler and latents, as A1111 swaps the model under the same
k-diffusion sampler (``sd_samplers_common.apply_refiner``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from studio.errors import RequestError
from studio.generation.noise import make_noise, step_noise_generators
from studio.generation.preview import JobProgress
from studio.generation.samplers import SamplerSpec, ScheduleSpec, make_scheduler
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback, StepCallbacks, StepEnd
from studio.generation.txt2img import encode_images, txt2img_image_conditioning  # noqa: F401 (re-exported)
from studio.jobs import JobState
from studio.prompts.schedule import ConditioningPlan

REFINER_FAMILY = "sdxl-refiner"


@dataclass(frozen=True)
class RefinerSwitch:
    """Go on with another model part-way through the pass (A1111's refiner).

    ``load`` is called once, when the switch point is reached, outside inference mode (the model it
    loads outlives the pass); it returns the model and its conditioning plan, the same prompts and
    steps encoded by that model's text encoders. The scheduler and the latents carry on unchanged.
    """

    switch_at: float    # A1111's ``refiner_switch_at``: the fraction of the denoising done first (0..1)
    load: Callable[[], tuple[Any, ConditioningPlan]]


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
    callbacks: Sequence[StepCallback] = ()      # run after the job's own progress callback
    eta_noise_seed_delta: int = 0               # A1111's ENSD: seeds of the per-step noise are seed + this
    s_min_uncond: float = 0.0                   # A1111's NGMS: below this sigma, skip the negative prompt
    guidance: float | None = None               # FLUX's distilled guidance (Forge's "Distilled CFG Scale")
    reference_latents: torch.Tensor | None = None  # FLUX Kontext: the image to edit, [B, 16, h, w] scaled latents
    # the SDXL refiner's aesthetic score for the positive and the negative prompt (A1111's options
    # sdxl_refiner_high_aesthetic_score and sdxl_refiner_low_aesthetic_score)
    aesthetic_scores: tuple[float, float] = (6.0, 2.5)
    refiner: RefinerSwitch | None = None        # switch to a refiner part-way (SD families only)


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


def ends_step(call: int, calls: int, steps: int, order: int) -> bool:
    """Whether model call ``call`` (of ``calls``) finishes a sampler step, by diffusers' progress rule:
    second-order samplers finish a step every ``order`` calls (their last step has one call), and
    samplers that make more calls than ``steps * order`` (PLMS's warm-up) count the extra ones first."""
    warmup = calls - steps * order
    return call == calls - 1 or (call + 1 > warmup and (call + 1) % order == 0)


def skips_uncond(call: int, sigma: float, s_min_uncond: float) -> bool:
    """A1111's NGMS (``s_min_uncond``): below that sigma every other model call -- the odd ones,
    counted from the pass's first call -- runs without the negative prompt."""
    return s_min_uncond > 0 and call % 2 == 1 and sigma < s_min_uncond


def draws_step_noise(sampler: SamplerSpec, eta: float | None) -> bool:
    """Whether the sampler draws fresh noise from the per-image generators between steps, which
    is what ENSD reseeds: ancestral, SDE-DPM-Solver and LCM samplers, and DDIM with eta > 0. (DPM++
    SDE's Brownian noise has a seed of its own.)"""
    if sampler.uses_eta:
        return (eta if eta is not None else sampler.default_eta) > 0
    return ("Ancestral" in sampler.scheduler_class or sampler.scheduler_class == "LCMScheduler"
            or str(sampler.kwargs.get("algorithm_type", "")).startswith("sde"))


def call_sigmas(scheduler: Any, timesteps: torch.Tensor, start: int) -> list[float]:
    """The noise level (k-diffusion sigma) the UNet sees at each model call from ``start`` on: the
    scheduler's own sigmas where it keeps one per call, else from ``alphas_cumprod`` at the timestep."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        return sigmas[start:start + len(timesteps)].float().cpu().tolist()
    alphas = scheduler.alphas_cumprod.float().cpu().numpy()
    log_sigmas = np.log(((1 - alphas) / alphas) ** 0.5)
    t = timesteps.float().cpu().numpy()
    return np.exp(np.interp(t, np.arange(len(alphas)), log_sigmas)).tolist()


def added_time_ids(model: Any, spec: BatchSpec) -> torch.Tensor | None:
    """SDXL's size conditioning as two rows, the negative prompt's and the positive prompts', or None
    for models without it. SDXL: [h, w, crop top, crop left, target h, target w] in both rows. The
    refiner (diffusers' ``requires_aesthetics_score``; sgm's ``aesthetic_score`` embedder): [h, w,
    crop top, crop left, aesthetic score], the high score for the positive prompts and the low one for
    the negative, as A1111's ``get_learned_conditioning`` gives them. Crops are 0 (A1111's default
    ``sdxl_crop_top`` / ``sdxl_crop_left``)."""
    if not model.is_sdxl:
        return None
    h, w = spec.height, spec.width
    if model.family == REFINER_FAMILY:
        high, low = spec.aesthetic_scores
        rows = [[h, w, 0, 0, low], [h, w, 0, 0, high]]
    else:
        rows = [[h, w, 0, 0, h, w]] * 2
    return torch.tensor(rows, dtype=model.policy.dtype, device=model.policy.device)


def group_time_ids(time_ids: torch.Tensor, groups: int, batch: int, has_negative: bool) -> torch.Tensor:
    """The time-id rows of ``groups`` prompt blocks of ``batch`` images, the negative block first when
    there is one."""
    positive = time_ids[1:].expand(groups, -1)
    rows = torch.cat([time_ids[:1], positive[1:]]) if has_negative else positive
    return rows.repeat_interleave(batch, dim=0)


def timestep_sigmas(scheduler: Any) -> np.ndarray:
    """The k-diffusion sigma of every discrete training timestep (A1111's ``inner_model.sigmas``)."""
    alphas = scheduler.alphas_cumprod.float().cpu().numpy().astype(np.float64)
    return ((1 - alphas) / alphas) ** 0.5


def refiner_due(sigma: float, switch_at: float, sigmas: np.ndarray) -> bool:
    """A1111 1.10's ``apply_refiner`` rule (by timestep, the default): the completed ratio is
    ``(999 - t) / 1000`` for the discrete timestep ``t`` whose sigma is closest to the call's, and the
    switch comes once it reaches ``switch_at``; so 1.0 never switches (the ratio tops at 0.999). A1111
    computes the ratio in float32, and so does this. An infinite sigma (zero terminal SNR's first call)
    is the start of the denoising, where there is nothing to switch yet."""
    if not math.isfinite(sigma):
        return False
    t = int(np.argmin(np.abs(sigmas - sigma)))
    last = len(sigmas) - 1
    return bool(np.float32(last - t) / np.float32(last + 1) >= np.float32(switch_at))


def convert_prediction(pred: torch.Tensor, x: torch.Tensor, sigma: float, source: str,
                       target: str) -> torch.Tensor:
    """A ``source`` prediction (``"epsilon"`` or ``"v_prediction"``) as a ``target`` one, for UNet input
    ``x`` at k-diffusion noise level ``sigma``: a refiner may be trained for the other parameterisation
    than the scheduler runs (A1111's k-diffusion wrapper of the new model turns either into a denoised
    image). ``x`` is the variance-preserving x_t that every diffusers scheduler hands the UNet:
    x = a x0 + b eps with a = 1/sqrt(1 + sigma^2), b = sigma a; v = a eps - b x0."""
    if source == target:
        return pred
    a = 1 / math.sqrt(1 + sigma * sigma)
    b = sigma * a
    if (source, target) == ("v_prediction", "epsilon"):
        return a * pred + b * x
    if (source, target) == ("epsilon", "v_prediction"):
        return (pred - b * x) / a
    raise RequestError(f"cannot run a {source} model under a {target} sampler")


@dataclass
class _Stage:
    """The model the loop denoises with: the pass's model, then the refiner after the switch."""

    model: Any
    plan: ConditioningPlan
    time_ids: torch.Tensor | None   # added_time_ids()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.policy.dtype

    @property
    def device(self) -> torch.device:
        return self.model.policy.device


def _refiner_stage(switch: RefinerSwitch, spec: BatchSpec, latent_ch: int) -> _Stage:
    # the refiner stays cached after this pass: weights made in inference mode could not be
    # patched (LoRA) or trained later
    with torch.inference_mode(False):
        refiner, plan = switch.load()
    name = getattr(getattr(refiner, "info", None), "title", "the refiner")
    if refiner.spec.is_flow or refiner.vae.config.latent_channels != latent_ch:
        raise RequestError(f"refiner {name} ({refiner.label}) does not share the model's latent space; "
                           "choose an SD1, SD2 or SDXL checkpoint or the SDXL refiner")
    if refiner.unet.config.in_channels != latent_ch:
        raise RequestError(f"refiner {name} is an inpainting or instruct model ({refiner.unet.config.in_channels} "
                           "input channels); choose a regular checkpoint as the refiner")
    return _Stage(refiner, plan, added_time_ids(refiner, spec))


def start_noise(spec: BatchSpec, shape: tuple[int, int, int], scale: int,
                device: torch.device) -> tuple[torch.Tensor, list[torch.Generator], torch.Tensor | None]:
    """A batch's noise (per seed, on the CPU; variation seeds and "resize seed from" mixed in; ``scale``
    pixels per latent cell), the generators of the sampler's per-step noise (ENSD), and the init latents
    of img2img with the masked area filled as "latent noise" / "latent nothing" asks; both loops start here."""
    resize = None
    if spec.resize_from and spec.resize_from[0] > 0 and spec.resize_from[1] > 0:
        resize = (spec.resize_from[0] // scale, spec.resize_from[1] // scale)
    noise, gens = make_noise(spec.seeds, shape, spec.subseeds, spec.subseed_strength, resize)
    gens = step_noise_generators(spec.seeds, gens, spec.eta_noise_seed_delta)
    noise = noise.to(device)
    init = spec.init_latents.to(device) if spec.init_latents is not None else None
    if init is not None and spec.mask is not None:
        if spec.latent_fill == "latent noise":
            init = init * (1 - spec.mask) + noise * spec.mask
        elif spec.latent_fill == "latent nothing":
            init = init * (1 - spec.mask)
    return noise, gens, init


def sample(model: Any, spec: BatchSpec, state: JobState) -> torch.Tensor:
    """Denoise one batch; returns float32 latents (scaled, as the VAE decoder takes them).

    With ``spec.refiner`` the latents are finished by the refiner (its ``load`` knows which model that
    is). Step callbacks see the pass's first model (``PassInfo.model``); their extra UNet arguments
    (ControlNet's residuals) go to that model only, as A1111's ControlNet hooks the UNet it started on.
    """
    device = model.policy.device
    latent_ch = model.vae.config.latent_channels
    h, w = spec.height // 8, spec.width // 8
    stage = _Stage(model, spec.plan, added_time_ids(model, spec))
    use_uncond = spec.cfg_scale != 1.0 or len(spec.plan.weights) > 1
    batch = len(spec.seeds)
    refiner = spec.refiner
    if refiner is not None and model.unet.config.in_channels != latent_ch:
        raise RequestError(f"{model.label} models ({model.unet.config.in_channels} input channels: inpainting, "
                           "instruct) cannot hand over to a refiner; leave the refiner unset")

    scheduler = make_scheduler(spec.sampler, spec.schedule, model.scheduler_config)
    if hasattr(scheduler, "noise_sampler_seed"):
        # DPM++ SDE's Brownian noise: one tree per image seeded with its seed, as A1111 seeds it; left
        # unset, diffusers draws a random seed and the same seed gives a different image every time
        scheduler.noise_sampler_seed = list(spec.seeds)
    scheduler.set_timesteps(spec.steps, device=device)
    start = 0
    if spec.init_latents is not None:
        start = img2img_start(spec.steps, spec.strength) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    timesteps = scheduler.timesteps[start:]
    calls = len(timesteps)
    sigmas = call_sigmas(scheduler, timesteps, start)
    model_sigmas = timestep_sigmas(scheduler) if refiner is not None else None
    step_params = inspect.signature(scheduler.step).parameters
    noise, gens, init = start_noise(spec, (latent_ch, h, w), 8, device)
    if init is not None:
        latents = scheduler.add_noise(init, noise, timesteps[:1]) if calls else init
    else:
        latents = noise * scheduler.init_noise_sigma
    extra_step: dict[str, Any] = {}
    if "generator" in step_params:
        extra_step["generator"] = gens if len(gens) > 1 else gens[0]
    if "eta" in step_params and spec.sampler.uses_eta:
        extra_step["eta"] = spec.eta if spec.eta is not None else spec.sampler.default_eta

    cond_image = spec.image_conditioning
    if cond_image is None and model.unet.config.in_channels == latent_ch + 5:
        cond_image = txt2img_image_conditioning(model, batch, spec.height, spec.width)
    if cond_image is not None:
        cond_image = cond_image.to(device)

    # A1111 counts prompt-schedule steps from 0 in img2img too, over the steps actually run
    steps_run = spec.steps - start // scheduler.order
    callbacks = StepCallbacks([JobProgress(state, spec.preview_every, model.previewer), *spec.callbacks])
    last_embeds = None
    switched = False             # the refiner has taken over
    done = 0                     # sampler steps finished
    step_start = 0               # the model call the current step started at
    with torch.inference_mode(), callbacks.running(PassInfo(model, steps_run, list(spec.seeds))):
        for i, t in enumerate(timesteps):
            if state.interrupted or state.skipped:
                break
            if refiner is not None and not switched and refiner_due(sigmas[i], refiner.switch_at, model_sigmas):
                stage, switched = _refiner_stage(refiner, spec, latent_ch), True
                last_embeds = None
            dtype = stage.dtype
            # second-order samplers call the model twice per step; prompt schedules count steps
            step = i * steps_run // calls
            embeds, pooled = stage.plan.at(step)
            if embeds is not last_embeds:  # the plan returns the same tensors until the text changes
                last_embeds = embeds
                if not use_uncond:
                    embeds, pooled = embeds[1:], (pooled[1:] if pooled is not None else None)
                groups = embeds.shape[0]
                context = embeds.to(stage.device, dtype).repeat_interleave(batch, dim=0)
                added = None
                if stage.time_ids is not None:
                    added = {"text_embeds": pooled.to(stage.device, dtype).repeat_interleave(batch, dim=0),
                             "time_ids": group_time_ids(stage.time_ids, groups, batch, use_uncond)}
            has_uncond = use_uncond and not skips_uncond(i, sigmas[i], spec.s_min_uncond)
            run_groups, run_context, run_added = groups, context, added
            if use_uncond and not has_uncond:  # the first block of the batch is the negative prompt's
                run_groups, run_context = groups - 1, context[batch:]
                run_added = None if added is None else {k: v[batch:] for k, v in added.items()}
            x = scheduler.scale_model_input(latents.repeat(run_groups, 1, 1, 1), t)
            if cond_image is not None:
                x = torch.cat([x, cond_image.repeat(run_groups, 1, 1, 1)], dim=1)
            extra: dict[str, Any] = {}
            call_added = run_added
            if not switched:
                call = ModelCall(i, step, steps_run, t, sigmas[i], x, run_context, run_added, run_groups, batch,
                                 has_uncond)
                extra = callbacks.unet_kwargs(call)
                if "added_cond_kwargs" in extra:  # e.g. IP-Adapter image embeddings, next to SDXL's own
                    call_added = {**(run_added or {}), **extra.pop("added_cond_kwargs")}
            # a callback may replace the text context of the call (Revision's "ignore prompt")
            call_context = extra.pop("encoder_hidden_states", run_context)
            pred = stage.model.unet(x.to(stage.device, dtype), t, encoder_hidden_states=call_context,
                                    added_cond_kwargs=call_added, **extra).sample.to(device, torch.float32)
            if not switched:
                pred = callbacks.unet_output(call, pred)
            preds = pred.chunk(run_groups)
            weights = stage.plan.weights
            if has_uncond or not use_uncond:
                pred = guide(preds, weights, spec.cfg_scale, use_uncond)
            else:
                # A1111 puts the first prompt's prediction where the negative one would be, at scale 1
                pred = guide((preds[0], *preds), weights, 1.0, True)
            if switched:
                pred = convert_prediction(pred, x[:batch, :latent_ch].float(), sigmas[i],
                                          stage.model.prediction_type, scheduler.config.prediction_type)
            latents = scheduler.step(pred, t, latents, **extra_step).prev_sample
            if spec.mask is not None and init is not None:
                # keep the unmasked area on the init image, noised to where the sampler now is
                keep = init
                if i + 1 < calls:
                    keep = scheduler.add_noise(init, noise, timesteps[i + 1:i + 2])
                latents = keep * (1 - spec.mask) + latents * spec.mask
            if ends_step(i, calls, steps_run, scheduler.order):
                tensors = {"latents": latents, "noise_pred": pred, "prompt_embeds": run_context}
                end = StepEnd(done, steps_run, timesteps[step_start], sigmas[step_start])
                latents = callbacks.step_end(end, tensors)["latents"]
                done, step_start = done + 1, i + 1
    return latents
