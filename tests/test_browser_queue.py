"""The queue panel in a real browser (Playwright + Debian chromium). A small Gradio app holds the
panel over a studio-like object with the real JobQueue and the real queue routes: a long fake job
runs, more jobs are queued behind it from outside the page (as API clients do), the panel lists
them with their settings, Up reorders, Cancel removes, a reload shows the same queue. When the real
app has the panel wired in (``#txt2img_queue``), a second test does the same through
/sdapi/v1/txt2img with a tiny model."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from studio.generation.request import Txt2ImgRequest
from studio.jobs import JobQueue
from tests.helpers import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run installs it)"),
]



class LongJob:
    """A job that steps slowly until released or interrupted, standing in for a long generation."""

    def __init__(self, queue: JobQueue) -> None:
        self.gate, self.started = threading.Event(), threading.Event()
        req = Txt2ImgRequest(prompt="a long running lighthouse, many steps", steps=150, width=64, height=64,
                             seed=11)

        def fn(state):
            state.set_total(150)
            self.started.set()
            while not (self.gate.is_set() or state.interrupted):
                state.step = min(state.step + 1, 149)
                time.sleep(0.05)
            return SimpleNamespace(interrupted=state.interrupted)

        self.job = queue.submit(fn, "txt2img", request=req)
        assert self.started.wait(10)


def quick(queue: JobQueue, prompt: str, **fields):
    req = Txt2ImgRequest(prompt=prompt, steps=4, width=64, height=64, **fields)
    return queue.submit(lambda state: SimpleNamespace(interrupted=False), "txt2img", request=req)


@pytest.fixture(scope="module")
def panel_app():
    import gradio as gr

    from studio.api.routes import build_queue_router
    from studio.ui.queue_panel import build_queue_panel

    studio = SimpleNamespace(queue=JobQueue())
    with gr.Blocks(title="queue panel") as blocks:
        with gr.Row():
            with gr.Column():
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
            with gr.Column():
                gr.Button("Generate", variant="primary")
                build_queue_panel(studio, "txt2img")
    app, url, _ = blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    app.include_router(build_queue_router(studio))
    yield SimpleNamespace(url=url.rstrip("/"), queue=studio.queue)
    blocks.close()
    studio.queue.shutdown()


@contextlib.contextmanager
def busy_panel(app, width: int = 1440, height: int = 900, touch: bool = False):
    """The panel's page in Chromium while a LongJob runs: yields (page, long job); the job is released
    and the browser closed however the test ends. ``touch``: a touch screen (a phone)."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        long = None
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, has_touch=touch)
            page.goto(app.url, wait_until="domcontentloaded")
            page.locator("#txt2img_queue_list").wait_for(timeout=60_000)
            long = LongJob(app.queue)
            yield page, long
        finally:
            if long is not None:
                long.gate.set()
            browser.close()


def rows(page) -> list[str]:
    return page.locator("#txt2img_queue_list .queue-row.waiting .queue-prompt").all_inner_texts()


