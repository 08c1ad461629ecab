"""Skip (the Skip button, POST /sdapi/v1/skip): the running batch stops sampling at once and keeps its
image; the job goes on with its next batch, which runs in full. Interrupt, by contrast, ends the job."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests

from studio.config import Flags
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from tests.helpers import make_models_dir

STEPS = 12
PRESS_AT_CALL = 3


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("skip")
    make_models_dir(root)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.select_checkpoint("tiny-sd1.safetensors")
    yield s
    s.queue.shutdown()


def two_batches(studio: Studio, press_skip: bool) -> tuple[object, Counter]:
    """Two batches of one image; UNet calls counted per batch, Skip pressed during the first batch's
    third call when ``press_skip``."""
    model = studio.select_checkpoint("tiny-sd1.safetensors")
    calls: Counter = Counter()

    def count_and_maybe_press_skip(_module, _args):
        state = studio.queue.current
        calls[state.batch] += 1
        if press_skip and state.batch == 0 and calls[0] == PRESS_AT_CALL:
            assert studio.queue.skip()

    handle = model.unet.register_forward_pre_hook(count_and_maybe_press_skip)
    try:
        result = studio.txt2img(Txt2ImgRequest(prompt="a lighthouse", steps=STEPS, n_iter=2, width=64, height=64,
                                               seed=21, sampler_name="Euler", save_images=False))
    finally:
        handle.remove()
    return result, calls


def test_skip_ends_the_running_batch_early_with_its_image_and_the_job_goes_on(studio):
    full, full_calls = two_batches(studio, press_skip=False)
    skipped, calls = two_batches(studio, press_skip=True)
    per_batch = full_calls[0]
    assert per_batch >= STEPS and full_calls[1] == per_batch
    # the first batch stopped right after the call during which Skip was pressed ...
    assert PRESS_AT_CALL <= calls[0] < per_batch and calls[0] <= PRESS_AT_CALL + per_batch // STEPS
    # ... and still gave its (less denoised) image; the second batch ran in full, unchanged
    assert len(skipped.images) == 2 and not skipped.interrupted and skipped.seeds == full.seeds
    assert calls[1] == per_batch
    assert not np.array_equal(np.asarray(skipped.images[0]), np.asarray(full.images[0]))
    np.testing.assert_array_equal(np.asarray(skipped.images[1]), np.asarray(full.images[1]))


def test_api_skip_ends_the_running_batch_and_the_next_one_starts(server):
    """Through the API: after /skip the first batch takes at most the step already under way, the
    second batch starts, and interrupting it returns both batches' images."""
    api = f"{server.url}/sdapi/v1/"
    result = {}
    body = {"prompt": "a lighthouse", "steps": 150, "width": 64, "height": 64, "seed": 5, "n_iter": 2,
            "sampler_name": "Euler a"}
    worker = threading.Thread(target=lambda: result.setdefault("r", requests.post(api + "txt2img", json=body)))
    worker.start()

    def progress() -> dict:
        return requests.get(api + "progress").json()["state"]

    state = progress()
    while worker.is_alive() and not (state["job_count"] and state["sampling_step"] >= 2):
        time.sleep(0.05)
        state = progress()
    assert worker.is_alive() and state["job_no"] == 0, "the first batch was not seen running"
    assert requests.post(api + "skip").status_code == 200
    after_skip = progress()
    assert after_skip["job_no"] == 1 or (after_skip["skipped"] and after_skip["sampling_step"] < 150)
    last_first_batch_step = after_skip["sampling_step"] if after_skip["job_no"] == 0 else None
    while worker.is_alive() and state["job_no"] == 0:
        state = progress()
        if state["job_no"] == 0 and last_first_batch_step is not None:
            # the flag was set before after_skip was read: at most the step under way then completes
            assert state["sampling_step"] <= last_first_batch_step + 1, (last_first_batch_step, state)
        time.sleep(0.02)
    assert state["job_no"] == 1 and not state["skipped"], state   # the second batch runs, not skipped
    assert requests.post(api + "interrupt").status_code == 200
    worker.join(120)
    reply = result["r"]
    assert reply.status_code == 200
    assert len(reply.json()["images"]) == 2   # an interrupt alone would have ended the job with one image
