"""The loop people repeat all day, in a real browser (issue 20): the first screen at 1440x900 and on
a phone, two quick Generate clicks, Send to img2img, PNG Info → hires settings, History, the
checkpoint dropdown after ↻ and after a switch, no demo banner with real checkpoints, and a LoRA
copied into its folder showing up without ↻. Its own server and data dir: the tests change both."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, make_models_dir, running_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,   # a server, a browser and several generations: the CI's slow step
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run installs it)"),
]

TABS = (("txt2img", "txt2img"), ("img2img", "img2img"), ("Inpaint", "inpaint"), ("ControlNet", "controlnet"),
        ("Extras", "extras"), ("PNG Info", "pnginfo"), ("History", "history"), ("Settings", "settings"))


@pytest.fixture(scope="module")
def daily(tmp_path_factory):
    from studio.testing import tiny_components
    from studio.testing.loras import write_kohya_lora

    root = tmp_path_factory.mktemp("daily")
    make_models_dir(root, (("sd1", ".safetensors"), ("sd2", ".safetensors")))
    spare = root / "spare"
    spare.mkdir()
    write_kohya_lora(spare / "harbourlight.safetensors", tiny_components("sd1", seed=1), "sd1", seed=3)
    (root / "models" / "Lora").mkdir(parents=True, exist_ok=True)
    with running_server(root) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(daily):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, daily):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(daily.url, wait_until="domcontentloaded")
    page.locator("#txt2img_generate").wait_for(timeout=90_000)
    yield page
    page.close()


def open_tab(page, name: str) -> None:
    """A top-level tab; on a narrow screen Gradio folds the last ones into its "…" menu."""
    tab = page.get_by_role("tab", name=name, exact=True).first
    if tab.count() and tab.is_visible():
        tab.click()
        return
    page.locator("#tabs button[aria-label='More tabs']").first.click()
    page.locator("#tabs .overflow-dropdown button", has_text=name).first.click()


def small(page, tab: str = "txt2img", steps: str = "3", size: str = "64") -> None:
    for elem, value in ((f"#{tab}_width", size), (f"#{tab}_height", size), (f"#{tab}_steps", steps)):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")


def wait_idle(daily, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if requests.get(f"{daily.url}/sdapi/v1/progress?skip_current_image=true", timeout=30).json()[
                "state"]["job_count"] == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the queue did not empty")


def job_counts(daily, until: int, seconds: float) -> list[int]:
    """/progress's job_count, polled until it reaches ``until`` or ``seconds`` pass."""
    counts: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and max(counts, default=0) < until:
        counts.append(requests.get(f"{daily.url}/sdapi/v1/progress", timeout=30).json()["state"]["job_count"])
        time.sleep(0.1)
    return counts


def test_the_first_screen_holds_prompt_generate_and_result(page, artifacts_dir):
    gallery = page.locator("#txt2img_gallery").bounding_box()
    generate = page.locator("#txt2img_generate").bounding_box()
    prompt = page.locator("#txt2img_prompt").bounding_box()
    assert gallery["y"] < 900, "the result area starts below the first screen"
    assert page.locator("#txt2img_queue").bounding_box()["y"] > gallery["y"], "the queue comes after the result"
    assert generate["x"] > prompt["x"] + prompt["width"] - 5 and abs(generate["y"] - prompt["y"]) < 60
    for name, tab_id in TABS:
        page.get_by_role("tab", name=name, exact=True).first.click()
        page.wait_for_timeout(600)
        page.screenshot(path=str(Path(artifacts_dir) / f"daily_{tab_id}_1440.png"))
    page.get_by_role("tab", name="txt2img", exact=True).first.click()


