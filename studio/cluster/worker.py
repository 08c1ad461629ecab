"""A generation worker: one Ray Serve replica that owns one device (a GPU, or a share of the CPU cores)
and a Studio of its own (model manager, caches, extensions), built from the front's flags.

The front routes each job here with Serve's model multiplexing (the model id is the checkpoint's
title), so a job lands on a replica that already holds its checkpoint when one is free. ``generate``
streams Progress events while the job runs and ends with WorkDone; the job itself is the same
``Engine.run`` a single-process studio runs, on one thread that owns the device. This module is only
imported by the cluster front (``--workers`` / ``--ray-address``) and inside the replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from studio.cluster.files import FileRef, ensure_local
from studio.cluster.hub import hub_handle
from studio.cluster.plan import ClusterPlan
from studio.cluster.protocol import ModelSummary, SaverRecorder, VaeSummary, WorkDone, WorkOrder, progress_of
from studio.core import Studio
from studio.generation.saving import OutputSaver
from studio.jobs import JobState

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
POLL_S = 0.2          # how often a running job's progress goes out and its flags are read


class WorkerCore:
    """Everything a replica does; :func:`worker_deployment` adds Serve's decorators around it."""

    def __init__(self, flags: Any, plan: ClusterPlan) -> None:
        import torch

        if plan.gpus == 0:
            torch.set_num_threads(plan.threads)
        self.plan = plan
        self.studio = Studio.create(flags)
        # until the first job brings the front's settings: as many checkpoints as the multiplexing holds
        self.studio.settings.options = self.studio.settings.options.model_copy(
            update={"sd_checkpoints_limit": plan.models})
        self.engine = self.studio.engine
        self.worker_id = serve.get_replica_context().replica_id.unique_id
        self.hub = hub_handle()
        # the one thread that touches the device: loads and jobs never overlap
        self.device_thread = ThreadPoolExecutor(1, thread_name_prefix="studio-device")
        self.loads: Counter[str] = Counter()
        self.jobs_done = 0
        self.failures = 0
        self.state = "idle"
        self.job: str | None = None
        self.error: str | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._report()
        threading.Thread(target=self._heartbeat, name="studio-heartbeat", daemon=True).start()

    # -- what the hub shows -------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        import torch

        return {
            "node": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "device": self.studio.policy.label, "threads": torch.get_num_threads(),
            "checkpoints": [m.info.title for m in self.studio.models.cached()],
            "state": self.state, "job": self.job, "jobs_done": self.jobs_done, "failures": self.failures,
            "loads": dict(self.loads), "error": self.error, "started": self.started,
        }

    def _report(self) -> None:
        try:
            self.hub.report.remote(self.worker_id, self.info())
        except Exception:  # noqa: BLE001 - a report is for the views; the job goes on
            log.debug("worker %s could not report", self.worker_id, exc_info=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._report()

    def status(self) -> dict[str, Any]:
        return {"id": self.worker_id, **self.info()}

    # -- models -------------------------------------------------------------------------
    async def load_model(self, model_id: str) -> str:
        """Serve's multiplexed loader: called when this replica does not hold ``model_id`` yet."""
        self.state = "loading"
        self._report()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.device_thread, self._load, model_id)
        return model_id

    def _load(self, model_id: str) -> None:
        if self.studio.models.catalog.find(model_id) is None:
            # a file the front listed after this worker last scanned (the folders are shared)
            self.studio.models.refresh()
        self.engine.load(model_id)
        self.loads[model_id] += 1

    def _roots(self) -> dict[str, Any]:
        p = self.studio.paths
        return {"Stable-diffusion": p.ckpt_dirs[0], "VAE": p.vae, "Lora": p.lora_dirs[0],
                "hypernetworks": p.hypernetwork_dirs[0], "embeddings": p.embedding_dirs[0],
                "ControlNet": p.controlnet_dirs[0], "text_encoder": p.models / "text_encoder"}

    def sync_files(self, files: tuple[FileRef, ...], state: JobState) -> None:
        """Make the job's model files present on this node (fetched from the front when missing)."""
        if not files:
            return

        def read(sha256: str, offset: int, length: int) -> bytes:
            return ray.get(self.hub.read.remote(sha256, offset, length))

        def progress(ref: FileRef, done: int) -> None:
            state.textinfo = f"Fetching {ref.relpath}: {done >> 20} of {ref.size >> 20} MB"

        fetched = [path for path, new in ensure_local(files, self._roots(), read, on_progress=progress) if new]
        if fetched:
            log.info("worker %s fetched %s", self.worker_id, ", ".join(str(p) for p in fetched))
            self.studio.models.refresh()
            self.studio.vaes.refresh()
            self.studio.networks.refresh()
            self.studio.controlnets.library.refresh()

    # -- jobs ---------------------------------------------------------------------------
    def _run(self, order: WorkOrder, state: JobState) -> WorkDone:
        # the front's settings, in memory only: this worker may share the front's config.json
        # ... keeping as many checkpoints loaded as Serve's multiplexing believes this worker holds
        self.studio.settings.options = order.options.model_copy(update={"sd_checkpoints_limit": self.plan.models})
        recorder = SaverRecorder(OutputSaver.from_options)
        self.engine.make_saver = recorder
        try:
            prepared = self.engine.prepare(order.request, styles_applied=True)
            result = self.engine.run(prepared, state)
        finally:
            self.engine.make_saver = OutputSaver.from_options
        model = result.model
        result.model = ModelSummary(model.info, model.probe.variant, model.label)
        result.vae = VaeSummary(result.vae.filename, result.vae.shorthash) if result.vae is not None else None
        result.paths, result.grid_path = [], None
        return WorkDone(result, recorder.recorded(), self.worker_id)

    async def run_order(self, order: WorkOrder, load: Any):
        """The body of ``generate``: load through Serve's multiplexed loader, run on the device thread,
        stream progress, apply the front's interrupt/skip flags between polls."""
        state = JobState(order.job_id, order.description)
        state.started = time.monotonic()
        self.job, self.state, self.error = order.job_id, "busy", None
        self._report()
        seen = -1
        skips_seen = 0
        try:
            loop = asyncio.get_running_loop()
            if order.files:   # the files first: the checkpoint may be one of them
                self.state = "fetching"
                await loop.run_in_executor(self.device_thread, self.sync_files, order.files, state)
            await load(order.model_id)
            self.state = "busy"
            future = loop.run_in_executor(self.device_thread, self._run, order, state)
            while not future.done():
                await asyncio.wait([future], timeout=POLL_S)
                flags = await self.hub.flags.remote(order.job_id)
                if flags.get("interrupted"):
                    state.interrupted = True
                skips = int(flags.get("skips", 0))
                if skips > skips_seen:   # a skip is an event: the runner clears the flag once used
                    skips_seen, state.skipped = skips, True
                event, seen = progress_of(state, seen, self.worker_id)
                yield event
            done = future.result()
            self.jobs_done += 1
            yield done
        except BaseException as e:
            self.failures += 1
            self.error = f"{type(e).__name__}: {e}"[:500]
            raise
        finally:
            self.job, self.state = None, "idle"
            self._report()


def worker_deployment(plan: ClusterPlan) -> Any:
    """The Serve deployment for ``plan``: the multiplexing cache size is fixed when the class is made."""

    @serve.deployment(name="StudioWorker", max_ongoing_requests=1, health_check_period_s=2,
                      health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    class StudioWorker(WorkerCore):
        @serve.multiplexed(max_num_models_per_replica=plan.models)
        async def get_model(self, model_id: str) -> str:
            return await self.load_model(model_id)

        async def generate(self, order: WorkOrder):
            async for event in self.run_order(order, self.get_model):
                yield event

    return StudioWorker
