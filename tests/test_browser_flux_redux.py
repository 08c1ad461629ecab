"""FLUX.1 Redux from the UI, as a user finds it: a FLUX checkpoint, the Redux file in ComfyUI's
models/style_models and its SigLIP encoder in models/clip_vision; Control Type "Revision" offers the
flux_redux module and picks the Redux model; Generate gives an image whose infotext carries the unit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.slow, pytest.mark.browser]

UNIT = "txt2img_controlnet_unit_0"
REDUX = "flux1-redux-dev"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from studio.testing.flux import make_flux_checkpoint
    from studio.testing.flux_adapters import write_redux, write_siglip_vision
    from tests.helpers import running_server

    playwright = pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("redux-browser")
    models = root / "models"
    make_flux_checkpoint(models / "Stable-diffusion" / "flux1-dev-tiny.safetensors", dtype=torch.float32)
    write_redux(models / "style_models" / f"{REDUX}.safetensors", seed=4)
    write_siglip_vision(models / "clip_vision" / "sigclip_vision_patch14_384.safetensors", seed=3)
    with running_server(root) as server, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(server.url, wait_until="domcontentloaded")
        page.locator("#txt2img_generate").wait_for(timeout=60_000)
        yield page
        browser.close()


def _reference(tmp_path: Path) -> str:
    arr = np.zeros((96, 96, 3), np.uint8)
    arr[:48] = (230, 30, 30)
    arr[48:, 24:72] = (20, 40, 220)
    path = tmp_path / "reference.png"
    Image.fromarray(arr).save(path)
    return str(path)


def test_revision_control_type_picks_redux_and_generates(page, artifacts_dir, tmp_path):
    for elem, value in (("#txt2img_width", "64"), ("#txt2img_height", "64"), ("#txt2img_steps", "2")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#txt2img_prompt textarea").fill("a red house")
    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    page.locator(f"#{UNIT}_image canvas").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    page.locator(f"#{UNIT}_image input[type=file]").first.set_input_files(_reference(tmp_path))
    page.locator(f"#{UNIT}_type_filter_radio").get_by_text("Revision", exact=True).click()
    # Revision selects flux_redux once the FLUX checkpoint is loaded (the extension's revision_clipvision,
    # SDXL's, before), and the matching model, the Redux file. (The update goes through the server:
    # generous waits on a loaded machine.)
    page.wait_for_function(f"() => ['revision_clipvision', 'flux_redux'].includes("
                           f"document.querySelector('#{UNIT}_module input').value)", timeout=60_000)
    assert page.locator(f"#{UNIT}_model input").first.input_value().startswith(REDUX)
    if page.locator(f"#{UNIT}_module input").input_value() != "flux_redux":
        page.locator(f"#{UNIT}_module input").click()
        page.get_by_role("option", name="flux_redux").click()
    page.wait_for_function(f"() => document.querySelector('#{UNIT}_module input').value === 'flux_redux'",
                           timeout=60_000)
    page.locator(f"#{UNIT}_threshold_a").get_by_text("Downsampling factor").wait_for(timeout=10_000)
    page.locator(f"#{UNIT}_enable input").check()
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "() => (document.querySelector('#txt2img_info textarea') || {}).value?.includes('flux_redux')",
        timeout=180_000)
    info = page.locator("#txt2img_info textarea").input_value()
    # switching between modules with other slider ranges raised no error on the page
    assert not page.get_by_text("is less than minimum value").is_visible()
    assert f'Model: {REDUX}' in info and "Size: 64x64" in info
    page.locator(f"#{UNIT}_image").scroll_into_view_if_needed()
    page.screenshot(path=str(Path(artifacts_dir) / "controlnet_redux.png"))
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(500)
    # the open ControlNet panel fits a phone's width (its unit tabs wrap instead of widening the page)
    assert page.evaluate("document.querySelector('#txt2img_controlnet').getBoundingClientRect().right") <= 390
    page.locator(f"#{UNIT}_type_filter_radio").scroll_into_view_if_needed()
    page.screenshot(path=str(Path(artifacts_dir) / "controlnet_redux_phone.png"))
