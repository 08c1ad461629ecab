"""The History tab in a real browser: outputs seeded with A1111-infotext PNGs (nothing generated),
found by a prompt word, shown with their parameters, deleted after the confirmation step."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from studio.generation.outputs import png_bytes
from studio.options import StudioOptions
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run installs it)"),
]

SEEDED = (  # (folder, name, prompt, colour)
    ("txt2img-images/2026-12-01", "00000-11.png", "a red fox in the snow, watercolor", (200, 60, 40)),
    ("txt2img-images/2026-12-02", "00001-12.png", "a blue whale under the ocean", (30, 70, 200)),
    ("img2img-images/2026-12-02", "00000-13.png", "a green forest at dawn", (40, 160, 60)),
    ("txt2img-grids/2026-12-02", "grid-0000.png", "a yellow lemon still life", (230, 210, 40)),
)


def seed_outputs(data_dir: Path) -> None:
    for age, (folder, name, prompt, colour) in enumerate(SEEDED):
        path = data_dir / "outputs" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (f"{prompt}\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
                f"Seed: {11 + age}, Size: 96x64, Model hash: 0123abcd, Model: tinyModel")
        path.write_bytes(png_bytes(Image.new("RGB", (96, 64), colour), text))
        os.utime(path, (1_800_000_000 + age, 1_800_000_000 + age))


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import gradio as gr

    from studio.ui.history import HISTORY_CSS, build_history_tab

    data_dir = tmp_path_factory.mktemp("history_ui")
    seed_outputs(data_dir)
    studio = SimpleNamespace(paths=SimpleNamespace(data=data_dir), settings=SimpleNamespace(options=StudioOptions()),
                             flags=SimpleNamespace(listen=True, share=False))
    with gr.Blocks(title="History test") as blocks, gr.Tabs():
        with gr.Tab("txt2img", id="txt2img"):  # History is not the first tab in the app either
            gr.Markdown("txt2img")
        build_history_tab(studio)
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=HISTORY_CSS)
    try:
        yield f"http://127.0.0.1:{port}", data_dir
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_history(browser, url: str, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="History").click()
    page.locator("#history_gallery button.thumbnail-item").first.wait_for(timeout=30_000)
    return page


def test_history_finds_shows_and_deletes_an_image(browser, app_url, artifacts_dir):
    url, data_dir = app_url
    page = open_history(browser, url, 1440, 900)
    assert page.locator("#history_gallery button.thumbnail-item").count() == len(SEEDED)
    assert "Page 1 of 1 · 4 images" in page.locator("#history_page").inner_text()

    page.locator("#history_search textarea, #history_search input").first.fill("WHALE ocean")
    page.locator("#history_search textarea, #history_search input").first.press("Enter")
    page.wait_for_function(
        "() => document.querySelectorAll('#history_gallery button.thumbnail-item').length === 1", timeout=30_000)
    assert "1 image" in page.locator("#history_page").inner_text()
    page.locator("#history_gallery button.thumbnail-item").first.click()
    page.wait_for_function(
        "() => document.querySelector('#history_info textarea').value.includes('Seed: 12,')", timeout=30_000)
    assert page.locator("#history_info textarea").input_value().startswith("a blue whale under the ocean\n")
    page.locator("#history_image img").wait_for(timeout=30_000)
    page.screenshot(path=str(Path(artifacts_dir) / "history_1440.png"))

    # Delete asks first; Confirm delete removes the file
    whale = data_dir / "outputs" / "txt2img-images" / "2026-12-02" / "00001-12.png"
    page.locator("#history_delete").click()
    page.locator("#history_confirm_delete").wait_for(timeout=10_000)
    assert whale.exists()
    page.locator("#history_confirm_delete").click()
    page.wait_for_function(
        "() => document.querySelector('#history_message').innerText.includes('Deleted')", timeout=30_000)
    assert not whale.exists()
    assert page.locator("#history_gallery button.thumbnail-item").count() == 0
    page.locator("#history_search textarea, #history_search input").first.fill("")
    page.locator("#history_refresh").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#history_gallery button.thumbnail-item').length === 3", timeout=30_000)
    page.close()


def test_history_on_a_phone(browser, app_url, artifacts_dir):
    url, _ = app_url
    page = open_history(browser, url, 390, 844)
    page.locator("#history_search textarea, #history_search input").first.fill("fox")
    page.locator("#history_search_button").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#history_gallery button.thumbnail-item').length === 1", timeout=30_000)
    page.locator("#history_gallery button.thumbnail-item").first.click()
    page.wait_for_function(
        "() => document.querySelector('#history_info textarea').value.startsWith('a red fox')", timeout=30_000)
    page.screenshot(path=str(Path(artifacts_dir) / "history_390.png"), full_page=True)
    page.close()
