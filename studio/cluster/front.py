"""The front's side of ``--workers`` / ``--ray-address``: start (or join) Ray, deploy the generation
workers on Ray Serve, and run each queued generation job on one of them.

The front keeps its one JobQueue: a generation job waits there as always (the queue view, reorder,
cancel and ``job_count`` see it) and, when one of the cluster lane's dispatcher threads takes it, is
sent to Serve with the checkpoint as the multiplexed model id, so it lands on a worker that holds that
checkpoint when one is free. Progress streams back into the job's JobState; interrupt and skip go the
other way through the hub. A worker that dies mid-job costs the job one retry (Serve routes the retry
to a live replica and replaces the dead one); images come back and are saved here, once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray
from ray import serve

from studio.cluster.hub import NAMESPACE, start_hub
from studio.cluster.manifest import ManifestBuilder
from studio.cluster.plan import ClusterPlan, make_plan, worker_flags
from studio.cluster.protocol import Progress, WorkDone, WorkOrder, apply_progress, replay_saves
from studio.cluster.worker import worker_deployment
from studio.errors import RequestError
from studio.generation.saving import OutputSaver

log = logging.getLogger(__name__)

APP_NAME = "studio-workers"
RETRIES = 1                 # a job whose worker died runs once more, elsewhere
START_TIMEOUT_S = 900.0     # a worker builds a whole studio and may first have to import torch


class ClusterError(RuntimeError):
    """The cluster could not run a job (it did not start, or a job's workers died twice)."""


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rex

    return tuple(e for e in (getattr(rex, n, None) for n in (
        "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
        "OutOfMemoryError", "ObjectLostError")) if isinstance(e, type))


class Cluster:
    """Owns the Ray connection, the hub and the Serve application; ``run`` is a cluster job's body."""

    def __init__(self, flags: Any, engine: Any) -> None:
        self.flags = flags
        self.engine = engine
        self.plan: ClusterPlan | None = None
        self.handle: Any = None
        self.hub: Any = None
        self.dashboard_url: str | None = None
        self.error: str | None = None
        self.manifest = ManifestBuilder(engine)
        self._ready = threading.Event()
        self._started = time.time()

    # -- start / stop -------------------------------------------------------------------
    def start(self) -> Cluster:
        """Connect, deploy, wait for the workers. Errors are kept for the jobs and the views."""
        try:
            self._start()
        except Exception as e:  # noqa: BLE001 - reported on every job and in the Workers panel
            self.error = self.error or f"the generation workers did not start: {type(e).__name__}: {e}"
            log.exception("%s", self.error)
        finally:
            # the lane's dispatchers: one per worker (queued jobs waited for them; after a failed start
            # one dispatcher answers them with the error)
            self.engine.queue.add_lane("cluster", self.plan.workers if self.plan and not self.error else 1)
            self._ready.set()
        return self

    def start_in_background(self) -> threading.Thread:
        """Connect now, on this thread; deploy the workers on another. Ray's local cluster processes end
        with the *thread* that started them (they watch their parent with PR_SET_PDEATHSIG), so
        ``ray.init`` must run on a thread that lives as long as the studio: the caller's main thread."""
        try:
            self.connect()
        except Exception as e:  # noqa: BLE001 - reported on every job and in the Workers panel
            self.error = f"could not start or join the Ray cluster: {e}"
            log.error("%s", self.error)
        thread = threading.Thread(target=self.start, name="studio-cluster-start", daemon=True)
        thread.start()
        return thread

    def connect(self) -> None:
        if ray.is_initialized():
            return
        flags = self.flags
        if flags.ray_address:
            context = ray.init(address=flags.ray_address, namespace=NAMESPACE, log_to_driver=True)
        else:
            context = ray.init(namespace=NAMESPACE, include_dashboard=bool(flags.ray_dashboard),
                               num_cpus=max(os.cpu_count() or 1, flags.workers or 1), log_to_driver=True)
        # Ray's serializer imports pydantic.v1 on first use; done here, on the main thread, it cannot race
        # the UI's imports on another thread (a KeyError from importlib otherwise, now and then)
        ray.get(ray.put(None))
        url = getattr(context, "dashboard_url", None)
        self.dashboard_url = f"http://{url}" if url and not str(url).startswith("http") else (url or None)

    def _start(self) -> None:
        if self.error:
            raise ClusterError(self.error)
        self.connect()
        flags = self.flags
        self.plan = plan = make_plan(flags, float(ray.cluster_resources().get("GPU", 0)))
        self.hub = start_hub()
        serve.start(http_options={"location": "NoServer"})
        options: dict[str, Any] = {"num_cpus": 1 if plan.gpus == 0 else 0.5}
        if plan.gpus:
            options["num_gpus"] = plan.gpus
        deployment = worker_deployment(plan).options(num_replicas=plan.workers, ray_actor_options=options)
        log.info("Starting %d generation worker(s) (%s, %d thread(s) each)", plan.workers, plan.device, plan.threads)
        self.handle = serve.run(deployment.bind(worker_flags(flags, plan), plan), name=APP_NAME, route_prefix=None)
        log.info("Generation workers ready in %.1f s", time.time() - self._started)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        if not self._ready.wait(timeout):
            raise ClusterError(f"the generation workers are still starting after {timeout:.0f} s")
        if self.error:
            raise ClusterError(self.error)

    def shutdown(self) -> None:
        try:
            if self.handle is not None:
                serve.delete(APP_NAME)
            serve.shutdown()
        except Exception:  # noqa: BLE001 - shutting down: nothing left to report to
            log.debug("serve shutdown", exc_info=True)
        if ray.is_initialized():
            ray.shutdown()

    # -- jobs ---------------------------------------------------------------------------
    def model_for(self, req: Any) -> Any:
        """The checkpoint a job runs on, decided here so Serve can route by it."""
        catalog = self.engine.models.catalog
        query = req.checkpoint or self.engine.initial_checkpoint()
        info = catalog.find(query) if query else None
        if info is None and query:
            raise RequestError(f"checkpoint {query!r} not found (GET /sdapi/v1/sd-models lists them)")
        if info is None:
            items = catalog.items()
            if not items:
                raise RequestError("no checkpoint: put a model file into models/Stable-diffusion")
            info = items[0]
        return info

    def run(self, prepared: Any, state: Any) -> Any:
        """A cluster-lane job: send the prepared request to a worker, mirror its progress, save its images."""
        self.wait_ready()
        req, options = prepared.request, self.engine.settings.options
        info = self.model_for(req)
        files: tuple = ()
        if self.plan is not None and (self.plan.address or self.plan.worker_data_dir):
            offered = self.manifest.request(req, prepared.options, info)
            if offered:
                ray.get(self.hub.offer.remote([(ref, str(path)) for ref, path in offered]))
            files = tuple(ref for ref, _ in offered)
        # by its file name, not its title: a node that just fetched the file has not hashed it yet
        order = WorkOrder(state.job_id, state.description, req.model_copy(update={"checkpoint": info.name}),
                          options, info.name, files)
        lost = _lost_worker_errors()
        try:
            for attempt in range(1, RETRIES + 2):
                try:
                    done = self._stream(order, state)
                    break
                except lost as e:
                    if attempt > RETRIES or state.interrupted:
                        raise ClusterError(f"the worker running {state.job_id} stopped ({type(e).__name__}), "
                                           f"and so did the one that retried it: {e}") from e
                    log.warning("worker lost during %s (%s): retrying on another worker", state.job_id, e)
                    state.textinfo = "A worker stopped: running the job again on another"
                    state.worker = None
                    order = WorkOrder(order.job_id, order.description, order.request, order.options,
                                      order.model_id, order.files, attempt + 1)
        finally:
            try:
                self.hub.forget_job.remote(state.job_id)
            except Exception:  # noqa: BLE001
                pass
        return self._finish(done, prepared)

    def _stream(self, order: WorkOrder, state: Any) -> WorkDone:
        from ray.exceptions import RayTaskError

        sent = (False, 0)
        skips = 0
        done: WorkDone | None = None
        stream = self.handle.options(multiplexed_model_id=order.model_id, stream=True).generate.remote(order)
        try:
            for event in stream:
                if isinstance(event, Progress):
                    apply_progress(state, event)
                    state.worker = event.worker or state.worker
                elif isinstance(event, WorkDone):
                    done = event
                if state.skipped:   # a press of Skip: counted, and cleared here as the runner clears it
                    skips, state.skipped = skips + 1, False
                wanted = (bool(state.interrupted), skips)
                if wanted != sent:
                    self.hub.set_flags.remote(order.job_id, *wanted)
                    sent = wanted
        except RayTaskError as e:   # the job's own error (a bad request, a missing file): as if run here
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        if done is None:
            raise ClusterError(f"{order.job_id}: the worker ended the job without a result")
        return done

    def _finish(self, done: WorkDone, prepared: Any) -> Any:
        result = done.result
        options = prepared.options.model_dump()
        data = self.engine.paths.data

        def make_saver(spec: Any) -> OutputSaver:
            return OutputSaver.from_options(options, data, spec.kind, model_name=spec.model_name,
                                            model_hash=spec.model_hash, vae_filename=spec.vae_filename,
                                            styles=dict(spec.styles) or None)

        result.paths, result.grid_path = replay_saves(done.saves, make_saver)
        return result

    # -- views --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        workers: list[dict[str, Any]] = []
        if self.hub is not None:
            try:
                workers = ray.get(self.hub.workers.remote(), timeout=5)
            except Exception as e:  # noqa: BLE001 - the view says what went wrong
                self.error = self.error or f"the hub did not answer: {e}"
        plan = self.plan
        return {
            "enabled": True, "mode": "ray", "address": self.flags.ray_address or "local",
            "ready": self._ready.is_set() and self.error is None, "error": self.error,
            "dashboard_url": self.dashboard_url,
            "planned_workers": plan.workers if plan else self.flags.workers,
            "device": plan.device if plan else None, "workers": workers,
        }

