"""One schema behind every door: a field added to the request model (here in a test-only subclass)
shows in the CLI's --help, in the API's /openapi.json and in the UI, with nothing else changed;
the same mistake gets the same words from every door; the settings object refuses what it does
not know; and the defects that had the doors disagree stay fixed."""

from __future__ import annotations

import argparse

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import Field

from studio.cli import build_parser
from studio.cli_schema import request_values
from studio.config import Flags, Settings
from studio.core import Studio
from studio.errors import RequestError
from studio.generation.request import (
    Img2ImgRequest,
    RequestSchemas,
    Txt2ImgRequest,
    build_request,
    fill_from_infotext,
)
from studio.options import StudioOptions, validate_changes


class GlowRequest(Txt2ImgRequest):
    glow_strength: float = Field(0.25, ge=0, le=2, description="how much the picture glows (test-only field)")


class GlowImg2ImgRequest(Img2ImgRequest):
    glow_strength: float = Field(0.25, ge=0, le=2, description="how much the picture glows (test-only field)")


SCHEMAS = RequestSchemas(txt2img=GlowRequest, img2img=GlowImg2ImgRequest)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    s = Studio.create(Flags(data_dir=str(tmp_path_factory.mktemp("doors"))), schemas=SCHEMAS)
    yield s
    s.queue.shutdown()


def test_a_new_field_is_a_cli_flag(capsys):
    parser = build_parser(SCHEMAS)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    assert "--glow-strength" in capsys.readouterr().out
    ns = parser.parse_args(["generate", "-p", "x", "--glow-strength", "1.5"])
    req = build_request(GlowRequest, request_values(ns, GlowRequest))
    assert req.glow_strength == 1.5 and req.prompt == "x" and req.steps == 20  # the interactive default


def test_a_new_field_is_in_the_api_schema_and_body(studio):
    from studio.api.routes import build_router

    app = FastAPI()
    app.include_router(build_router(studio))
    spec = TestClient(app).get("/openapi.json").json()
    bodies = [op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
              for path, ops in spec["paths"].items() if path.endswith(("/txt2img", "/img2img"))
              for op in ops.values()]
    for name in bodies:
        props = spec["components"]["schemas"][name]["properties"]
        assert props["glow_strength"]["maximum"] == 2
        assert "checkpoint" not in props and "controlnet_units" not in props   # engine-only fields stay hidden
    # out of range: the API's 422 holds the words the other doors print
    reply = TestClient(app).post("/sdapi/v1/txt2img", json={"glow_strength": 5})
    assert reply.status_code == 422
    api_msg = reply.json()["detail"][0]["msg"]
    with pytest.raises(RequestError) as e:
        build_request(GlowRequest, {"glow_strength": 5})
    assert api_msg in str(e.value) and "glow_strength" in str(e.value)


def test_a_new_field_gets_a_ui_control(studio):
    from studio.ui.app import build_ui

    blocks = build_ui(studio)
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    for tab in ("txt2img", "img2img", "inpaint"):
        assert f"{tab}_glow_strength" in ids
    # the hand-made controls bind their fields: no duplicate auto-made control for them
    assert "txt2img_steps" in ids and "txt2img_cfg_scale" not in ids - {"txt2img_cfg_scale"}
    assert not any(i and i.endswith("_more_parameters") and i.startswith("controlnet") for i in ids)


def test_nan_in_an_integer_field_is_a_json_422(studio):
    from studio.api.routes import build_router

    app = FastAPI()
    app.include_router(build_router(studio))
    reply = TestClient(app).post("/sdapi/v1/txt2img", content=b'{"steps": NaN, "cfg_scale": Infinity}',
                                 headers={"content-type": "application/json"})
    assert reply.status_code == 422
    fields = {tuple(item["loc"])[-1] for item in reply.json()["detail"]}
    assert {"steps", "cfg_scale"} <= fields


