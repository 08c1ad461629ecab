"""The UI in front of generation workers (issue 21), in headless Chromium: app.py --workers 2, a txt2img
Generate from the page runs on a worker and shows its image, and the Workers tab lists both workers.
Screenshots at 1440x900 and 390x844 under tests/artifacts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, make_models_dir, running_server

pytest.importorskip("ray.serve", reason="the cluster extra is not installed (pip install -e .[cluster])")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-cluster")
    make_models_dir(root, (("sd1", ".safetensors"),))
    with running_server(root, "--workers", "2", "--worker-threads", "1", "--no-demo") as srv:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            status = requests.get(f"{srv.url}/studio/v1/workers", timeout=30).json()
            assert not status["error"], status["error"]
            if status["ready"] and len(status["workers"]) == 2:
                break
            time.sleep(1)
        yield srv


@pytest.fixture(scope="module")
def browser(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_generate_runs_on_a_worker_and_the_workers_tab_lists_them(browser, server, artifacts_dir):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    try:
        page.goto(server.url, wait_until="domcontentloaded")
        page.locator("#txt2img_generate").wait_for(timeout=90_000)
        page.locator("#txt2img_prompt textarea").fill("a lighthouse on a cliff")
        for elem, value in (("#txt2img_width", "64"), ("#txt2img_height", "64"), ("#txt2img_steps", "3")):
            box = page.locator(f"{elem} input[type=number]")
            box.fill(value)
            box.press("Enter")
        page.locator("#txt2img_generate").click()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#txt2img_gallery img')].some(i => i.naturalWidth === 64)",
            timeout=180_000)
        page.wait_for_function("() => document.querySelector('#txt2img_info textarea').value.includes('Steps: 3')",
                               timeout=30_000)
        assert "tiny-sd1" in page.locator("#txt2img_info textarea").input_value()
        page.screenshot(path=str(Path(artifacts_dir) / "cluster_txt2img_1440.png"))
        page.get_by_role("tab", name="Workers", exact=True).first.click()
        rows = page.locator("#workers_table tbody tr")
        rows.nth(1).wait_for(timeout=30_000)
        assert rows.count() == 2
        page.wait_for_function("() => document.querySelector('#workers_table').innerText.includes('tiny-sd1')",
                               timeout=30_000)   # the worker that ran the job holds the checkpoint
        page.screenshot(path=str(Path(artifacts_dir) / "cluster_workers_1440.png"))
    finally:
        page.close()
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        phone.goto(server.url, wait_until="domcontentloaded")
        phone.locator("#txt2img_generate").wait_for(timeout=90_000)
        phone.locator("#tabs button[aria-label='More tabs']").first.click()
        phone.locator("#tabs .overflow-dropdown button", has_text="Workers").first.click()
        phone.locator("#workers_table tbody tr").nth(1).wait_for(timeout=30_000)
        phone.screenshot(path=str(Path(artifacts_dir) / "cluster_workers_390.png"))
    finally:
        phone.close()
