"""Training speed: seconds per LoRA step of the studio's loop next to diffusers' LoRA example loop
(``examples/text_to_image/train_text_to_image_lora.py``, written out plainly) on the same modules, in
the same run: on the tiny test model and on a full-size SD1.5 architecture (random weights) at
512×512, batch 1, float32 (the example's default) and, for the studio, its default device policy.

    .venv/bin/python bench/bench_training.py [--steps 3] [--tiny-steps 20]

The two loops train different module sets, as their defaults do: the studio kohya's (attention,
proj_in/out and feed-forward layers of every transformer block), the example only the attention
projections; the table says how many LoRA parameters each trains.
Writes bench/results/training.json and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.bench_txt2img import make_full_size_checkpoint  # noqa: E402
from bench.report import write_section  # noqa: E402


def timed_state():
    """A JobState that remembers when each optimizer step ended."""
    from studio.jobs import JobState

    class TimedState(JobState):
        stamps: list[float]

        def advance(self, preview=None):
            super().advance(preview)
            self.stamps.append(time.perf_counter())

    state = TimedState(job_id="bench", description="bench")
    state.stamps = []
    return state


def make_dataset(folder: Path, size: int, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of a thing", encoding="utf-8")
    return folder


def per_step(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]   # the first step (warm-up, caches) is left out


def studio_steps(studio, checkpoint: str, data: Path, size: int, steps: int) -> tuple[list[float], int]:
    from studio.training.base import TrainSettings
    from studio.training.dataset import TrainDataset
    from studio.training.loop import run_training
    from studio.training.lora import LoraSettings, LoraTrainable

    settings = TrainSettings(data_dir=str(data), output_name="bench", steps=steps + 1, resolution=size,
                             min_bucket_reso=min(256, size), max_bucket_reso=max(1024, size), learning_rate=1e-4,
                             mixed_precision="no", resume=False, overwrite=True)
    dataset = TrainDataset.from_settings(settings)
    out = Path(tempfile.mkdtemp()) / "bench.safetensors"
    trainable = LoraTrainable(LoraSettings(rank=8, alpha=8), out, 1e-4)

    def job(state):
        model = studio.models.load(checkpoint)
        timed = timed_state()
        run_training(model, trainable, settings, dataset, timed, Path(tempfile.mkdtemp()))
        return timed.stamps

    stamps = studio.queue.run(job)
    return per_step(stamps), sum(t.numel() for t in trainable.state_dict().values())


def diffusers_steps(studio, checkpoint: str, data: Path, size: int, steps: int) -> tuple[list[float], int]:
    """The example's loop, on the studio's loaded modules."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    def job(state):
        model = studio.models.load(checkpoint)
        unet, vae, text_encoder, tokenizer = model.unet, model.vae, model.text_encoders[0], model.tokenizers[0]
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="bench")
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
        image = np.array(Image.open(sorted(data.glob("*.png"))[0]).convert("RGB").resize((size, size)))
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        ids = tokenizer(["a photo of a thing"], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        dtype = next(unet.parameters()).dtype
        unet.train()
        stamps = []
        for _ in range(steps + 1):
            latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (1,))
            noisy = scheduler.add_noise(latents, noise, t)
            hidden = text_encoder(ids)[0]
            pred = unet(noisy.to(dtype), t, hidden.to(dtype)).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            stamps.append(time.perf_counter())
        unet.eval()
        count = sum(p.numel() for p in params)
        unet.delete_adapters("bench")
        return stamps, count

    stamps, count = studio.queue.run(job)
    return per_step(stamps), count


def run_case(label: str, work: Path, checkpoint: str, size: int, steps: int, no_half: bool,
             with_diffusers: bool, rounds: int = 2) -> dict:
    from studio.config import Flags
    from studio.core import Studio

    studio = Studio.create(Flags(data_dir=str(work), no_half=no_half, no_demo=True))
    data = make_dataset(Path(tempfile.mkdtemp()) / "data", size)
    ours: list[float] = []
    theirs: list[float] = []
    # in alternating rounds (studio, diffusers, studio, diffusers), so a busy machine slows both alike
    for _ in range(rounds if with_diffusers else 1):
        times, ours_params = studio_steps(studio, checkpoint, data, size, steps)
        ours += times
        if with_diffusers:
            times, their_params = diffusers_steps(studio, checkpoint, data, size, steps)
            theirs += times
    row = {"label": label, "size": size, "steps": steps, "dtype": str(studio.policy.dtype).removeprefix("torch."),
           "rounds": rounds if with_diffusers else 1,
           "studio_s": ours, "studio_median": statistics.median(ours), "studio_lora_params": ours_params}
    if with_diffusers:
        row |= {"diffusers_s": theirs, "diffusers_median": statistics.median(theirs),
                "diffusers_lora_params": their_params}
    studio.queue.shutdown()
    print(json.dumps(row), flush=True)
    return row


def write_report(results: dict, path: Path) -> None:
    lines = [
        "## LoRA training (bench/bench_training.py)",
        "",
        f"Machine: {results['machine']}. Seconds per optimizer step (median; the first step of each round, which "
        "fills caches, is left out; studio and diffusers in two alternating rounds), batch 1, LoRA rank 8, "
        "the same modules in the same run. The studio trains "
        "kohya's layer set, the diffusers example only the attention projections (parameter counts below). "
        "The studio encodes each image with the VAE once and samples from the cached distribution; the example "
        "encodes every step.",
        "",
        "| model | size | dtype | studio s/step | diffusers example s/step | ratio | LoRA params (studio / example) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        theirs = r.get("diffusers_median")
        ratio = f"{r['studio_median'] / theirs:.2f}" if theirs else "—"
        params = f"{r['studio_lora_params'] / 1e6:.2f} M / " + (f"{r['diffusers_lora_params'] / 1e6:.2f} M"
                                                                if theirs else "—")
        lines.append(f"| {r['label']} | {r['size']}² | {r['dtype']} | {r['studio_median']:.3f} | "
                     f"{f'{theirs:.3f}' if theirs else '—'} | {ratio} | {params} |")
    lines.append("")
    write_section(path, lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps on the full-size model")
    ap.add_argument("--tiny-steps", type=int, default=20)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or Path(tempfile.gettempdir()) / "studio-bench")
    make_full_size_checkpoint(work)
    from studio.testing.trainable import make_trainable_checkpoint

    make_trainable_checkpoint(work / "models" / "Stable-diffusion" / "tiny-train.safetensors")
    rows = [
        run_case("tiny test model", work, "tiny-train.safetensors", 64, args.tiny_steps, True, True),
        run_case("SD1.5 architecture", work, "random-sd15.safetensors", 512, args.steps, True, True),
        run_case("SD1.5 architecture, default policy", work, "random-sd15.safetensors", 512, args.steps, False,
                 False),
    ]
    results = {"rows": rows, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                        f"torch {torch.__version__}"}
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(results, indent=2))
    write_report(results, REPO / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
