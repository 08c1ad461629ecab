"""txt2img speed: the studio vs plain diffusers, in the same run, on a full-size SD1.5
architecture with random weights made on the fly (no download).

    .venv/bin/python bench/bench_txt2img.py [--size 256] [--steps 10] [--runs 3]

Measures, on the same modules and the same scheduler:
- studio vs ``StableDiffusionPipeline`` at equal dtype (fp32 and the default policy's dtype): overhead;
- the studio's default device policy vs diffusers' fp32 default: speed-up;
- cold start: ``python app.py`` to the first HTTP 200 against a bare app with as many blocks (bench_startup.py).
Writes bench/results/txt2img.json and the table in docs/benchmarks.md.
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

from bench.report import write_section  # noqa: E402


def make_full_size_checkpoint(folder: Path, name: str = "random-sd15.safetensors", seed: int = 0) -> Path:
    from safetensors.torch import save_file

    from studio.models.ldm_keys import to_ldm_state_dict
    from studio.testing.fullsize import STANDARD, build_components

    path = folder / "models" / "Stable-diffusion" / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    comps = build_components(STANDARD["sd15"], device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        for p in comps[name].parameters():
            # diffusers initialises some layers to zero; random small weights keep every op busy
            p.data.normal_(0, 0.02)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in to_ldm_state_dict(comps, "sd1").items()}
    save_file(sd, str(path))
    del comps, sd
    gc.collect()
    return path


def bench_dtype(data_dir: Path, no_half: bool, size: int, steps: int, runs: int) -> dict:
    from diffusers import StableDiffusionPipeline

    from studio.config import Flags
    from studio.core import Studio
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.samplers import find_schedule, make_scheduler, split_sampler_name

    studio = Studio.create(Flags(data_dir=str(data_dir), no_half=no_half, no_demo=True))
    t = time.perf_counter()
    model = studio.select_checkpoint("random-sd15.safetensors")
    load_s = time.perf_counter() - t
    req = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=steps, width=size,
                         height=size, seed=1, sampler_name="Euler", save_images=False)
    studio.settings.update({"live_previews_enable": False}, persist=False)

    def run_studio():
        studio.txt2img(req)

    sampler, schedule = split_sampler_name("Euler", "Automatic")
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        scheduler=make_scheduler(sampler, find_schedule("Automatic"), model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run_diffusers():
        # on the studio's worker thread too: two threads driving torch make their OpenMP
        # pools spin against each other on a 2-core machine, which would skew both timings
        studio.queue.run(lambda state: run_pipe())

    def run_pipe():
        pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=steps, height=size, width=size,
             guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(1))

    # Time spent inside UNet forwards, so that the loop's own overhead (everything else: text
    # encoding, scheduler, CFG, decode, queue) can be compared without the UNet's noise.
    unet_time = [0.0]
    started: list[float] = []
    model.unet.register_forward_pre_hook(lambda *a: started.append(time.perf_counter()))
    model.unet.register_forward_hook(lambda *a: unet_time.__setitem__(0, unet_time[0] + time.perf_counter()
                                                                       - started.pop()))

    def measured(fn) -> tuple[float, float]:
        unet_time[0] = 0.0
        total = _timed(fn)
        return total, total - unet_time[0]

    # warm up both, then interleave so machine noise hits both equally
    s_times, d_times, s_outside, d_outside = [], [], [], []
    run_studio()
    run_diffusers()
    for _ in range(runs):
        total, outside = measured(run_studio)
        s_times.append(total)
        s_outside.append(outside)
        total, outside = measured(run_diffusers)
        d_times.append(total)
        d_outside.append(outside)
    dtype = str(model.policy.dtype).removeprefix("torch.")
    studio.models.unload()
    studio.queue.shutdown()
    gc.collect()
    return {"dtype": dtype, "load_s": load_s, "studio_s": s_times, "diffusers_s": d_times,
            "studio_median": statistics.median(s_times), "diffusers_median": statistics.median(d_times),
            "studio_best": min(s_times), "diffusers_best": min(d_times),
            "studio_outside_unet": statistics.median(s_outside),
            "diffusers_outside_unet": statistics.median(d_outside)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_startup(data_dir: Path) -> dict:
    """Medians of bench/bench_startup.py's alternating rounds against a bare app with as many blocks."""
    from bench.bench_startup import measure

    result = measure(REPO, 3)
    return {"studio app.py": result["stats_s"]["studio"]["median"],
            "bare gr.Blocks": result["stats_s"]["bare"]["median"]}


