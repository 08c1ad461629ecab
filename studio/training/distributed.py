"""A training run on several processes of this machine: one per GPU, or CPU processes over gloo.

``processes > 1`` (a field of every training schema, so the Train tab, ``studio train ... --processes N``
and the API all have it) makes :func:`studio.training.runner.execute` hand the prepared run to
:func:`run`: it writes what the run is into ``<data>/training/<kind>-<name>/launch/job.json`` and starts
``accelerate launch --multi_gpu --num_processes N -m studio.training.launch_main job.json``. Each process
rebuilds a studio on the same data folder, prepares the same request, loads the same checkpoint (on GPU
``LOCAL_RANK``, or the CPU) and calls the same loop; the Accelerator makes them one data-parallel run
(every process takes every N-th batch, the trained tensors' gradients are averaged: the effective batch is
``batch_size x N``), and only the main process writes the files and samples.

The job that started it stays the studio's one training job: it follows the main process's progress
file (step, total, losses, text, samples) into its JobState, turns an interrupt into a stop file the
processes see (they stop together and save, as a one-process run does), and turns a process's failure into
the job's error with the last lines the processes wrote. CPU processes (gloo) are for trying the
data-parallel path without GPUs (the tests do); they are not faster than one process.

The launched module, studio.training.launch_main, may import studio.core (it builds a studio); nothing in
studio imports it, so this module only names it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from studio.config import atomic_write
from studio.jobs import JobState
from studio.training.base import TrainingError, TrainSettings

if TYPE_CHECKING:
    from studio.engine import Engine
    from studio.training.loop import TrainResult

log = logging.getLogger(__name__)

ENTRY_MODULE = "studio.training.launch_main"
LAUNCH_DIR = "launch"
JOB_FILE, PROGRESS_FILE, RESULT_FILE, STOP_FILE, LOG_FILE = (
    "job.json", "progress.jsonl", "result.json", "stop", "launch.log")
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 600.0    # after an interrupt, how long the processes may take to save and leave
TAIL_LINES = 25


class DistributedTrainingError(RuntimeError):
    """A process of a multi-process run failed (not the user's input): the job's error, with its output."""


def check_processes(processes: int, device: torch.device | str) -> None:
    """Refuse, before queueing, a process count this machine cannot run (a 400 in the API)."""
    if processes <= 1:
        return
    device = torch.device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if processes > count:
            raise TrainingError(f"{processes} training processes need {processes} GPUs; this machine has "
                                f"{count}. Set processes to at most {count}.")
    elif device.type != "cpu":
        raise TrainingError(f"multi-process training runs on CUDA GPUs or the CPU, not {device.type}; "
                            "set processes to 1")


def launch_folder(data_dir: Path, kind: str, name: str) -> Path:
    from studio.training.loop import work_dir

    return work_dir(data_dir, kind, name) / LAUNCH_DIR


def launch_command(processes: int, job_file: Path) -> list[str]:
    """``accelerate launch`` of the entry module on ``processes`` local processes.

    ``--multi_gpu`` is accelerate's torchrun launcher; it is also how several CPU processes start
    without MPI: ``--cpu`` alone starts one process (many only through mpirun), while each launched
    process that trains on the CPU asks for ``Accelerator(cpu=True)`` and so gets the MULTI_CPU setup
    over gloo. Every value an accelerate config file could set is given, so a user's
    ``accelerate config`` does not change the run; port 0 picks a free port (other runs may be going)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            "--module", ENTRY_MODULE, str(job_file)]


