"""Sampler table, schedule types and request validation (pure, no models)."""

import diffusers
import pytest

from studio.generation.request import RequestError, Txt2ImgRequest, build_request, validate_txt2img
from studio.generation.samplers import (
    SAMPLER_NAMES,
    find_schedule,
    make_scheduler,
    samplers_api,
    split_sampler_name,
)

BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}

REQUIRED = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
            "DDIM", "PLMS", "UniPC", "LCM"]


def test_required_samplers_present():
    assert set(REQUIRED) <= set(SAMPLER_NAMES)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_builds_and_steps(name):
    sampler, schedule = split_sampler_name(name, "Automatic")
    sched = make_scheduler(sampler, schedule, BASE)
    sched.set_timesteps(4)
    assert len(sched.timesteps) >= 4


def test_legacy_combined_names():
    sampler, schedule = split_sampler_name("DPM++ 2M Karras", None)
    assert (sampler.name, schedule.label) == ("DPM++ 2M", "Karras")
    sampler, schedule = split_sampler_name("k_euler_a", "karras")
    assert (sampler.name, schedule.label) == ("Euler a", "Karras")


def test_karras_and_exponential_sigmas_applied():
    s, _ = split_sampler_name("Euler", None)
    k = make_scheduler(s, find_schedule("Karras"), BASE)
    assert isinstance(k, diffusers.EulerDiscreteScheduler) and k.config.use_karras_sigmas
    e = make_scheduler(s, find_schedule("exponential"), BASE)
    assert e.config.use_exponential_sigmas


def test_unsupported_schedule_names_the_valid_ones():
    s, _ = split_sampler_name("DDIM", None)
    with pytest.raises(ValueError, match="does not support schedule type 'Karras'.*Automatic"):
        make_scheduler(s, find_schedule("Karras"), BASE)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(RequestError, match="Valid samplers: .*Euler a"):
        validate_txt2img(Txt2ImgRequest(sampler_name="Nope"))


def test_samplers_api_shape():
    first = samplers_api()[0]
    assert set(first) == {"name", "aliases", "options"}


def test_validate_rounds_size_and_says_so():
    req = validate_txt2img(Txt2ImgRequest(width=100, height=64))
    assert (req.width, req.height) == (96, 64)
    assert "rounded down to 96x64" in req.notes[0]


@pytest.mark.parametrize("changes,match", [
    ({"width": 32}, "width: Input should be greater than or equal to 64"),
    ({"height": 4096}, "height: Input should be less than or equal to 2048"),
    ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"steps": -5}, "steps"),
    ({"cfg_scale": 31}, "cfg_scale"),
    ({"batch_size": 9}, "batch_size"),
    ({"clip_skip": 0}, "clip_skip"),
    ({"steps": 2.5}, "steps: Input should be a valid integer"),
])
def test_schema_rejects_out_of_range(changes, match):
    # ranges live on the schema: every door (API 422, UI, CLI) reports pydantic's words for the field
    with pytest.raises(RequestError, match=match):
        build_request(Txt2ImgRequest, changes)