def wait_rows(page, expected: list[str], timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while rows(page) != expected:
        if time.monotonic() > end:
            raise AssertionError(f"waiting rows {rows(page)} != {expected}")
        time.sleep(0.1)


@pytest.mark.parametrize("width,height", [(1440, 900), (390, 844)])
def test_panel_lists_reorders_and_cancels_queued_jobs(panel_app, artifacts_dir, width, height):
    q = panel_app.queue
    with busy_panel(panel_app, width, height) as (page, long):
        second = quick(q, "a red fox in snow", seed=5, n_iter=2)
        third = quick(q, "a blue whale, watercolor", sampler_name="Euler a")
        panel = page.locator("#txt2img_queue_list")
        wait_rows(page, ["a red fox in snow", "a blue whale, watercolor"])
        running = panel.locator(".queue-row.running")
        assert "a long running lighthouse" in running.inner_text()
        meta = panel.locator(".queue-row.waiting .queue-meta").first.inner_text()
        assert "64×64" in meta and "4 steps" in meta and "seed 5" in meta and "batch 2×1" in meta
        page.wait_for_function("() => document.querySelector('#txt2img_queue').innerText.includes('Queue (3)')",
                               timeout=10_000)
        page.screenshot(path=str(Path(artifacts_dir) / f"queue_{width}.png"), full_page=True)

        # Up on the second waiting row puts it first, in the page and in the worker's order
        panel.locator(f".queue-row[data-job='{third.state.job_id}'] button[data-queue-action='up']").click()
        wait_rows(page, ["a blue whale, watercolor", "a red fox in snow"])
        assert q.position(third.state.job_id) == 1 and q.position(second.state.job_id) == 2
        # the API sees the same order
        listed = requests.get(f"{panel_app.url}/studio/v1/queue", timeout=10).json()["waiting"]
        assert [w["id"] for w in listed] == [third.state.job_id, second.state.job_id]

        # Cancel removes one; its waiter is told at once
        panel.locator(f".queue-row[data-job='{second.state.job_id}'] button[data-queue-action='cancel']").click()
        wait_rows(page, ["a blue whale, watercolor"])
        with pytest.raises(LookupError, match="cancelled"):
            second.wait(5)

        # a reload reads the server's queue again
        page.reload(wait_until="domcontentloaded")
        page.locator("#txt2img_queue_list .queue-row.running").wait_for(timeout=30_000)
        wait_rows(page, ["a blue whale, watercolor"])
        page.screenshot(path=str(Path(artifacts_dir) / f"queue_{width}_after.png"), full_page=True)

        long.gate.set()
        third.wait(10)
        long.job.wait(10)
        page.wait_for_function(
            "() => document.querySelector('#txt2img_queue').innerText.includes('Queue (0)')", timeout=15_000)
        assert rows(page) == []
        page.locator("#txt2img_queue_list details.queue-recent summary").click()
        recent = page.locator("#txt2img_queue_list details.queue-recent").inner_text()
        assert "a blue whale" in recent and "cancelled" in recent and "done" in recent
        time.sleep(1.5)   # a refresh or two: the open "Recent" list stays open
        assert page.locator("#txt2img_queue_list details.queue-recent").get_attribute("open") is not None
        page.screenshot(path=str(Path(artifacts_dir) / f"queue_{width}_recent.png"), full_page=True)


def test_dragging_a_row_onto_another_reorders_the_queue(panel_app, artifacts_dir):
    q = panel_app.queue
    with busy_panel(panel_app) as (page, long):
        jobs = [quick(q, prompt) for prompt in ("first fox", "second owl", "third whale")]
        wait_rows(page, ["first fox", "second owl", "third whale"])
        panel = page.locator("#txt2img_queue_list")

        def row(job):
            return panel.locator(f".queue-row.waiting[data-job='{job.state.job_id}']")

        # the last row dropped on the top half of the first: it runs next
        row(jobs[2]).drag_to(row(jobs[0]), target_position={"x": 40, "y": 3})
        wait_rows(page, ["third whale", "first fox", "second owl"])
        assert [j.request.prompt for j in q.waiting()] == ["third whale", "first fox", "second owl"]
        # the first row dropped on the lower half of the last: it goes last
        box = row(jobs[1]).bounding_box()
        row(jobs[2]).drag_to(row(jobs[1]), target_position={"x": 40, "y": box["height"] - 3})
        wait_rows(page, ["first fox", "second owl", "third whale"])
        assert q.position(jobs[2].state.job_id) == 3
        assert panel.locator(".dragging, .drop-before, .drop-after").count() == 0
        page.screenshot(path=str(Path(artifacts_dir) / "queue_dragged_1440.png"), full_page=True)
        long.gate.set()
        for job in jobs:
            job.wait(10)


def test_a_finger_drags_a_row_by_its_place_number(panel_app, artifacts_dir):
    """On a phone HTML5 drag and drop never starts: the place number is a touch handle (pointer events)."""
    q = panel_app.queue
    with busy_panel(panel_app, 390, 844, touch=True) as (page, long):
        jobs = [quick(q, prompt) for prompt in ("first fox", "second owl", "third whale")]
        wait_rows(page, ["first fox", "second owl", "third whale"])
        panel = page.locator("#txt2img_queue_list")
        cdp = page.context.new_cdp_session(page)

        def row(job):
            return panel.locator(f".queue-row.waiting[data-job='{job.state.job_id}']")

        def swipe(job, onto, lower: bool) -> None:
            """A finger on ``job``'s place number, moved in steps onto ``onto``'s upper or lower half."""
            row(job).scroll_into_view_if_needed()
            handle, target = row(job).locator(".queue-place").bounding_box(), row(onto).bounding_box()
            x0, y0 = handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2
            x1, y1 = target["x"] + 80, target["y"] + (target["height"] - 4 if lower else 4)
            cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x0, "y": y0}]})
            for i in range(1, 9):
                point = {"x": x0 + (x1 - x0) * i / 8, "y": y0 + (y1 - y0) * i / 8}
                cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
                time.sleep(0.03)
            cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})

        scrolled = page.evaluate("window.scrollY")
        swipe(jobs[2], jobs[0], lower=False)
        wait_rows(page, ["third whale", "first fox", "second owl"])
        assert [j.request.prompt for j in q.waiting()] == ["third whale", "first fox", "second owl"]
        swipe(jobs[2], jobs[1], lower=True)
        wait_rows(page, ["first fox", "second owl", "third whale"])
        assert page.evaluate("window.scrollY") == scrolled, "the finger's drag scrolled the page"
        # a finger on the prompt text still scrolls: only the place number is a handle
        assert page.evaluate(
            "getComputedStyle(document.querySelector('#txt2img_queue_list .queue-row.waiting .queue-text'))"
            ".touchAction") != "none"
        assert panel.locator(".dragging, .drop-before, .drop-after").count() == 0
        page.screenshot(path=str(Path(artifacts_dir) / "queue_touch_dragged_390.png"), full_page=True)
        long.gate.set()
        for job in jobs:
            job.wait(10)