def launch_env(processes: int, device: torch.device, base: dict[str, str] | None = None) -> dict[str, str]:
    """The processes' environment: this checkout's studio first on the path; on the CPU no GPU at all
    and the cores shared out (torchrun would give each process one thread)."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def child_flags(studio: Engine) -> dict[str, Any]:
    """Flags (studio.config.Flags fields) for a studio in a launched process that sees the same folders
    and makes the same device choices as this one (the device itself is picked per process)."""
    paths, policy = studio.paths, studio.models.policy
    flags: dict[str, Any] = {"data_dir": str(paths.data), "models_dir": str(paths.models),
                             "no_demo": studio.models.demo_dir is None,
                             "no_hashing": not studio.models.catalog.hashing}
    extra = {"ckpt_dir": paths.ckpt_dirs[3:4], "embeddings_dir": paths.embedding_dirs[2:3],
             "lora_dir": paths.lora_dirs[:1], "hypernetwork_dir": paths.hypernetwork_dirs[:1],
             "vae_dir": paths.vae_dirs[:1], "controlnet_dir": paths.controlnet_dirs[:1],
             "text_encoder_dir": paths.text_encoder_dirs[:1]}
    flags.update({name: str(found[0]) for name, found in extra.items() if found})
    if paths.styles_file is not None:
        flags["styles_file"] = str(paths.styles_file)
    if paths.extra_model_paths is not None:
        flags["extra_model_paths_config"] = str(paths.extra_model_paths)
    if policy.dtype == torch.float32:
        flags["no_half"] = True
    elif policy.dtype == torch.bfloat16:
        flags["precision"] = "bf16"
    if policy.vae_dtype == torch.float32 and policy.dtype != torch.float32:
        flags["no_half_vae"] = True
    flags["xformers"] = policy.attention == "xformers"
    flags["opt_split_attention"] = policy.attention == "sliced"
    return flags


@dataclass
class _Follower:
    """Reads the main process's progress file as it grows and puts it into the job's state."""

    path: Path
    state: JobState
    offset: int = 0
    samples: list[Path] = field(default_factory=list)

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1    # a line being written is read next time
        self.offset += end
        for line in chunk[:end].splitlines():
            if line.strip():
                self.apply(json.loads(line))

    def apply(self, event: dict[str, Any]) -> None:
        s = self.state
        if "total" in event:
            s.total = int(event["total"])
        if "step" in event:
            s.step = int(event["step"])
        if event.get("textinfo"):
            s.textinfo = str(event["textinfo"])
        s.losses.extend((int(step), float(loss)) for step, loss in event.get("losses", []))
        if event.get("sample"):
            path = Path(event["sample"])
            self.samples.append(path)
            try:
                from PIL import Image

                with Image.open(path) as image:
                    s.preview = image.copy()
                s.preview_id += 1
            except OSError:
                pass   # a sample that cannot be read is only no preview


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    with path.open(encoding="utf-8", errors="replace") as f:
        return "".join(deque(f, maxlen=lines)).rstrip()


def _stop_group(proc: subprocess.Popen) -> None:
    """End the launcher and its processes (they run in their own session; without process groups,
    the launcher alone, which ends its processes)."""
    for sig, wait in ((signal.SIGTERM, 30), (getattr(signal, "SIGKILL", signal.SIGTERM), 10)):
        try:
            if hasattr(os, "killpg"):
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def write_job(folder: Path, studio: Engine, prepared: Any, checkpoint: str | None,
              device: torch.device) -> Path:
    """A clean launch folder with the job file the launched processes read."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    job = {"request": prepared.request.to_json(), "flags": child_flags(studio), "device": device.type,
           "checkpoint": checkpoint, "folder": str(folder)}
    path = folder / JOB_FILE
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(job, indent=1), encoding="utf-8"))
    return path


def result_from_json(data: dict[str, Any], samples: list[Path]) -> TrainResult:
    from studio.training.loop import TrainResult

    return TrainResult(kind=data["kind"], output_path=Path(data["output"]), step=int(data["step"]),
                       losses=[float(x) for x in data.get("losses", [])], interrupted=bool(data["interrupted"]),
                       saved=[Path(p) for p in data.get("saved", [])],
                       samples=[Path(p) for p in data.get("samples", [])] or samples,
                       notes=list(data.get("notes", [])), resumed_from=int(data.get("resumed_from", 0)),
                       seconds=float(data.get("seconds", 0.0)))


def result_json(result: TrainResult) -> dict[str, Any]:
    return {**result.api_dict(), "losses": result.losses}