def test_on_a_phone_the_result_comes_right_after_the_prompt(browser, daily, artifacts_dir):
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        phone.goto(daily.url, wait_until="domcontentloaded")
        phone.locator("#txt2img_generate").wait_for(timeout=90_000)
        phone.wait_for_timeout(1500)
        results = phone.locator("#txt2img_gallery").bounding_box()
        params = phone.locator("#txt2img_steps").bounding_box()
        assert results["y"] < params["y"], "on a phone the gallery must come before the parameters"
        # a long checkpoint title ends in "…" before the dropdown's arrow instead of running under it
        style = phone.evaluate("""() => { const i = document.querySelector('#setting_sd_model_checkpoint input');
            const s = getComputedStyle(i); return [s.textOverflow, parseFloat(s.paddingRight)]; }""")
        assert style[0] == "ellipsis" and style[1] >= 20
        for name, tab_id in TABS:
            open_tab(phone, name)
            phone.wait_for_timeout(600)
            phone.screenshot(path=str(Path(artifacts_dir) / f"daily_{tab_id}_390.png"))
    finally:
        phone.close()


def test_two_quick_generate_clicks_make_two_jobs_in_order(page, daily, artifacts_dir):
    import threading

    page.get_by_role("tab", name="txt2img", exact=True).first.click()
    page.locator("#txt2img_prompt textarea").fill("a lighthouse at dusk")
    small(page)
    outputs = daily.data_dir / "outputs" / "txt2img-images"
    before = set(outputs.rglob("*.png")) if outputs.exists() else set()
    wait_idle(daily)
    # an API client's long job holds the worker, so both clicks land while something runs however fast
    # this machine is (a tiny model's 150 steps took under a second on CI); it is interrupted below
    blocker = threading.Thread(target=requests.post, args=(f"{daily.url}/sdapi/v1/txt2img",), kwargs={
        "timeout": 600, "json": {"prompt": "a long blocker", "steps": 150, "width": 256, "height": 256,
                                 "n_iter": 50, "save_images": False}}, daemon=True)
    blocker.start()
    counts = job_counts(daily, until=1, seconds=120)
    assert max(counts) >= 1, f"the API job was not counted: job_count {counts[-20:]}"
    page.locator("#txt2img_generate").click()
    counts = job_counts(daily, until=2, seconds=60)
    if max(counts) < 2:
        page.screenshot(path=str(Path(artifacts_dir) / "daily_first_click_lost_1440.png"))
    assert max(counts) >= 2, f"the first Generate click made no job: job_count {counts[-20:]}"
    page.locator("#txt2img_generate").click()
    # the second click is queued, not dropped
    counts = job_counts(daily, until=3, seconds=60)
    assert max(counts) >= 3, f"the second Generate click was not queued: job_count {counts[-20:]}"
    page.wait_for_function("() => document.querySelector('#txt2img_generate').innerText.includes('queue')",
                           timeout=30_000)
    # the tab's queue panel lists both waiting clicks behind the running job
    page.wait_for_function(
        "() => document.querySelectorAll('#txt2img_queue .queue-row.waiting').length >= 2"
        " && document.querySelector('#txt2img_queue').innerText.includes('a lighthouse')", timeout=15_000)
    page.screenshot(path=str(Path(artifacts_dir) / "daily_busy_1440.png"))
    requests.post(f"{daily.url}/sdapi/v1/interrupt", timeout=30).raise_for_status()
    blocker.join(timeout=120)
    wait_idle(daily)
    page.wait_for_function("() => !document.querySelector('#txt2img_generate').innerText.includes('queue')",
                           timeout=60_000)
    new = sorted(set(outputs.rglob("*.png")) - before, key=lambda p: p.stat().st_mtime)
    assert len(new) == 2 and new[0].name < new[1].name, [p.name for p in new]
    page.locator("#txt2img_gallery img").first.wait_for(timeout=30_000)


