"""The Settings tab as a user sees it: search narrows the page, Apply says what changed (or what is
wrong, saving nothing), at 1440×900 and on a 390×844 phone. Headless Debian Chromium driven by
Playwright against app.py (a server of its own, so the shared one's settings stay untouched)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # heavy (a server and a browser): the CI's slow step
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run installs it)"),
]

RESULT = "document.querySelector('#settings_result').innerText.trim()"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.helpers import make_models_dir, running_server

    playwright = pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("settingsbrowser")
    make_models_dir(root)
    with running_server(root) as server, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(server.url, wait_until="domcontentloaded")
        page.locator("#txt2img_generate").wait_for(timeout=60_000)
        yield page, server
        browser.close()


def wait_result(page, pattern: str) -> str:
    # while the event runs Gradio writes its own status into the output: wait for the tab's answer
    page.wait_for_function(f"() => /{pattern}/.test({RESULT})", timeout=30_000)
    return page.locator("#settings_result").inner_text()


def test_search_apply_and_summary(served, artifacts_dir):
    page, server = served
    page.get_by_role("tab", name="Settings").click()
    search = page.locator("#settings_search :is(input, textarea)")
    search.wait_for(timeout=10_000)

    # search narrows the page to matching settings and their sections
    search.fill("jpeg")
    page.locator("#setting_samples_format").wait_for(state="hidden", timeout=10_000)
    assert page.locator("#setting_jpeg_quality").is_visible()
    assert not page.locator("#settings_paths_for_saving").is_visible()
    # applying while filtered saves what was changed and nothing else (hidden controls keep their values)
    quality = page.locator("#setting_jpeg_quality input[type=number]")
    quality.fill("91")
    quality.press("Enter")
    page.locator("#settings_submit").click()
    text = wait_result(page, "^(Saved|Nothing changed|❌)")
    assert text.startswith("Saved — 1 setting changed"), text
    assert "jpeg_quality" in text and "80 → 91" in text
    search.fill("")
    page.locator("#setting_samples_format").wait_for(state="visible", timeout=10_000)

    pattern = page.locator("#setting_samples_filename_pattern :is(input, textarea)")
    pattern.fill("[seed]-[prompt_words]")
    page.locator("#setting_save_to_dirs input[type=checkbox]").uncheck()
    page.locator("#settings_submit").click()
    text = wait_result(page, "^(Saved — 2|Nothing changed|❌)")
    assert text.startswith("Saved — 2 settings changed"), text
    assert "samples_filename_pattern" in text and "[seed]-[prompt_words]" in text
    assert "save_to_dirs" in text and "on → off" in text and "jpeg_quality" not in text
    stored = json.loads((Path(server.data_dir) / "config.json").read_text())
    assert stored["jpeg_quality"] == 91 and stored["samples_filename_pattern"] == "[seed]-[prompt_words]"
    assert stored["save_to_dirs"] is False
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(Path(artifacts_dir) / "settings_1440.png"))

    # a bad value: named, and nothing saved
    color = page.locator("#setting_grid_background_color :is(input, textarea)")
    color.fill("red")
    quality.fill("92")
    quality.press("Enter")
    page.locator("#settings_submit").click()
    text = wait_result(page, "^❌")
    assert "grid_background_color" in text and "jpeg_quality" not in text, text
    assert json.loads((Path(server.data_dir) / "config.json").read_text())["jpeg_quality"] == 91

    # nothing changed after fixing it back
    color.fill("#ffffff")
    quality.fill("91")
    quality.press("Enter")
    page.locator("#settings_submit").click()
    assert wait_result(page, "^Nothing changed") == "Nothing changed."

    page.set_viewport_size({"width": 390, "height": 844})
    search.fill("filename")
    page.locator("#setting_samples_format").wait_for(state="hidden", timeout=10_000)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(Path(artifacts_dir) / "settings_390.png"))
    search.fill("")
    page.set_viewport_size({"width": 1440, "height": 900})
