"""The Fast preset: few-step models and LoRAs recognised by name and metadata, their settings filled in
for what the request leaves unset, the LoRA added to the prompt; through the rules, the engine (a tiny
checkpoint and a random LoRA named as the LCM LoRA is), the UI's button and the API."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from studio.config import Flags
from studio.core import Studio
from studio.errors import RequestError
from studio.generation.fast import FastLora, choose, file_texts, kind_of, steps_named, with_lora
from studio.generation.infotext import parse_infotext
from studio.generation.request import Txt2ImgRequest
from studio.testing import make_checkpoint, tiny_components
from studio.testing.loras import write_kohya_lora

# -- the rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind, steps", [
    ("lcm-lora-sdv1-5", "lcm", 4),
    ("LCM_Dreamshaper_v7", "lcm", 4),
    ("sd_xl_turbo_1.0_fp16", "turbo", 1),
    ("sd_turbo", "turbo", 1),
    ("sdxl_lightning_2step_lora", "lightning", 2),
    ("sdxl_lightning_8step", "lightning", 8),
    ("Hyper-SD15-8steps-lora", "hyper", 8),
    ("Hyper-SDXL-1step-lora", "hyper", 1),
    ("TCD-SD15-LoRA", "tcd", 4),
    ("dmd2_sdxl_4step_lora_fp16", "dmd2", 4),
])
def test_few_step_files_are_recognised_by_name_with_their_steps(name, kind, steps):
    found = kind_of([name])
    assert found is not None and found.id == kind
    assert steps_named(found, [name]) == steps


@pytest.mark.parametrize("name", ["dreamshaper_8", "v1-5-pruned-emaonly", "juggernautXL_v9", "clcmodel"])
def test_ordinary_files_are_not_few_step(name):
    assert kind_of([name]) is None


def test_metadata_names_the_kind_when_the_file_name_does_not():
    texts = file_texts("model.safetensors", {"modelspec.title": "SDXL-Lightning 8-step", "ss_network_dim": "64"})
    kind = kind_of(texts)
    assert kind is not None and kind.id == "lightning" and steps_named(kind, texts) == 8


def test_auto_takes_the_checkpoint_first_then_a_lora_of_its_family():
    loras = [FastLora("lcm-lora-sdxl", ("lcm-lora-sdxl",), "sdxl"),
             FastLora("lcm-lora-sdv1-5", ("lcm-lora-sdv1-5",), "sd1"),
             FastLora("style", ("style",), "sd1")]
    turbo = choose("auto", "sd_xl_turbo.safetensors", ["sd_xl_turbo.safetensors"], "a cat", loras, "sdxl")
    assert (turbo.kind.id, turbo.lora, turbo.steps, turbo.cfg_scale) == ("turbo", None, 1, 1.0)
    lcm = choose("auto", "dreamshaper.safetensors", ["dreamshaper.safetensors"], "a cat", loras, "sd1")
    assert (lcm.kind.id, lcm.lora, lcm.sampler_name, lcm.steps) == ("lcm", "lcm-lora-sdv1-5", "LCM", 4)
    xl = choose("auto", "juggernautXL.safetensors", ["juggernautXL.safetensors"], "a cat", loras, "sdxl")
    assert xl.lora == "lcm-lora-sdxl"
    # a few-step LoRA the user already put in the prompt decides, and is not added twice
    hyper = [*loras, FastLora("Hyper-SD15-4steps-lora", ("Hyper-SD15-4steps-lora",), "sd1")]
    chosen = choose("auto", "dreamshaper.safetensors", ["dreamshaper"], "a cat <lora:Hyper-SD15-4steps-lora:0.8>",
                    hyper, "sd1")
    assert (chosen.kind.id, chosen.lora, chosen.steps) == ("hyper", None, 4)


def test_a_kind_chosen_by_hand_is_the_users_word_and_adds_nothing():
    preset = choose("lightning", "myMerge.safetensors", ["myMerge"], "a cat", [], None)
    assert (preset.sampler_name, preset.scheduler, preset.steps, preset.lora) == ("Euler", "sgm_uniform", 4, None)
    with pytest.raises(RequestError, match="unknown few-step kind 'warp'"):
        choose("warp", "a.safetensors", ["a"], "", [], None)


def test_auto_without_any_few_step_file_says_where_to_put_one():
    with pytest.raises(RequestError, match="models/Lora"):
        choose("auto", "dreamshaper.safetensors", ["dreamshaper"], "a cat", [FastLora("style", ("style",), "sd1")],
               "sd1")


def test_with_lora_appends_once():
    assert with_lora("a cat", "lcm") == "a cat <lora:lcm:1>"
    assert with_lora("a cat <lora:LCM:0.5>", "lcm") == "a cat <lora:LCM:0.5>"
    assert with_lora("", "lcm") == "<lora:lcm:1>"
    assert with_lora("a cat", None) == "a cat"


# -- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    models = root / "models"
    sd1 = tiny_components("sd1", seed=1)
    make_checkpoint(models / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1", components=sd1)
    write_kohya_lora(models / "Lora" / "lcm-lora-sdv1-5.safetensors", sd1, "sd1", rank=4, alpha=4.0, seed=3)
    write_kohya_lora(models / "Lora" / "style.safetensors", sd1, "sd1", rank=4, alpha=4.0, seed=4)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def generate(studio: Studio, **fields):
    req = Txt2ImgRequest(**{"prompt": "a red cube", "width": 64, "height": 64, "seed": 5, "save_images": False,
                            **fields})
    return studio.txt2img(req)


def test_fast_auto_runs_the_lcm_lora_with_its_settings_and_equals_the_same_request_spelled_out(studio):
    fast = generate(studio, fast="auto")
    params = parse_infotext(fast.infotexts[0])
    assert (params["Sampler"], params["Steps"], params["CFG scale"]) == ("LCM", "4", "1")
    assert "<lora:lcm-lora-sdv1-5:1>" in params["Prompt"]
    assert any("Fast preset (LCM, LoRA lcm-lora-sdv1-5)" in n for n in fast.notes)
    spelled = generate(studio, prompt="a red cube <lora:lcm-lora-sdv1-5:1>", sampler_name="LCM", steps=4,
                       cfg_scale=1.0)
    assert np.array_equal(np.asarray(fast.images[0]), np.asarray(spelled.images[0]))
    plain = generate(studio, sampler_name="LCM", steps=4, cfg_scale=1.0)
    assert not np.array_equal(np.asarray(fast.images[0]), np.asarray(plain.images[0]))   # the LoRA is applied


def test_fields_the_caller_sent_win_over_the_preset(studio):
    result = generate(studio, fast="auto", steps=3, cfg_scale=1.5)
    params = parse_infotext(result.infotexts[0])
    assert (params["Sampler"], params["Steps"], params["CFG scale"]) == ("LCM", "3", "1.5")


def test_a_chosen_kind_sets_its_sampler_and_schedule(studio):
    params = parse_infotext(generate(studio, fast="lightning").infotexts[0])
    assert (params["Sampler"], params["Schedule type"], params["Steps"]) == ("Euler", "SGM Uniform", "4")
    assert "<lora:" not in params["Prompt"]
    params = parse_infotext(generate(studio, fast="tcd").infotexts[0])
    assert (params["Sampler"], params["Steps"]) == ("TCD", "4")
    with pytest.raises(RequestError, match="unknown few-step kind"):
        generate(studio, fast="warp")


def test_the_tcd_sampler_draws_noise_with_its_gamma(studio):
    gamma = generate(studio, sampler_name="TCD", steps=3, cfg_scale=1.0)
    none = generate(studio, sampler_name="TCD", steps=3, cfg_scale=1.0, eta=0.0)
    assert not np.array_equal(np.asarray(gamma.images[0]), np.asarray(none.images[0]))


def test_the_fast_button_fills_the_controls(studio):
    from studio.ui.fast_preset import fast_updates

    prompt, sampler, schedule, steps, cfg, message = fast_updates(studio, "auto", "a cat")
    assert prompt["value"] == "a cat <lora:lcm-lora-sdv1-5:1>"
    assert (sampler["value"], schedule["value"], steps["value"], cfg["value"]) == ("LCM", "Automatic", 4, 1.0)
    assert "LCM" in message
    _, sampler, schedule, steps, _, _ = fast_updates(studio, "turbo", "a cat")
    assert (sampler["value"], schedule["value"], steps["value"]) == ("Euler a", "SGM Uniform", 1)


# -- the API ------------------------------------------------------------------------------------


def test_the_api_takes_fast_and_refuses_what_it_cannot_honour(server):
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 3, "fast": "lcm"}
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("LCM", 4, 1.0)
    assert any("Fast preset (LCM, chosen)" in n for n in info["notes"]), info["notes"]
    Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).verify()
    # the served models folder has no few-step LoRA and no few-step checkpoint: auto is refused, with advice
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body | {"fast": "auto"}, timeout=300)
    assert r.status_code == 400 and "models/Lora" in r.text, r.text
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body | {"fast": "warp"}, timeout=300)
    assert r.status_code == 400 and "unknown few-step kind" in r.text


# -- the CLI ------------------------------------------------------------------------------------


def test_the_cli_takes_fast(tmp_path, capsys):
    from studio.cli import main

    sd1 = tiny_components("sd1", seed=1)
    make_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1", components=sd1)
    write_kohya_lora(tmp_path / "models" / "Lora" / "Hyper-SD15-2steps-lora.safetensors", sd1, "sd1", seed=3)
    out = tmp_path / "cli-out"
    code = main(["generate", "--data-dir", str(tmp_path), "-p", "a small boat", "--fast", "auto", "--width", "64",
                 "--height", "64", "--seed", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    params = parse_infotext(Image.open(next(out.glob("*.png"))).info["parameters"])
    assert (params["Sampler"], params["Schedule type"], params["Steps"], params["CFG scale"]) == \
        ("DDIM", "SGM Uniform", "2", "1")
    assert params["Prompt"] == "a small boat <lora:Hyper-SD15-2steps-lora:1>"
    code = main(["generate", "--data-dir", str(tmp_path), "-p", "x", "--fast", "warp", "--out", str(out)])
    assert code != 0 and "unknown few-step kind" in capsys.readouterr().err
