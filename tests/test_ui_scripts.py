"""The Script dropdown, the ADetailer accordion and the Refiner accordion without a browser: their
controls become the same request fields an API client sends."""

from __future__ import annotations

import gradio as gr
import pytest

from studio.config import Flags
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest, build_request
from studio.ui.bindings import RequestForm
from studio.ui.detailer import build_detailer_panel
from studio.ui.refiner import build_refiner_controls
from studio.ui.scripts import build_script_panel


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    s = Studio.create(Flags(data_dir=str(tmp_path_factory.mktemp("uiscripts")), no_demo=True))
    yield s
    s.queue.shutdown()


def test_script_panel_sends_the_chosen_scripts_positional_args(studio):
    with gr.Blocks():
        panel = build_script_panel(studio, "txt2img")
    titles = [s.title for s in panel.scripts]
    assert titles == ["Prompt matrix", "Prompts from file or textbox", "X/Y/Z plot"]
    assert panel.dropdown.choices[0] == ("None", "None")
    values = [c.value for group in panel.controls for c in group]
    assert panel.fields(["None", *values]) == {"script_name": None, "script_args": []}
    xyz = titles.index("X/Y/Z plot")
    start = sum(len(g) for g in panel.controls[:xyz])
    values[start:start + 2] = ["Steps", "2,3"]
    fields = panel.fields(["X/Y/Z plot", *values])
    assert fields["script_name"] == "X/Y/Z plot" and fields["script_args"][:2] == ["Steps", "2,3"]
    assert len(fields["script_args"]) == len(panel.controls[xyz]) == 18
    # the request these make is accepted by the engine's parse, as an API client's would be
    req = build_request(Txt2ImgRequest, {"prompt": "x", **fields})
    assert studio.engine.scripts.find("txt2img", req.script_name).title == "X/Y/Z plot"


def test_xyz_axis_type_shows_the_values_dropdown_for_choice_axes(studio):
    script = studio.engine.scripts.find("txt2img", "x/y/z plot")
    links = script.linked(studio.engine.script_env(), "txt2img")
    sampler = links[0]("Sampler")
    assert sampler[1] == {"visible": False} and sampler[2]["visible"] and "Euler a" in sampler[2]["choices"]
    steps = links[3]("Steps")
    assert steps[4] == {"visible": True} and steps[5]["visible"] is False


def test_img2img_scripts_are_offered_on_img2img_only(studio):
    with gr.Blocks():
        panel = build_script_panel(studio, "img2img", elem_prefix="inpaint")
    assert "SD upscale" in [s.title for s in panel.scripts] and panel.dropdown.elem_id == "inpaint_script"


def test_detailer_panel_makes_adetailer_args(studio):
    with gr.Blocks():
        panel = build_detailer_panel(studio, "t", img2img=True)
    values = [c.value for c in panel.inputs()]
    assert panel.fields(values) == {}   # off: nothing sent
    values[0], values[1] = True, True
    fields = panel.fields(values)
    enable, skip, unit = fields["alwayson_scripts"]["ADetailer"]["args"]
    assert enable and skip and unit["ad_model"] == "face_opencv" and unit["ad_denoising_strength"] == 0.4
    from studio.detailer import detailer_from_alwayson

    assert detailer_from_alwayson(fields["alwayson_scripts"]).enabled_units()


def test_refiner_controls_set_the_refiner_fields(studio):
    with gr.Blocks():
        controls = build_refiner_controls(studio, "t")
    form = RequestForm(Txt2ImgRequest, "t")
    controls.bind(form)
    c = controls.controls
    data = {c["enable"]: True, c["checkpoint"]: "model.safetensors", c["switch_at"]: 0.6, c["restore_faces"]: True}
    values = form.values(data)
    assert values["refiner_checkpoint"] == "model.safetensors" and values["refiner_switch_at"] == 0.6
    assert values["restore_faces"] is True
    data[c["enable"]] = False
    assert form.values(data)["refiner_checkpoint"] is None
