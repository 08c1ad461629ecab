"""The UI as a user sees it: app.py started, headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run installs it)"),
]



@pytest.fixture(scope="module")
def page(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url, wait_until="domcontentloaded")
        page.locator("#txt2img_generate").wait_for(timeout=60_000)
        yield page
        browser.close()


def test_type_prompt_generate_and_see_image(page, artifacts_dir):
    page.locator("#txt2img_prompt textarea").fill("a lighthouse at dusk, oil painting")
    for elem, value in (("#txt2img_width", "64"), ("#txt2img_height", "64"), ("#txt2img_steps", "3")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery img").first.wait_for(timeout=120_000)
    info = page.locator("#txt2img_info textarea")
    info.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_info textarea').value.includes('Steps: 3')", timeout=30_000)
    text = info.input_value()
    assert text.startswith("a lighthouse at dusk, oil painting\n")
    assert "Size: 64x64" in text and "Model hash: " in text
    page.screenshot(path=str(Path(artifacts_dir) / "txt2img.png"), full_page=True)


def test_bad_value_shows_error_and_ui_keeps_working(page, artifacts_dir):
    seed = page.locator("#txt2img_seed input")
    seed.fill("99999999999")
    page.locator("#txt2img_generate").click()
    error = page.locator("#txt2img_error")
    page.wait_for_function(
        "() => document.querySelector('#txt2img_error').innerText.includes('seed: Input should be less than or equal to')",
        timeout=30_000)
    assert "seed: Input should be less than or equal to 4294967294" in error.inner_text()
    page.screenshot(path=str(Path(artifacts_dir) / "txt2img-error.png"), full_page=True)
    seed.fill("7")
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_info textarea').value.includes('Seed: 7,')", timeout=120_000)


def test_png_info_tab_reads_parameters_and_refuses_garbage(page, server, artifacts_dir, tmp_path):
    import base64

    import requests

    body = requests.post(f"{server.url}/sdapi/v1/txt2img", json={
        "prompt": "a castle, at night: moody", "steps": 2, "width": 64, "height": 64, "seed": 31}).json()
    png = tmp_path / "castle.png"
    png.write_bytes(base64.b64decode(body["images"][0]))
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")

    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(png))
    page.wait_for_function(
        "() => document.querySelector('#pnginfo_generation_info textarea').value.includes('Seed: 31')",
        timeout=30_000)
    assert page.locator("#pnginfo_generation_info textarea").input_value().startswith("a castle, at night: moody")
    page.screenshot(path=str(Path(artifacts_dir) / "pnginfo.png"), full_page=True)

    page.locator("#pnginfo_send_txt2img").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value === 'a castle, at night: moody'",
        timeout=30_000)
    assert page.locator("#txt2img_seed input").input_value() == "31"

    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image button[aria-label='Clear']").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(garbage))
    page.wait_for_function(
        "() => document.querySelector('#pnginfo_message').innerText.includes('not a readable image')",
        timeout=30_000)


def test_batch_gallery_shows_each_images_parameters(page, artifacts_dir):
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_seed input").fill("100")
    size = page.locator("#txt2img_batch_size input[type=number]")
    size.fill("2")
    size.press("Enter")
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_info textarea').value.includes('Seed: 100,')", timeout=120_000)
    thumbs = page.locator("#txt2img_gallery button.thumbnail-item")
    thumbs.nth(1).wait_for(timeout=30_000)
    thumbs.nth(1).click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_info textarea').value.includes('Seed: 101,')", timeout=30_000)
    page.screenshot(path=str(Path(artifacts_dir) / "txt2img-batch.png"), full_page=True)
    size.fill("1")
    size.press("Enter")


def test_corrupt_checkpoint_in_dropdown_shows_error_and_keeps_model(page, server, artifacts_dir):
    folder = server.data_dir / "models" / "Stable-diffusion"
    body = b"{broken header, not json"
    (folder / "broken.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#refresh_sd_model_checkpoint").click()
    dropdown = page.locator("#setting_sd_model_checkpoint input")
    page.wait_for_timeout(500)
    dropdown.click()
    page.get_by_role("option", name="broken.safetensors").click()
    page.wait_for_function(
        "() => document.querySelector('#model_status').innerText.includes('corrupt')", timeout=30_000)
    page.screenshot(path=str(Path(artifacts_dir) / "corrupt-checkpoint.png"), full_page=True)
    assert dropdown.input_value().startswith("tiny-")  # the previous model is still selected
    page.locator("#txt2img_seed input").fill("5")
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_info textarea').value.includes('Seed: 5,')", timeout=120_000)
    (folder / "broken.safetensors").unlink()


def test_token_counter_and_styles(page, artifacts_dir):
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
    page.wait_for_function(
        "() => document.querySelector('#txt2img_token_counter').innerText.trim() === '5/75'", timeout=30_000)
    page.locator("#txt2img_prompt textarea").fill(" ".join(["tower"] * 80))
    page.wait_for_function(
        "() => document.querySelector('#txt2img_token_counter').innerText.trim() === '80/150'", timeout=30_000)
    page.locator("#txt2img_prompt textarea").fill("cat")
    page.locator("#txt2img_styles input").click()
    page.get_by_role("option", name="framed").click()
    page.locator("#txt2img_style_apply").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value === 'cat, framed'", timeout=30_000)
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "blurry"
    page.screenshot(path=str(Path(artifacts_dir) / "styles.png"), full_page=True)
    page.locator("#txt2img_neg_prompt textarea").fill("")


def test_extra_networks_cards_insert_tags_and_vae_dropdown(page, artifacts_dir):
    page.get_by_role("tab", name="txt2img").click()
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill("a quiet harbour")
    page.locator("#txt2img_extra_networks").get_by_text("Extra networks").click()
    page.locator("#txt2img_extra_networks").get_by_role("tab", name="Lora").click()
    # other tests may add LoRAs to the served folder: pick the card by its caption
    card = page.locator("#txt2img_extra_lora button.thumbnail-item", has_text="tinylora").first
    card.wait_for(timeout=30_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#txt2img_extra_lora img')].some(i => i.complete && i.naturalWidth)",
        timeout=30_000)
    page.screenshot(path=str(Path(artifacts_dir) / "extra-networks-lora.png"), full_page=True)
    card.click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value.includes('<lora:tinylora:1>')",
        timeout=30_000)
    assert prompt.input_value() == "a quiet harbour <lora:tinylora:1>"
    card.click()  # a second click takes the tag out again
    page.wait_for_function(
        "() => !document.querySelector('#txt2img_prompt textarea').value.includes('<lora')", timeout=30_000)
    page.locator("#txt2img_extra_networks").get_by_role("tab", name="Hypernetworks").click()
    # other tests (API training) may add hypernetworks to the served folder: pick the card by its caption
    page.locator("#txt2img_extra_hypernetworks button.thumbnail-item", has_text="tinyhn").first.click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value.includes('<hypernet:tinyhn:1>')",
        timeout=30_000)
    # the VAE dropdown lists the file from models/VAE
    page.locator("#setting_sd_vae input").click()
    page.get_by_role("option", name="tinyvae.safetensors").wait_for(timeout=10_000)
    page.keyboard.press("Escape")
    page.screenshot(path=str(Path(artifacts_dir) / "extra-networks-hypernet.png"), full_page=True)


def _wait_for_an_idle_queue(server, timeout: float = 600) -> None:
    """Earlier tests of the session (the API fuzzing in the slow step) may leave jobs queued on the shared
    server: a UI test that waits for its own result starts once they are done."""
    import time

    import requests

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if requests.get(f"{server.url}/sdapi/v1/progress", timeout=30).json()["state"]["job_count"] == 0:
            return
        time.sleep(1)


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_inpaint_tab_paint_mask_generate(page, server, artifacts_dir, tmp_path):
    import numpy as np
    from PIL import Image

    _wait_for_an_idle_queue(server)

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).resize(
        (128, 128), Image.Resampling.NEAREST).save(init)
    page.get_by_role("tab", name="Inpaint").click()
    page.locator("#inpaint_prompt textarea").fill("a small red door")
    page.locator("#inpaint_image input[type=file]").first.set_input_files(str(init))
    canvas = page.locator("#inpaint_image canvas").first
    # the first test of a fresh page in the slow step: the editor can take a while to come up
    canvas.wait_for(timeout=90_000)
    page.wait_for_timeout(1000)
    for elem, value in (("#inpaint_width", "64"), ("#inpaint_height", "64"), ("#inpaint_steps", "2")):
        field = page.locator(f"{elem} input[type=number]")
        field.fill(value)
        field.press("Enter")

    def paint_and_generate(wait_for: str):
        box = canvas.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 30, cy)
        page.mouse.down()
        for dx in range(-30, 31, 5):  # a stroke across the middle: the area to repaint
            page.mouse.move(cx + dx, cy + dx / 3)
        page.mouse.up()
        page.locator("#inpaint_generate").click()
        page.wait_for_function(wait_for, timeout=120_000)

    info = "document.querySelector('#inpaint_info textarea').value.includes('Mask blur: 4')"
    done = f"() => {info}"
    either = ("() => {info} || ['paint over', 'upload an image'].some(t => "
              "document.querySelector('#inpaint_error').innerText.includes(t))").replace("{info}", info)
    paint_and_generate(either)
    if "upload an image" in page.locator("#inpaint_error").inner_text():
        # on a fresh page the editor (one of many WebGL canvases) can come up after the upload and lose it
        page.locator("#inpaint_image input[type=file]").first.set_input_files(str(init))
        page.wait_for_timeout(2000)
        paint_and_generate(either)
    if "paint over" in page.locator("#inpaint_error").inner_text():
        # the editor can still be settling after the upload and miss the first stroke
        paint_and_generate(done)
    text = page.locator("#inpaint_info textarea").input_value()
    assert text.startswith("a small red door\n") and "Denoising strength: 0.75" in text
    assert "Masked content: original" in text
    page.locator("#inpaint_gallery img").first.wait_for(timeout=30_000)
    page.screenshot(path=str(Path(artifacts_dir) / "inpaint.png"), full_page=True)
    # no mask painted -> a clear message, nothing queued
    page.get_by_role("button", name="Clear canvas").click()


def _control_png(tmp_path) -> str:
    import numpy as np
    from PIL import Image

    arr = np.zeros((96, 96, 3), np.uint8)
    arr[24:72, 30:66] = 255
    path = tmp_path / "control.png"
    Image.fromarray(arr).save(path)
    return str(path)


def _pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=False).first.click()


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_controlnet_unit_in_txt2img(page, artifacts_dir, tmp_path):
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_prompt textarea").fill("a house on a hill")
    for elem, value in (("#txt2img_width", "64"), ("#txt2img_height", "64"), ("#txt2img_steps", "3")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    unit = "txt2img_controlnet_unit_0"
    # the unit's image is an editor (paint = mask): it takes an upload once its canvas is up
    page.locator(f"#{unit}_image canvas").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    page.locator(f"#{unit}_image input[type=file]").set_input_files(_control_png(tmp_path))
    page.locator(f"#{unit}_enable input").check()
    _pick(page, f"{unit}_module", "canny")
    # the preprocessor's own sliders appear, with its labels
    page.locator(f"#{unit}_threshold_a").get_by_text("Low Threshold").wait_for(timeout=10_000)
    _pick(page, f"{unit}_model", "tinycn")
    page.locator(f"#{unit}_run_preprocessor").click()
    page.locator(f"#{unit}_preview img").wait_for(timeout=60_000)
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_info textarea').value.includes('ControlNet 0: \"Module: canny')",
        timeout=120_000)
    text = page.locator("#txt2img_info textarea").input_value()
    assert "Model: tinycn [" in text and "Threshold A: 100.0" in text
    # the gallery shows the image and the unit's detected map
    page.wait_for_function("() => document.querySelectorAll('#txt2img_gallery .thumbnail-item').length >= 2",
                           timeout=30_000)
    page.locator(f"#{unit}_enable").scroll_into_view_if_needed()
    page.screenshot(path=str(Path(artifacts_dir) / "controlnet-txt2img.png"), full_page=True)
    page.locator(f"#{unit}_enable input").uncheck()


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_controlnet_tab_detect_and_extension_preprocessor(page, artifacts_dir, tmp_path):
    page.get_by_role("tab", name="ControlNet").first.click()
    page.locator("#controlnet_detect_image input[type=file]").set_input_files(_control_png(tmp_path))
    page.locator("#controlnet_detect_run").click()
    page.locator("#controlnet_detect_map img").wait_for(timeout=60_000)
    page.locator("#controlnet_detect_save").click()
    page.wait_for_function(
        "() => document.querySelector('#controlnet_detect_result').innerText.includes('Saved to')", timeout=30_000)
    # the preprocessor a user's extension added is in the list, with its slider
    _pick(page, "controlnet_detect_module", "edges_plus")
    page.locator("#controlnet_detect_threshold_a").get_by_text("Strength").wait_for(timeout=10_000)
    page.locator("#controlnet_detect_run").click()
    page.wait_for_timeout(500)
    page.locator("#controlnet_detect_map img").wait_for(timeout=60_000)
    page.screenshot(path=str(Path(artifacts_dir) / "controlnet-tab.png"), full_page=True)
    page.get_by_role("tab", name="Extensions").click()
    table = page.locator("#extensions_table")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(Path(artifacts_dir) / "extensions.png"), full_page=True)
    table.get_by_text("broken on purpose").first.wait_for(timeout=10_000)
    assert "edges_plus" in table.inner_text() and "posterize" in table.inner_text()
    page.screenshot(path=str(Path(artifacts_dir) / "extensions.png"), full_page=True)


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_train_tab_preview_and_a_short_lora_run(page, server, artifacts_dir):
    import numpy as np
    from PIL import Image

    folder = Path(server.data_dir) / "browser_train"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a noisy texture", encoding="utf-8")
    page.get_by_role("tab", name="Train").click()
    page.locator("#train_lora_name textarea, #train_lora_name input").first.fill("browser_lora")
    page.locator("#train_lora_data_dir textarea, #train_lora_data_dir input").first.fill(str(folder))
    for elem, value in (("#train_lora_steps", "4"), ("#train_lora_resolution", "256")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#train_lora_preview").click()
    page.wait_for_function(
        "() => document.querySelector('#train_lora_dataset_summary').innerText.includes('256x256')",
        timeout=60_000)
    page.locator("#train_lora_gallery img").first.wait_for(timeout=30_000)
    page.locator("#train_lora_start").click()
    page.wait_for_function(
        "() => document.querySelector('#train_lora_result').innerText.includes('browser_lora.safetensors')",
        timeout=300_000)
    text = page.locator("#train_lora_result").inner_text()
    assert "4" in text and "loss" in text.lower()
    page.screenshot(path=str(Path(artifacts_dir) / "train-lora.png"), full_page=True)
    assert (Path(server.data_dir) / "models" / "Lora" / "browser_lora.safetensors").is_file()


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_settings_tab_turns_on_token_merging(page, server, artifacts_dir):
    import requests

    # selecting the tab re-reads the settings: a value set through the API since the page loaded
    # shows up, and that is the sign the re-read has landed and will not overwrite what we type
    requests.post(f"{server.url}/sdapi/v1/options", json={"token_merging_ratio": 0.1})
    page.get_by_role("tab", name="Settings").click()
    box = page.locator("#setting_token_merging_ratio input[type=number]")
    box.wait_for(timeout=10_000)
    page.wait_for_function(
        "() => document.querySelector('#setting_token_merging_ratio input[type=number]').value === '0.1'",
        timeout=30_000)
    assert "bfloat16" in page.locator("#settings_policy").inner_text() or \
        "float32" in page.locator("#settings_policy").inner_text()
    try:
        box.fill("0.5")
        box.press("Enter")
        page.locator("#settings_submit").click()
        # while the event runs, Gradio writes its status ("queue: 1/1 | 0.5s", "0.4s") into the output:
        # wait for one of apply_settings' own answers
        page.wait_for_function(
            "() => /^(Saved|Nothing changed|❌ Not saved)/.test("
            "document.querySelector('#settings_result').innerText.trim())", timeout=30_000)
        assert "token_merging_ratio" in page.locator("#settings_result").inner_text(), \
            page.locator("#settings_result").inner_text()
        page.screenshot(path=str(Path(artifacts_dir) / "settings.png"), full_page=True)
        assert requests.get(f"{server.url}/sdapi/v1/options").json()["token_merging_ratio"] == 0.5
        page.get_by_role("tab", name="txt2img").first.click()
        page.locator("#txt2img_prompt textarea").fill("merged tokens")
        page.locator("#txt2img_generate").click()
        page.wait_for_function(
            "() => document.querySelector('#txt2img_info textarea').value.includes('Token merging ratio: 0.5')",
            timeout=120_000)
    finally:
        requests.post(f"{server.url}/sdapi/v1/options", json={"token_merging_ratio": 0.0})


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_flux_checkpoint_brings_its_presets_and_generates(page, server, artifacts_dir):
    from studio.testing.flux import make_flux_checkpoint

    folder = server.data_dir / "models" / "Stable-diffusion"
    make_flux_checkpoint(folder / "flux1-dev-tiny.safetensors", seed=3)
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#refresh_sd_model_checkpoint").click()
    page.wait_for_timeout(500)
    dropdown = page.locator("#setting_sd_model_checkpoint input")
    dropdown.click()
    page.get_by_role("option", name="flux1-dev-tiny.safetensors").click()
    page.wait_for_function(
        "() => document.querySelector('#model_status').innerText.includes('FLUX.1')", timeout=60_000)
    # Forge's presets: CFG 1, Euler, Simple, and the Distilled CFG Scale slider beside CFG
    page.locator("#txt2img_distilled_cfg_scale").wait_for(state="visible", timeout=30_000)
    page.wait_for_function(
        "() => document.querySelector('#txt2img_cfg_scale input[type=number]').value === '1'", timeout=30_000)
    counter = page.locator("#txt2img_token_counter")
    page.locator("#txt2img_prompt textarea").fill("a red (cube:1.2) on a table")
    page.wait_for_function(
        "() => document.querySelector('#txt2img_token_counter').innerText.includes('T5')", timeout=30_000)
    assert "CLIP" in counter.inner_text()
    for elem, value in (("#txt2img_width", "64"), ("#txt2img_height", "64"), ("#txt2img_steps", "2")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_info textarea').value.includes('Distilled CFG Scale: 3.5')",
        timeout=120_000)
    text = page.locator("#txt2img_info textarea").input_value()
    assert "CFG scale: 1," in text and "Sampler: Euler," in text and "Model: flux1-dev-tiny" in text
    page.screenshot(path=str(Path(artifacts_dir) / "flux-txt2img.png"), full_page=True)
    # back to an SD model: the slider goes, the SD defaults come back
    dropdown.click()
    page.get_by_role("option", name="tiny-sd1.safetensors").first.click()
    page.locator("#txt2img_distilled_cfg_scale").wait_for(state="hidden", timeout=60_000)
    page.wait_for_function(
        "() => document.querySelector('#txt2img_cfg_scale input[type=number]').value === '7'", timeout=30_000)
    (folder / "flux1-dev-tiny.safetensors").unlink()


@pytest.mark.slow  # heavy (a browser generating a grid): the CI's slow step; test_ui_scripts covers the panel
def test_xyz_plot_script_shows_the_labelled_grid(page, artifacts_dir):
    page.get_by_role("tab", name="txt2img").first.click()
    for elem, value in (("#txt2img_width", "64"), ("#txt2img_height", "64"), ("#txt2img_steps", "2")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")

    def pick(elem: str, option: str) -> None:
        page.locator(f"#{elem} input").click()
        page.get_by_role("option", name=option, exact=True).locator("visible=true").first.click()

    pick("txt2img_script", "X/Y/Z plot")
    pick("txt2img_script_x_y_z_plot_0", "Steps")
    page.locator("#txt2img_script_x_y_z_plot_1 input, #txt2img_script_x_y_z_plot_1 textarea").first.fill("1,2")
    pick("txt2img_script_x_y_z_plot_3", "Sampler")   # a choice axis: its values become a dropdown
    pick("txt2img_script_x_y_z_plot_5", "Euler")
    pick("txt2img_script_x_y_z_plot_5", "Euler a")
    page.keyboard.press("Escape")
    page.locator("#txt2img_prompt textarea").fill("a plotted cube")
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_info textarea').value.includes('X Type: Steps')", timeout=120_000)
    text = page.locator("#txt2img_info textarea").input_value()
    assert "Y Type: Sampler" in text and 'X Values: "1,2"' in text
    page.locator("#txt2img_gallery").scroll_into_view_if_needed()
    page.screenshot(path=str(Path(artifacts_dir) / "txt2img-xyz.png"), full_page=True)
    pick("txt2img_script", "None")
