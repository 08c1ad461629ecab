"""The UI for SD3 and FLUX.1 without a browser: the "VAE / Text Encoder" picker, the family presets a
checkpoint change brings, the Distilled CFG Scale slider and the per-encoder token counters. The app is
built as the server builds it and its wired handlers are called with the values a browser would send."""

from __future__ import annotations

import re
import shutil

import gradio as gr
import pytest

from studio.config import Flags, Settings
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from studio.models.state_dict import ModelFileError
from studio.testing import make_checkpoint
from studio.testing.flux import (
    make_clip_l,
    make_flux_checkpoint,
    make_flux_transformer,
    make_flux_vae,
    make_t5xxl,
    tiny_flux_components,
)
from studio.ui.app import build_ui, module_choices
from studio.ui.bindings import RequestForm
from studio.ui.common import build_sampling_controls, model_guidance, token_counter_html

FLUX_DEV = "flux1-dev-tiny.safetensors"
SCHNELL = "flux1-schnell.safetensors"
SD1 = "tiny-sd1.safetensors"
MODULE_FILES = {"clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"}
TABS = ("txt2img", "img2img", "inpaint")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("uidit")
    models = root / "models"
    make_flux_checkpoint(models / "Stable-diffusion" / FLUX_DEV, "dev")
    make_checkpoint(models / "Stable-diffusion" / SD1, "sd1", seed=1)
    schnell = tiny_flux_components("schnell", seed=1)
    make_flux_transformer(models / "diffusion_models" / SCHNELL, "schnell", components=schnell)
    make_clip_l(models / "text_encoders" / "clip_l.safetensors", components=schnell)
    make_t5xxl(models / "text_encoders" / "t5xxl_fp16.safetensors", components=schnell)
    make_flux_vae(models / "vae" / "ae.safetensors", components=schnell)
    s = Studio.create(Flags(data_dir=str(root), no_half=True, no_demo=True))
    yield s
    s.queue.shutdown()


@pytest.fixture(scope="module")
def blocks(studio):
    return build_ui(studio)


def by_id(blocks: gr.Blocks, elem_id: str):
    return next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def handler(blocks: gr.Blocks, name: str):
    """The wired event function called ``name`` (a closure in build_ui) and its output components."""
    found = [f for f in blocks.fns.values() if getattr(f.fn, "__name__", "") == name]
    assert found, f"no handler {name!r} is wired"
    return found[0]


def call_follow(blocks: gr.Blocks, name: str, switched: bool, prompt: str = "a red cube") -> dict[str, dict]:
    """Run a model-following handler as Gradio would: ``{component: value}`` in, updates by elem id out."""
    fn = handler(blocks, name)
    data = {}
    for component in fn.inputs:
        elem = getattr(component, "elem_id", None) or ""
        if elem.endswith("_prompt") and not elem.endswith("neg_prompt"):
            data[component] = prompt
        elif isinstance(component, gr.State):
            data[component] = switched
        else:
            data[component] = component.value
    return {out.elem_id: update for out, update in zip(fn.outputs, fn.fn(data), strict=True)}


def load(studio, title: str):
    studio.select_checkpoint(title)
    return studio.models.current


# --------------------------------------------------------------------------- the module picker


