"""The one job queue: a single worker thread owns the device and runs jobs in order.

Front doors submit callables and wait on the returned :class:`Job`; while a job runs,
its :class:`JobState` carries step/total, ETA, the latest live preview and the
interrupt/skip flags that the sampler loop checks between steps.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)


@dataclass
class JobState:
    job_id: str
    description: str
    step: int = 0
    total: int = 0
    batch: int = 0
    batches: int = 1
    started: float | None = None
    interrupted: bool = False
    skipped: bool = False
    preview: Image.Image | None = None
    preview_id: int = 0
    textinfo: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)   # training: (step, loss)

    def set_total(self, total: int) -> None:
        self.total, self.step = total, 0

    def advance(self, preview: Callable[[], Image.Image] | None = None) -> None:
        self.step += 1
        if preview is not None:
            self.preview = preview()
            self.preview_id += 1

    @property
    def progress(self) -> float:
        """Fraction over all batches (A1111 counts sampling steps of the whole job)."""
        if not self.total:
            return 0.0
        done = self.batch * self.total + self.step
        return min(1.0, done / (self.total * max(self.batches, 1)))

    @property
    def eta(self) -> float | None:
        p = self.progress
        if not self.started or p <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / p - elapsed


@dataclass
class Job:
    state: JobState
    fn: Callable[[JobState], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    request: Any = None            # the typed request the job runs (None for loads, refreshes...)
    cancelled: bool = False

    def summary(self) -> dict[str, Any]:
        """What a queue view shows of a job: its id, kind and the request's main fields."""
        req = self.request
        fields = {}
        if req is not None and hasattr(req, "model_dump"):
            fields = {k: v for k, v in req.model_dump(exclude={"init_images", "mask", "alwayson_scripts"}).items()
                      if k in SUMMARY_FIELDS}
        return {"id": self.state.job_id, "description": self.state.description, "request": fields}

    def wait(self, timeout: float | None = None) -> Any:
        if not self.done.wait(timeout):
            raise TimeoutError(f"job {self.state.job_id} did not finish in {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


class JobCancelled(LookupError):
    """The job was cancelled while it waited in the queue."""


SUMMARY_FIELDS = ("prompt", "negative_prompt", "steps", "sampler_name", "width", "height", "seed", "batch_size",
                  "n_iter", "cfg_scale", "checkpoint")


class JobQueue:
    def __init__(self) -> None:
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._pending = 0
        self._waiting: list[Job] = []
        self._worker = threading.Thread(target=self._run, name="studio-worker", daemon=True)
        self._worker.start()

    def submit(self, fn: Callable[[JobState], Any], description: str = "job", request: Any = None) -> Job:
        job = Job(JobState(job_id=f"task({next(self._ids)})", description=description), fn, request=request)
        with self._lock:
            self._pending += 1
            self._waiting.append(job)
        self._queue.put(job)
        return job

    def waiting(self) -> list[Job]:
        """The jobs not started yet, oldest first."""
        with self._lock:
            return list(self._waiting)

    def cancel(self, job_id: str) -> bool:
        """Take a waiting job out of the queue (its waiter gets JobCancelled). A running job is
        stopped with interrupt() instead. Returns whether a waiting job had that id."""
        with self._lock:
            for job in self._waiting:
                if job.state.job_id == job_id:
                    job.cancelled = True
                    return True
        return False

    def run(self, fn: Callable[[JobState], Any], description: str = "job", timeout: float | None = None) -> Any:
        return self.submit(fn, description).wait(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.remove(job)
                if job.cancelled:
                    self._pending -= 1
                    job.error = JobCancelled(f"{job.state.job_id} was cancelled")
                    job.done.set()
                    continue
                self._current = job
            job.state.started = time.monotonic()
            try:
                job.result = job.fn(job.state)
            except BaseException as e:  # noqa: BLE001 - a failed job must never stop the worker
                job.error = e
                if not isinstance(e, (ValueError, LookupError)):  # user errors need no traceback
                    log.exception("job %s failed", job.state.job_id)
            finally:
                with self._lock:
                    self._current = None
                    self._pending -= 1
                job.done.set()

    @property
    def current(self) -> JobState | None:
        with self._lock:
            return self._current.state if self._current else None

    @property
    def job_count(self) -> int:
        """Jobs queued or running (A1111's ``state.job_count``)."""
        with self._lock:
            return self._pending

    def interrupt(self) -> bool:
        state = self.current
        if state:
            state.interrupted = True
        return state is not None

    def skip(self) -> bool:
        state = self.current
        if state:
            state.skipped = True
        return state is not None

    def shutdown(self) -> None:
        self._queue.put(None)
