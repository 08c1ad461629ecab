"""The Fast preset on a CPU: time to a 512² image with an LCM LoRA (4 steps, CFG 1) against the default
20-step path (DPM++ 2M, CFG 7), and against plain diffusers running the same LoRA, in one process.

    .venv/bin/python bench/bench_fast.py                   # full-size SD1.5 (random weights), ~15 min on 2 cores
    .venv/bin/python bench/bench_fast.py --tiny --report /tmp/fast.md    # the harness on tiny models, seconds

The three are timed in turns (default, fast, diffusers, default, ...) after a warm-up each, so a busy
machine slows all alike; medians and the spread (min–max). Each run is one whole txt2img call with
the model loaded: text encoding, sampling, VAE decode (and, for the studio, switching its LoRA set,
which a user pays too when alternating). The LoRA is random, in the LCM LoRA's layout (kohya keys,
UNet only, rank 64): its speed is what matters here, not its pictures. Diffusers gets its own copy of
the UNet (its PEFT layers would otherwise wrap the studio's), loads the file with
``load_lora_weights`` and fuses it, and samples with ``LCMScheduler``.

Writes bench/results/fast[-tiny].json and the "Fast preset" section of docs/benchmarks.md (or --report).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.bench_dit import cpu_name  # noqa: E402
from bench.report import write_section  # noqa: E402
from bench.suite import Setup, interleaved, on_worker, open_studio, sd_pipeline  # noqa: E402

PROMPT = "a photo of a cat on a sofa, detailed"
LORA = "lcm-lora-sdv1-5"


def make_models(setup: Setup) -> Path:
    """The checkpoint (full size or tiny); returns where the LoRA goes (written once the model's shapes are known)."""
    work = Path(setup.work)
    if setup.tiny:
        from studio.testing import make_checkpoint

        ckpt = work / "models" / "Stable-diffusion" / setup.sd15
        if not ckpt.exists():
            make_checkpoint(ckpt, "sd1", seed=1)
    else:
        from bench.bench_txt2img import make_full_size_checkpoint

        make_full_size_checkpoint(work)
    return work / "models" / "Lora" / f"{LORA}.safetensors"


def write_lora(lora: Path, model: Any, rank: int) -> None:
    from studio.testing.loras import write_kohya_lora

    if not lora.exists():
        write_kohya_lora(lora, {"unet": model.unet, "text_encoder": model.text_encoders[0]}, "sd1", rank=rank,
                         alpha=float(rank), te=False, seed=7)


def cpu_flags() -> str:
    """The CPU's name (bench_dit's) and the vector flags that decide the device policy's dtype."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    extras = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{cpu_name()} ({', '.join(extras)})" if extras else cpu_name()


def spread(summary: dict[str, Any]) -> str:
    return f"{summary['median']:.2f} ({min(summary['times']):.2f}–{max(summary['times']):.2f})"


def run(setup: Setup, size: int, default_steps: int, rank: int) -> dict[str, Any]:
    from diffusers import LCMScheduler

    from studio.generation.request import Txt2ImgRequest

    lora_path = make_models(setup)
    studio, model = open_studio(setup, setup.sd15)
    write_lora(lora_path, model, rank)
    studio.engine.networks.loras.refresh()

    def default() -> Any:
        return studio.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=default_steps, sampler_name="DPM++ 2M",
                                             scheduler="Automatic", cfg_scale=7.0, width=size, height=size, seed=1,
                                             save_images=False))

    def fast() -> Any:
        return studio.txt2img(Txt2ImgRequest(prompt=PROMPT, fast="auto", width=size, height=size, seed=1,
                                             save_images=False))

    probe = fast()
    assert any("Fast preset (LCM" in n for n in probe.notes), probe.notes

    # diffusers on its own UNet copy with the same file loaded and fused, in the studio's dtype
    pipe = sd_pipeline(model)
    pipe.unet = copy.deepcopy(model.unet)
    pipe.scheduler = LCMScheduler.from_config(model.scheduler_config)
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="lcm")
    pipe.fuse_lora()

    def plain() -> Any:
        return pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=size, width=size,
                    generator=torch.Generator("cpu").manual_seed(1))

    fns = {"default": default, "fast": fast, "diffusers": on_worker(studio, plain)}
    for fn in fns.values():   # warm-up: first calls allocate and (for the studio) apply the LoRA set
        fn()
    result = interleaved(fns, setup.runs)
    result["speedup"] = result["default"]["median"] / result["fast"]["median"]
    result["speedup_best"] = min(result["default"]["times"]) / min(result["fast"]["times"])
    result["vs_diffusers"] = result["fast"]["median"] / result["diffusers"]["median"]
    result["dtype"] = str(model.unet.dtype).replace("torch.", "")
    result["fast_settings"] = probe.infotexts[0].splitlines()[-1]
    studio.queue.shutdown()
    return result


def report(results: dict[str, Any]) -> list[str]:
    r = results["results"]
    goal = "≥ 4×"
    met = "yes" if r["speedup"] >= 4 else "no"
    return [
        "## Fast preset on the CPU (bench/bench_fast.py)",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}, {results['threads']} threads, weights in "
        f"{r['dtype']} (the device policy). {results['model']}, {results['size']}×{results['size']}, batch 1, "
        f"{results['runs']} interleaved runs after a warm-up each (default, fast, diffusers, ...). Cells: median "
        "seconds (min–max) for one whole txt2img call with the model loaded (text encoding, sampling, VAE decode; "
        "for the studio also switching its LoRA set, as a user alternating pays). The LoRA is random in the "
        f"LCM LoRA's layout (kohya keys, UNet only, rank {results['rank']}).",
        "",
        "| path | settings | seconds |",
        "|---|---|---|",
        f"| studio default | DPM++ 2M, {results['default_steps']} steps, CFG 7 | {spread(r['default'])} |",
        f"| studio Fast (`fast: auto`, the Fast button) | LCM LoRA added, LCM, 4 steps, CFG 1 | {spread(r['fast'])} |",
        f"| plain diffusers, same LoRA fused | LCMScheduler, 4 steps, guidance 1 | {spread(r['diffusers'])} |",
        "",
        f"Fast vs default: **{r['speedup']:.2f}×** faster (medians; {r['speedup_best']:.2f}× best to best); goal "
        f"{goal}: {met}. Studio Fast vs plain diffusers with the same LoRA: {r['vs_diffusers']:.2f}× its time.",
        "",
        f"The Fast run's settings, from its infotext: `{r['fast_settings']}`",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny test models: checks the harness in seconds")
    ap.add_argument("--work", default=None, help="folder for the models (kept between runs)")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--report", default=None, help="markdown file to write the section to "
                                                   "(default docs/benchmarks.md; with --tiny nothing unless given)")
    args = ap.parse_args()
    work = args.work or str(Path("/tmp") / ("studio-bench-fast-tiny" if args.tiny else "studio-bench-fast"))
    size = 64 if args.tiny else 512
    runs = args.runs or (2 if args.tiny else 3)
    rank = 4 if args.tiny else 64
    setup = Setup(work=work, tiny=args.tiny, steps=20, runs=runs, sizes=(size,), batches=(1,), xl_size=size)
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"machine": f"{platform.machine()}, {cpu_flags()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "size": size, "runs": runs,
               "rank": rank, "default_steps": 20,
               "model": "tiny SD1 test model" if args.tiny else "full-size SD1.5 architecture (random weights)"}
    results["results"] = run(setup, size, 20, rank)
    r = results["results"]
    print(f"default {spread(r['default'])}  fast {spread(r['fast'])}  diffusers {spread(r['diffusers'])}  "
          f"speed-up {r['speedup']:.2f}x", flush=True)
    out = REPO / "bench" / "results" / ("fast-tiny.json" if args.tiny else "fast.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    target = args.report or (None if args.tiny else str(REPO / "docs" / "benchmarks.md"))
    if target:
        write_section(Path(target), report(results))


if __name__ == "__main__":
    main()
