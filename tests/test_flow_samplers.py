"""A1111 sampler and schedule names on diffusers' flow-matching schedulers (SD3, FLUX): the default
schedules are diffusers' own pipelines' timesteps, every schedule type runs on every offered sampler,
and the samplers integrate the flow correctly (checked against models whose exact answer is known)."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps as flux_retrieve_timesteps
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    retrieve_timesteps as sd3_retrieve_timesteps,
)

from studio.generation.flow_samplers import (
    FLOW_SAMPLER_NAMES,
    FlowShift,
    flow_add_noise,
    flow_img2img_start,
    flow_sampler_supported,
    make_flow_scheduler,
)
from studio.generation.samplers import SAMPLER_NAMES, UnknownSamplerError

# the scheduler configs the model repos ship (scheduler/scheduler_config.json)
FLUX_DEV_CONFIG = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                   "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_CONFIG = {"shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                       "base_image_seq_len": 256, "max_image_seq_len": 4096}
SD3_CONFIG = {"shift": 3.0}

FLUX_DEV = FlowShift(dynamic=True)
FLUX_SCHNELL = FlowShift(shift=1.0, flux_sigmas=True)
SD3 = FlowShift(shift=3.0)
FAMILIES = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL, "sd3": SD3}

SCHEDULE_TYPES = ("automatic", "karras", "exponential", "beta", "sgm_uniform")
DETERMINISTIC = ("Euler", "Heun", "DPM++ 2M", "UniPC")


def flux_pipeline_timesteps(config, steps, image_seq_len):
    """FluxPipeline.__call__'s step 5, with its own helpers."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096),
                         scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
    timesteps, _ = flux_retrieve_timesteps(scheduler, steps, None, sigmas=sigmas, mu=mu)
    return scheduler, timesteps


