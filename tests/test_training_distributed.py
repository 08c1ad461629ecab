"""Training on several processes (studio.training.distributed): the command line and environment for the
CPU and for GPUs, what is refused, the request and progress hand-over, and real two-process runs on the
CPU over gloo: both ranks join one process group, the job follows the main one's progress, the LoRA
loads, an interrupt saves what was learned and a failed process is the job's error."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from studio.cli import build_parser, training_request
from studio.config import Flags
from studio.core import Studio
from studio.jobs import JobState
from studio.testing.trainable import make_trainable_checkpoint
from studio.training import distributed
from studio.training.base import TrainingError, TrainSettings
from studio.training.lora import LoraSettings
from studio.training.runner import TrainingRequest
from studio.training.schemas import TrainEmbeddingRequest, TrainLoraRequest
from tests.test_training_engine import make_images


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_dist")
    make_trainable_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.select_checkpoint("tiny-sd1.safetensors")
    yield s
    s.queue.shutdown()


@pytest.fixture(scope="module")
def data(studio):
    return make_images(Path(studio.paths.data) / "dataset", count=4, size=64)


def lora_request(data: Path, name: str, **changes) -> TrainingRequest:
    base = dict(data_dir=str(data), output_name=name, steps=4, resolution=64, min_bucket_reso=64,
                max_bucket_reso=64, learning_rate=5e-3, seed=1, mixed_precision="no", batch_size=1, processes=2)
    return TrainingRequest("lora", TrainSettings(**{**base, **changes}), lora=LoraSettings(rank=2, alpha=2))


# -- fast: no processes started -------------------------------------------------------------------------

def test_launch_command_and_environment(tmp_path):
    job = tmp_path / "job.json"
    cmd = distributed.launch_command(4, job)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--main_process_port") + 1] == "0"        # a free port: other runs may be going
    assert cmd[-3:] == ["--module", distributed.ENTRY_MODULE, str(job)]
    cpu = distributed.launch_env(2, torch.device("cpu"), base={"PATH": "/bin"})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and int(cpu["OMP_NUM_THREADS"]) >= 1
    assert cpu["PYTHONPATH"].split(":")[0] == str(Path(distributed.__file__).resolve().parents[2])
    gpu = distributed.launch_env(8, torch.device("cuda"), base={"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and "OMP_NUM_THREADS" not in gpu


def test_every_door_has_the_field(studio):
    import gradio as gr

    from studio.ui.train import build_train_tab

    ns = build_parser().parse_args(["train", "lora", "--data", "d", "--name", "n", "--processes", "2"])
    assert training_request(ns).settings.processes == 2
    ns = build_parser().parse_args(["train", "embedding", "--data", "d", "--name", "n"])
    assert training_request(ns).settings.processes == 1
    from studio.api.training import lora_body_model

    assert lora_body_model().model_fields["processes"].default == 1
    with gr.Blocks(), gr.Tab("Train"):
        forms = build_train_tab(studio)
    assert "processes" in forms["lora"].bound and "processes" in forms["ti"].bound


def test_what_is_refused(monkeypatch):
    for bad in (0, 65, -1):
        with pytest.raises(ValidationError):
            TrainSettings(data_dir="x", output_name="x", processes=bad)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.check_processes(2, "cuda")
    with pytest.raises(TrainingError, match="need 4 GPUs; this machine has 2"):
        distributed.check_processes(4, "cuda")
    with pytest.raises(TrainingError, match="not mps"):
        distributed.check_processes(2, "mps")
    distributed.check_processes(3, "cpu")       # CPU processes over gloo: any number
    distributed.check_processes(1, "mps")       # one process is today's run anywhere


def test_the_request_crosses_to_the_processes():
    lora = TrainLoraRequest(data_dir="d", output_name="n", rank=8, unet_lr=2e-4, processes=3, seed=5)
    back = TrainingRequest.from_json(json.loads(json.dumps(TrainingRequest("lora", lora, lora=lora).to_json())))
    assert type(back.settings) is TrainLoraRequest and back.settings == lora and back.lora == lora
    emb = TrainingRequest("embedding", TrainEmbeddingRequest(data_dir="d", output_name="e", learn_rate="0.005:3, 1e-4"),
                          learn_rate="0.005:3, 1e-4")
    back = TrainingRequest.from_json(json.loads(json.dumps(emb.to_json())))
    assert back.settings == emb.settings and back.learn_rate == emb.learn_rate and back.lora is None


def test_progress_goes_from_the_main_process_to_the_job(tmp_path):
    from PIL import Image

    child, job = JobState("c", "child"), JobState("j", "job")
    sample = tmp_path / "s.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(sample)
    follower = distributed._Follower(tmp_path / distributed.PROGRESS_FILE, job)
    with distributed.Reporter(tmp_path, child, main=True) as reporter:
        child.set_total(10)
        child.step, child.textinfo = 2, "step 2/10"
        child.losses += [(1, 0.5), (2, 0.25)]
        reporter.report()
        reporter.sample(2, sample)
        follower.poll()
        assert (job.step, job.total, job.textinfo, job.losses) == (2, 10, "step 2/10", [(1, 0.5), (2, 0.25)])
        assert job.preview is not None and job.preview_id == 1 and follower.samples == [sample]
        (tmp_path / distributed.STOP_FILE).touch()   # the job's interrupt reaches every process
        deadline = time.monotonic() + 5
        while not child.interrupted and time.monotonic() < deadline:
            time.sleep(0.05)
    assert child.interrupted
    quiet = distributed.Reporter(tmp_path, JobState("r1", "rank 1"), main=False)
    quiet.report()   # only the main process writes progress
    follower.poll()
    assert job.step == 2


def _collective_rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from studio.training import collective

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)   # a different random init on each process, as a LoRA's would be
        a, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
        collective.broadcast_params([a, b])
        a.grad = torch.full_like(a, float(rank + 1))       # rank 0: 1, rank 1: 2; b has no gradient here
        if rank == 1:
            b.grad = torch.full_like(b, 4.0)
        collective.average_grads([a, b])
        out[rank] = {"a": a.detach().clone(), "b": b.detach().clone(), "ga": a.grad.clone(), "gb": b.grad.clone(),
                     "mean": float(collective.mean(torch.tensor(float(rank)))),
                     "any": collective.any_process(rank == 1, torch.device("cpu")),
                     "none": collective.any_process(False, torch.device("cpu"))}
    finally:
        dist.destroy_process_group()


def test_the_processes_agree_on_weights_gradients_and_stops():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.get_context("fork").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_collective_rank, args=(port, out), nprocs=2, start_method="fork")
        r0, r1 = out[0], out[1]
    assert torch.equal(r0["a"], r1["a"]) and torch.equal(r0["b"], r1["b"])   # rank 0's init everywhere
    assert torch.equal(r0["ga"], torch.full((3, 2), 1.5)) and torch.equal(r1["ga"], r0["ga"])
    assert torch.equal(r0["gb"], torch.full((4,), 2.0, dtype=torch.float64))  # a missing gradient counts as 0
    assert r0["mean"] == r1["mean"] == 0.5
    assert r0["any"] and r1["any"] and not r0["none"] and not r1["none"]


def test_a_failed_process_is_the_jobs_error(tmp_path):
    (tmp_path / distributed.LOG_FILE).write_text("\n".join(f"line {i}" for i in range(100)) + "\nBoom\n")
    follower = distributed._Follower(tmp_path / distributed.PROGRESS_FILE, JobState("j", "job"))
    with pytest.raises(distributed.DistributedTrainingError, match=r"exit code 1(.|\n)*line 99\nBoom") as info:
        distributed._finish(tmp_path, 1, follower, 1.0)
    assert "line 50" not in str(info.value)   # the last lines, not the whole log
    distributed.write_error(tmp_path, 1, RuntimeError("out of memory"))
    with pytest.raises(distributed.DistributedTrainingError, match="process 1 failed: out of memory"):
        distributed._finish(tmp_path, 1, follower, 1.0)
    distributed.write_error(tmp_path, 0, TrainingError("already trained for 4 steps"))
    with pytest.raises(TrainingError, match="already trained"):   # the user's input: a 400, not a crash
        distributed._finish(tmp_path, 1, follower, 1.0)


def test_refused_before_the_queue(studio, data, monkeypatch):
    monkeypatch.setattr(studio.models, "policy", replace(studio.models.policy, device=torch.device("cuda")))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TrainingError, match="need 2 GPUs; this machine has 1"):
        studio.submit_training(lora_request(data, "refused"))


def test_the_processes_see_this_studio(studio):
    flags = Flags(**distributed.child_flags(studio.engine))
    assert flags.data_dir == str(studio.paths.data) and flags.no_half
    from studio.config import Paths

    assert Paths.from_flags(flags) == studio.paths


# -- real processes: accelerate launch, two CPU processes over gloo --------------------------------------

@pytest.mark.slow  # three Python processes (the launcher and two ranks) start: ~15 s idle, 45 s on a busy machine
def test_two_processes_train_one_lora(studio, data):
    from safetensors.torch import load_file

    job = studio.submit_training(lora_request(data, "dist_lora"))
    result = job.wait(600)
    folder = distributed.launch_folder(studio.paths.data, "lora", "dist_lora")
    ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # two processes, one gloo group of two: the Accelerator joined them
    assert [(r["rank"], r["world_size"], r["backend"]) for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert result.step == 4 and not result.interrupted and len(result.losses) == 4
    assert any("2 processes" in note for note in result.notes)
    # the job followed the main process: its steps and losses
    assert (job.state.step, job.state.total) == (4, 4) and [s for s, _ in job.state.losses] == [1, 2, 3, 4]
    path = Path(studio.paths.lora_dirs[0]) / "dist_lora.safetensors"
    assert result.saved == [path] and any(k.startswith("lora_unet_") for k in load_file(path))
    assert studio.networks.loras.find("dist_lora") is not None          # the library was refreshed


@pytest.mark.slow  # two more launches of two processes each
def test_interrupt_and_failure(studio, data):
    job = studio.submit_training(lora_request(data, "dist_stopped", steps=500))

    def stop_after_two_steps():
        while job.state.step < 2 and not job.done.is_set():
            time.sleep(0.05)
        studio.queue.interrupt()

    threading.Thread(target=stop_after_two_steps, daemon=True).start()
    result = job.wait(600)
    assert result.interrupted and 2 <= result.step < 500
    assert (Path(studio.paths.lora_dirs[0]) / "dist_stopped.safetensors").is_file()
    # a process that fails: the dataset went away after the request was checked
    gone = make_images(Path(studio.paths.data) / "gone", count=2, size=64)
    prepared_job = studio.submit_training(lora_request(gone, "dist_failed"))
    for f in gone.iterdir():
        f.unlink()
    with pytest.raises(TrainingError, match="no images"):   # the processes' words, as the user's mistake
        prepared_job.wait(600)
