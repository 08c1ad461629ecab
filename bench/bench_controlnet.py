"""ControlNet speed: a studio txt2img with one unit vs diffusers' ``StableDiffusionControlNetPipeline``
on the same modules, full-size SD1.5 + a full-size ControlNet (random weights, made on the fly).

    .venv/bin/python bench/bench_controlnet.py [--size 256] [--steps 6] [--runs 3]

Also measured: the studio's cost of a unit (with vs without), and the preprocess + first model load.
Writes bench/results/controlnet.json and its section of docs/benchmarks.md.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.bench_txt2img import _timed, make_full_size_checkpoint  # noqa: E402
from bench.report import write_section  # noqa: E402


def make_full_size_controlnet(folder: Path) -> Path:
    from diffusers import UNet2DConditionModel

    from studio.testing.controlnets import make_controlnet
    from studio.testing.fullsize import STANDARD

    path = folder / "models" / "ControlNet" / "random-cn-sd15.safetensors"
    if not path.exists():
        torch.manual_seed(3)
        unet = UNet2DConditionModel(**STANDARD["sd15"]["unet"])
        make_controlnet(path, "sd1", seed=3, components={"unet": unet}, dtype=torch.float16)
        del unet
        gc.collect()
    return path


def control_map(size: int) -> Image.Image:
    arr = np.zeros((size, size, 3), np.uint8)
    arr[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = 255
    return Image.fromarray(arr)


def run(work: Path, size: int, steps: int, runs: int) -> dict:
    from diffusers import StableDiffusionControlNetPipeline

    from studio.config import Flags
    from studio.controlnet.units import ControlNetUnitRequest
    from studio.core import Studio
    from studio.generation.request import Txt2ImgRequest
    from studio.generation.samplers import find_schedule, make_scheduler, split_sampler_name

    studio = Studio.create(Flags(data_dir=str(work), no_demo=True))
    studio.settings.update({"live_previews_enable": False}, persist=False)
    model = studio.select_checkpoint("random-sd15.safetensors")
    hint = control_map(size)
    unit = ControlNetUnitRequest(module="none", model="random-cn-sd15", image=hint, resize_mode="Just Resize")
    base = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=steps, width=size,
                          height=size, seed=1, sampler_name="Euler", save_images=False)
    with_unit = base.with_changes(controlnet_units=(unit,))
    t = time.perf_counter()
    studio.txt2img(with_unit)   # loads the ControlNet (first use), then warm
    first_s = time.perf_counter() - t
    loaded = studio.controlnets.loaded()[0]

    sampler, schedule = split_sampler_name("Euler", "Automatic")
    pipe = StableDiffusionControlNetPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        controlnet=loaded.model, scheduler=make_scheduler(sampler, find_schedule("Automatic"), model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def run_pipe():
        pipe("a photo of a cat", image=hint, negative_prompt="blurry", num_inference_steps=steps, height=size,
             width=size, guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(1))

    def run_diffusers():
        studio.queue.run(lambda state: run_pipe())   # the same worker thread as the studio

    timings: dict[str, list[float]] = {"studio_unit": [], "diffusers_unit": [], "studio_plain": []}
    run_diffusers()
    studio.txt2img(base)
    for _ in range(runs):
        timings["studio_unit"].append(_timed(lambda: studio.txt2img(with_unit)))
        timings["diffusers_unit"].append(_timed(run_diffusers))
        timings["studio_plain"].append(_timed(lambda: studio.txt2img(base)))
    dtype = str(model.policy.dtype).removeprefix("torch.")
    studio.queue.shutdown()
    return {"dtype": dtype, "first_with_load_s": first_s, **timings,
            **{f"{k}_median": statistics.median(v) for k, v in timings.items()},
            **{f"{k}_best": min(v) for k, v in timings.items()}}


def write_report(r: dict, path: Path) -> None:
    def cell(key: str) -> str:
        return f"{r[key + '_median']:.2f} ({r[key + '_best']:.2f})"

    ratio = r["studio_unit_median"] / r["diffusers_unit_median"]
    ratio_best = r["studio_unit_best"] / r["diffusers_unit_best"]
    cost = r["studio_unit_median"] / r["studio_plain_median"]
    lines = [
        "## ControlNet (bench/bench_controlnet.py)",
        "",
        f"Machine: {r['machine']}. Full-size SD1.5 + full-size ControlNet (random weights, fp16 files), "
        f"{r['size']}×{r['size']}, {r['steps']} steps, Euler, CFG 7, one unit (preprocessor none, weight 1), "
        f"{r['dtype']} (the default policy). {r['runs']} runs each after a warm-up, interleaved on the same "
        "modules and worker thread. Cells: median (best) seconds.",
        "",
        "| run | seconds | ratio | goal |",
        "|---|---|---|---|",
        f"| studio txt2img + 1 unit | {cell('studio_unit')} | | |",
        f"| diffusers `StableDiffusionControlNetPipeline` | {cell('diffusers_unit')} | "
        f"{ratio:.3f} ({ratio_best:.3f}) | ≤ 1.03 |",
        f"| studio txt2img, no unit | {cell('studio_plain')} | unit costs ×{cost:.2f} | |",
        "",
        f"First generation with the unit, including loading the 0.7 GB (fp16) ControlNet: {r['first_with_load_s']:.1f} s.",
        "",
    ]
    write_section(path, lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the random models (kept between runs)")
    args = ap.parse_args()
    work = Path(args.work or Path(tempfile.gettempdir()) / "studio-bench")
    make_full_size_checkpoint(work)
    make_full_size_controlnet(work)
    results = {"size": args.size, "steps": args.steps, "runs": args.runs,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}"}
    results |= run(work, args.size, args.steps, args.runs)
    print(json.dumps(results), flush=True)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "controlnet.json").write_text(json.dumps(results, indent=2))
    write_report(results, REPO / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