def sd3_pipeline_timesteps(steps):
    """StableDiffusion3Pipeline.__call__'s step 5 for SD3/SD3.5 (no dynamic shifting)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SD3_CONFIG)
    timesteps, _ = sd3_retrieve_timesteps(scheduler, steps, None)
    return scheduler, timesteps


def step_kwargs(scheduler, generator):
    return {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}


def run_from(scheduler, timesteps, start, x, velocity, generator):
    """The denoising loop from timestep index ``start``, with ``velocity(x, sigma)`` as the model; the
    model reads its sigma from the timestep it is given, as the FLUX and SD3 transformers do."""
    scheduler.set_begin_index(start)
    for t in timesteps[start:]:
        x = scheduler.step(velocity(x, t.float() / 1000), t, x, return_dict=False,
                           **step_kwargs(scheduler, generator))[0]
    return x


def point_mass(x0):
    """The exact velocity when all data is ``x0``: any correct sampler lands on ``x0`` exactly."""
    return lambda x, sigma: (x - x0) / sigma


def gaussian(mean, std):
    """The exact velocity for data ~ N(mean, std²) elementwise. Its flow ODE maps noise e at sigma 1
    to mean + std * e at sigma 0, so deterministic samplers must converge there."""
    def velocity(x, sigma):
        alpha = 1 - sigma
        x0 = mean + alpha * std ** 2 / (alpha ** 2 * std ** 2 + sigma ** 2) * (x - alpha * mean)
        return (x - x0) / sigma
    return velocity


def schedule_sigmas(scheduler):
    """One sigma per step plus the final one (Heun keeps each later step's sigma twice)."""
    sigmas = scheduler.sigmas.cpu()
    if scheduler.order == 2:
        sigmas = torch.cat([sigmas[:1], sigmas[1::2]])
    return sigmas


def test_offered_names_are_a1111_names_in_a1111_order():
    assert set(FLOW_SAMPLER_NAMES) >= {"Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "LCM"}
    assert FLOW_SAMPLER_NAMES == tuple(n for n in SAMPLER_NAMES if n in FLOW_SAMPLER_NAMES)


@pytest.mark.parametrize("steps", [1, 4, 20, 28])
@pytest.mark.parametrize("image_seq_len", [4096, 1024])  # FLUX dev at 1024² and 512²
def test_euler_is_the_flux_dev_pipelines_schedule(steps, image_seq_len):
    reference, timesteps = flux_pipeline_timesteps(FLUX_DEV_CONFIG, steps, image_seq_len)
    scheduler, ours = make_flow_scheduler("Euler", "Automatic", FLUX_DEV, steps, image_seq_len)
    assert torch.equal(ours, timesteps)
    assert torch.equal(scheduler.sigmas, reference.sigmas)


def test_flux_dev_shift_depends_on_resolution():
    big = make_flow_scheduler("Euler", "automatic", FLUX_DEV, 20, 4096)[0].sigmas
    small = make_flow_scheduler("Euler", "automatic", FLUX_DEV, 20, 1024)[0].sigmas
    assert (big[1:-1] > small[1:-1]).all()  # more tokens: more time at high noise


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_euler_is_the_flux_schnell_pipelines_schedule(steps):
    reference, timesteps = flux_pipeline_timesteps(FLUX_SCHNELL_CONFIG, steps, 4096)
    scheduler, ours = make_flow_scheduler("Euler", "Automatic", FLUX_SCHNELL, steps, 4096)
    assert torch.equal(ours, timesteps)
    assert torch.equal(scheduler.sigmas, reference.sigmas)
    # schnell's resolution does not matter
    assert torch.equal(make_flow_scheduler("Euler", "Automatic", FLUX_SCHNELL, steps, 256)[1], timesteps)


@pytest.mark.parametrize("steps", [1, 4, 28, 40])
def test_euler_is_the_sd3_pipelines_schedule(steps):
    reference, timesteps = sd3_pipeline_timesteps(steps)
    scheduler, ours = make_flow_scheduler("Euler", "Automatic", SD3, steps, 4096)
    assert torch.equal(ours, timesteps)
    assert torch.equal(scheduler.sigmas, reference.sigmas)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_schedule_names_agree(family):
    """Automatic, Uniform and Forge's Simple are all the family's default, also as combined names."""
    expected = make_flow_scheduler("Euler", "automatic", FAMILIES[family], 9, 4096)[1]
    for name, schedule in [("Euler", "Uniform"), ("Euler", "uniform"), ("Euler", "Simple"),
                           ("Euler", "simple"), ("Euler Simple", "Automatic"), ("k_euler", "Automatic")]:
        assert torch.equal(make_flow_scheduler(name, schedule, FAMILIES[family], 9, 4096)[1], expected)


def test_automatic_is_the_flow_default_not_the_sd_samplers_default():
    """On SD, DPM++ 2M's automatic schedule is Karras; flow models default to their own sigmas."""
    auto = make_flow_scheduler("DPM++ 2M", "Automatic", FLUX_DEV, 10, 4096)[1]
    assert torch.equal(auto, make_flow_scheduler("Euler", "Automatic", FLUX_DEV, 10, 4096)[1])
    assert not torch.equal(auto, make_flow_scheduler("DPM++ 2M", "Karras", FLUX_DEV, 10, 4096)[1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schedule", ["karras", "exponential", "beta", "sgm_uniform"])
def test_schedule_types_differ_from_uniform_and_decrease(family, schedule):
    steps = 12
    uniform = make_flow_scheduler("Euler", "uniform", FAMILIES[family], steps, 4096)[0].sigmas
    scheduler, timesteps = make_flow_scheduler("Euler", schedule, FAMILIES[family], steps, 4096)
    sigmas = scheduler.sigmas
    assert len(sigmas) == steps + 1 and len(timesteps) == steps
    assert not torch.allclose(sigmas, uniform, atol=1e-4)
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0
    assert torch.allclose(timesteps, sigmas[:-1] * 1000)


def test_legacy_combined_names_pick_the_schedule():
    karras = make_flow_scheduler("Euler a", "Karras", FLUX_DEV, 10, 4096)[1]
    assert torch.equal(make_flow_scheduler("Euler a Karras", "Automatic", FLUX_DEV, 10, 4096)[1], karras)
    # an explicit schedule type wins over the suffix
    beta = make_flow_scheduler("Euler a", "Beta", FLUX_DEV, 10, 4096)[1]
    assert torch.equal(make_flow_scheduler("Euler a Karras", "Beta", FLUX_DEV, 10, 4096)[1], beta)


@pytest.mark.parametrize("name", FLOW_SAMPLER_NAMES)
@pytest.mark.parametrize("schedule", SCHEDULE_TYPES)
def test_every_sampler_runs_the_schedules_sigmas(name, schedule):
    """The schedule type decides the sigmas, the sampler only integrates them (as in A1111/Forge)."""
    euler = make_flow_scheduler("Euler", schedule, FLUX_DEV, 6, 4096)[0]
    scheduler, timesteps = make_flow_scheduler(name, schedule, FLUX_DEV, 6, 4096)
    assert torch.allclose(schedule_sigmas(scheduler), euler.sigmas, atol=2e-6)
    assert torch.equal(timesteps.unique_consecutive(), euler.timesteps)
    assert len(timesteps) == 6 * scheduler.order - (scheduler.order - 1)


@pytest.mark.parametrize("name", FLOW_SAMPLER_NAMES)
@pytest.mark.parametrize("family", ["flux-dev", "sd3"])
@pytest.mark.parametrize("schedule", ["automatic", "karras"])
@pytest.mark.parametrize("steps", [1, 4])
def test_every_sampler_denoises_to_sigma_zero(name, family, schedule, steps):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 4, 4, generator=generator)
    noise = torch.randn(1, 16, 4, 4, generator=generator)
    scheduler, timesteps = make_flow_scheduler(name, schedule, FAMILIES[family], steps, 4096, device="cpu")
    assert timesteps.device.type == "cpu" and timesteps.dtype == torch.float32
    scheduler.set_begin_index(0)
    # the scheduler's own noising (FlowMatch: scale_noise; DPM-Solver/UniPC: add_noise) is ours
    if hasattr(scheduler, "scale_noise"):
        noised = scheduler.scale_noise(x0, timesteps[:1], noise)
    else:
        noised = scheduler.add_noise(x0, noise, timesteps[:1])
    assert torch.allclose(noised, flow_add_noise(scheduler, x0, noise, 0), atol=1e-5)
    out = run_from(scheduler, timesteps, 0, noised, point_mass(x0), generator)
    assert torch.isfinite(out).all()
    assert schedule_sigmas(scheduler)[-1] == 0
    assert torch.allclose(out, x0, atol=1e-4)


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_samplers_solve_the_flow_ode(name, family):
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 8, 8, generator=generator)
    exact = 0.5 + 0.3 * noise
    errors = []
    for steps in (8, 200):
        scheduler, timesteps = make_flow_scheduler(name, "automatic", FAMILIES[family], steps, 4096)
        out = run_from(scheduler, timesteps, 0, noise.clone(), gaussian(0.5, 0.3), generator)
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.03 and errors[1] < errors[0] / 5


@pytest.mark.parametrize("name", FLOW_SAMPLER_NAMES)
def test_img2img_runs_a1111s_number_of_steps_and_denoises(name):
    steps, strength = 20, 0.75
    scheduler, timesteps = make_flow_scheduler(name, "automatic", FLUX_DEV, steps, 1024)
    start = flow_img2img_start(scheduler, timesteps, steps, strength)
    runs = int(strength * steps) + 1  # A1111: 16 of 20
    order = scheduler.order
    assert len(timesteps) - start == runs * order - (order - 1)
    assert schedule_sigmas(scheduler)[steps - runs] == scheduler.sigmas[start]
    generator = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 1, 16, 4, 4, generator=generator)
    out = run_from(scheduler, timesteps, start, flow_add_noise(scheduler, x0, noise, start), point_mass(x0),
                   generator)
    assert torch.isfinite(out).all() and torch.allclose(out, x0, atol=1e-4)


def test_img2img_full_strength_starts_at_the_first_timestep():
    for name in ("Euler", "Heun"):
        scheduler, timesteps = make_flow_scheduler(name, "automatic", SD3, 10, 4096)
        assert flow_img2img_start(scheduler, timesteps, 10, 1.0) == 0
        assert flow_img2img_start(scheduler, timesteps, 10, 0.0) == 9 * scheduler.order  # one step left


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "LMS", "DPM2 a", "DPM++ SDE", "DEIS", "LMS Karras",
                                  "k_dpm_2", "Restart", "nonsense"])
def test_unsupported_samplers_are_refused_with_the_list(name):
    assert not flow_sampler_supported(name)
    with pytest.raises(UnknownSamplerError) as err:
        make_flow_scheduler(name, "automatic", FLUX_DEV, 4, 4096)
    message = str(err.value)
    assert repr(name) in message and "flow-matching" in message
    assert all(sampler in message for sampler in FLOW_SAMPLER_NAMES)


@pytest.mark.parametrize("name", ["Euler", "euler a", "k_euler_a", "DPM++ 2M Karras", "UniPC", "Euler Simple"])
def test_supported_names(name):
    assert flow_sampler_supported(name)


def test_unknown_schedule_type_names_the_schedule_types():
    with pytest.raises(UnknownSamplerError, match="schedule type 'Turbo'"):
        make_flow_scheduler("Euler", "Turbo", FLUX_DEV, 4, 4096)