def test_picker_lists_the_module_files_and_saves_the_option(studio, blocks):
    picker = by_id(blocks, "setting_forge_additional_modules")
    assert picker.multiselect
    # the only control for the option: the Settings tab draws no text box that would send it a string
    ids = [getattr(b, "elem_id", None) for b in blocks.blocks.values()]
    assert ids.count("setting_forge_additional_modules") == 1
    assert {value for _label, value in picker.choices} == MODULE_FILES
    assert any("T5-XXL" in label for label, value in picker.choices if value == "t5xxl_fp16.safetensors")
    apply = next(f for f in blocks.fns.values() if (picker._id, "input") in f.targets)
    try:
        apply.fn(["t5xxl_fp16.safetensors", "ae.safetensors"])
        assert studio.settings.options.forge_additional_modules == ["t5xxl_fp16.safetensors", "ae.safetensors"]
        # saved as quicksettings are: in config.json
        stored = Settings.load(studio.paths.settings_file).options.forge_additional_modules
        assert stored == ["t5xxl_fp16.safetensors", "ae.safetensors"]
    finally:
        studio.settings.update({"forge_additional_modules": []})


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_refresh_rescans_and_the_next_load_uses_the_choice(studio, blocks):
    folder = studio.paths.models / "text_encoders"
    other = folder / "t5xxl_other.safetensors"
    shutil.copyfile(folder / "t5xxl_fp16.safetensors", other)
    picker = by_id(blocks, "setting_forge_additional_modules")
    try:
        refresh = handler(blocks, "do_refresh")
        update = refresh.fn()[refresh.outputs.index(picker)]
        assert "t5xxl_other.safetensors" in {value for _label, value in update["choices"]}
        studio.models.unload()
        with pytest.raises(ModelFileError, match="several files could be"):
            load(studio, SCHNELL)                       # two T5 files and no choice
        apply = next(f for f in blocks.fns.values() if (picker._id, "input") in f.targets)
        apply.fn(["t5xxl_other.safetensors"])
        assert load(studio, SCHNELL).modules_used["t5xxl"] == "t5xxl_other.safetensors"
    finally:
        other.unlink()
        studio.settings.update({"forge_additional_modules": []})
        studio.models.unload()


def test_the_option_shows_as_the_files_it_picks():
    from pathlib import Path

    from studio.models.modules import ModuleFile

    t5 = ModuleFile(Path("/m/text_encoders/t5xxl_fp16.safetensors"), "t5xxl_fp16.safetensors", "t5xxl", None, "fp16")
    vae = ModuleFile(Path("/m/vae/ae.safetensors"), "ae.safetensors", "vae16", None, "fp32")
    # Forge saves full paths; stems and names work too; a file that is gone stays visible, marked
    choices, value = module_choices([t5, vae], ["/m/text_encoders/t5xxl_fp16.safetensors", "ae", "gone.gguf"])
    assert value == ["t5xxl_fp16.safetensors", "ae.safetensors", "gone.gguf"]
    assert ("gone.gguf (not found)", "gone.gguf") in choices
    assert [v for _label, v in choices] == ["t5xxl_fp16.safetensors", "ae.safetensors", "gone.gguf"]


# --------------------------------------------------------------------------- presets, slider, counters


def test_a_flux_checkpoint_brings_its_presets_and_the_distilled_slider(studio, blocks):
    choose = handler(blocks, "choose")
    assert choose.fn(FLUX_DEV)[2] is True
    model = studio.models.current
    presets = model.spec.presets_for(model.probe.variant)
    updates = call_follow(blocks, "after_choice", switched=True)
    for tab in TABS:
        assert updates[f"{tab}_cfg_scale"]["value"] == presets["cfg_scale"] == 1.0
        assert updates[f"{tab}_sampling"]["value"] == presets["sampler_name"] == "Euler"
        assert updates[f"{tab}_scheduler"]["value"] == "Simple"       # the dropdown's label of "simple"
        assert updates[f"{tab}_distilled_cfg_scale"] == {"__type__": "update", "visible": True, "value": 3.5}
        assert "value" not in updates[f"{tab}_steps"]                # dev declares no steps
    sampler = by_id(blocks, "txt2img_sampling")
    assert updates["txt2img_sampling"]["value"] in [value for _label, value in sampler.choices]

    # schnell: 4 steps, no guidance input, so no slider
    assert choose.fn(SCHNELL)[2] is True
    updates = call_follow(blocks, "after_choice", switched=True)
    assert updates["txt2img_steps"]["value"] == 4
    assert updates["img2img_distilled_cfg_scale"]["visible"] is False


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_leaving_flux_for_sd_brings_the_sd_defaults_back(studio, blocks):
    choose = handler(blocks, "choose")
    load(studio, FLUX_DEV)
    assert choose.fn(SD1)[2] == "from_flow"
    updates = call_follow(blocks, "after_choice", switched="from_flow")
    for tab in TABS:
        assert updates[f"{tab}_cfg_scale"]["value"] == 7.0
        assert updates[f"{tab}_sampling"]["value"] == "DPM++ 2M"
        assert updates[f"{tab}_scheduler"]["value"] == "Automatic"
        assert updates[f"{tab}_steps"]["value"] == 20


