"""A1111/Forge sampler and schedule-type names mapped onto diffusers' flow-matching schedulers.

Flow-matching models (SD3/SD3.5, FLUX.1; later Chroma, Z-Image, FLUX.2) predict a velocity along the
straight path ``x = (1 - sigma) * x0 + sigma * noise``, so the SD table's schedulers (built on a VP
``alphas_cumprod`` schedule) do not apply to them. As in A1111/Forge, the schedule type decides the
sigmas and the sampler only integrates them: every sampler here runs on exactly the sigmas Euler gets
for that schedule type, and "Automatic", "Uniform" and Forge's "Simple" give the sigmas diffusers' own
pipelines use, so the studio's images match theirs.

Names are resolved by the SD table's code (``split_sampler_name``), so legacy combined names such as
"Euler a Karras" and A1111's aliases ("k_euler") work here too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from studio.generation.samplers import (
    UnknownSamplerError,
    find_schedule,
    split_sampler_name,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FlowShift:
    """How a model family shifts its sigmas toward the noisy end (the scheduler config's shift fields)."""

    shift: float = 3.0                 # static shift (SD3 3.0; FLUX schnell 1.0)
    dynamic: bool = False              # FLUX dev: resolution-dependent shift (diffusers' use_dynamic_shifting)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    # The unshifted sigmas the family's pipeline starts from. True: linspace(1, 1/steps, steps), as
    # FluxPipeline passes them (also Chroma, Z-Image, FLUX.2); False: the scheduler spaces its own from
    # its training range, as StableDiffusion3Pipeline's set_timesteps(steps) does. None: as `dynamic`
    # (FLUX dev True, SD3 False), so FLUX schnell (static shift 1.0) must say True.
    flux_sigmas: bool | None = None
    # FLUX.2: the dynamic shift's exponent from BFL's empirical fit over image size and step count
    # (Flux2KleinPipeline's compute_empirical_mu) instead of the line between the two seq-len points
    empirical_mu: bool = False

    @property
    def uses_flux_sigmas(self) -> bool:
        return self.dynamic if self.flux_sigmas is None else self.flux_sigmas

    def mu(self, image_seq_len: int, steps: int | None = None) -> float | None:
        """The dynamic shift's exponent for an image of ``image_seq_len`` latent tokens: linear in the
        token count between (base_seq_len, base_shift) and (max_seq_len, max_shift), as FluxPipeline's
        calculate_shift; with ``empirical_mu``, FLUX.2's fit, which also depends on ``steps``. None when
        the shift is static."""
        if not self.dynamic:
            return None
        if self.empirical_mu:
            return flux2_empirical_mu(image_seq_len, steps or 1)
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_seq_len)


# BFL's fit of FLUX.2's shift exponent: two lines in the token count, one measured at 10 steps and one at
# 200, interpolated linearly in the step count; past 4300 tokens the 200-step line alone.
_FLUX2_MU_10_STEPS = (8.73809524e-05, 1.89833333)     # (per token, at 0 tokens)
_FLUX2_MU_200_STEPS = (0.00016927, 0.45666666)
_FLUX2_MU_LARGE = 4300


def flux2_empirical_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's shift exponent for ``image_seq_len`` latent tokens sampled in ``steps`` steps."""
    at_200 = _FLUX2_MU_200_STEPS[0] * image_seq_len + _FLUX2_MU_200_STEPS[1]
    if image_seq_len > _FLUX2_MU_LARGE:
        return float(at_200)
    at_10 = _FLUX2_MU_10_STEPS[0] * image_seq_len + _FLUX2_MU_10_STEPS[1]
    per_step = (at_200 - at_10) / 190.0
    return float(per_step * steps + (at_200 - 200.0 * per_step))


@dataclass(frozen=True)
class FlowSamplerSpec:
    name: str                      # the A1111 name (as in samplers.SAMPLERS)
    scheduler_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    # FlowMatch* schedulers take the shift, mu and the Karras/exponential/beta flags themselves; the
    # others get the sigmas a FlowMatchEuler scheduler computes for the same schedule.
    native: bool = False


# DPM-Solver and UniPC handle flow models through these flags (x0 = x - sigma * v, alpha = 1 - sigma);
# their sigmas are replaced by the schedule's, so their own flow_shift only has to be honest, not used.
_SOLVER_FLOW = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}

