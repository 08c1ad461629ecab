"""A ControlNet unit's UI behaviour without a browser: Control Type filtering, the model refresh,
Allow Preview, "Upload independent control image", the painted mask, and the enabled markers."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio.config import Flags
from studio.controlnet.units import ControlNetUnitRequest, unit_infotext
from studio.core import Studio
from studio.testing.controlnets import make_controlnet
from studio.ui.controlnet import (
    UNIT_FIELDS,
    accordion_label,
    allow_preview_updates,
    build_controlnet_panel,
    control_type_updates,
    enabled_updates,
    image_and_mask,
    independent_updates,
    paste_updates,
    preview_updates,
    refreshed_models,
    run_button_updates,
    unit_label,
    units_from_values,
)
from tests.helpers import unit_ui_values

CANNY = "control_v11p_sd15_canny"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("uicnunits")
    make_controlnet(root / "models" / "ControlNet" / f"{CANNY}.safetensors", "sd1", seed=1)
    s = Studio.create(Flags(data_dir=str(root), no_demo=True))
    yield s
    s.queue.shutdown()


def _title(studio: Studio, stem: str) -> str:
    return next(name for name in studio.controlnets.names() if name.startswith(stem))


values = unit_ui_values


def _editor(size=(16, 16), stroke: tuple[int, int, int, int] | None = (4, 4, 8, 8)):
    """gr.ImageEditor's value: a background and one layer with a painted square (or nothing)."""
    background = Image.new("RGB", size, (40, 90, 140))
    layer = np.zeros((size[1], size[0], 4), np.uint8)
    if stroke:
        left, top, right, bottom = stroke
        layer[top:bottom, left:right] = (255, 255, 255, 255)
    return {"background": background, "layers": [Image.fromarray(layer, "RGBA")], "composite": background}


def test_choosing_a_control_type_picks_its_module_and_model(studio):
    module, model = control_type_updates(studio, "Canny")
    assert module["value"] == "canny" and "canny" in module["choices"] and "depth_midas" not in module["choices"]
    assert model["value"] == _title(studio, CANNY) and model["choices"] == ["None", _title(studio, CANNY)]
    # a type without a matching model file: "None", and only "None" offered
    module, model = control_type_updates(studio, "OpenPose")
    assert model["value"] == "None" and model["choices"] == ["None"]
    assert all(m == "none" or "pose" in m for m in module["choices"])
    # "All" is everything, nothing chosen
    module, model = control_type_updates(studio, "All")
    assert module["value"] == "none" and module["choices"] == studio.preprocessors.names()
    assert model["value"] == "None" and _title(studio, CANNY) in model["choices"]


def test_model_refresh_keeps_the_type_filter(studio):
    folder = studio.paths.controlnet_dirs[0]
    make_controlnet(folder / "other_canny_sd15.safetensors", "sd1", seed=2)
    make_controlnet(folder / "some_depth_sd15.safetensors", "sd1", seed=3)
    update = refreshed_models(studio, "Canny", _title(studio, CANNY))
    names = update["choices"]
    assert any(n.startswith("other_canny_sd15") for n in names) and not any("depth" in n for n in names)
    assert update["value"] == _title(studio, CANNY)   # the chosen model stays
    # a chosen model the filter does not offer gives way to the type's default
    assert refreshed_models(studio, "Depth", _title(studio, CANNY))["value"].startswith("some_depth_sd15")


def test_painted_layer_is_the_units_mask():
    image, mask = image_and_mask(_editor())
    assert image.size == (16, 16) and mask.mode == "L"
    arr = np.asarray(mask)
    assert arr[5, 5] == 255 and arr[0, 0] == 0 and arr[12, 12] == 0   # white = masked
    assert image_and_mask(_editor(stroke=None))[1] is None               # nothing painted: no mask
    plain = Image.new("RGB", (8, 8))
    assert image_and_mask(plain) == (plain, None)                        # "Send map to unit 0"
    drawn = Image.new("RGB", (8, 8), "white")
    assert image_and_mask({"background": None, "layers": [], "composite": drawn}) == (drawn, None)


def test_upload_independent_image_decides_the_units_image():
    editor = _editor()
    unit = units_from_values(values(enabled=True, image=editor))[0]
    assert unit.image is editor["background"] and np.asarray(unit.mask)[5, 5] == 255
    # img2img's default (box off): the unit has no image of its own, the engine uses the img2img image
    reuse = units_from_values(values(enabled=True, image=editor, upload_independent=False))[0]
    assert reuse.image is None and reuse.mask is None
    assert units_from_values(values(control_type="Canny") * 2) == ()