def test_explicit_clip_skip_one_is_kept_when_the_setting_is_two(studio):
    studio.settings.update({"CLIP_stop_at_last_layers": 2}, persist=False)
    try:
        explicit = studio.engine.prepare(Txt2ImgRequest(prompt="x", clip_skip=1)).request
        unset = studio.engine.prepare(Txt2ImgRequest(prompt="x")).request
        override = studio.engine.prepare(Txt2ImgRequest(
            prompt="x", override_settings={"CLIP_stop_at_last_layers": 1})).request
    finally:
        studio.settings.update({"CLIP_stop_at_last_layers": 1}, persist=False)
    assert explicit.clip_skip == 1
    assert unset.clip_skip == 2
    assert override.clip_skip == 1


def test_cli_clip_skip_one_is_explicit():
    ns = build_parser().parse_args(["generate", "-p", "x", "--clip-skip", "1"])
    assert request_values(ns, Txt2ImgRequest)["clip_skip"] == 1
    ns = build_parser().parse_args(["generate", "-p", "x"])
    assert "clip_skip" not in request_values(ns, Txt2ImgRequest)   # None: the setting decides


def test_seed_is_resolved_before_queueing(studio):
    req = studio.engine.prepare(Txt2ImgRequest(prompt="x", seed=-1)).request
    assert 0 <= req.seed < 2**32


def test_override_settings_are_validated_before_queueing(studio):
    with pytest.raises(RequestError, match="unknown option"):
        studio.engine.prepare(Txt2ImgRequest(prompt="x", override_settings={"no_such_option": 1}))
    with pytest.raises(RequestError, match="CLIP_stop_at_last_layers"):
        studio.engine.prepare(Txt2ImgRequest(prompt="x", override_settings={"CLIP_stop_at_last_layers": 40}))


def test_infotext_fills_only_unset_fields():
    req = fill_from_infotext(Txt2ImgRequest(prompt="mine", infotext="theirs\nSteps: 7, Sampler: Euler, CFG scale: 3, "
                                                                     "Seed: 5, Size: 64x96"))
    assert (req.prompt, req.steps, req.cfg_scale, req.seed, req.width, req.height) == ("mine", 7, 3, 5, 64, 96)


def test_unknown_option_is_refused_by_name_and_nothing_changes(tmp_path):
    settings = Settings.load(tmp_path / "config.json")
    with pytest.raises(RequestError, match="grow_forever"):
        settings.update({"grow_forever": "x" * 100, "jpeg_quality": 90})
    assert settings.options.jpeg_quality == 80
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(RequestError, match="jpeg_quality"):
        settings.update({"jpeg_quality": 500})


def test_options_normalise_and_survive_a_round_trip(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"samples_format": "PNG", "some_a1111_key": [1, 2], "jpeg_quality": "not a number"}')
    settings = Settings.load(path)
    assert settings.options.samples_format == "png" and settings.options.jpeg_quality == 80
    settings.update({"send_seed": False})
    again = Settings.load(path)
    assert again.options.send_seed is False
    assert again.foreign == {"some_a1111_key": [1, 2]}   # A1111's keys stay in the file


def test_every_listed_a1111_option_is_served():
    listed = {"send_seed", "send_size", "samples_save", "samples_format", "outdir_samples",
              "outdir_txt2img_samples", "outdir_img2img_samples", "outdir_grids", "samples_filename_pattern",
              "grid_save", "eta_noise_seed_delta", "s_min_uncond", "img2img_color_correction",
              "upscaler_for_img2img", "emphasis", "quicksettings_list"}
    assert listed <= set(StudioOptions.model_fields)
    assert validate_changes({"quicksettings_list": ["sd_vae", "CLIP_stop_at_last_layers"]})
    with pytest.raises(RequestError):
        validate_changes({"quicksettings_list": ["not_an_option"]})
    with pytest.raises(RequestError):
        validate_changes({"emphasis": "Loud"})


def test_send_seed_and_send_size_decide_what_png_info_sends():
    from studio.ui.txt2img import fields_to_send

    fields = {"prompt": "p", "seed": 5, "width": 64, "height": 96, "steps": 7}
    both = StudioOptions()
    assert fields_to_send(fields, both) == fields
    neither = StudioOptions(send_seed=False, send_size=False)
    assert fields_to_send(fields, neither) == {"prompt": "p", "steps": 7}


