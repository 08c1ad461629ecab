"""The generation workers' parts that need no Ray (issue 21): the plan made from the flags, saving
replayed on the front exactly as a local job saves, progress mirrored into the front's JobState, the
files a job needs on a worker, the engine's cluster lane, the Workers view and its route, and Ray
never imported without the flags. tests/test_cluster.py runs the real thing on a local Ray cluster."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from studio.cluster.files import sha256_of
from studio.cluster.plan import make_plan, wants_cluster, worker_flags
from studio.cluster.protocol import SaverRecorder, apply_progress, progress_of, replay_saves
from studio.config import Flags
from studio.core import Studio
from studio.errors import RequestError
from studio.generation.request import Txt2ImgRequest
from studio.generation.saving import OutputSaver
from studio.jobs import JobState
from studio.ui.workers_panel import workers_html
from tests.helpers import REPO, make_models_dir

WAIT = 10.0


# -- the plan ---------------------------------------------------------------------------------
def test_without_the_flags_there_is_no_cluster():
    assert not wants_cluster(Flags())
    assert wants_cluster(Flags(workers=2)) and wants_cluster(Flags(ray_address="auto"))


def test_cpu_workers_share_the_cores_and_gpu_workers_take_one_each():
    cpu = make_plan(Flags(workers=2), cluster_gpus=0, cpu_count=16)
    assert (cpu.workers, cpu.threads, cpu.gpus, cpu.device) == (2, 8, 0.0, "cpu")
    gpu = make_plan(Flags(workers=4), cluster_gpus=4, cpu_count=16)
    assert (gpu.workers, gpu.gpus, gpu.device) == (4, 1.0, "cuda")
    shared = make_plan(Flags(workers=4, worker_gpus=0.5), cluster_gpus=2, cpu_count=16)
    assert shared.gpus == 0.5
    assert make_plan(Flags(workers=2, worker_threads=1), 0, cpu_count=16).threads == 1
    assert make_plan(Flags(workers=2, device="cpu"), cluster_gpus=2).gpus == 0   # --device cpu wins


def test_joining_a_cluster_alone_runs_one_worker_per_gpu():
    assert make_plan(Flags(ray_address="auto"), cluster_gpus=8).workers == 8
    assert make_plan(Flags(ray_address="auto"), cluster_gpus=0).workers == 1


def test_impossible_plans_are_refused_with_the_reason():
    with pytest.raises(RequestError, match="needs 3 GPUs"):
        make_plan(Flags(workers=3), cluster_gpus=2)
    with pytest.raises(RequestError, match="--workers"):
        make_plan(Flags(workers=-1), cluster_gpus=0)
    with pytest.raises(RequestError, match="--worker-models"):
        make_plan(Flags(workers=1, worker_models=0), cluster_gpus=0)


def test_worker_flags_keep_the_folders_or_move_to_the_nodes_own():
    flags = Flags(workers=2, data_dir="/data", lora_dir="/loras", port=7861)
    plan = make_plan(flags, cluster_gpus=0, cpu_count=4)
    shared = worker_flags(flags, plan)
    assert (shared.data_dir, shared.lora_dir, shared.workers, shared.device) == ("/data", "/loras", 0, "cpu")
    local = worker_flags(replace(flags, worker_data_dir="/node"), replace(plan, worker_data_dir="/node"))
    assert (local.data_dir, local.lora_dir, local.no_demo) == ("/node", None, True)


# -- saving on the front ----------------------------------------------------------------------
def _images() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), c) for c in ((200, 20, 20), (20, 200, 20))]


def _saved(folder: Path) -> list[tuple[str, str]]:
    return sorted((str(p.relative_to(folder)), Image.open(p).info.get("parameters", ""))
                  for p in folder.rglob("*.png"))


def test_replayed_saves_write_what_a_local_job_writes(tmp_path):
    options = {"grid_save": True, "samples_save": True}
    req = Txt2ImgRequest(prompt="a red fox", seed=5, batch_size=2, save_images=True)
    direct = OutputSaver.from_options(options, tmp_path / "direct", "txt2img", model_name="tiny", model_hash="abc")
    recorder = SaverRecorder(OutputSaver.from_options)
    remote = recorder(options, tmp_path / "worker", "txt2img", model_name="tiny", model_hash="abc")
    for saver in (direct, remote):
        for i, image in enumerate(_images()):
            saver.save(image, f"a red fox\nSteps: 3, Seed: {5 + i}", 5 + i, req)
        saver.save_grid(_images(), "a red fox\nSteps: 3, Seed: 5", req)
    assert not (tmp_path / "worker").exists()   # the worker wrote nothing

    def make(spec):
        return OutputSaver.from_options(options, tmp_path / "front", spec.kind, model_name=spec.model_name,
                                        model_hash=spec.model_hash)

    paths, grid = replay_saves(recorder.recorded(), make)
    assert len(paths) == 2 and all(p is not None and p.is_file() for p in paths) and grid is not None
    assert _saved(tmp_path / "front") == _saved(tmp_path / "direct") and len(_saved(tmp_path / "direct")) == 3


def test_progress_carries_a_preview_once():
    worker = JobState("task(1)", "txt2img", step=3, total=10, batch=1, batches=2, textinfo="sampling")
    worker.preview, worker.preview_id = Image.new("RGB", (8, 8)), 4
    event, seen = progress_of(worker, -1, "w1")
    assert event.preview is not None and seen == 4
    again, _ = progress_of(worker, seen, "w1")
    assert again.preview is None
    front = JobState("task(1)", "txt2img")
    apply_progress(front, event)
    apply_progress(front, again)
    assert (front.step, front.total, front.batch, front.batches, front.textinfo) == (3, 10, 1, 2, "sampling")
    assert front.preview is not None and front.preview_id == 1


# -- the studio with a cluster ----------------------------------------------------------------
class FakeCluster:
    """Stands in for studio.cluster.front.Cluster: records what it was asked to run."""

    def __init__(self) -> None:
        self.ran: list = []
        self.gate = threading.Event()

    def run(self, prepared, state):
        self.ran.append((prepared.request, threading.current_thread().name))
        self.gate.wait(WAIT)
        return "made on a worker"

    def status(self) -> dict:
        return {"enabled": True, "workers": [{"id": "w1", "state": "idle"}]}

    def shutdown(self) -> None:
        pass


@pytest.fixture
def studio(tmp_path):
    make_models_dir(tmp_path, (("sd1", ".safetensors"), ("sd2", ".safetensors")))
    studio = Studio.create(Flags(data_dir=str(tmp_path), no_half=True, no_demo=True))
    yield studio
    studio.queue.shutdown()


def test_generation_jobs_go_to_the_cluster_lane_and_wait_in_the_one_queue(studio):
    fake = FakeCluster()
    studio.use_cluster(fake)
    studio.queue.add_lane("cluster", 1)
    first = studio.submit_txt2img(Txt2ImgRequest(prompt="one", steps=2, width=64, height=64))
    second = studio.submit_txt2img(Txt2ImgRequest(prompt="two", steps=2, width=64, height=64))
    local = studio.queue.submit(lambda state: "local work", "refresh")
    assert local.wait(WAIT) == "local work"   # the local lane does not wait behind the cluster's jobs
    assert studio.queue.job_count == 2 and first.lane == second.lane == "cluster"
    fake.gate.set()
    assert first.wait(WAIT) == second.wait(WAIT) == "made on a worker"
    assert [r.prompt for r, _ in fake.ran] == ["one", "two"]
    assert all(thread.startswith("studio-cluster") for _, thread in fake.ran)
    assert fake.ran[0][0].seed >= 0   # prepared on the front: the seed is fixed before it leaves
    assert studio.models.current is None   # the front loaded nothing


def test_with_a_cluster_choosing_a_checkpoint_remembers_it_without_loading(studio):
    studio.use_cluster(FakeCluster())
    assert studio.select_checkpoint("tiny-sd2.safetensors") is None
    assert studio.settings.options.sd_model_checkpoint.startswith("tiny-sd2.safetensors")
    assert studio.models.current is None and studio.start_initial_load() is None
    studio.settings.update({"sd_model_checkpoint": ""})
    assert studio.start_initial_load() is None   # nothing chosen: the first is remembered, as a load would
    assert studio.settings.options.sd_model_checkpoint.startswith("tiny-sd1.safetensors")
    with pytest.raises(RequestError, match="not found"):
        studio.select_checkpoint("nope.safetensors")
    assert studio.workers_status()["workers"][0]["id"] == "w1"


def test_without_a_cluster_the_workers_view_shows_this_process(studio):
    import os

    app = FastAPI()
    from studio.api.routes import install_api

    install_api(app, studio)
    status = TestClient(app).get("/studio/v1/workers").json()
    assert status["enabled"] is False and len(status["workers"]) == 1
    worker = status["workers"][0]
    assert worker["pid"] == os.getpid() and worker["state"] == "idle" and worker["checkpoints"] == []


def test_the_manifest_names_the_files_a_job_needs(studio, tmp_path):
    from studio.cluster.manifest import ManifestBuilder
    from studio.testing import tiny_components
    from studio.testing.embeddings import random_vectors, write_kohya_safetensors
    from studio.testing.loras import write_kohya_lora

    lora = studio.paths.lora_dirs[0] / "style" / "harbour.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    write_kohya_lora(lora, tiny_components("sd1", seed=1), "sd1", seed=3)
    emb = studio.paths.embedding_dirs[0] / "cat.safetensors"
    emb.parent.mkdir(parents=True, exist_ok=True)
    write_kohya_safetensors(emb, random_vectors(2, 32))
    studio.refresh_networks()
    info = studio.models.catalog.find("tiny-sd1.safetensors")
    req = Txt2ImgRequest(prompt="a harbour <lora:harbour:0.7> <lora:missing:1>", negative_prompt="cat")
    refs = ManifestBuilder(studio.engine).request(req, studio.settings.options, info)
    by_folder = {ref.folder: (ref, path) for ref, path in refs}
    assert set(by_folder) == {"Stable-diffusion", "Lora", "embeddings"}
    assert by_folder["Lora"][0].relpath == "style/harbour.safetensors"
    assert by_folder["Stable-diffusion"][0].relpath == "tiny-sd1.safetensors"
    for ref, path in refs:
        assert ref.sha256 == sha256_of(path) and ref.size == path.stat().st_size


def test_the_workers_panel_shows_each_worker_and_escapes_what_it_shows():
    status = {"enabled": True, "address": "local", "ready": True, "error": None, "planned_workers": 2,
              "dashboard_url": "http://127.0.0.1:8265",
              "workers": [{"id": "a1", "node": "box", "pid": 12, "device": "cuda:0 · float16 · sdpa", "state": "busy",
                           "checkpoints": ["<b>x</b>.safetensors"], "job": "task(3)", "jobs_done": 4, "failures": 0},
                          {"id": "b2", "node": "box", "pid": 13, "device": "cpu", "state": "lost", "checkpoints": [],
                           "error": "RuntimeError: <oops>"}]}
    page = workers_html(status)
    assert "Ray dashboard" in page and "http://127.0.0.1:8265" in page
    assert "&lt;b&gt;x&lt;/b&gt;.safetensors" in page and "<b>x</b>" not in page
    assert "state-busy" in page and "state-lost" in page and "&lt;oops&gt;" in page
    assert "cuda:0 · float16" in page and "sdpa" not in page
    assert "2 of 2 worker(s)" in page


def test_ray_is_never_imported_without_the_flags(tmp_path):
    make_models_dir(tmp_path)
    code = (
        "import sys\n"
        "from studio.config import parse_flags\n"
        "from studio.server import serve\n"
        f"studio, app = serve(parse_flags(['--nowebui', '--port', '0', '--data-dir', {str(tmp_path)!r}, "
        "'--skip-load-model-at-start']), block=False)\n"
        "print('RAY' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'NO RAY')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("NO RAY"), out.stdout + out.stderr
