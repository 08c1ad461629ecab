"""A1111 sampler and schedule-type names mapped onto diffusers schedulers.

A1111 (v1.9+) shows the sampler and the schedule type separately; older infotexts and
API clients still send combined names such as "DPM++ 2M Karras", which are split here.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    scheduler_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    default_schedule: str = "uniform"
    # k-diffusion samplers in A1111 start at full noise (t=999): diffusers' "linspace"
    # spacing matches; A1111's DDIM/PLMS use "leading" spacing with steps_offset 1.
    spacing: str = "linspace"
    uses_eta: bool = False
    default_eta: float = 0.0   # the eta used when neither the request nor a setting gives one


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m",), "karras"),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde",), "karras"),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m_sde",), "exponential"),
    SamplerSpec("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
                ("k_dpmpp_2m_sde_heun",), "exponential"),
    SamplerSpec("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, ("k_dpmpp_3m_sde",), "exponential"),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral")),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, ("k_euler",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, ("k_lms",)),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, ("k_heun",)),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2",), "karras"),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a",), "karras"),
    SamplerSpec("DEIS", "DEISMultistepScheduler", {}, ("deis",)),
    SamplerSpec("DDIM", "DDIMScheduler", {"set_alpha_to_one": False}, ("ddim",), "uniform", "leading", True),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms",), "uniform", "leading"),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, ("unipc",), "uniform", "linspace"),
    SamplerSpec("LCM", "LCMScheduler", {}, ("k_lcm",), "uniform", "trailing"),
    # Forge's / ComfyUI's TCD for TCD LoRAs: its eta is the paper's gamma, 0.3 by its authors' default
    SamplerSpec("TCD", "TCDScheduler", {}, ("tcd",), "uniform", "trailing", True, 0.3),
)


@dataclass(frozen=True)
class ScheduleSpec:
    name: str        # A1111 internal name (API "scheduler" field)
    label: str       # shown in the UI and written to the infotext
    kwargs: dict[str, Any]
    default_rho: float = -1


SCHEDULES: tuple[ScheduleSpec, ...] = (
    ScheduleSpec("automatic", "Automatic", {}),
    ScheduleSpec("uniform", "Uniform", {}),
    ScheduleSpec("karras", "Karras", {"use_karras_sigmas": True}, 7.0),
    ScheduleSpec("exponential", "Exponential", {"use_exponential_sigmas": True}),
    ScheduleSpec("beta", "Beta", {"use_beta_sigmas": True}),
    ScheduleSpec("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}),
    # A1111 1.10's "Simple" (ComfyUI's): every (1000/steps)-th of the model's sigmas from the top, which is
    # diffusers' trailing spacing; for flow models it is their pipelines' own schedule (Forge's FLUX default)
    ScheduleSpec("simple", "Simple", {"timestep_spacing": "trailing"}),
)

SAMPLER_NAMES = tuple(s.name for s in SAMPLERS)
SCHEDULE_LABELS = tuple(s.label for s in SCHEDULES)


class UnknownSamplerError(ValueError):
    pass


def _norm(text: str) -> str:
    return text.strip().lower()


def find_sampler(name: str) -> SamplerSpec:
    key = _norm(name)
    for spec in SAMPLERS:
        if key == _norm(spec.name) or key in spec.aliases:
            return spec
    raise UnknownSamplerError(
        f"Unknown sampler {name!r}. Valid samplers: {', '.join(SAMPLER_NAMES)}"
    )


def find_schedule(name: str | None) -> ScheduleSpec:
    if not name:
        return SCHEDULES[0]
    key = _norm(name)
    for spec in SCHEDULES:
        if key in (spec.name, _norm(spec.label)):
            return spec
    raise UnknownSamplerError(
        f"Unknown schedule type {name!r}. Valid schedule types: {', '.join(SCHEDULE_LABELS)}"
    )


def split_sampler_name(name: str, schedule: str | None) -> tuple[SamplerSpec, ScheduleSpec]:
    """Resolve "DPM++ 2M Karras"-style legacy names to (sampler, schedule); an explicit
    non-automatic ``schedule`` wins over the suffix."""
    try:
        sampler = find_sampler(name)
        suffix = None
    except UnknownSamplerError:
        sampler, suffix = None, None
        for spec in SCHEDULES[1:]:
            for word in (spec.label, spec.name):
                if _norm(name).endswith(" " + _norm(word)):
                    base = name.strip()[: -len(word)].strip()
                    try:
                        sampler, suffix = find_sampler(base), spec
                    except UnknownSamplerError:
                        continue
                    break
            if sampler:
                break
        if sampler is None:
            raise
    chosen = find_schedule(schedule)
    if chosen.name == "automatic" and suffix is not None:
        chosen = suffix
    return sampler, chosen


def effective_schedule(sampler: SamplerSpec, schedule: ScheduleSpec) -> ScheduleSpec:
    if schedule.name != "automatic":
        return schedule
    return find_schedule(sampler.default_schedule)


def _accepted_kwargs(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def make_scheduler(sampler: SamplerSpec, schedule: ScheduleSpec, base_config: dict[str, Any]):
    """Build a fresh diffusers scheduler. Raises ValueError if the sampler cannot use the
    schedule (e.g. Karras sigmas on DDIM), naming the schedule types it does accept."""
    # imported here so the UI and API can list samplers without paying diffusers' import time
    cls = getattr(importlib.import_module("diffusers"), sampler.scheduler_class)
    accepted = _accepted_kwargs(cls)
    sched = effective_schedule(sampler, schedule)
    unsupported = [k for k in sched.kwargs if k not in accepted]
    if unsupported:
        ok = [s.label for s in SCHEDULES if all(k in accepted for k in s.kwargs)]
        raise UnknownSamplerError(
            f"Sampler {sampler.name!r} does not support schedule type {sched.label!r}; "
            f"use one of: {', '.join(ok)}"
        )
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in accepted:
        raise UnknownSamplerError(f"Sampler {sampler.name!r} cannot sample a zero-terminal-SNR model; "
                                  f"use one of: {', '.join(zero_snr_samplers())}")
    config = {k: v for k, v in base_config.items() if k in accepted}
    config["timestep_spacing"] = sampler.spacing
    config.update(sampler.kwargs)
    config.update(sched.kwargs)
    # steps_offset only matters for "leading" spacing; SD's value is 1 (diffusers warns otherwise)
    if "steps_offset" in accepted:
        config["steps_offset"] = 1
    return cls(**{k: v for k, v in config.items() if k in accepted})


def zero_snr_samplers() -> list[str]:
    """The samplers whose diffusers scheduler can rescale its noise schedule to zero terminal SNR."""
    found = []
    for sampler in SAMPLERS:
        cls = getattr(importlib.import_module("diffusers"), sampler.scheduler_class)
        if "rescale_betas_zero_snr" in _accepted_kwargs(cls):
            found.append(sampler.name)
    return found


def samplers_api() -> list[dict[str, Any]]:
    return [
        {"name": s.name, "aliases": list(s.aliases), "options": {"scheduler": s.default_schedule}}
        for s in SAMPLERS
    ]


def schedules_api() -> list[dict[str, Any]]:
    return [
        {"name": s.name, "label": s.label, "aliases": None, "default_rho": s.default_rho,
         "need_inner_model": False}
        for s in SCHEDULES
    ]
