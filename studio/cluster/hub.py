"""The cluster's one shared actor, pinned to the front's node: where workers say who they are and what
they hold, where the front leaves a job's interrupt/skip flags for the worker running it, and where a
worker on another machine reads the model files the front offers (studio.cluster.files)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from studio.cluster.files import FileOffers, FileRef

HUB_NAME = "studio-hub"
NAMESPACE = "studio"
# a worker that has not reported for this long is shown as lost (it heartbeats every ~2 s)
STALE_S = 10.0
# a lost worker's entry is dropped after this long (Serve has replaced it by then)
FORGET_S = 300.0


class ClusterHub:
    """Threaded actor (max_concurrency > 1): a long file read never holds up a flag or a report."""

    def __init__(self) -> None:
        self._workers: dict[str, dict[str, Any]] = {}
        self._flags: dict[str, dict[str, Any]] = {}
        self._offers = FileOffers()

    # -- workers ------------------------------------------------------------------------
    def report(self, worker_id: str, info: dict[str, Any]) -> None:
        entry = self._workers.setdefault(worker_id, {"id": worker_id, "jobs_done": 0, "failures": 0})
        entry.update(info)
        entry["last_seen"] = time.time()

    def gone(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def workers(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for worker_id, entry in list(self._workers.items()):
            age = now - entry.get("last_seen", 0)
            if age > FORGET_S:
                del self._workers[worker_id]
                continue
            view = dict(entry, seen_s_ago=round(age, 1))
            if age > STALE_S:
                view["state"] = "lost"
            out.append(view)
        return sorted(out, key=lambda e: e.get("started", 0))

    # -- job flags ----------------------------------------------------------------------
    def set_flags(self, job_id: str, interrupted: bool, skips: int) -> None:
        """``skips``: how many times Skip was pressed (a count, so each press skips one image)."""
        self._flags[job_id] = {"interrupted": interrupted, "skips": skips}

    def flags(self, job_id: str) -> dict[str, Any]:
        return self._flags.get(job_id, {"interrupted": False, "skips": 0})

    def forget_job(self, job_id: str) -> None:
        self._flags.pop(job_id, None)

    # -- model files --------------------------------------------------------------------
    def offer(self, refs_and_paths: list[tuple[FileRef, str]]) -> None:
        for ref, path in refs_and_paths:
            self._offers.offer(ref, Path(path))

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        return self._offers.read(sha256, offset, length)


def start_hub() -> Any:
    """The hub actor on this (the front's) node: the files it offers are this node's."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(ClusterHub).options(
        name=HUB_NAME, namespace=NAMESPACE, num_cpus=0, max_concurrency=16, lifetime=None,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), get_if_exists=True)
    return actor.remote()


def hub_handle() -> Any:
    return ray.get_actor(HUB_NAME, namespace=NAMESPACE)