def run(studio: Engine, prepared: Any, state: JobState) -> TrainResult:
    """Run ``prepared`` (a studio.training.runner.PreparedTraining) on ``settings.processes`` processes and
    follow it into ``state``; the result is a one-process run's (the files are written by the main process)."""
    settings: TrainSettings = prepared.request.settings
    processes = settings.processes
    device = torch.device(studio.models.policy.device)
    check_processes(processes, device)
    # the checkpoint the processes load: the one asked for, else the one this studio would train on
    checkpoint = studio.models.resolve(settings.checkpoint or studio.initial_checkpoint()).title
    folder = launch_folder(studio.paths.data, prepared.request.kind, settings.output_name)
    job_file = write_job(folder, studio, prepared, checkpoint, device)
    state.textinfo = f"Starting {processes} training processes ({'GPU' if device.type == 'cuda' else 'CPU'})"
    follower = _Follower(folder / PROGRESS_FILE, state)
    started = time.monotonic()
    with (folder / LOG_FILE).open("wb") as out:
        proc = subprocess.Popen(launch_command(processes, job_file), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=launch_env(processes, device), start_new_session=True)
        stop_sent: float | None = None
        try:
            while proc.poll() is None:
                follower.poll()
                if state.interrupted and stop_sent is None:
                    (folder / STOP_FILE).touch()
                    stop_sent = time.monotonic()
                    state.textinfo = "Interrupting: the processes save what they have learned"
                if stop_sent is not None and time.monotonic() - stop_sent > STOP_GRACE_SECONDS:
                    log.warning("Training processes did not stop %.0fs after the interrupt; ending them",
                                STOP_GRACE_SECONDS)
                    _stop_group(proc)
                    break
                time.sleep(POLL_SECONDS)
        except BaseException:
            _stop_group(proc)
            raise
    follower.poll()
    return _finish(folder, proc.returncode, follower, time.monotonic() - started)


def _finish(folder: Path, returncode: int | None, follower: _Follower, seconds: float) -> TrainResult:
    errors = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("error-*.json"))]
    for error in errors:
        if error.get("user"):   # the user's input (a TrainingError in a process): said as such, a 400
            raise TrainingError(error["message"])
    if errors:
        raise DistributedTrainingError(f"training process {errors[0]['rank']} failed: {errors[0]['message']}\n"
                                       f"{_tail(folder / LOG_FILE)}")
    result_file = folder / RESULT_FILE
    if returncode != 0 or not result_file.is_file():
        raise DistributedTrainingError(f"the training processes ended with exit code {returncode} "
                                       f"(output in {folder / LOG_FILE}):\n{_tail(folder / LOG_FILE)}")
    result = result_from_json(json.loads(result_file.read_text(encoding="utf-8")), follower.samples)
    result.seconds = seconds
    return result


# -- in a launched process (studio.training.launch_main) ------------------------------------------------

def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(data), encoding="utf-8"))


def write_rank(folder: Path, rank: int, world_size: int, device: str, backend: str | None = None) -> None:
    """Each process says who it is (rank-<r>.json): what a run's processes were, after the fact; with
    the process group's backend and size once the Accelerator has joined them."""
    _write_json(folder / f"rank-{rank}.json", {"rank": rank, "world_size": world_size, "device": device,
                                               "backend": backend, "pid": os.getpid()})


def write_error(folder: Path, rank: int, error: BaseException) -> None:
    _write_json(folder / f"error-{rank}.json", {"rank": rank, "user": isinstance(error, TrainingError),
                                                "message": str(error) or type(error).__name__})


def write_result(folder: Path, result: TrainResult) -> None:
    _write_json(folder / RESULT_FILE, result_json(result))


class Reporter:
    """In a launched process: sees the stop file (an interrupt of the job) and, in the main process,
    appends the JobState's changes to the progress file the job follows. A thread, because the loop
    reports into a JobState and knows nothing of files."""

    def __init__(self, folder: Path, state: JobState, main: bool):
        import threading

        self.folder, self.state, self.main = folder, state, main
        self._sent: tuple[int, int, str] = (-1, -1, "")
        self._losses = 0
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="training-reporter", daemon=True)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.report()

    def _run(self) -> None:
        while not self._done.wait(POLL_SECONDS):
            if (self.folder / STOP_FILE).exists():
                self.state.interrupted = True
            self.report()

    def _append(self, event: dict[str, Any]) -> None:
        with (self.folder / PROGRESS_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def report(self, **extra: Any) -> None:
        if not self.main:
            return
        with self._lock:
            s = self.state
            now = (s.step, s.total, s.textinfo)
            losses = s.losses[self._losses:]
            if now == self._sent and not losses and not extra:
                return
            self._sent, self._losses = now, self._losses + len(losses)
            self._append({"step": s.step, "total": s.total, "textinfo": s.textinfo,
                          "losses": [list(x) for x in losses], **extra})

    def sample(self, step: int, path: Path) -> None:
        self.report(sample=str(path))