# In A1111's UI order. Left out: LMS, DPM2, DPM2 a, DPM++ SDE, DDIM and PLMS, whose diffusers schedulers
# only know VP noise schedules (deterministic DDIM on a flow path would be Euler anyway), and DEIS, whose
# flow mode in diffusers 0.42 stops at its last sigma instead of 0 (and gives NaN when asked to reach 0).
FLOW_SAMPLERS: tuple[FlowSamplerSpec, ...] = (
    FlowSamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler",
                    {**_SOLVER_FLOW, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    FlowSamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                    {**_SOLVER_FLOW, "algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    FlowSamplerSpec("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
                    {**_SOLVER_FLOW, "algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                     "solver_type": "heun"}),
    FlowSamplerSpec("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                    {**_SOLVER_FLOW, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    # diffusers' stochastic Euler: predict x0, then noise it afresh to the next sigma (all of the noise is
    # new each step, where A1111's ancestral step on a flow model would keep part of it)
    FlowSamplerSpec("Euler a", "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, native=True),
    FlowSamplerSpec("Euler", "FlowMatchEulerDiscreteScheduler", {}, native=True),
    FlowSamplerSpec("Heun", "FlowMatchHeunDiscreteScheduler", {}),
    FlowSamplerSpec("UniPC", "UniPCMultistepScheduler", {**_SOLVER_FLOW, "solver_order": 2}),
    FlowSamplerSpec("LCM", "FlowMatchLCMScheduler", {}, native=True),
)

FLOW_SAMPLER_NAMES: tuple[str, ...] = tuple(s.name for s in FLOW_SAMPLERS)

# The schedule types that set one of the FlowMatch schedulers' sigma-conversion flags (samplers.SCHEDULES)
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# Names meaning "the family's default sigmas": A1111's automatic and uniform, Forge's Simple
_DEFAULT_SCHEDULES = ("automatic", "uniform", "simple")
_SIMPLE = "simple"


def _unsupported(name: str) -> UnknownSamplerError:
    return UnknownSamplerError(
        f"Sampler {name!r} is not available for flow-matching models (SD3, FLUX); "
        f"use one of: {', '.join(FLOW_SAMPLER_NAMES)}"
    )


def _strip_simple(sampler_name: str, scheduler: str | None) -> tuple[str, str | None]:
    """Forge calls the flow default schedule "Simple", which older A1111 tables lack: read it as Uniform,
    also as the suffix of a combined name ("Euler Simple")."""
    if scheduler is not None and scheduler.strip().lower() == _SIMPLE:
        scheduler = "uniform"
    words = sampler_name.strip()
    if words.lower().endswith(" " + _SIMPLE):
        words = words[: -len(_SIMPLE)].strip()
        if not scheduler or find_schedule(scheduler).name == "automatic":
            scheduler = "uniform"
    return words, scheduler


def resolve_flow_sampler(sampler_name: str, scheduler: str | None) -> tuple[FlowSamplerSpec, str]:
    """(sampler, schedule type name) for an A1111 sampler name and schedule type; "automatic" is the
    family's default ("uniform"), not the SD table's per-sampler default (Karras for DPM++ 2M)."""
    name, scheduler = _strip_simple(sampler_name, scheduler)
    find_schedule(scheduler)  # a bad schedule type raises with the list of schedule types
    try:
        sd_sampler, schedule = split_sampler_name(name, scheduler)
    except UnknownSamplerError:
        raise _unsupported(sampler_name) from None
    for spec in FLOW_SAMPLERS:
        if spec.name == sd_sampler.name:
            return spec, "uniform" if schedule.name in _DEFAULT_SCHEDULES else schedule.name
    raise _unsupported(sampler_name)


def flow_sampler_supported(sampler_name: str) -> bool:
    try:
        resolve_flow_sampler(sampler_name, None)
    except UnknownSamplerError:
        return False
    return True


def _build(class_name: str, config: dict[str, Any]) -> Any:
    # imported here so listing samplers does not pay diffusers' import time
    return getattr(importlib.import_module("diffusers"), class_name)(**config)


def _flow_match_config(spec_kwargs: dict[str, Any], schedule: str, shift: FlowShift) -> dict[str, Any]:
    config = {
        "shift": shift.shift, "use_dynamic_shifting": shift.dynamic, "base_shift": shift.base_shift,
        "max_shift": shift.max_shift, "base_image_seq_len": shift.base_seq_len,
        "max_image_seq_len": shift.max_seq_len, **spec_kwargs,
    }
    config.update({k: v for k, v in find_schedule(schedule).kwargs.items() if k in _SIGMA_FLAGS})
    return config


def _solver_config(spec: FlowSamplerSpec, shift: FlowShift) -> dict[str, Any]:
    config = dict(spec.kwargs)
    config["flow_shift" if spec.kwargs.get("use_flow_sigmas") else "shift"] = shift.shift
    return config


def _set_flow_match_timesteps(scheduler: Any, schedule: str, shift: FlowShift, steps: int, mu: float | None,
                              device: Any) -> None:
    """set_timesteps on a FlowMatch scheduler as the family's pipeline calls it. The scheduler then
    shifts the sigmas (statically, or by ``mu``) and converts them for Karras/exponential/beta."""
    if schedule == "sgm_uniform":
        # Forge/ComfyUI's SGM Uniform: evenly spaced in unshifted time from 1 to the scheduler's smallest
        # training time (1/num_train_timesteps), steps + 1 points less the last
        train = scheduler.config.num_train_timesteps
        sigmas = np.linspace(1.0, 1.0 / train, steps + 1)[:-1]
    elif shift.uses_flux_sigmas:
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
    else:
        scheduler.set_timesteps(steps, device=device, mu=mu)
        return
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)


def _adopt_sigmas(scheduler: Any, sigmas: torch.Tensor, timesteps: torch.Tensor) -> None:
    """Run a non-FlowMatch (or shift-unaware) scheduler on the schedule's sigmas: after its own
    set_timesteps(steps) has reset its state, replace its sigmas (one per step plus the final 0) and
    timesteps (sigma * 1000, what the transformer is given) with the schedule's."""
    import torch
    if scheduler.order == 2:
        # Heun evaluates every step after the first twice: t0, t1, t1, t2, t2, ... (diffusers' layout)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    if getattr(scheduler.config, "use_flow_sigmas", False):
        # DPM-Solver and UniPC take log(alpha) = log(1 - sigma): keep the first sigma off 1, as UniPC's
        # own flow schedule does (the timestep the model sees stays the schedule's), and keep the sigmas
        # on the CPU, where their own set_timesteps leaves them
        sigmas = sigmas.cpu().clone()
        sigmas[0] = sigmas[0].clamp(max=1 - 1e-6)
    scheduler.sigmas = sigmas
    scheduler.timesteps = timesteps


def make_flow_scheduler(sampler_name: str, scheduler: str, shift: FlowShift, steps: int, image_seq_len: int,
                        device=None) -> tuple[Any, torch.Tensor]:
    """A configured diffusers scheduler with timesteps set for `steps`, and its timesteps.

    ``image_seq_len`` is the number of latent tokens, (height / 16) * (width / 16) in pixels for FLUX
    and SD3 (8x VAE, 2x2 patches), so 4096 at 1024²; it only matters with a dynamic shift. Raises
    UnknownSamplerError for a sampler flow models cannot use, or an unknown schedule type.
    """
    spec, schedule = resolve_flow_sampler(sampler_name, scheduler)
    mu = shift.mu(image_seq_len, steps)
    flow_config = _flow_match_config(spec.kwargs if spec.native else {}, schedule, shift)
    if spec.native:
        sched = _build(spec.scheduler_class, flow_config)
        _set_flow_match_timesteps(sched, schedule, shift, steps, mu, device)
        return sched, sched.timesteps
    reference = _build("FlowMatchEulerDiscreteScheduler", flow_config)
    _set_flow_match_timesteps(reference, schedule, shift, steps, mu, device)
    sched = _build(spec.scheduler_class, _solver_config(spec, shift))
    sched.set_timesteps(steps, device=device)
    _adopt_sigmas(sched, reference.sigmas, reference.timesteps)
    return sched, sched.timesteps


def flow_img2img_start(scheduler: Any, timesteps: torch.Tensor, steps: int, strength: float) -> int:
    """Index into ``timesteps`` of the first timestep img2img runs, by A1111's rule (it runs
    ``int(min(strength, 0.999) * steps) + 1`` of ``steps``); second-order samplers (Heun) have two
    timesteps per step after the first. Pass it to ``scheduler.set_begin_index`` before noising."""
    from studio.generation.sampling import img2img_start
    index = img2img_start(steps, strength) * scheduler.order
    if index >= len(timesteps):
        raise ValueError(f"{len(timesteps)} timesteps cannot hold {steps} steps of {type(scheduler).__name__}")
    return index


def flow_add_noise(scheduler: Any, sample: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """``sample`` noised to the sigma of timestep ``index`` on the flow path, for any of these
    schedulers (FlowMatch ones call this scale_noise, DPM-Solver and UniPC add_noise)."""
    sigma = scheduler.sigmas[index].to(sample.device, sample.dtype)
    return sigma * noise + (1.0 - sigma) * sample
