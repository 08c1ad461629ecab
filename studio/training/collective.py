"""What the processes of a data-parallel run (``accelerate launch``, studio.training.distributed) agree
on, step by step, through torch.distributed.

The loop does not wrap the UNet in DDP: what learns is not always in the UNet (an embedding's vectors
sit in the text encoder, a hypernetwork's layers beside the attention), and DDP refuses a module with
nothing to train, or would broadcast the whole frozen UNet at start. Instead the few trained tensors are
made equal once (:func:`broadcast_params`) and their gradients averaged before each optimizer step
(:func:`average_grads`), which is what DDP does for them. Each call is a collective: every process must
make the same calls in the same order, so decisions that end the loop (an interrupt, a broken loss) are
taken together (:func:`any_process`, :func:`mean`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def _groups(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    # one flat buffer per (device, dtype): one collective each instead of one per LoRA tensor
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def broadcast_params(params: Iterable[torch.Tensor]) -> None:
    """Every process starts from the main process's values (a LoRA's random init, a resumed state)."""
    for group in _groups(p.data for p in params):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def average_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """The gradients of every process, averaged: each process then takes the same optimizer step."""
    params = list(params)
    for p in params:
        if p.grad is None:   # not reached this step here, maybe elsewhere: it counts as zero
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    for group in _groups(p.grad for p in params):
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def mean(value: torch.Tensor) -> torch.Tensor:
    """A scalar averaged over the processes (the loss a step reports)."""
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return total[0] / dist.get_world_size()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when it is true on one (an interrupt seen by the main process)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
