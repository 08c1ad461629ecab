"""The runner's A1111 options: ENSD (eta noise seed delta), NGMS (negative guidance minimum sigma) and
the emphasis mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import infotext_to_settings, parse_infotext
from studio.generation.request import Txt2ImgRequest
from studio.generation.runner import run_generation
from studio.generation.samplers import effective_schedule, make_scheduler, split_sampler_name
from studio.generation.sampling import call_sigmas, draws_step_noise, skips_uncond
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensd")
    make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors")))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def request(**changes) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64,
            "seed": 21, "sampler_name": "Euler a", "save_images": False}
    return Txt2ImgRequest(**{**base, **changes})


def generate(studio, req, checkpoint="tiny-sd1.safetensors", **kw):
    model = studio.select_checkpoint(checkpoint)
    req = studio.engine.prepare(req).request     # as the engine hands it to the runner
    rows = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        result = studio.queue.run(lambda state: run_generation(model, req, state, **kw))
    finally:
        handle.remove()
    return result, rows


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


# --- ENSD ------------------------------------------------------------------------------------

def test_ensd_moves_the_step_noise_of_ancestral_samplers_only(studio):
    plain, _ = generate(studio, request())
    zero, _ = generate(studio, request(), eta_noise_seed_delta=0)
    shifted, _ = generate(studio, request(), eta_noise_seed_delta=31337)
    assert np.array_equal(pixels(plain), pixels(zero))
    assert np.abs(pixels(plain) - pixels(shifted)).max() > 0
    assert parse_infotext(shifted.infotexts[0])["ENSD"] == "31337"
    assert "ENSD" not in plain.infotexts[0]

    euler, _ = generate(studio, request(sampler_name="Euler"))
    euler_shifted, _ = generate(studio, request(sampler_name="Euler"), eta_noise_seed_delta=31337)
    assert np.array_equal(pixels(euler), pixels(euler_shifted))
    assert "ENSD" not in euler_shifted.infotexts[0]     # written only where it changes the image


def test_ensd_keeps_the_initial_noise_on_the_seed(studio):
    # one Euler a step adds no noise (its last step ends at sigma 0): only the initial noise counts
    one, _ = generate(studio, request(steps=1))
    one_shifted, _ = generate(studio, request(steps=1), eta_noise_seed_delta=31337)
    assert np.array_equal(pixels(one), pixels(one_shifted))


@pytest.mark.parametrize("name,eta,expected", [
    ("Euler a", None, True), ("DPM2 a", None, True), ("DPM++ 2M SDE", None, True), ("LCM", None, True),
    ("Euler", None, False), ("DPM++ 2M", None, False), ("DPM++ SDE", None, False),
    ("DDIM", None, False), ("DDIM", 0.5, True),
])
def test_which_samplers_draw_step_noise(name, eta, expected):
    sampler, _ = split_sampler_name(name, "Automatic")
    assert draws_step_noise(sampler, eta) is expected


# --- emphasis --------------------------------------------------------------------------------

def test_emphasis_reaches_the_prompt_and_the_infotext(studio):
    weighted = request(sampler_name="Euler", prompt="a (red:1.6) cube")
    original, _ = generate(studio, weighted)
    no_norm, _ = generate(studio, weighted, emphasis="No norm")
    assert np.abs(pixels(original) - pixels(no_norm)).max() > 0
    assert parse_infotext(no_norm.infotexts[0])["Emphasis"] == "No norm"
    assert "Emphasis" not in original.infotexts[0]
    unweighted, _ = generate(studio, request(sampler_name="Euler"), emphasis="No norm")
    assert "Emphasis" not in unweighted.infotexts[0]     # A1111 writes it only where a weight could apply


# --- NGMS ------------------------------------------------------------------------------------

def euler_sigmas(studio, steps: int) -> list[float]:
    model = studio.select_checkpoint("tiny-sd1.safetensors")
    sampler, schedule = split_sampler_name("Euler", "Automatic")
    scheduler = make_scheduler(sampler, effective_schedule(sampler, schedule), model.scheduler_config)
    scheduler.set_timesteps(steps)
    return call_sigmas(scheduler, scheduler.timesteps, 0)


def test_ngms_zero_is_today(studio):
    plain, rows = generate(studio, request(sampler_name="Euler"))
    zero, zero_rows = generate(studio, request(sampler_name="Euler"), s_min_uncond=0.0)
    assert np.array_equal(pixels(plain), pixels(zero)) and rows == zero_rows == [2, 2, 2, 2]
    assert "NGMS" not in zero.infotexts[0]


def test_ngms_skips_the_negative_prompt_on_odd_calls_below_the_sigma(studio):
    plain, _ = generate(studio, request(sampler_name="Euler"))
    everywhere, rows = generate(studio, request(sampler_name="Euler"), s_min_uncond=100.0)
    assert rows == [2, 1, 2, 1]                       # A1111 skips every other call only
    assert np.abs(pixels(plain) - pixels(everywhere)).max() > 0
    assert parse_infotext(everywhere.infotexts[0])["NGMS"] == "100"
    # a threshold between the sigmas of calls 1 and 3 skips call 3 only
    sigmas = euler_sigmas(studio, 4)
    assert sigmas[3] < sigmas[1]
    _, rows = generate(studio, request(sampler_name="Euler"), s_min_uncond=(sigmas[1] + sigmas[3]) / 2)
    assert rows == [2, 2, 2, 1]


def test_ngms_with_and_prompts_and_sdxl(studio):
    _, rows = generate(studio, request(sampler_name="Euler", prompt="a cube AND a tree:0.5"), s_min_uncond=100.0)
    assert rows == [3, 2, 3, 2]
    result, rows = generate(studio, request(sampler_name="Euler"), checkpoint="tiny-sdxl.safetensors",
                            s_min_uncond=100.0)
    assert rows == [2, 1, 2, 1] and np.asarray(result.images[0]).std() > 0


def test_skipping_rule():
    assert not skips_uncond(0, 0.1, 1.0)          # even call
    assert skips_uncond(1, 0.1, 1.0)
    assert not skips_uncond(1, 2.0, 1.0)          # sigma above the minimum
    assert not skips_uncond(1, 0.1, 0.0)          # off


def test_call_sigmas_follow_each_call(studio):
    model = studio.select_checkpoint("tiny-sd1.safetensors")
    for name in ("Heun", "DPM2", "DDIM", "PLMS"):
        sampler, schedule = split_sampler_name(name, "Automatic")
        scheduler = make_scheduler(sampler, effective_schedule(sampler, schedule), model.scheduler_config)
        scheduler.set_timesteps(5)
        sigmas = call_sigmas(scheduler, scheduler.timesteps, 0)
        assert len(sigmas) == len(scheduler.timesteps)
        assert sigmas[0] > 1 and all(s > 0 for s in sigmas), name
        assert sigmas[-1] < sigmas[0]
    # where the scheduler keeps one sigma per call, those are the ones
    sampler, schedule = split_sampler_name("Heun", "Automatic")
    scheduler = make_scheduler(sampler, effective_schedule(sampler, schedule), model.scheduler_config)
    scheduler.set_timesteps(5)
    torch.testing.assert_close(torch.tensor(call_sigmas(scheduler, scheduler.timesteps[2:], 2)),
                               scheduler.sigmas[2:-1].float())


def test_pasted_infotext_gives_the_settings_back():
    parsed = parse_infotext("a cube\nSteps: 4, Sampler: Euler a, Seed: 1, ENSD: 31337, NGMS: 0.5, Version: x")
    assert infotext_to_settings(parsed) == {"eta_noise_seed_delta": 31337, "s_min_uncond": 0.5}
    assert infotext_to_settings(parse_infotext("a cube\nSteps: 4, Seed: 1, ENSD: lots")) == {}


def test_dpmpp_sde_is_reproducible_and_batch_independent(studio):
    # its Brownian noise is seeded per image, as in A1111, not drawn at random each run
    req = request(sampler_name="DPM++ SDE", steps=3)
    first, _ = generate(studio, req)
    again, _ = generate(studio, req)
    assert np.array_equal(pixels(first), pixels(again))
    batch, _ = generate(studio, request(sampler_name="DPM++ SDE", steps=3, seed=20, batch_size=2))
    assert np.array_equal(np.asarray(batch.images[1], dtype=np.int16), pixels(first))   # seed 21 alone