def test_an_sd_checkpoint_keeps_the_users_values(studio, blocks):
    choose = handler(blocks, "choose")
    load(studio, SD1)
    assert choose.fn(SD1)[2] is True
    updates = call_follow(blocks, "after_choice", switched=True)
    for tab in TABS:
        for control in ("steps", "cfg_scale", "sampling", "scheduler"):
            assert "value" not in updates[f"{tab}_{control}"]
        assert updates[f"{tab}_distilled_cfg_scale"]["visible"] is False
    # a choice that failed changes no values, whatever is loaded
    load(studio, FLUX_DEV)
    _title, status, switched = choose.fn("no-such-model")
    assert switched is False and status.startswith("⚠️")
    updates = call_follow(blocks, "after_choice", switched=False)
    assert "value" not in updates["txt2img_cfg_scale"] and updates["txt2img_distilled_cfg_scale"]["visible"]


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_the_distilled_value_is_sent_only_to_a_model_that_takes_it(studio):
    with gr.Blocks():
        controls = build_sampling_controls("t", 1, model_guidance(studio))
    form = RequestForm(Txt2ImgRequest, "t")
    controls.bind(form)
    data = {c: c.value for c in form.inputs()} | {controls.distilled: 2.5}
    load(studio, FLUX_DEV)
    assert form.values(data)["distilled_cfg_scale"] == 2.5
    load(studio, SCHNELL)
    assert form.values(data)["distilled_cfg_scale"] is None
    load(studio, SD1)
    assert form.values(data)["distilled_cfg_scale"] is None


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_token_counters_show_each_encoders_count(studio, blocks):
    text = "a red cube on a blue table"
    model = load(studio, FLUX_DEV)
    clip_ids = model.tokenizers[0](text)["input_ids"]
    t5_ids = model.tokenizers[1](text)["input_ids"]
    shown = re.sub(r"<[^>]+>", "", token_counter_html(studio, text, 20))
    # CLIP's count leaves out its start and end tokens, T5's its end token
    assert shown == f"CLIP {len(clip_ids) - 2}/75 · T5 {len(t5_ids) - 1}/{studio.engine.token_counts(text)['t5'][1]}"
    # the counters follow a model change
    updates = call_follow(blocks, "after_choice", switched=True, prompt=text)
    assert updates["txt2img_token_counter"] == token_counter_html(studio, text, 20)
    assert "T5 0/" in updates["txt2img_negative_token_counter"]
    load(studio, SD1)
    shown = re.sub(r"<[^>]+>", "", token_counter_html(studio, text, 20))
    assert shown == f"{len(clip_ids) - 2}/75"
    updates = call_follow(blocks, "after_choice", switched=True, prompt=text)
    assert updates["img2img_token_counter"] == token_counter_html(studio, text, 20)


def test_the_slider_sits_beside_cfg_in_every_generation_tab(blocks):
    for tab in TABS:
        slider = by_id(blocks, f"{tab}_distilled_cfg_scale")
        assert (slider.minimum, slider.maximum, slider.step, slider.value) == (0, 30, 0.1, 3.5)
        assert slider.label == "Distilled CFG Scale"
    # bound by the hand-made slider: no second, auto-made control in "More parameters"
    ids = [getattr(b, "elem_id", None) for b in blocks.blocks.values()]
    assert ids.count("txt2img_distilled_cfg_scale") == 1