def test_queued_jobs_can_be_listed_and_cancelled(studio):
    from studio.api.routes import build_queue_router

    app = FastAPI()
    app.include_router(build_queue_router(studio))
    client = TestClient(app)
    gate = __import__("threading").Event()
    blocker = studio.queue.submit(lambda state: gate.wait(10), "blocker")
    waiting = studio.engine.submit(Txt2ImgRequest(prompt="queued cat", steps=2, width=64, height=64))
    try:
        listed = client.get("/studio/v1/queue").json()["waiting"]
        mine = [j for j in listed if j["id"] == waiting.state.job_id]
        assert mine and mine[0]["request"]["prompt"] == "queued cat"
        assert client.delete(f"/studio/v1/queue/{waiting.state.job_id}").status_code == 200
        assert client.delete("/studio/v1/queue/task(999999)").status_code == 404
    finally:
        gate.set()
    blocker.wait(10)
    with pytest.raises(LookupError, match="cancelled"):
        waiting.wait(10)


def test_cli_args_are_an_argparse_namespace_of_fields():
    ns = build_parser().parse_args(["generate", "-p", "x", "--sampler", "Euler a", "--batch-count", "2",
                                    "--hires", "--only-masked", "--invert-mask"])
    assert isinstance(ns, argparse.Namespace)
    values = request_values(ns, Img2ImgRequest)
    assert values["sampler_name"] == "Euler a" and values["n_iter"] == 2 and values["enable_hr"] is True
    assert values["inpaint_full_res"] is True and values["inpainting_mask_invert"] == 1


def test_the_token_counter_refuses_what_a_request_would_refuse(studio):
    # the counter runs on every keystroke: an over-limit prompt is refused before the (slow) parse
    assert studio.token_count("a cat", 20) == (2, 75)
    with pytest.raises(RequestError, match="limit is 200"):
        studio.token_count("[" * 1000, 20)


def test_a_prepared_request_travels_to_another_process_intact(studio):
    """A queued job's request is plain data (pydantic + PIL + unit dataclasses), so a worker in another
    process (the workers issue) gets exactly what the front door checked."""
    import pickle

    from PIL import Image

    from studio.controlnet.units import ControlNetUnitRequest

    unit = ControlNetUnitRequest(enabled=False, module="canny", image=Image.new("RGB", (8, 8), "red"))
    req = studio.engine.prepare(Img2ImgRequest(prompt="x", init_images=[Image.new("RGB", (64, 64))],
                                               controlnet_units=(unit,))).request
    back = pickle.loads(pickle.dumps(req))
    assert back == req and back.seed == req.seed and back.controlnet_units[0].module == "canny"
    assert back.init_images[0].size == (64, 64)


def test_scripts_the_studio_does_not_have_are_a1111s_422(studio):
    from studio.api.routes import build_router

    app = FastAPI()
    app.include_router(build_router(studio))
    client = TestClient(app)
    r = client.post("/sdapi/v1/txt2img", json={"script_name": "no such script", "steps": 1})
    assert r.status_code == 422 and r.json()["detail"] == "Script 'no such script' not found"
    # a script of the other tab is not found either (A1111 looks in the request's tab only)
    r = client.post("/sdapi/v1/txt2img", json={"script_name": "sd upscale", "steps": 1})
    assert r.status_code == 422 and r.json()["detail"] == "Script 'sd upscale' not found"
    r = client.post("/sdapi/v1/txt2img", json={"alwayson_scripts": {"Dynamic Prompts": {"args": []}}, "steps": 1})
    assert r.status_code == 422 and r.json()["detail"] == "always on script Dynamic Prompts not found"
    # A1111's UI words for "the same as the first pass" are not a request for something else
    same = studio.engine.prepare(Txt2ImgRequest(enable_hr=True, hr_checkpoint_name="Use same checkpoint",
                                                hr_sampler_name="Use same sampler")).request
    assert same.hr_sampler_name is None
    with pytest.raises(RequestError, match="hr_checkpoint_name"):
        studio.engine.prepare(Txt2ImgRequest(enable_hr=True, hr_checkpoint_name="other.safetensors"))
