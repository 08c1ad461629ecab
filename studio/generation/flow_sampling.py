"""The denoising loop of the flow-matching families (SD3/SD3.5, FLUX.1): the same batch spec,
job progress, interrupt/skip, prompt schedules, AND sub-prompts, CFG, NGMS and step callbacks as
the SD loop (generation/sampling.py), with what flow models do differently:

- the sample starts as pure noise (sigma 1) and the model predicts a velocity; the schedulers are
  diffusers' flow-matching ones (generation/flow_samplers.py), shifted as the family declares
  (FLUX.1 dev by resolution, as ``FluxPipeline`` does);
- img2img and inpainting enter the schedule part-way from the init latents moved along the
  straight flow path to that step's sigma (``sigma * noise + (1 - sigma) * init``);
- FLUX.1's guidance-distilled models take the "Distilled CFG Scale" as an input; real CFG (with the
  negative prompt) runs only when ``cfg_scale`` is not 1, as in Forge;
- step callbacks' extra model arguments (FLUX ControlNets' ``controlnets``) go to the family's denoiser,
  which lists the ones it takes (``extra_kwargs``); any other is refused, naming the family, rather
  than dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch

from studio.errors import RequestError
from studio.families.dit_engine import dit_engine
from studio.families.spec import SCHNELL_SHIFT
from studio.generation.dit_denoisers import pack_latents
from studio.generation.flow_samplers import FlowShift, flow_add_noise, flow_img2img_start, make_flow_scheduler
from studio.generation.preview import JobProgress
from studio.generation.sampling import BatchSpec, ends_step, guide, skips_uncond, start_noise
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallbacks, StepEnd
from studio.jobs import JobState


def flow_shift(model) -> FlowShift:
    spec = model.spec.flow_shift
    if model.spec.id == "flux1" and model.probe.variant == "schnell":
        spec = SCHNELL_SHIFT
    return FlowShift(**dataclasses.asdict(spec))


def sample_flow(model, spec: BatchSpec, state: JobState) -> torch.Tensor:
    """Denoise one batch of a flow model; returns float32 latents scaled as the VAE decoder takes them."""
    family = model.spec
    device = model.policy.device
    scale = family.latent.downscale
    h, w = spec.height // scale, spec.width // scale
    tokens = (h // family.latent.patch) * (w // family.latent.patch)
    scheduler, timesteps = make_flow_scheduler(spec.sampler.name, spec.schedule.name, flow_shift(model),
                                               spec.steps, tokens, device=device)
    start = 0
    if spec.init_latents is not None:
        start = flow_img2img_start(scheduler, timesteps, spec.steps, spec.strength)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    timesteps = timesteps[start:]
    calls = len(timesteps)
    sigmas = [float(s) for s in scheduler.sigmas[start:start + calls]]
    noise, gens, init = start_noise(spec, (family.latent.channels, h, w), scale, device)
    if init is not None:
        latents = flow_add_noise(scheduler, init, noise, start) if calls else init
    else:
        latents = noise
    extra_step = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra_step["generator"] = gens[0]

    cond_image = spec.image_conditioning      # FLUX Fill: masked-image latents + folded mask, [B, 80, h, w]
    if cond_image is not None:
        cond_image = cond_image.to(device)
    reference = spec.reference_latents        # FLUX Kontext: the image being edited
    if reference is not None:
        reference = reference.to(device)
    denoiser = dit_engine(family.id).denoiser(model)
    accepted = frozenset(getattr(denoiser, "extra_kwargs", ()))

    @functools.cache
    def image_inputs(groups: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The Fill conditioning (packed) and the Kontext reference for ``groups`` prompt groups: built once
        per group count, not per step."""
        extra = None if cond_image is None else pack_latents(cond_image.repeat(groups, 1, 1, 1))
        ref = None if reference is None else reference.repeat(groups, 1, 1, 1)
        return extra, ref

    plan = spec.plan
    use_uncond = spec.cfg_scale != 1.0 or len(plan.weights) > 1
    batch = len(spec.seeds)
    order = getattr(scheduler, "order", 1)
    steps_run = spec.steps - start // order   # as the SD loop counts an img2img pass
    callbacks = StepCallbacks([JobProgress(state, spec.preview_every, model.previewer), *spec.callbacks])
    last_embeds = None
    done, step_start = 0, 0
    with torch.inference_mode(), callbacks.running(PassInfo(model, steps_run, list(spec.seeds))):
        for i, t in enumerate(timesteps):
            if state.interrupted or state.skipped:
                break
            step = i * steps_run // calls
            embeds, pooled = plan.at(step)
            if embeds is not last_embeds:
                last_embeds = embeds
                if not use_uncond:
                    embeds, pooled = embeds[1:], (pooled[1:] if pooled is not None else None)
                groups = embeds.shape[0]
                context = embeds.to(device).repeat_interleave(batch, dim=0)
                # families without a pooled vector (Chroma, Z-Image, FLUX.2) get None through to their denoiser
                vectors = pooled.to(device).repeat_interleave(batch, dim=0) if pooled is not None else None
            has_uncond = use_uncond and not skips_uncond(i, sigmas[i], spec.s_min_uncond)
            run_groups, run_context, run_vectors = groups, context, vectors
            if use_uncond and not has_uncond:
                run_groups, run_context = groups - 1, context[batch:]
                run_vectors = vectors[batch:] if vectors is not None else None
            x = latents.repeat(run_groups, 1, 1, 1)
            call = ModelCall(i, step, steps_run, t, sigmas[i], x, run_context, None, run_groups, batch, has_uncond)
            model_kwargs = callbacks.unet_kwargs(call)
            refused = sorted(model_kwargs.keys() - accepted)
            if refused:
                raise RequestError(f"{family.label} checkpoints do not take {', '.join(refused)}: ControlNet and "
                                   f"adapter units work with SD1/SD2/SDXL checkpoints, FLUX.1 ControlNets with "
                                   f"FLUX.1 ones")
            extra, ref = image_inputs(run_groups)
            pred = callbacks.unet_output(call, denoiser(x, t, run_context, run_vectors, spec.guidance, extra, ref,
                                                        **model_kwargs))
            preds = pred.chunk(run_groups)
            if has_uncond or not use_uncond:
                pred = guide(preds, plan.weights, spec.cfg_scale, use_uncond)
            else:
                pred = guide((preds[0], *preds), plan.weights, 1.0, True)
            latents = scheduler.step(pred, t, latents, **extra_step).prev_sample.float()
            if spec.mask is not None and init is not None:
                keep = init
                if i + 1 < calls:
                    keep = flow_add_noise(scheduler, init, noise, start + i + 1)
                latents = keep * (1 - spec.mask) + latents * spec.mask
            if ends_step(i, calls, steps_run, order):
                tensors = {"latents": latents, "noise_pred": pred, "prompt_embeds": run_context}
                end = StepEnd(done, steps_run, timesteps[step_start], sigmas[step_start])
                latents = callbacks.step_end(end, tensors)["latents"]
                done, step_start = done + 1, i + 1
    return latents
