"""One process of a multi-process training run: ``python -m studio.training.launch_main <job.json>``, started
by ``accelerate launch`` (studio.training.distributed.launch_command), never imported by the studio.

It builds a studio on the data folder the job names (the device: GPU ``LOCAL_RANK``, or the CPU), prepares
the same request, and trains with the same loop as a one-process run; the Accelerator the loop creates
joins the processes (torchrun's environment). The main process reports progress and writes the result;
every process records its rank, and its error if it fails.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist

from studio.config import Flags
from studio.core import Studio
from studio.jobs import JobState
from studio.training import distributed
from studio.training.runner import TrainingRequest, prepare, train_here


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: accelerate launch -m studio.training.launch_main <job.json>", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    folder = Path(job["folder"])
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if job["device"] == "cuda" else "cpu"
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    distributed.write_rank(folder, rank, world_size, device)
    state = JobState(job_id=f"train-rank-{rank}", description=f"training process {rank} of {world_size}")
    studio = None
    try:
        studio = Studio.create(Flags(**{**job["flags"], "device": device}))
        prepared = prepare(studio.engine, TrainingRequest.from_json(job["request"]))
        with distributed.Reporter(folder, state, main=rank == 0) as reporter:
            result = train_here(studio.engine, prepared, state, checkpoint=job["checkpoint"],
                                on_sample=reporter.sample)
        if dist.is_initialized():   # the group the Accelerator made: its size and backend, as trained
            distributed.write_rank(folder, rank, dist.get_world_size(), device, backend=str(dist.get_backend()))
    except BaseException as e:
        distributed.write_error(folder, rank, e)
        raise
    finally:
        if studio is not None:
            studio.shutdown()
    if rank == 0:
        distributed.write_result(folder, result)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