def test_interrupt_button_stops_the_running_job(panel_app):
    q = panel_app.queue
    with busy_panel(panel_app) as (page, long):
        button = page.locator("#txt2img_queue_list .queue-row.running button[data-queue-action='interrupt']")
        button.wait_for(timeout=15_000)
        button.click()
        assert long.job.wait(10).interrupted
        assert q.recent()[0].outcome == "interrupted"


def test_real_app_queue_panel_with_api_jobs(server, artifacts_dir):
    """The panel as the studio serves it: a long txt2img runs (tiny model, many steps), two more are
    queued over /sdapi/v1/txt2img, the txt2img tab's panel lists them, Up reorders, Cancel removes
    one (its API call ends), /sdapi/v1/progress counts the jobs."""
    playwright = pytest.importorskip("playwright.sync_api")
    url = server.url
    results: dict[str, requests.Response] = {}

    def post(name: str, **fields):
        body = {"prompt": name, "width": 64, "height": 64, "steps": 2, "seed": 1, **fields}
        results[name] = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#txt2img_generate").wait_for(timeout=60_000)
            if page.locator("#txt2img_queue_list").count() == 0:
                pytest.skip("the queue panel is not wired into the txt2img tab yet")
            threads = [threading.Thread(target=post, args=("a long api lighthouse",),
                                        kwargs={"steps": 150, "n_iter": 100})]
            threads[0].start()
            end = time.monotonic() + 60
            while requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()["state"]["job_count"] < 1:
                assert time.monotonic() < end, "the long job never started"
                time.sleep(0.1)
            for name in ("second api fox", "third api whale"):
                threads.append(threading.Thread(target=post, args=(name,)))
                threads[-1].start()
                time.sleep(0.3)   # in this order
            wait_rows(page, ["second api fox", "third api whale"], timeout=30)
            assert requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()["state"]["job_count"] == 3
            panel = page.locator("#txt2img_queue_list")
            page.locator("#txt2img_queue").scroll_into_view_if_needed()
            page.screenshot(path=str(Path(artifacts_dir) / "queue_app_1440.png"))
            panel.locator(".queue-row.waiting").nth(1).locator("button[data-queue-action='up']").click()
            wait_rows(page, ["third api whale", "second api fox"])
            panel.locator(".queue-row.waiting").nth(1).locator("button[data-queue-action='cancel']").click()
            wait_rows(page, ["third api whale"])
            threads[1].join(30)
            assert results["second api fox"].status_code != 200     # its waiter was told
            requests.post(f"{url}/sdapi/v1/interrupt", timeout=10)
            for t in threads:
                t.join(120)
            assert results["third api whale"].status_code == 200
            page.wait_for_function(
                "() => document.querySelector('#txt2img_queue').innerText.includes('Queue (0)')", timeout=15_000)
        finally:
            requests.post(f"{url}/sdapi/v1/interrupt", timeout=10)
            browser.close()
