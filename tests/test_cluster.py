"""Generation workers on Ray Serve (issue 21), end to end: app.py started with --workers 2 as a user
starts it, on a local Ray cluster with tiny models, driven over the A1111 API. Slow (a Ray cluster and
two worker processes each building a studio): the CI's slow step runs it."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from tests.helpers import make_models_dir, running_server

pytest.importorskip("ray.serve", reason="the cluster extra is not installed (pip install -e .[cluster])")

pytestmark = pytest.mark.slow

READY_S = 300


def wait_workers(url: str, count: int, timeout: float = READY_S) -> dict:
    end = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < end:
        status = requests.get(f"{url}/studio/v1/workers", timeout=30).json()
        assert not status.get("error"), status["error"]
        live = [w for w in status["workers"] if w.get("state") != "lost"]
        if status.get("ready") and len(live) >= count:
            return status
        time.sleep(1)
    raise AssertionError(f"{count} workers did not report: {status}")


def txt2img(url: str, **fields) -> requests.Response:
    body = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"} | fields
    return requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    make_models_dir(root, (("sd1", ".safetensors"), ("sd2", ".safetensors")))
    with running_server(root, "--nowebui", "--workers", "2", "--worker-threads", "1", "--no-demo") as srv:
        wait_workers(srv.url, 2)
        srv.titles = [m["title"] for m in requests.get(f"{srv.url}/sdapi/v1/sd-models", timeout=30).json()]
        yield srv


def test_twenty_requests_over_two_checkpoints_are_all_served_and_saved_once(cluster):
    outputs = cluster.data_dir / "outputs" / "txt2img-images"
    before = set(outputs.rglob("*.png")) if outputs.exists() else set()
    titles = cluster.titles

    def one(i: int) -> tuple[int, dict]:
        r = txt2img(cluster.url, prompt=f"harbour {i}", seed=100 + i, save_images=True,
                    override_settings={"sd_model_checkpoint": titles[i % 2]})
        assert r.status_code == 200, r.text
        return i, json.loads(r.json()["info"])

    with ThreadPoolExecutor(20) as pool:
        results = dict(pool.map(one, range(20)))
    for i, info in results.items():
        assert info["seed"] == 100 + i and info["sd_model_name"] == titles[i % 2].rsplit(".", 1)[0]
    new = set(outputs.rglob("*.png")) - before
    assert len(new) == 20, sorted(p.name for p in new)   # every image saved once, on the front
    assert len({p.name for p in new}) == 20
    status = requests.get(f"{cluster.url}/studio/v1/workers", timeout=30).json()
    workers = [w for w in status["workers"] if w.get("state") != "lost"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    assert sum(w["jobs_done"] for w in workers) >= 20
    for w in workers:   # routed by checkpoint: no worker loaded a checkpoint twice
        assert all(n == 1 for n in w["loads"].values()), w["loads"]
    # the front never loaded a model itself
    memory = requests.get(f"{cluster.url}/sdapi/v1/options", timeout=30).json()
    assert memory["sd_model_checkpoint"] in (None, "", *titles)


def test_a_worker_killed_mid_job_costs_one_retry_and_the_client_gets_its_image(cluster):
    result: dict = {}

    def slow_job() -> None:
        result["response"] = txt2img(cluster.url, steps=150, width=160, height=160, seed=7)

    thread = threading.Thread(target=slow_job)
    thread.start()
    victim = None
    end = time.monotonic() + 120
    while victim is None and time.monotonic() < end:
        queue = requests.get(f"{cluster.url}/studio/v1/queue", timeout=30).json()
        running = [r for r in queue["running_all"] if r.get("worker") and r["step"] > 2]
        if running:
            status = requests.get(f"{cluster.url}/studio/v1/workers", timeout=30).json()
            victim = next((w for w in status["workers"] if w["id"] == running[0]["worker"]), None)
        time.sleep(0.2)
    assert victim is not None, "the job never started on a worker"
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(600)
    r = result["response"]
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (160, 160)
    # Ray Serve replaces the dead replica: two live workers again
    wait_workers(cluster.url, 2)
    recent = requests.get(f"{cluster.url}/studio/v1/queue", timeout=30).json()["recent"]
    assert recent[0]["outcome"] == "done"


def test_progress_and_interrupt_reach_jobs_on_both_workers(cluster):
    responses: list[requests.Response] = []

    def long_job(seed: int) -> None:
        responses.append(txt2img(cluster.url, steps=150, width=192, height=192, seed=seed))

    threads = [threading.Thread(target=long_job, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    end = time.monotonic() + 180
    running: list = []
    while time.monotonic() < end:
        queue = requests.get(f"{cluster.url}/studio/v1/queue", timeout=30).json()
        running = [r for r in queue["running_all"] if r.get("worker") and r["step"] >= 2]
        if len(running) == 2:
            break
        time.sleep(0.2)
    assert len(running) == 2 and running[0]["worker"] != running[1]["worker"], (running, queue)
    progress = requests.get(f"{cluster.url}/sdapi/v1/progress", timeout=30).json()
    assert progress["state"]["job_count"] == 2 and 0 < progress["progress"] < 1
    assert progress["current_image"] is not None or progress["state"]["sampling_step"] > 0
    requests.post(f"{cluster.url}/sdapi/v1/interrupt", timeout=30)
    for t in threads:
        t.join(120)
    assert len(responses) == 2 and all(r.status_code == 200 for r in responses)
    for r in responses:   # stopped early: the steps run are far fewer than asked
        info = json.loads(r.json()["info"])
        assert info["interrupted"] is True
    assert requests.get(f"{cluster.url}/sdapi/v1/progress", timeout=30).json()["state"]["job_count"] == 0


def test_a_bad_request_is_refused_and_the_workers_keep_serving(cluster):
    r = txt2img(cluster.url, override_settings={"sd_model_checkpoint": "no-such-model"})
    assert r.status_code in (400, 404, 422), r.text
    r = txt2img(cluster.url, prompt="<lora:nowhere:1> a cat")   # a missing LoRA: a note, as without workers
    assert r.status_code == 200
    assert txt2img(cluster.url, seed=3).status_code == 200


def test_a_checkpoint_a_worker_cannot_load_is_reported_and_the_others_keep_serving(cluster):
    broken = cluster.data_dir / "models" / "Stable-diffusion" / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    try:
        # the workers serving now (a replica killed by an earlier test may still be listed as lost)
        serving = {w["id"] for w in wait_workers(cluster.url, 2)["workers"] if w.get("state") != "lost"}
        requests.post(f"{cluster.url}/sdapi/v1/refresh-checkpoints", timeout=60)
        r = txt2img(cluster.url, override_settings={"sd_model_checkpoint": "broken.safetensors"})
        assert 400 <= r.status_code < 600 and r.status_code != 200
        assert "broken.safetensors" in r.text, r.text   # the message names the file
        assert txt2img(cluster.url, seed=4).status_code == 200
        after = {w["id"]: w for w in wait_workers(cluster.url, 2)["workers"]}
        assert serving <= set(after), f"a worker went away after a failed load: {serving - set(after)}"
        assert all(after[i]["state"] != "lost" for i in serving), [after[i] for i in serving]
    finally:
        broken.unlink()


@pytest.fixture(scope="module")
def remote_node(tmp_path_factory):
    """One worker with its own, empty models folder (another machine's disk): it must fetch the files."""
    from studio.testing import tiny_components
    from studio.testing.loras import write_kohya_lora

    root = tmp_path_factory.mktemp("front")
    make_models_dir(root, (("sd1", ".safetensors"),))
    lora_dir = root / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    write_kohya_lora(lora_dir / "harbourlight.safetensors", tiny_components("sd1", seed=1), "sd1", seed=3)
    node = tmp_path_factory.mktemp("node")
    with running_server(root, "--nowebui", "--workers", "1", "--worker-data-dir", str(node), "--no-demo") as srv:
        wait_workers(srv.url, 1)
        srv.node = node
        yield srv


def test_a_worker_without_the_files_fetches_them_verified(remote_node):
    from studio.cluster.files import sha256_of

    r = txt2img(remote_node.url, prompt="a harbour <lora:harbourlight:0.8>", save_images=True)
    assert r.status_code == 200, r.text
    front = remote_node.data_dir / "models"
    node = remote_node.node / "models"
    for sub in ("Stable-diffusion/tiny-sd1.safetensors", "Lora/harbourlight.safetensors"):
        assert (node / sub).is_file(), f"{sub} was not fetched"
        assert sha256_of(node / sub) == sha256_of(front / sub)
    info = json.loads(r.json()["info"])
    assert "harbourlight" in info["infotexts"][0]   # the LoRA was applied on the worker
    saved = list((remote_node.data_dir / "outputs").rglob("*.png"))
    assert len(saved) == 1 and not list((remote_node.node / "outputs").rglob("*.png"))
