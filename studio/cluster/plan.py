"""How many generation workers, where, and with what: decided from the flags before Ray starts (no Ray
here, so the rules are tested as plain functions)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from studio.errors import RequestError


@dataclass(frozen=True)
class ClusterPlan:
    workers: int                    # Serve replicas
    address: str | None             # None = start a local Ray cluster
    threads: int                    # torch CPU threads per worker
    gpus: float                     # GPUs per worker (0 = CPU workers)
    models: int                     # checkpoints a worker keeps loaded
    worker_data_dir: str | None     # None = the front's data dir (shared storage)
    dashboard: bool

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


def wants_cluster(flags: Any) -> bool:
    """Only these two flags bring Ray in; without them the studio never imports it."""
    return bool(flags.workers) or bool(flags.ray_address)


def make_plan(flags: Any, cluster_gpus: float, cpu_count: int | None = None) -> ClusterPlan:
    """``cluster_gpus``: the GPUs this machine has (local cluster) or the joined cluster reports."""
    cpus = cpu_count or os.cpu_count() or 1
    if flags.workers < 0:
        raise RequestError(f"--workers: expected 0 or more, got {flags.workers}")
    if flags.worker_models < 1:
        raise RequestError(f"--worker-models: expected 1 or more, got {flags.worker_models}")
    gpus = flags.worker_gpus if flags.worker_gpus is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if gpus < 0:
        raise RequestError(f"--worker-gpus: expected 0 or more, got {gpus}")
    if flags.device == "cpu":
        gpus = 0.0
    workers = flags.workers
    if not workers:   # --ray-address alone: one worker per GPU of the cluster, else one
        workers = max(1, int(cluster_gpus // gpus)) if gpus > 0 else 1
    if gpus > 0 and flags.ray_address is None and workers * gpus > cluster_gpus + 1e-9:
        raise RequestError(f"--workers {workers} with {gpus:g} GPU each needs {workers * gpus:g} GPUs; this machine "
                           f"has {cluster_gpus:g} (use --worker-gpus 0.5 to share a GPU, or fewer workers)")
    threads = flags.worker_threads or max(1, cpus // workers if gpus == 0 else 1)
    return ClusterPlan(workers, flags.ray_address, threads, float(gpus), flags.worker_models,
                       flags.worker_data_dir, bool(flags.ray_dashboard))


def worker_flags(flags: Any, plan: ClusterPlan) -> Any:
    """The flags a worker builds its own Studio from: the front's, on the worker's device and data dir.
    A worker never serves HTTP, watches folders or builds the demo model on its own."""
    changes: dict[str, Any] = {"workers": 0, "ray_address": None, "device": plan.device,
                               "skip_load_model_at_start": True}
    if plan.worker_data_dir:
        # a node-local folder: the front's own folder flags point at paths the node may not have
        changes |= {"data_dir": plan.worker_data_dir, "models_dir": None, "ckpt_dir": None, "vae_dir": None,
                    "lora_dir": None, "hypernetwork_dir": None, "embeddings_dir": None, "controlnet_dir": None,
                    "text_encoder_dir": None, "extra_model_paths_config": None, "no_demo": True}
    return replace(flags, **changes)
