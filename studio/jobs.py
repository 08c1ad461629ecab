"""The one job queue: a worker thread owns the device and runs jobs in order.

Front doors submit callables and wait on the returned :class:`Job`; while a job runs,
its :class:`JobState` carries step/total, ETA, the latest live preview and the
interrupt/skip flags that the sampler loop checks between steps.

The waiting jobs are a plain list guarded by one condition variable (not a ``queue.Queue``)
so that the queue panel and the API can cancel and reorder them: the worker always takes
the list's first job. A short record of finished jobs is kept for the same views.

Jobs run in *lanes*: ``local`` (one worker thread: the front's own device, as always) and, with
``--workers``, ``cluster`` (one dispatcher thread per generation worker, each waiting on a remote
job). A lane's thread takes the first waiting job of its lane, so order is kept within a lane and
``job_count`` still counts every job, wherever it runs.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

log = logging.getLogger(__name__)

# How many finished jobs the queue remembers for its views (the panel's "Recent" list).
RECENT_LIMIT = 20


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
    worker: str | None = None       # the generation worker running it (with --workers), for the views

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
    submitted: float = field(default_factory=time.time)   # wall clock, for the views
    lane: str = "local"            # which of the queue's worker lanes runs it

    def summary(self) -> dict[str, Any]:
        """What a queue view shows of a job: its id, kind and the request's main fields."""
        req = self.request
        fields = {}
        if req is not None and hasattr(req, "model_dump"):
            fields = {k: v for k, v in req.model_dump(exclude={"init_images", "mask", "alwayson_scripts"}).items()
                      if k in SUMMARY_FIELDS}
        out = {"id": self.state.job_id, "description": self.state.description, "request": fields}
        if self.state.worker is not None:
            out["worker"] = self.state.worker
        return out

    def wait(self, timeout: float | None = None) -> Any:
        if not self.done.wait(timeout):
            raise TimeoutError(f"job {self.state.job_id} did not finish in {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


class JobCancelled(LookupError):
    """The job was cancelled while it waited in the queue."""


class QueueClosed(RuntimeError):
    """The queue's worker has stopped (after :meth:`JobQueue.shutdown`); nothing runs any more."""


SUMMARY_FIELDS = ("prompt", "negative_prompt", "steps", "sampler_name", "width", "height", "seed", "batch_size",
                  "n_iter", "cfg_scale", "checkpoint")

Outcome = Literal["done", "interrupted", "failed", "cancelled"]


@dataclass(frozen=True)
class FinishedJob:
    """A job that left the queue, as the views list it: no result, no images (those belong to the
    front door that waited for it), only what it was and how it ended."""
    id: str
    description: str
    request: dict[str, Any]
    outcome: Outcome
    error: str | None
    finished: float                 # wall clock (time.time())
    duration: float | None          # seconds it ran; None for a job cancelled while it waited

    @property
    def ok(self) -> bool:
        return self.outcome in ("done", "interrupted")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "description": self.description, "request": self.request, "outcome": self.outcome,
                "ok": self.ok, "error": self.error, "finished": self.finished, "duration": self.duration}


def finished_record(job: Job) -> FinishedJob:
    """How ``job`` ended, once its result or error is set."""
    if job.cancelled:
        outcome: Outcome = "cancelled"
    elif job.error is not None:
        outcome = "failed"
    elif job.state.interrupted or getattr(job.result, "interrupted", False):
        outcome = "interrupted"
    else:
        outcome = "done"
    started = job.state.started
    duration = None if started is None else time.monotonic() - started
    error = None if job.error is None or job.cancelled else (str(job.error) or type(job.error).__name__)
    summary = job.summary()
    return FinishedJob(summary["id"], summary["description"], summary["request"], outcome, error, time.time(),
                       duration)


@dataclass(frozen=True)
class QueueSnapshot:
    """The queue at one instant (taken under its lock, so positions agree with each other)."""
    running: Job | None             # the longest-running job (A1111's one "current" job)
    waiting: list[Job]
    recent: list[FinishedJob]       # newest first
    also_running: list[Job] = field(default_factory=list)   # the others running at once (several workers)

    @property
    def job_count(self) -> int:
        return len(self.waiting) + (self.running is not None) + len(self.also_running)

    def as_dict(self) -> dict[str, Any]:
        """The queue as the API and the queue panel show it: the running job with its progress (position
        0; ``running_all`` lists every running one when several workers run at once), the waiting ones in
        the order they will run (position 1, 2, ...) and the recent ones."""
        running = [_running_dict(job) for job in ([self.running] if self.running else []) + self.also_running]
        waiting = [{**job.summary(), "position": i, "submitted": job.submitted}
                   for i, job in enumerate(self.waiting, start=1)]
        return {"running": running[0] if running else None, "running_all": running, "waiting": waiting,
                "recent": [r.as_dict() for r in self.recent], "job_count": self.job_count}


