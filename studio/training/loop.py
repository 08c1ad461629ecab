"""The one training loop: LoRA, textual inversion and hypernetworks all run through :func:`run_training`.

Built on HF Accelerate (mixed precision, gradient accumulation, and data parallelism when started with
``accelerate launch`` — studio.training.distributed: each process takes every N-th batch and the trained
tensors' gradients are averaged, studio.training.collective); the model is the studio's loaded model, so
training runs on the same device policy as generation and the result is usable as soon as the job ends.

Per optimizer step: a batch from one aspect bucket, VAE latents (the encoder's mean and std are
cached per image, a fresh sample is drawn each time — A1111's "random" latent sampling), noise with
the optional offset, a random timestep per sample, the trainable's text conditioning, the UNet
prediction, the epsilon / v-prediction target and the (Min-SNR weighted) MSE.

Saving writes the trainable's file (atomically) and a resume state next to the training log
(``<data>/training/<kind>-<name>/state.pt``: step, trainable tensors, optimizer, LR scheduler and
RNG states, the loss history), so a later run with ``resume`` continues where this one stopped.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.config import atomic_write
from studio.jobs import JobState
from studio.training.base import Batch, Trainable, TrainingError, TrainSettings
from studio.training.loss import diffusion_loss, offset_noise, train_scheduler, training_target

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass
class TrainResult:
    kind: str
    output_path: Path
    step: int                                   # optimizer steps done, resumed ones included
    losses: list[float] = field(default_factory=list)   # per step of this run
    interrupted: bool = False
    saved: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0

    def api_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "output": str(self.output_path), "step": self.step,
                "resumed_from": self.resumed_from, "interrupted": self.interrupted,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "saved": [str(p) for p in self.saved], "samples": [str(p) for p in self.samples],
                "notes": self.notes, "seconds": round(self.seconds, 2)}


def work_dir(data_dir: Path, kind: str, name: str) -> Path:
    return Path(data_dir) / "training" / f"{kind}-{name}"


def _mixed_precision(setting: str, device: torch.device) -> str:
    if setting == "auto":
        return "fp16" if device.type == "cuda" else "no"
    if setting == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 mixed precision needs a CUDA GPU; use bf16 or no on this device")
    return setting


def _accelerator(mixed_precision: str, accumulation: int, device: torch.device) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    # Accelerate keeps one process-wide state; a long-running server trains many times with
    # different settings, so the per-run part is reset (the distributed setup is kept).
    AcceleratorState._reset_state()
    # split_batches: each process already counts the run's steps itself (it takes its own batches),
    # so the LR scheduler steps once per optimizer step, not once per process
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation,
                       cpu=device.type == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True))


def _optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    if name == "AdamW8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainingError("AdamW8bit needs the bitsandbytes package (CUDA only); use AdamW") from e
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=1e-2)
    if name != "AdamW":
        raise TrainingError(f"unknown optimizer {name!r}; use AdamW or AdamW8bit")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)


def _lr_scheduler(settings: TrainSettings, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float] | None):
    if lr_at is not None:
        # A1111's "0.005:100, 1e-3:1000, 1e-5" schedules: a factor of the first group's base rate
        base = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step) / base)
    from diffusers.optimization import get_scheduler

    name = settings.lr_scheduler
    if name == "constant" and settings.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                         num_training_steps=settings.steps)


class _LatentCache:
    """The VAE encoder's distribution per (image, bucket): encoding once, sampling every step."""

    def __init__(self, model: Any):
        self.model = model
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def sample(self, keys: list[tuple], pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.model.vae
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            with torch.no_grad():
                x = pixels[missing].to(self.model.policy.device, vae.dtype)
                dist = vae.encode(x).latent_dist
                for j, i in enumerate(missing):
                    self._cache[keys[i]] = (dist.mean[j].float().cpu(), dist.std[j].float().cpu())
        mean = torch.stack([self._cache[k][0] for k in keys])
        std = torch.stack([self._cache[k][1] for k in keys])
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        return latents * vae.config.scaling_factor


def _time_ids(batch: Batch, height: int, width: int) -> torch.Tensor:
    rows = []
    for i in range(len(batch.captions)):
        orig = batch.original_sizes[i] if i < len(batch.original_sizes) else (height, width)
        crop = batch.crops[i] if i < len(batch.crops) else (0, 0)
        rows.append([orig[0], orig[1], crop[0], crop[1], height, width])
    return torch.tensor(rows, dtype=torch.float32)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda temp: torch.save(obj, temp))


