"""A ControlNet unit as a user sees it: Control Type, Allow Preview, the enabled markers, in headless
Debian Chromium driven by Playwright against app.py (a server of its own, with a "canny" model file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # heavy (a server and a browser): the CI's slow step
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run installs it)"),
]

CANNY = "control_v11p_sd15_canny"
UNIT = "txt2img_controlnet_unit_0"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from studio.testing.controlnets import make_controlnet
    from tests.helpers import make_models_dir, running_server

    playwright = pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("cnbrowser")
    make_models_dir(root)
    make_controlnet(root / "models" / "ControlNet" / f"{CANNY}.safetensors", "sd1", seed=5)
    with running_server(root) as server, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(server.url, wait_until="domcontentloaded")
        page.locator("#txt2img_generate").wait_for(timeout=60_000)
        yield page
        browser.close()


def _control_png(tmp_path) -> str:
    import numpy as np
    from PIL import Image

    arr = np.zeros((96, 96, 3), np.uint8)
    arr[24:72, 30:66] = 255
    path = tmp_path / "control.png"
    Image.fromarray(arr).save(path)
    return str(path)


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


def test_control_type_preview_and_enabled_marker(page, artifacts_dir, tmp_path):
    accordion = page.locator("#txt2img_controlnet")
    accordion.get_by_text("ControlNet", exact=True).first.click()
    # the image editor takes an upload once its canvas is up
    page.locator(f"#{UNIT}_image canvas").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    page.locator(f"#{UNIT}_image input[type=file]").first.set_input_files(_control_png(tmp_path))

    # Control Type: the preprocessor and the model follow
    page.locator(f"#{UNIT}_type_filter_radio").get_by_text("Canny", exact=True).click()
    page.wait_for_function(f"() => document.querySelector('#{UNIT}_module input').value === 'canny'",
                           timeout=15_000)
    assert _value(page, f"{UNIT}_model").startswith(CANNY)
    page.locator(f"#{UNIT}_threshold_a").get_by_text("Low Threshold").wait_for(timeout=10_000)

    # Allow Preview shows the map, and a new preprocessor re-runs it
    assert not page.locator(f"#{UNIT}_preview").is_visible()
    page.locator(f"#{UNIT}_allow_preview input").check()
    page.locator(f"#{UNIT}_preview img").wait_for(timeout=60_000)
    assert page.locator(f"#{UNIT}_run_preprocessor").inner_text().strip() == "Run preprocessor"

    # the enabled marker: on the unit's tab and in the accordion's title
    page.locator(f"#{UNIT}_enable input").check()
    page.get_by_role("tab", name="ControlNet Unit 0 (on)").wait_for(timeout=10_000)
    accordion.get_by_text("ControlNet (1 unit on)").first.wait_for(timeout=10_000)

    accordion.screenshot(path=str(Path(artifacts_dir) / "controlnet_unit_1440.png"))
    page.locator(f"#{UNIT}_image").scroll_into_view_if_needed()
    page.screenshot(path=str(Path(artifacts_dir) / "controlnet_unit_1440_viewport.png"))

    page.locator(f"#{UNIT}_enable input").uncheck()
    # attached, not visible: the check is the label, wherever the page has scrolled the tab row
    page.get_by_role("tab", name="ControlNet Unit 0", exact=True).wait_for(state="attached", timeout=20_000)
    assert page.get_by_role("tab", name="ControlNet Unit 0 (on)").count() == 0


def test_img2img_unit_uses_the_img2img_image_until_told(page):
    unit = "img2img_controlnet_unit_0"
    page.get_by_role("tab", name="img2img").first.click()
    page.locator("#img2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    independent = page.locator(f"#{unit}_upload_independent input")
    independent.wait_for(timeout=10_000)
    assert not independent.is_checked()
    assert not page.locator(f"#{unit}_image").is_visible()
    assert not page.locator(f"#{unit}_allow_preview").is_visible()
    independent.check()
    page.locator(f"#{unit}_image").wait_for(timeout=10_000)
    page.locator(f"#{unit}_allow_preview").wait_for(timeout=10_000)
    assert page.locator(f"#{unit}_run_preprocessor").is_visible()
    independent.uncheck()
    page.locator(f"#{unit}_image").wait_for(state="hidden", timeout=10_000)
