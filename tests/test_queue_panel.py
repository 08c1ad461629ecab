"""The queue panel's pieces without a browser: the list it renders from the queue's view, the row
buttons' actions on a real JobQueue, the "waiting in queue" line, and the panel built in Blocks
(its refresh, its server function). tests/test_browser_queue.py drives it in Chromium."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import gradio as gr
import pytest

from studio.generation.request import Txt2ImgRequest
from studio.jobs import JobCancelled, JobQueue
from studio.ui.queue_panel import (
    BUSY_INTERVAL,
    IDLE_INTERVAL,
    apply_action,
    build_queue_panel,
    queue_html,
    settings_line,
    waiting_text,
)

WAIT = 5.0


@pytest.fixture
def queue():
    q = JobQueue()
    yield q
    q.shutdown()


@pytest.fixture
def held(queue):
    """A running job that holds the worker until the test ends."""
    gate, started = threading.Event(), threading.Event()
    job = queue.submit(lambda state: started.set() or gate.wait(WAIT), "blocker")
    assert started.wait(WAIT)
    yield job
    gate.set()
    job.wait(WAIT)


def submit(queue: JobQueue, prompt: str, **fields):
    req = Txt2ImgRequest(prompt=prompt, steps=4, width=64, height=96, **fields)
    return queue.submit(lambda state: None, "txt2img", request=req)


def order(queue: JobQueue) -> list[str]:
    return [j.request.prompt for j in queue.waiting()]


def test_settings_line_names_the_main_settings():
    line = settings_line({"width": 512, "height": 768, "steps": 20, "sampler_name": "Euler a", "seed": 42,
                          "n_iter": 2, "batch_size": 3, "cfg_scale": 7.0, "checkpoint": "tiny-sd1"})
    assert line == "512×768 · 20 steps · Euler a · seed 42 · batch 2×3 · CFG 7 · tiny-sd1"
    assert settings_line({"seed": -1, "n_iter": 1, "batch_size": 1}) == "random seed"
    assert settings_line({}) == ""


def test_list_shows_running_and_waiting_rows_with_their_buttons(queue, held):
    held.state.set_total(10)
    held.state.step = 4
    first = submit(queue, "a <b>bold</b> cat " + "x" * 100, seed=3)
    second = submit(queue, "a dog", sampler_name="Euler a")
    text = queue_html(queue.snapshot().as_dict())
    assert "class='queue-row running'" in text and "40%" in text and "data-queue-action='interrupt'" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold" not in text          # prompts are escaped
    assert "…" in text                                                           # and cut short
    assert "64×96 · 4 steps" in text and "seed 3" in text and "Euler a" in text
    rows = text.split("class='queue-row waiting'")[1:]
    assert len(rows) == 2
    assert first.state.job_id in rows[0] and second.state.job_id in rows[1]
    # the first waiting job cannot go up, the last cannot go down
    assert "data-queue-action='up' data-job='task(2)' title='Move up' aria-label='Move up' disabled" in rows[0]
    assert "data-queue-action='down' data-job='task(3)' title='Move down' aria-label='Move down' disabled" \
        in rows[1]
    assert rows[0].count("disabled") == 1 and rows[1].count("disabled") == 1


def test_empty_queue_and_recent_jobs(queue):
    assert "Nothing running or queued" in queue_html(queue.snapshot().as_dict())
    job = submit(queue, "a finished fox")
    job.wait(WAIT)
    broken = queue.submit(lambda state: (_ for _ in ()).throw(ValueError("steps: too many")), "txt2img")
    with pytest.raises(ValueError):
        broken.wait(WAIT)
    text = queue_html(queue.snapshot().as_dict(), note="task(9) is no longer waiting")
    assert "<details class='queue-recent'><summary>Recent (2)</summary>" in text
    assert "a finished fox" in text and "class='queue-meta'>done " in text
    assert "failed " in text and "(steps: too many)" in text
    assert "class='queue-note'>task(9) is no longer waiting" in text


def test_row_actions_reorder_cancel_and_say_when_too_late(queue, held):
    a, b, c = (submit(queue, p) for p in ("a", "b", "c"))
    assert apply_action(queue, "up", c.state.job_id) is None and order(queue) == ["a", "c", "b"]
    assert apply_action(queue, "down", a.state.job_id) is None and order(queue) == ["c", "a", "b"]
    assert apply_action(queue, "first", b.state.job_id) is None and order(queue) == ["b", "c", "a"]
    assert apply_action(queue, "cancel", c.state.job_id) is None and order(queue) == ["b", "a"]
    with pytest.raises(JobCancelled):
        c.wait(WAIT)
    assert "no longer waiting" in apply_action(queue, "up", c.state.job_id)
    assert "no longer waiting" in apply_action(queue, "cancel", held.state.job_id)
    assert "unknown queue action" in apply_action(queue, "explode", a.state.job_id)
    assert "not running" in apply_action(queue, "interrupt", a.state.job_id)
    assert apply_action(queue, "interrupt", held.state.job_id) is None and held.state.interrupted


def test_a_drop_places_the_job_beside_the_row_it_lands_on(queue, held):
    a, b, c, d = (submit(queue, p) for p in "abcd")
    assert apply_action(queue, "drop", d.state.job_id, a.state.job_id) is None and order(queue) == list("dabc")
    assert apply_action(queue, "drop", d.state.job_id, b.state.job_id, after=True) is None
    assert order(queue) == list("abdc")
    assert apply_action(queue, "drop", a.state.job_id, c.state.job_id, after=True) is None
    assert order(queue) == list("bdca")
    assert apply_action(queue, "drop", a.state.job_id, a.state.job_id) is None and order(queue) == list("bdca")
    # the row it was dropped on started or was cancelled meanwhile: nothing moves, and the list says why
    assert "no longer waiting" in apply_action(queue, "drop", a.state.job_id, held.state.job_id)
    queue.cancel(c.state.job_id)
    assert "no longer waiting" in apply_action(queue, "drop", c.state.job_id, b.state.job_id)
    assert order(queue) == list("bda")
    # only waiting rows are draggable, and only when there is another to drop on
    text = queue_html(queue.snapshot().as_dict())
    assert text.count("draggable='true'") == 3
    assert f"class='queue-row running' data-job='{held.state.job_id}'>" in text
    queue.cancel(b.state.job_id)
    queue.cancel(d.state.job_id)
    assert "draggable" not in queue_html(queue.snapshot().as_dict())


def test_waiting_text_says_where_a_job_is(queue, held):
    a, b = submit(queue, "a"), submit(queue, "b")
    assert waiting_text(queue, b.state.job_id) == "Waiting in queue: position 2 of 2"
    queue.move(b.state.job_id, 0)
    assert waiting_text(queue, b.state.job_id) == "Waiting in queue: position 1 of 2"
    assert waiting_text(queue, held.state.job_id) is None       # running
    assert waiting_text(queue, "task(999)") is None
    assert a


def test_panel_in_blocks_refreshes_and_acts(queue, held):
    studio = SimpleNamespace(queue=queue)
    with gr.Blocks():
        panel = build_queue_panel(studio, "txt2img")
    assert panel.accordion.elem_id == "txt2img_queue" and panel.rows.elem_id == "txt2img_queue_list"
    job = submit(queue, "a queued owl")
    rows, accordion, timer = panel.refresh()
    assert "a queued owl" in rows
    assert accordion.label == "Queue (2)" and timer.value == BUSY_INTERVAL
    # the row buttons call the component's server function, which answers the new list
    answer = panel.rows.queue_action({"action": "cancel", "id": job.state.job_id})
    assert "a queued owl" not in answer.split("queue-recent")[0] and "cancelled" in answer
    assert "no longer waiting" in panel.rows.queue_action({"action": "up", "id": job.state.job_id})
    assert "unknown queue action" in panel.rows.queue_action(None)


def test_idle_panel_refreshes_slowly():
    q = JobQueue()
    try:
        with gr.Blocks():
            panel = build_queue_panel(SimpleNamespace(queue=q))
        rows, accordion, timer = panel.refresh()
        assert accordion.label == "Queue (0)" and timer.value == IDLE_INTERVAL and "Nothing running" in rows
    finally:
        q.shutdown()


def test_with_several_workers_every_running_job_has_its_row_and_its_own_interrupt():
    q = JobQueue()
    q.add_lane("cluster", 2)
    gate, started = threading.Event(), threading.Semaphore(0)

    def run(state):
        state.worker = f"w-{state.description}"
        started.release()
        gate.wait(WAIT)
        return state.interrupted

    a = q.submit(run, "a", lane="cluster")
    b = q.submit(run, "b", lane="cluster")
    assert started.acquire(timeout=WAIT) and started.acquire(timeout=WAIT)
    page = queue_html(q.snapshot().as_dict())
    assert page.count("class='queue-row running'") == 2
    assert "worker w-a" in page and "worker w-b" in page
    assert apply_action(q, "interrupt", b.state.job_id) is None
    gate.set()
    assert b.wait(WAIT) is True and a.wait(WAIT) is False   # only b was interrupted
    assert apply_action(q, "interrupt", a.state.job_id) == f"{a.state.job_id} is not running any more"
    q.shutdown()
