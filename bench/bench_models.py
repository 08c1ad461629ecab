"""Model manager speed: loading, switching and LoRA patching on a full-size SD1.5
architecture with random weights made on the fly (no download), next to the raw file read
and diffusers' LoRA path in the same run.

    .venv/bin/python bench/bench_models.py [--runs 5] [--size 256] [--steps 4]

- cold load of a checkpoint vs ``safetensors.torch.load_file`` of the same file (page cache warm);
- loading a second file of the same architecture into the loaded modules (sd_checkpoints_limit 1);
- cached switch between two checkpoints (sd_checkpoints_limit 2);
- LoRA set change with a rank-32 kohya LoRA on every attention and MLP layer (UNet + text
  encoder), vs diffusers ``load_lora_weights`` + ``fuse_lora`` on the same file and modules;
- UNet time per step with that LoRA merged vs none.
Writes bench/results/models.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
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

import torch  # noqa: E402

from bench.bench_txt2img import make_full_size_checkpoint  # noqa: E402
from bench.report import write_section  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_loading(work: Path, runs: int) -> dict:
    from safetensors.torch import load_file

    from studio.config import Flags
    from studio.core import Studio

    a = work / "models" / "Stable-diffusion" / "random-sd15.safetensors"
    studio = Studio.create(Flags(data_dir=str(work), no_demo=True))
    on_worker = studio.queue.run
    # hashes are computed once per file and cached in cache.json (as A1111 does); do it first
    for info in studio.checkpoints():
        studio.models.catalog.ensure_hash(info)
    # load_file maps the file lazily; copying every tensor makes it an actual read into RAM
    raw = [on_worker(lambda s: _timed(lambda: {k: v.clone() for k, v in load_file(str(a)).items()}))
           for _ in range(2)]

    studio.settings.update({"sd_checkpoints_limit": 1}, persist=False)
    cold = []
    for _ in range(2):
        studio.queue.run(lambda s: studio.models.unload())
        gc.collect()
        cold.append(_timed(lambda: studio.select_checkpoint("random-sd15")))
    reuse = []
    for name in ("random-sd15-b", "random-sd15", "random-sd15-b"):
        reuse.append(_timed(lambda n=name: studio.select_checkpoint(n)))

    studio.settings.update({"sd_checkpoints_limit": 2}, persist=False)
    studio.select_checkpoint("random-sd15")
    switch = [_timed(lambda n=n: studio.select_checkpoint(n))
              for n in ["random-sd15-b", "random-sd15"] * runs]
    model_mb = studio.models.current.nbytes / 2**20
    dtype = str(studio.models.current.policy.dtype).removeprefix("torch.")
    studio.models.unload()
    studio.queue.shutdown()
    gc.collect()
    return {"raw_read_s": min(raw), "cold_load_s": min(cold), "cold_all": cold,
            "reuse_load_s": statistics.median(reuse), "reuse_all": reuse,
            "cached_switch_s": statistics.median(switch), "cached_switch_max": max(switch),
            "model_mb": model_mb, "dtype": dtype}


def bench_lora(work: Path, runs: int, size: int, steps: int) -> dict:
    from diffusers import StableDiffusionPipeline

    from studio.config import Flags
    from studio.core import Studio
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.samplers import find_schedule, make_scheduler, split_sampler_name
    from studio.networks.lora import ActiveNetwork
    from studio.testing.loras import write_kohya_lora

    studio = Studio.create(Flags(data_dir=str(work), no_demo=True))
    model = studio.select_checkpoint("random-sd15")
    lora_path = work / "models" / "Lora" / "rank32.safetensors"
    if not lora_path.exists():
        comps = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
        write_kohya_lora(lora_path, comps, "sd1", rank=32, alpha=16.0, seed=1)
    studio.networks.refresh()
    loras = studio.networks.loras
    info = loras.find("rank32")
    from studio.networks.activation import lora_patcher

    patcher = lora_patcher(model)
    run = studio.queue.run

    first = run(lambda s: _timed(lambda: patcher.apply([ActiveNetwork(info, 1.0, 1.0)], loras)))
    changes = []
    for i in range(runs):
        weight = 0.5 + 0.1 * (i % 2)
        changes.append(run(lambda s, w=weight: _timed(lambda: patcher.apply([ActiveNetwork(info, w, w)], loras))))
    last = 0.5 + 0.1 * ((runs - 1) % 2)
    same = run(lambda s: _timed(lambda: patcher.apply([ActiveNetwork(info, last, last)], loras)))
    restore = run(lambda s: _timed(lambda: patcher.apply([], loras)))

    # per-step UNet time, no LoRA vs the LoRA merged (same set each run: no patch work inside)
    unet_time, started = [0.0], []
    model.unet.register_forward_pre_hook(lambda *a: started.append(time.perf_counter()))
    model.unet.register_forward_hook(lambda *a: unet_time.__setitem__(0, unet_time[0] + time.perf_counter()
                                                                       - started.pop()))
    studio.settings.update({"live_previews_enable": False}, persist=False)

    def unet_seconds_per_step(prompt: str) -> float:
        req = Txt2ImgRequest(prompt=prompt, steps=steps, width=size, height=size, seed=1, sampler_name="Euler",
                             save_images=False)
        unet_time[0] = 0.0
        studio.txt2img(req)  # a LoRA set change happens outside the UNet, so it is not counted
        return unet_time[0] / steps  # cond + uncond go in one batched forward per step

    # interleaved, so the machine's noise hits both alike
    plain_runs, lora_runs = [], []
    unet_seconds_per_step("a photo of a cat")
    for _ in range(runs):
        plain_runs.append(unet_seconds_per_step("a photo of a cat"))
        lora_runs.append(unet_seconds_per_step("a photo of a cat <lora:rank32:1>"))
    plain_step, lora_step = statistics.median(plain_runs), statistics.median(lora_runs)
    run(lambda s: patcher.apply([], loras))

    # diffusers on the same modules and file
    sampler, schedule = split_sampler_name("Euler", "Automatic")
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        scheduler=make_scheduler(sampler, find_schedule("Automatic"), model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )

    def diffusers_load_fuse():
        pipe.load_lora_weights(str(lora_path), adapter_name="rank32")
        pipe.fuse_lora(lora_scale=1.0)

    def diffusers_unload():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    d_first = run(lambda s: _timed(diffusers_load_fuse))
    d_unload = run(lambda s: _timed(diffusers_unload))
    d_again = run(lambda s: _timed(diffusers_load_fuse))
    run(lambda s: diffusers_unload())
    studio.models.unload()
    studio.queue.shutdown()
    return {"studio_first_apply_s": first, "studio_set_change_s": statistics.median(changes),
            "studio_set_change_all": changes, "studio_same_set_s": same, "studio_restore_s": restore,
            "diffusers_load_fuse_s": min(d_first, d_again), "diffusers_unfuse_unload_s": d_unload,
            "step_plain_s": plain_step, "step_lora_s": lora_step,
            "lora_mb": lora_path.stat().st_size / 2**20}


def write_report(results: dict, path: Path) -> None:
    ld, lo = results["loading"], results["lora"]
    change_vs_diffusers = lo["studio_set_change_s"] / (lo["diffusers_unfuse_unload_s"] + lo["diffusers_load_fuse_s"])
    lines = [
        "## Model manager (bench/bench_models.py)",
        "",
        f"Machine: {results['machine']}. Full-size SD1.5 architecture, random weights, fp16 files "
        f"({ld['model_mb']:.0f} MB in memory as {ld['dtype']}); LoRA: rank 32 / alpha 16 on every attention "
        f"and MLP layer of the UNet and text encoder ({lo['lora_mb']:.0f} MB file). "
        "Loads run on the studio's worker; the file is in the page cache and its sha256 already in cache.json.",
        "",
        "| measure | studio | reference | ratio | goal |",
        "|---|---|---|---|---|",
        f"| cold load vs reading the file's tensors into RAM (`load_file` + copy) | {ld['cold_load_s']:.2f} s | "
        f"{ld['raw_read_s']:.2f} s | {ld['cold_load_s'] / ld['raw_read_s']:.2f}× | ≤ 1.5× |",
        f"| load another file into the same modules (limit 1) | {ld['reuse_load_s']:.2f} s | "
        f"{ld['raw_read_s']:.2f} s | {ld['reuse_load_s'] / ld['raw_read_s']:.2f}× | — |",
        f"| cached switch (limit 2), median / worst | {ld['cached_switch_s'] * 1000:.1f} / "
        f"{ld['cached_switch_max'] * 1000:.1f} ms | — | — | ≤ 0.3 s |",
        f"| LoRA set change (restore + merge) | {lo['studio_set_change_s']:.2f} s | "
        f"{lo['diffusers_unfuse_unload_s'] + lo['diffusers_load_fuse_s']:.2f} s (diffusers unfuse+unload+load+fuse) "
        f"| {change_vs_diffusers:.2f}× | ≤ 0.5 s and ≤ 0.25× |",
        f"| LoRA first use (read file, back up, merge) | {lo['studio_first_apply_s']:.2f} s | "
        f"{lo['diffusers_load_fuse_s']:.2f} s (diffusers load_lora_weights + fuse_lora) | "
        f"{lo['studio_first_apply_s'] / lo['diffusers_load_fuse_s']:.2f}× | — |",
        f"| same LoRA set again | {lo['studio_same_set_s'] * 1000:.2f} ms | — | — | no work |",
        f"| remove all LoRAs (exact restore) | {lo['studio_restore_s']:.2f} s | "
        f"{lo['diffusers_unfuse_unload_s']:.2f} s (unfuse + unload) | — | — |",
        f"| UNet time per step, LoRA merged vs none ({results['size']}², batch 1 + CFG) | "
        f"{lo['step_lora_s']:.3f} s | {lo['step_plain_s']:.3f} s | {lo['step_lora_s'] / lo['step_plain_s']:.3f}× "
        "| ≤ 1.02× |",
        "",
    ]
    write_section(path, lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", default=None, help="folder for the random checkpoints (kept between runs)")
    args = ap.parse_args()
    work = Path(args.work or Path(tempfile.gettempdir()) / "studio-bench")
    make_full_size_checkpoint(work)
    make_full_size_checkpoint(work, "random-sd15-b.safetensors", seed=1)
    results = {"size": args.size, "steps": args.steps, "runs": args.runs,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}"}
    results["loading"] = bench_loading(work, args.runs)
    print("loading", json.dumps(results["loading"]), flush=True)
    gc.collect()
    results["lora"] = bench_lora(work, args.runs, args.size, args.steps)
    print("lora", json.dumps(results["lora"]), flush=True)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "models.json").write_text(json.dumps(results, indent=2))
    write_report(results, REPO / "docs" / "benchmarks.md")
    print((REPO / "docs" / "benchmarks.md").read_text())


if __name__ == "__main__":
    main()