def test_panel_controls_and_their_defaults(studio):
    with gr.Blocks():
        txt = build_controlnet_panel(studio, "t", count=2)
        img = build_controlnet_panel(studio, "i", img2img=True, count=1)
    assert len(txt.inputs()) == txt.size == 2 * len(UNIT_FIELDS)
    unit = txt.units[0].components
    assert unit["control_type"].value == "All"
    assert unit["control_type"].elem_id == "t_controlnet_unit_0_type_filter_radio"
    assert unit["upload_independent"].value is True and not unit["upload_independent"].visible
    assert txt.units[0].allow_preview.value is False and txt.units[0].allow_preview.label == "Allow Preview"
    assert isinstance(unit["image"], gr.ImageEditor)
    i2i = img.units[0].components["upload_independent"]
    assert i2i.value is False and i2i.visible and i2i.label == "Upload independent control image"
    assert txt.units[1].tab.label == "ControlNet Unit 1"


def test_allow_preview_runs_the_preprocessor(studio):
    image = _editor(size=(64, 64), stroke=None)
    assert preview_updates(studio, False, image, "invert", 512, -1, -1) == (gr.update(), gr.update())
    shown, message = preview_updates(studio, True, image, "invert", 512, -1, -1)
    assert message == "" and np.asarray(shown.convert("RGB"))[0, 0].tolist() == [215, 165, 115]
    # painted on: a non-inpaint module reads the strokes (the extension's canvas scribble mode)
    shown, _ = preview_updates(studio, True, _editor(size=(64, 64)), "invert", 512, -1, -1)
    assert np.asarray(shown.convert("RGB"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(shown.convert("RGB"))[5, 5].tolist() == [0, 0, 0]
    # an inpaint module reads them as its mask and shows the image
    shown, message = preview_updates(studio, True, _editor(size=(64, 64)), "inpaint", 512, -1, -1)
    assert message == "" and np.asarray(shown.convert("RGB"))[0, 0].tolist() == [40, 90, 140]
    column, preview, message = allow_preview_updates(studio, False, image, "invert", 512, -1, -1)
    assert column["visible"] is False and preview is None
    column, preview, _ = allow_preview_updates(studio, True, None, "invert", 512, -1, -1)
    assert column["visible"] is True and preview is None   # on, but nothing to run yet
    allow, column, preview, message = run_button_updates(studio, image, "invert", 512, -1, -1)
    assert allow["value"] is True and column["visible"] is True and preview is not None
    assert run_button_updates(studio, None, "invert", 512, -1, -1)[3] == "Upload an image first."


def test_independent_image_box_shows_the_units_image():
    row, allow, run, column = independent_updates(True)
    assert row["visible"] and allow["visible"] and run["visible"]
    row, allow, run, column = independent_updates(False)
    assert not row["visible"] and allow == {"__type__": "update", "visible": False, "value": False}
    assert not column["visible"]


def test_enabled_markers():
    assert unit_label(0, False) == "ControlNet Unit 0" and unit_label(2, True) == "ControlNet Unit 2 (on)"
    assert accordion_label([False, False]) == "ControlNet"
    assert accordion_label([True, False, True]) == "ControlNet (2 units on)"
    updates = enabled_updates(False, True, False)
    assert [u["label"] for u in updates] == ["ControlNet Unit 0", "ControlNet Unit 1 (on)", "ControlNet Unit 2",
                                             "ControlNet (1 unit on)"]
    # plain ASCII: no emoji font needed
    assert all(u["label"].isascii() for u in updates)


def test_paste_resets_the_type_filter(studio):
    with gr.Blocks():
        panel = build_controlnet_panel(studio, "p", count=2)
    text = unit_infotext(ControlNetUnitRequest(module="depth_midas"), "cn [abcd1234]", 512, -1, -1)
    updates = paste_updates(panel, {"ControlNet 0": text})
    first = dict(zip(UNIT_FIELDS, updates[:len(UNIT_FIELDS)]))
    second = dict(zip(UNIT_FIELDS, updates[len(UNIT_FIELDS):]))
    assert first["control_type"]["value"] == "All" and first["module"]["value"] == "depth_midas"
    assert first["module"]["choices"] == studio.preprocessors.names()
    assert "None" in first["model"]["choices"] and first["upload_independent"] == gr.update()
    assert second["enabled"]["value"] is False and second["control_type"] == gr.update()



def test_the_effective_region_mask_reaches_the_unit():
    mask = Image.new("L", (16, 16), 255)
    (unit,) = units_from_values(values(enabled=True, image=Image.new("RGB", (16, 16)), effective_region_mask=mask))
    assert unit.effective_region_mask is mask
    (plain,) = units_from_values(values(enabled=True, image=Image.new("RGB", (16, 16))))
    assert plain.effective_region_mask is None


def test_unit_events_pass_values_from_before_a_filter_or_range_change(studio):
    """An event sent with values from before the Control Type filter changed the dropdowns' choices
    and the preprocessor changed the sliders' ranges reaches its handler (the engine's rules decide,
    not a Gradio page error), also after those updates gave the session Gradio's own copies of the
    components, as in a browser. Driven through Gradio's process_api on the real unit panel."""
    import asyncio

    from gradio.state_holder import SessionState

    with gr.Blocks() as demo:
        panel = build_controlnet_panel(studio, "t", count=1)
    unit = panel.units[0].components
    assert unit["module"].get_block_name() == "dropdown" and unit["threshold_a"].get_block_name() == "slider"
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    run, refresh = by_id["t_controlnet_unit_0_run_preprocessor"], by_id["t_controlnet_unit_0_refresh_models"]

    def event(block: Any, name: str) -> Any:
        return next(fn for fn in demo.fns.values() if any(t[0] == block._id and t[1] == name for t in fn.targets))

    state = SessionState(demo)

    async def events() -> dict:
        # canny was chosen; the user clicks Control Type "MLSD": mlsd and its sliders (0.01-2, 0.01-20)
        await demo.process_api(event(unit["control_type"], "input"), ["MLSD"], state=state)
        await demo.process_api(event(unit["module"], "change"), ["mlsd"], state=state)
        # the models' ↻ clicked before those updates reached the page: the canny model, now filtered out
        refreshed = await demo.process_api(event(refresh, "click"), ["MLSD", _title(studio, CANNY)], state=state)
        assert refreshed["data"][0]["value"] == "None"
        # the Run button clicked before those updates reached the page: canny and its thresholds
        return await demo.process_api(event(run, "click"), [None, "canny", 512, 100, 200], state=state)

    result = asyncio.run(events())
    assert "canny" not in [value for _, value in state[unit["module"]._id].choices]
    assert state[unit["threshold_a"]._id].maximum == 2.0                   # the session's copies changed ...
    assert any("Upload an image first" in str(out) for out in result["data"])   # ... and the handler ran


def test_lenient_components_pass_values_outside_their_range_or_choices():
    from studio.ui.lenient_components import LenientDropdown, LenientSlider

    slider = LenientSlider(1, 9, value=1, step=1)
    assert slider.preprocess(0) == 0 and type(slider)(**{**slider.constructor_args, "minimum": 5}).preprocess(0) == 0
    dropdown = LenientDropdown(["none", "depth"], value="none")
    assert dropdown.preprocess("canny") == "canny"
    by_index = LenientDropdown(["none", "depth"], value="none", type="index")
    assert by_index.preprocess("depth") == 1
    with pytest.raises(gr.Error):
        by_index.preprocess("canny")      # an index dropdown has no index to give for it


def test_revision_selects_redux_on_a_flux_checkpoint(monkeypatch):
    from types import SimpleNamespace

    from studio.ui import controlnet as ui

    names = ["none", "canny", "flux_redux", "revision_clipvision", "revision_ignore_prompt"]
    fake = SimpleNamespace(preprocessors=SimpleNamespace(names=lambda: names),
                           controlnets=SimpleNamespace(names=lambda: ["flux1-redux-dev [e3b0c442]"]),
                           models=SimpleNamespace(current=None))
    assert ui.control_type_updates(fake, "Revision")[0]["value"] == "revision_clipvision"   # the extension's
    fake.models.current = SimpleNamespace(family="flux1-dev")
    module, model = ui.control_type_updates(fake, "Revision")
    assert module["value"] == "flux_redux" and model["value"] == "flux1-redux-dev [e3b0c442]"
    fake.models.current = SimpleNamespace(family="sdxl")
    assert ui.control_type_updates(fake, "Revision")[0]["value"] == "revision_clipvision"