def write_report(results: dict, path: Path) -> None:
    fp32, default = results["fp32"], results["default"]

    def row(label: str, a: dict, b: dict, a_key: str, b_key: str, goal: str) -> str:
        med = a[f"{a_key}_median"] / b[f"{b_key}_median"]
        best = a[f"{a_key}_best"] / b[f"{b_key}_best"]
        return (f"| {label} | {a[f'{a_key}_median']:.2f} ({a[f'{a_key}_best']:.2f}) | "
                f"{b[f'{b_key}_median']:.2f} ({b[f'{b_key}_best']:.2f}) | {med:.3f} ({best:.3f}) | {goal} |")

    speed_med = fp32["diffusers_median"] / default["studio_median"]
    speed_best = fp32["diffusers_best"] / default["studio_best"]
    st = results["startup"]
    lines = [
        "## txt2img (bench/bench_txt2img.py)",
        "",
        f"Machine: {results['machine']}. Full-size SD1.5 architecture (random weights, fp16 file), "
        f"{results['size']}×{results['size']}, {results['steps']} steps, Euler, CFG 7, batch 1. "
        f"{results['runs']} runs each after a warm-up, studio and diffusers interleaved on the same modules "
        "and the same worker thread. Cells: median (best) seconds; ratios of medians (of bests). "
        "This shared 2-core machine is noisy: single runs vary by up to ±30%.",
        "",
        "| comparison | studio s | diffusers s | ratio | goal |",
        "|---|---|---|---|---|",
        row("studio vs `StableDiffusionPipeline`, fp32", fp32, fp32, "studio", "diffusers", "≤ 1.03"),
        row(f"studio vs `StableDiffusionPipeline`, {default['dtype']}", default, default, "studio", "diffusers",
            "≤ 1.03"),
        f"| studio default policy ({default['dtype']}, channels_last) vs diffusers' fp32 default | "
        f"{default['studio_median']:.2f} ({default['studio_best']:.2f}) | "
        f"{fp32['diffusers_median']:.2f} ({fp32['diffusers_best']:.2f}) | "
        f"**{speed_med:.2f}× ({speed_best:.2f}×) faster** | ≥ 3× |",
        "",
        "Time outside the UNet (text encoders, scheduler, CFG, VAE decode, queue), median seconds — "
        "the loop's own cost without the UNet's noise: "
        + ", ".join(f"{r['dtype']}: studio {r['studio_outside_unet']:.2f} vs diffusers "
                    f"{r['diffusers_outside_unet']:.2f}" for r in (fp32, default)) + ".",
        "",
        f"Checkpoint load (file in page cache, 2.1 GB fp16): as fp32 {fp32['load_s']:.1f} s, as "
        f"{default['dtype']} {default['load_s']:.1f} s.",
        "",
        "| cold start to first HTTP 200 (`--skip-load-model-at-start`; bare app with as many blocks) "
        "| seconds (median of 3, alternated) |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in st.items()],
        f"| ratio | {st['studio app.py'] / st['bare gr.Blocks']:.2f} |",
        "",
    ]
    write_section(path, lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default=None, help="folder for the random checkpoint (kept between runs)")
    args = ap.parse_args()
    work = Path(args.work or Path(tempfile.gettempdir()) / "studio-bench")
    t = time.perf_counter()
    make_full_size_checkpoint(work)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f}s", flush=True)
    results = {"size": args.size, "steps": args.steps, "runs": args.runs,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}"}
    results["fp32"] = bench_dtype(work, True, args.size, args.steps, args.runs)
    print("fp32", json.dumps(results["fp32"]), flush=True)
    results["default"] = bench_dtype(work, False, args.size, args.steps, args.runs)
    print("default", json.dumps(results["default"]), flush=True)
    results["startup"] = bench_startup(work)
    print("startup", results["startup"], flush=True)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "txt2img.json").write_text(json.dumps(results, indent=2))
    write_report(results, REPO / "docs" / "benchmarks.md")
    print((REPO / "docs" / "benchmarks.md").read_text())


if __name__ == "__main__":
    main()