def load_resume_state(folder: Path, kind: str, output_path: Path) -> dict[str, Any] | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged state is reported and training starts over
        log.warning("Ignoring the resume state %s: %s", path, e)
        return None
    if state.get("kind") != kind or state.get("output") != str(output_path):
        return None
    return state


def run_training(model: Any, trainable: Trainable, settings: TrainSettings, dataset: Any, state: JobState,
                 data_dir: Path, metadata: dict[str, str] | None = None,
                 sample: Callable[[int], Path | None] | None = None,
                 lr_at: Callable[[int], float] | None = None) -> TrainResult:
    """Train ``trainable`` on ``dataset`` for ``settings.steps`` optimizer steps (fewer when resumed),
    reporting into ``state`` (step/total, ETA, ``losses``, ``textinfo``). ``sample(step)`` makes and
    saves a sample image with the current weights. Interrupting saves what has been learned."""
    started = time.monotonic()
    device = torch.device(model.policy.device)
    folder = work_dir(data_dir, trainable.kind, settings.output_name)
    result = TrainResult(trainable.kind, trainable.output_path, 0, notes=list(getattr(dataset, "notes", [])))
    accelerator = _accelerator(_mixed_precision(settings.mixed_precision, device), settings.gradient_accumulation,
                               device)
    unet = model.unet
    scheduler = train_scheduler(model.scheduler_config)
    groups = trainable.attach(model)
    try:
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise TrainingError("nothing to train (no parameter requires a gradient)")
        optimizer = _optimizer(settings.optimizer, groups, settings.learning_rate)
        lr_scheduler = _lr_scheduler(settings, optimizer, lr_at)
        step, epoch, history = 0, 0, []
        resume = load_resume_state(folder, trainable.kind, trainable.output_path) if settings.resume else None
        if resume is not None:
            trainable.load_state_dict(resume["trainable"])
            optimizer.load_state_dict(resume["optimizer"])
            lr_scheduler.load_state_dict(resume["lr_scheduler"])
            step, epoch, history = int(resume["step"]), int(resume["epoch"]), list(resume.get("losses", []))
            torch.set_rng_state(resume["torch_rng"])
            result.resumed_from = step
            result.notes.append(f"Resumed from step {step} ({folder / STATE_FILE}).")
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        params = [p for g in groups for p in g["params"]]
        processes, rank = accelerator.num_processes, accelerator.process_index
        if processes > 1:
            from studio.training import collective

            collective.broadcast_params(params)
        rng = random.Random(f"{settings.seed}-{epoch}-{step}")
        # each process draws its own noise and timesteps (rank 0's are a 1-process run's)
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step + 7919 * rank)
        latents_cache = _LatentCache(model)
        dtype = next(unet.parameters()).dtype
        total = settings.steps
        if step >= total:
            raise TrainingError(f"already trained for {step} steps (the setting is {total}); raise the steps "
                                "or untick resume to start over")
        state.set_total(total)
        state.step = step   # a resumed run shows its absolute step, like the loss plot
        state.textinfo = f"Training {trainable.kind} {settings.output_name}"
        if processes > 1:
            result.notes.append(f"Trained data-parallel on {processes} processes (effective batch "
                                f"{settings.batch_size * processes}).")
        stopped = False
        taken = 0   # batches seen over the epochs: process r takes those with taken % processes == r

        def stop_requested() -> bool:
            # every process leaves the loop at the same step, or the others would wait forever
            if processes == 1:
                return state.interrupted
            return collective.any_process(state.interrupted, device)

        def save(final: bool) -> None:
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                return  # with `accelerate launch`, one process writes the files
            meta = {"ss_steps": str(step), **(metadata or {})}
            path = trainable.save(trainable.output_path, step, meta)
            if path not in result.saved:
                result.saved.append(path)
            _atomic_torch_save({"kind": trainable.kind, "output": str(trainable.output_path), "step": step,
                                "epoch": epoch, "trainable": trainable.state_dict(),
                                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                                "torch_rng": torch.get_rng_state(), "losses": history[-10000:],
                                "settings": {k: str(v) for k, v in settings.model_dump().items()}},
                               folder / STATE_FILE)
            log.info("Training %s: saved step %d to %s%s", trainable.kind, step, path, " (final)" if final else "")

        unet.train()
        while step < total and not stopped:
            for items in dataset.batches(settings.batch_size, epoch, settings.seed):
                taken += 1
                if (taken - 1) % processes != rank:
                    continue  # each process of a data-parallel run takes its share of the batches
                if step >= total:
                    break
                stopped = stop_requested()
                if stopped:
                    break
                with accelerator.accumulate(unet):
                    batch = dataset.make_batch(items, rng)
                    keys = [(str(item.path), item.bucket) for item in items]
                    latents = latents_cache.sample(keys, batch.pixels, generator).to(device)
                    noise = offset_noise(latents.shape, settings.noise_offset, generator, device)
                    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                              generator=generator).to(device)
                    noisy = scheduler.add_noise(latents, noise, timesteps)
                    with accelerator.autocast():
                        context, pooled = trainable.encode(model, batch.captions, settings.clip_skip)
                        added = None
                        if model.is_sdxl:
                            h, w = batch.pixels.shape[2:]
                            added = {"text_embeds": pooled.to(device, dtype),
                                     "time_ids": _time_ids(batch, h, w).to(device, dtype)}
                        pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=context.to(device, dtype),
                                    added_cond_kwargs=added).sample
                    target = training_target(scheduler, latents, noise, timesteps)
                    loss = diffusion_loss(pred, target, timesteps, scheduler, settings.min_snr_gamma)
                    # the processes' mean: what the step reports, and a broken loss stops them all
                    reported = collective.mean(loss) if processes > 1 else loss.detach()
                    if not math.isfinite(reported.item()):
                        raise TrainingError(f"the loss became {reported.item()} at step {step + 1}; lower the "
                                            "learning rate or use mixed precision 'no'")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and processes > 1:
                        collective.average_grads(params)
                    if accelerator.sync_gradients and settings.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                value = float(reported.item())
                history.append(value)
                result.losses.append(value)
                state.losses.append((step, value))
                state.advance()
                state.textinfo = (f"Training {trainable.kind} {settings.output_name}: step {step}/{total}, "
                                  f"loss {value:.4f}, lr {lr_scheduler.get_last_lr()[0]:.2e}")
                if settings.save_every and step % settings.save_every == 0 and step < total:
                    save(final=False)
                if (sample is not None and settings.sample_every and step % settings.sample_every == 0
                        and accelerator.is_main_process):
                    unet.eval()
                    path = sample(step)
                    unet.train()
                    if path is not None:
                        result.samples.append(path)
            epoch += 1
        result.interrupted = (stopped or state.interrupted) and step < total
        result.step = step
        if step > result.resumed_from:
            save(final=True)
        if result.interrupted:
            result.notes.append(f"Interrupted at step {step}; what was learned so far is saved.")
    finally:
        unet.eval()
        trainable.detach(model)
        model.conditioner.clear_cache()
    result.seconds = time.monotonic() - started
    return result
