"""The ControlNet units panel without a browser: values → unit requests, infotext → controls,
preprocessor → sliders."""

from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image

from studio.config import Flags
from studio.controlnet.units import ControlNetUnitRequest, unit_infotext
from studio.core import Studio
from studio.ui.controlnet import (
    UNIT_FIELDS,
    build_controlnet_panel,
    paste_updates,
    slider_updates,
    units_from_values,
)
from tests.helpers import unit_ui_values


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    s = Studio.create(Flags(data_dir=str(tmp_path_factory.mktemp("uicn")), no_demo=True))
    yield s
    s.queue.shutdown()


values = unit_ui_values


def test_values_become_unit_requests():
    assert units_from_values(values() * 3) == ()   # nothing enabled: no units at all
    image = Image.new("RGB", (8, 8))
    units = units_from_values(values() + values(enabled=True, image=image, module="canny", model="cn [1]", weight=0.5,
                                                threshold_a=80, control_mode="ControlNet is more important"))
    assert len(units) == 2 and not units[0].enabled
    unit = units[1]
    assert unit.enabled and unit.module == "canny" and unit.model == "cn [1]" and unit.weight == 0.5
    assert unit.image is image and unit.threshold_a == 80 and unit.control_mode_index == 2
    # "Upload independent control image" off: the img2img image, not the uploaded one
    reuse = units_from_values(values(enabled=True, image=image, upload_independent=False))[0]
    assert reuse.image is None


def test_panel_builds_units_from_the_setting(studio):
    studio.settings.update({"control_net_unit_count": 2})
    try:
        with gr.Blocks():
            panel = build_controlnet_panel(studio, "t", img2img=True)
    finally:
        studio.settings.update({"control_net_unit_count": 3})
    assert len(panel.units) == 2 and len(panel.inputs()) == panel.size == 2 * len(UNIT_FIELDS)
    assert panel.units[0].components["upload_independent"].value is False   # img2img units reuse the input image
    assert ("canny", "canny") in panel.units[1].components["module"].choices


def test_infotext_pastes_into_the_units(studio):
    with gr.Blocks():
        panel = build_controlnet_panel(studio, "p", count=3)
    text = unit_infotext(ControlNetUnitRequest(module="canny", weight=0.7, guidance_end=0.5,
                                               resize_mode="Just Resize"), "cn [abcd1234]", 512, 100, 200)
    updates = paste_updates(panel, {"Steps": "20", "ControlNet 1": text})
    assert len(updates) == panel.size
    per_unit = [dict(zip(UNIT_FIELDS, updates[i:i + len(UNIT_FIELDS)]))
                for i in range(0, len(updates), len(UNIT_FIELDS))]
    assert per_unit[0]["enabled"]["value"] is False and per_unit[2]["enabled"]["value"] is False
    second = per_unit[1]
    assert second["enabled"]["value"] is True and second["module"]["value"] == "canny"
    assert second["model"]["value"] == "cn [abcd1234]" and second["weight"]["value"] == 0.7
    assert second["guidance_end"]["value"] == 0.5 and second["resize_mode"]["value"] == "Just Resize"
    assert second["threshold_b"]["value"] == 200.0 and "value" not in second["image"]


def test_sliders_follow_the_preprocessor(studio):
    res, a, b = slider_updates(studio, "canny")
    assert res["visible"] and res["value"] == 512
    assert a["label"] == "Low Threshold" and a["value"] == 100 and b["label"] == "High Threshold"
    res, a, b = slider_updates(studio, "invert")   # no resolution, no thresholds
    assert not res["visible"] and not a["visible"] and a["value"] == -1 and a["minimum"] == -1
    res, a, b = slider_updates(studio, "posterize")   # the shipped example extension's slider
    assert a["label"] == "Bits per channel" and not b["visible"]
