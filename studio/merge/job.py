"""The Checkpoint Merger as a job on the studio's one queue (never at the same time as a generation),
with A1111's output folder and the new file listed in the checkpoint dropdown as soon as it exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.errors import RequestError
from studio.jobs import Job, JobState
from studio.merge.merger import MergeResult, merge_checkpoints
from studio.merge.request import MergeRequest
from studio.models.vae import VaeNotFoundError


def output_folder(engine: Any, ckpt_dir_flag: str | None) -> Path:
    """A1111 writes merges to ``--ckpt-dir`` when given, else models/Stable-diffusion."""
    return engine.paths.ckpt_dirs[-1] if ckpt_dir_flag else engine.paths.ckpt_dirs[0]


def submit_merge(engine: Any, req: MergeRequest, out_dir: Path) -> Job:
    """Queue the merge of ``req``; names are checked when the job runs (the catalog may change while it
    waits). ``engine``: the studio's Engine (its catalog, VAEs and queue)."""
    catalog = engine.models.catalog

    def checkpoint(name: str) -> Any:
        info = catalog.find(name)
        if info is None:
            raise RequestError(f"Checkpoint {name!r} not found: put it in {engine.paths.ckpt_dirs[0]} and refresh")
        catalog.ensure_hash(info)   # the recipe records each input's hash
        return info

    def vae(name: str) -> Path | None:
        try:
            found = engine.vaes.resolve(name, None)
        except VaeNotFoundError as e:
            raise RequestError(str(e)) from e
        return found.path if found is not None else None

    def job(state: JobState) -> MergeResult:
        state.textinfo = f"Merging {req.primary_model_name}"

        def progress(done: int, total: int) -> None:
            if state.interrupted:
                raise RequestError("merge interrupted; nothing was written")
            state.total, state.step = total, done

        result = merge_checkpoints(req, checkpoint, vae, out_dir, progress)
        engine.models.refresh()   # the new file is in the checkpoint list at once
        return result

    return engine.queue.submit(job, f"merge {req.primary_model_name}", request=req)