def _running_dict(job: Job) -> dict[str, Any]:
    s = job.state
    return {**job.summary(), "position": 0, "submitted": job.submitted, "step": s.step, "total": s.total,
            "batch": s.batch, "batches": s.batches, "progress": s.progress, "eta": s.eta, "textinfo": s.textinfo}


class JobQueue:
    def __init__(self, recent_limit: int = RECENT_LIMIT) -> None:
        self._ids = itertools.count(1)
        # one condition guards every field below; the workers sleep on it while nothing waits
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running: list[Job] = []      # in the order they started
        self._recent: deque[FinishedJob] = deque(maxlen=recent_limit)
        self._closing = False
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._lanes: dict[str, int] = {}
        self._live = 0                     # threads still running (the queue has stopped at 0)
        self.add_lane("local", 1)

    def add_lane(self, lane: str, workers: int) -> None:
        """Start ``workers`` more threads that run the jobs submitted to ``lane`` (e.g. one dispatcher per
        remote generation worker). A lane without threads would keep its jobs waiting for ever."""
        with self._cond:
            for _ in range(workers):
                index = self._lanes.get(lane, 0)
                name = "studio-worker" if lane == "local" and index == 0 else f"studio-{lane}-{index}"
                thread = threading.Thread(target=self._run, args=(lane,), name=name, daemon=True)
                self._threads.append(thread)
                self._lanes[lane] = index + 1
                self._live += 1
                thread.start()

    @property
    def lanes(self) -> dict[str, int]:
        """Lane -> how many of its jobs can run at once."""
        with self._cond:
            return dict(self._lanes)

    def submit(self, fn: Callable[[JobState], Any], description: str = "job", request: Any = None,
               lane: str = "local") -> Job:
        job = Job(JobState(job_id=f"task({next(self._ids)})", description=description), fn, request=request,
                  lane=lane)
        with self._cond:
            if not self._stopped:
                self._waiting.append(job)
                self._cond.notify_all()   # the threads of other lanes ignore it
                return job
        # a job submitted after the worker stopped would otherwise wait for ever
        job.error = QueueClosed(f"{job.state.job_id} was not run: the job queue has shut down")
        job.done.set()
        return job

    def waiting(self) -> list[Job]:
        """The jobs not started yet, in the order they will run."""
        with self._cond:
            return list(self._waiting)

    def recent(self) -> list[FinishedJob]:
        """The last finished jobs (run, failed or cancelled), newest first."""
        with self._cond:
            return list(self._recent)

    def snapshot(self) -> QueueSnapshot:
        with self._cond:
            first = self._running[0] if self._running else None
            return QueueSnapshot(first, list(self._waiting), list(self._recent), list(self._running[1:]))

    def position(self, job_id: str) -> int | None:
        """A job's place in line: 0 while it runs, 1 for the next one to run, ...; None once it has
        finished or was cancelled (or never existed)."""
        with self._cond:
            if any(job.state.job_id == job_id for job in self._running):
                return 0
            index = self._index(job_id)
            return None if index is None else index + 1

    def cancel(self, job_id: str) -> bool:
        """Take a waiting job out of the queue; its waiter gets JobCancelled at once. A running job is
        stopped with interrupt() instead. Returns whether a waiting job had that id."""
        with self._cond:
            index = self._index(job_id)
            if index is None:
                return False
            job = self._waiting.pop(index)
            job.cancelled = True
            job.error = JobCancelled(f"{job_id} was cancelled")
        record = finished_record(job)   # outside the lock: it dumps the request
        with self._cond:
            self._recent.appendleft(record)
        job.done.set()
        return True

    def move(self, job_id: str, to_index: int) -> int | None:
        """Put a waiting job at ``to_index`` of the waiting list (0 = runs next; clamped to the list, so
        a large index puts it last). Returns its new position (1-based, as :meth:`position`), or None
        when no waiting job has that id (it may have started or finished meanwhile)."""
        with self._cond:
            index = self._index(job_id)
            if index is None:
                return None
            job = self._waiting.pop(index)
            to = min(max(to_index, 0), len(self._waiting))
            self._waiting.insert(to, job)
            return to + 1

    def place(self, job_id: str, beside_id: str, after: bool = False) -> int | None:
        """Put a waiting job just before (or ``after``) another waiting job, as a drag and drop in the
        queue panel asks: named by the job it lands next to rather than by an index, the move stays
        right when the list changed under the pointer. Returns its new position, or None when either
        job is no longer waiting."""
        with self._cond:
            index, beside = self._index(job_id), self._index(beside_id)
            if index is None or beside is None:
                return None
            if job_id == beside_id:
                return index + 1
            # ``beside``'s index once the job is out of the list, where move() inserts it
            beside -= 1 if index < beside else 0
            return self.move(job_id, beside + (1 if after else 0))   # the condition's lock is reentrant

    def shift(self, job_id: str, delta: int) -> int | None:
        """Move a waiting job ``delta`` places (negative = earlier); see :meth:`move`."""
        with self._cond:
            index = self._index(job_id)
            if index is None:
                return None
            return self.move(job_id, index + delta)   # the condition's lock is reentrant

    def _index(self, job_id: str) -> int | None:
        # callers hold the lock
        for i, job in enumerate(self._waiting):
            if job.state.job_id == job_id:
                return i
        return None

    def run(self, fn: Callable[[JobState], Any], description: str = "job", timeout: float | None = None) -> Any:
        return self.submit(fn, description).wait(timeout)

    def _next(self, lane: str) -> Job | None:
        # callers hold the lock: the first waiting job of the lane
        for i, job in enumerate(self._waiting):
            if job.lane == lane:
                return self._waiting.pop(i)
        return None

    def _run(self, lane: str = "local") -> None:
        while True:
            with self._cond:
                job = self._next(lane)
                while job is None and not self._closing:
                    self._cond.wait()
                    job = self._next(lane)
                if job is None:   # shut down, and every job of the lane submitted before has run
                    self._live -= 1
                    self._stopped = self._live == 0
                    return
                self._running.append(job)
            job.state.started = time.monotonic()
            try:
                job.result = job.fn(job.state)
            except BaseException as e:  # noqa: BLE001 - a failed job must never stop the worker
                job.error = e
                if not isinstance(e, (ValueError, LookupError)):  # user errors need no traceback
                    log.exception("job %s failed", job.state.job_id)
            finally:
                try:
                    record = finished_record(job)
                except Exception:  # noqa: BLE001 - the record is for a view; the waiter must still wake
                    log.exception("could not record job %s", job.state.job_id)
                    record = None
                with self._cond:
                    self._running.remove(job)
                    if record is not None:
                        self._recent.appendleft(record)
                job.done.set()

    @property
    def current(self) -> JobState | None:
        """The longest-running job's state (A1111 has one current job; with several workers, the oldest)."""
        with self._cond:
            return self._running[0].state if self._running else None

    @property
    def current_job(self) -> Job | None:
        with self._cond:
            return self._running[0] if self._running else None

    def running(self) -> list[Job]:
        """Every running job, the longest-running first."""
        with self._cond:
            return list(self._running)

    def find(self, job_id: str) -> Job | None:
        """A running or waiting job by id."""
        with self._cond:
            for job in self._running + self._waiting:
                if job.state.job_id == job_id:
                    return job
        return None

    @property
    def job_count(self) -> int:
        """Jobs queued or running, in every lane (A1111's ``state.job_count``)."""
        with self._cond:
            return len(self._waiting) + len(self._running)

    def _targets(self, job_id: str | None) -> list[JobState]:
        with self._cond:
            return [job.state for job in self._running if job_id is None or job.state.job_id == job_id]

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop the running job ``job_id`` (None: every running job, which is A1111's one current job
        when one worker runs). The sampler loop (or a remote worker, told by its dispatcher) stops it."""
        states = self._targets(job_id)
        for state in states:
            state.interrupted = True
        return bool(states)

    def skip(self, job_id: str | None = None) -> bool:
        """Skip the current image of ``job_id`` (None: of every running job)."""
        states = self._targets(job_id)
        for state in states:
            state.skipped = True
        return bool(states)

    def shutdown(self) -> None:
        """Stop the worker once the jobs already waiting have run (as before: the queue drains first)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker thread to end (after :meth:`shutdown`); whether they all did."""
        end = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)