def test_send_to_img2img_moves_the_image_and_the_prompt(page):
    page.get_by_role("tab", name="txt2img", exact=True).first.click()
    page.locator("#txt2img_gallery img").first.wait_for(timeout=60_000)
    page.locator("#txt2img_send_to_img2img").click()
    page.wait_for_function(
        "() => document.querySelector('#img2img_prompt textarea').value === 'a lighthouse at dusk'", timeout=30_000)
    page.locator("#img2img_image img").first.wait_for(timeout=30_000)
    sent = page.locator("#txt2img_width input[type=number]").input_value()
    assert page.locator("#img2img_width input[type=number]").input_value() == sent   # send_size is on


def test_png_info_send_to_txt2img_restores_hires_fix(page, daily, tmp_path):
    import base64

    body = requests.post(f"{daily.url}/sdapi/v1/txt2img", timeout=300, json={
        "prompt": "a castle", "steps": 2, "width": 64, "height": 64, "seed": 31, "enable_hr": True,
        "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.55}).json()
    png = tmp_path / "castle.png"
    png.write_bytes(base64.b64decode(body["images"][0]))
    page.get_by_role("tab", name="PNG Info", exact=True).first.click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(png))
    page.wait_for_function(
        "() => document.querySelector('#pnginfo_generation_info textarea').value.includes('Hires upscale: 1.5')",
        timeout=30_000)
    page.locator("#pnginfo_send_txt2img").click()
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value === 'a castle'",
                           timeout=30_000)
    page.locator("#txt2img_hr").get_by_text("Hires. fix").first.click()   # the accordion, to read its controls
    page.locator("#txt2img_enable_hr input").wait_for(timeout=10_000)
    assert page.locator("#txt2img_enable_hr input").is_checked()
    assert page.locator("#txt2img_hr_scale input[type=number]").input_value() == "1.5"
    assert page.locator("#txt2img_hires_steps input[type=number]").input_value() == "2"
    assert page.locator("#txt2img_denoising_strength input[type=number]").input_value() == "0.55"


def test_history_finds_an_image_by_a_prompt_word(page, artifacts_dir):
    page.get_by_role("tab", name="History", exact=True).first.click()
    page.locator("#history_search input, #history_search textarea").first.fill("lighthouse")
    page.locator("#history_search_button").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#history_gallery .thumbnail-item').length >= 2", timeout=30_000)
    page.screenshot(path=str(Path(artifacts_dir) / "daily_history_search_1440.png"))


def test_the_checkpoint_dropdown_shows_the_loaded_title_after_a_switch_and_refresh(page, daily):
    page.get_by_role("tab", name="txt2img", exact=True).first.click()
    dropdown = page.locator("#setting_sd_model_checkpoint input")
    dropdown.click()
    page.get_by_role("option", name="tiny-sd2.safetensors").first.click()
    page.wait_for_function(
        "() => document.querySelector('#setting_sd_model_checkpoint input').value.startsWith('tiny-sd2.safetensors [')",
        timeout=120_000)
    page.locator("#refresh_sd_model_checkpoint").click()
    page.wait_for_timeout(1500)
    assert dropdown.input_value().startswith("tiny-sd2.safetensors ["), dropdown.input_value()
    loaded = requests.get(f"{daily.url}/sdapi/v1/options", timeout=30).json()["sd_model_checkpoint"]
    assert dropdown.input_value() == loaded
    assert not page.locator("#demo_banner").is_visible()


def test_a_lora_copied_into_its_folder_appears_without_refresh(page, daily):
    page.get_by_role("tab", name="txt2img", exact=True).first.click()
    page.locator("#txt2img_extra_networks").get_by_text("Extra networks").click()
    page.locator("#txt2img_extra_networks").get_by_role("tab", name="Lora").click()
    shutil.copyfile(daily.data_dir / "spare" / "harbourlight.safetensors",
                    daily.data_dir / "models" / "Lora" / "harbourlight.safetensors")
    card = page.locator("#txt2img_extra_lora button.thumbnail-item", has_text="harbourlight").first
    card.wait_for(timeout=20_000)
