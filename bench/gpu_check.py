"""The GPU check: one prepared run that measures the studio on one CUDA GPU in about 8 minutes.

    .venv/bin/python bench/gpu_check.py                      # on the GPU machine: docs/benchmarks.md
    .venv/bin/python bench/gpu_check.py --cases sdxl,flux    # only some cases (the models stay in --work)
    .venv/bin/python bench/gpu_check.py --tiny --report /tmp/bench.md   # tiny models on the CPU: the harness

Cases, in the order they run (each in a process of its own, so a crash, an out-of-memory or a hang
in one is recorded as "failed: <reason>" and the next one runs):

- sd15, sdxl: SD1.5 512² and SDXL 1024², 20 steps of Euler a, CFG 7, batch 1 and 4. The studio
  against diffusers' own pipeline built on the very modules the studio loaded, interleaved
  (studio, diffusers, ...) after a warm-up each: seconds per call, the denoising loop's it/s
  (first to last UNet call, CUDA events: what published it/s figures count) and peak VRAM
  (``torch.cuda.max_memory_allocated``, reset before each run; peak RSS on a CPU).
- vae_nan: a VAE forced to fp16 whose first convolution overflows; the studio's decode must
  notice the NaNs, switch the VAE to float32 and return an image without them.
- switch: cold loads of two checkpoints, then switches between them from the model cache.
- lora: the first generation after a LoRA set change against one with the set unchanged.
- compile: the studio's regional torch.compile (its ``sd_compile_unet`` option): compile time
  and speed-up over eager.
- offload: ``--medvram`` / ``--lowvram`` against none on the same loaded model: speed, peak VRAM.
- flux: FLUX.1 dev at its real width and reduced depth (bench/bench_dit.py's models), as bf16,
  fp8 e4m3fn and GGUF Q8_0 files loaded by the studio: seconds per step.

Full-size architectures get random weights made on the fly in fp16 (no download), kept in --work
between runs. A global time budget (--budget-s) skips the cases that no longer fit ("skipped: time
budget") and stops a case that runs past it, keeping what it had measured. The raw figures go to
bench/results/gpu_check.json (gpu_check-tiny.json) after every case, and the report, a section
named after the GPU, to docs/benchmarks.md (--tiny: only to --report, by default in --work).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch.cuda.is_available() asks NVML instead of initialising the CUDA driver: the fork server that
# starts each case's process imports libraries that call it, and a driver initialised before a
# fork cannot be used after it
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.report import write_section  # noqa: E402
from bench.suite import (  # noqa: E402
    GIB,
    NEGATIVE,
    PROMPT,
    Setup,
    compare,
    generator,
    on_worker,
    open_studio,
    peak_rss,
    reset_peak,
    sd_pipeline,
    sdxl_pipeline,
    txt2img_request,
)

HEADING = "## GPU check (bench/gpu_check.py) — "
CASES = ("sd15", "sdxl", "vae_nan", "switch", "lora", "compile", "offload", "flux")
TITLES = {
    "sd15": "SD1.5 txt2img, studio vs diffusers",
    "sdxl": "SDXL txt2img, studio vs diffusers",
    "vae_nan": "fp16 VAE NaN fallback",
    "switch": "checkpoint switch from the RAM cache",
    "lora": "LoRA set change",
    "compile": "torch.compile (regional)",
    "offload": "--medvram / --lowvram",
    "flux": "FLUX.1 bf16 / fp8 / GGUF",
}
SAMPLER = "Euler a"
CFG = 7.0
GOAL_RATIO = 1.03            # studio ≤ 1.03× diffusers' time
GOAL_PUBLISHED = 0.80        # SD1.5 512² with compile on ≥ 80% of the best published it/s of the class
MIN_CASE_S = 10.0            # a case is not started with less time than this left
NO_CUDA_AFTER_FORK = 3       # a case process's exit code when CUDA is unusable in it
# What every case's process imports: the fork server imports it once, so a case's time is its work,
# not the 5-10 s that importing torch, diffusers and the studio takes.
CHILD_PRELOAD = ("bench.gpu_check", "studio.core", "studio.models.loader", "studio.models.dit_loader",
                 "diffusers.pipelines.stable_diffusion", "diffusers.pipelines.stable_diffusion_xl",
                 "diffusers.models.transformers", "diffusers.models.autoencoders",
                 "transformers.models.t5.modeling_t5", "transformers.models.clip.modeling_clip")
FLUX_GUIDANCE = 3.5
HELPER = "gpu-check-helper.safetensors"   # a tiny checkpoint to switch to and back (re-applies offload)

# Published it/s, from ../shared/reference/performance.md: (model, who/how, it/s). The H200 is a
# Hopper with the H100's compute and more memory bandwidth: its class is the H100's.
PUBLISHED: dict[str, list[tuple[str, str, float]]] = {
    "H100": [
        ("sd15", "diffusers vanilla, fp16 (stable-fast README, torch 2.1)", 54.5),
        ("sd15", "diffusers + torch.compile max-autotune (stable-fast README)", 66.0),
        ("sd15", "stable-fast (its compiler + CUDA graphs)", 104.6),
        ("sdxl", "diffusers vanilla, fp16 (stable-fast README)", 14.9),
        ("sdxl", "diffusers + torch.compile max-autotune (stable-fast README)", 18.5),
    ],
    "A100": [
        ("sd15", "diffusers eager, 50 steps (diffusers torch2.0 doc)", 21.66),
        ("sd15", "diffusers compiled reduce-overhead (diffusers torch2.0 doc, torch nightly)", 49.74),
        ("sd15", "diffusers vanilla (stable-fast README)", 35.6),
        ("sd15", "diffusers + torch.compile (stable-fast README)", 41.9),
        ("sd15", "stable-fast", 61.8),
        ("sd15", "PyTorch baseline, A800, 20 steps (OneDiff README)", 36.11),
        ("sd15", "OneDiff nexfort, A800, 20 steps", 76.02),
        ("sdxl", "diffusers eager (diffusers torch2.0 doc)", 8.64),
        ("sdxl", "diffusers vanilla / torch.compile (stable-fast README)", 10.0),
        ("sdxl", "PyTorch baseline, A800, 20 steps (OneDiff README)", 9.92),
        ("sdxl", "OneDiff nexfort, A800, 20 steps", 13.62),
        ("sdxl", "ComfyUI + LoRA (OneDiff comfy docs)", 9.10),
    ],
}
PUBLISHED_NOTE = ("A1111 / Forge publish no H100/A100 figures (their it/s in performance.md are RTX 4080/4090: "
                  "A1111+SDPA 24.5 it/s SD1.5 and 4.3 it/s SDXL on a 4080; Forge +3–6% on a 4090).")


@dataclass(frozen=True)
class Check:
    """What one run measures, handed to each case's process."""

    work: str
    tiny: bool
    steps: int
    runs: int
    sd15_size: int
    sdxl_size: int
    flux_size: int
    batches: tuple[int, ...]
    deadline: float          # time.time() after which a case skips its remaining parts
    cpu_compile: bool = False
    cuda: bool = False       # the parent sees a GPU: a case process that doesn't must say so

    def suite(self) -> Setup:
        """The suite's setup, for its model, request and studio helpers."""
        return Setup(work=self.work, tiny=self.tiny, steps=self.steps, runs=self.runs, sizes=(self.sd15_size,),
                     batches=self.batches, xl_size=self.sdxl_size)

    def left(self) -> float:
        return self.deadline - time.time()


class Recorder:
    """A case's results so far, written to its file after every part: a case stopped at the time
    budget (or crashed) still leaves what it had measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.result: dict[str, Any] = {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result))
        tmp.replace(self.path)


def log(message: str) -> None:
    print(message, flush=True)


def cuda() -> bool:
    return torch.cuda.is_available()


def reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:200]


def free_memory() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


# -- measuring ----------------------------------------------------------------------------------
class LoopClock:
    """The denoising loop's time in one run: from the start of the first call of ``net`` to the
    end of its last, which is what progress bars (and so published it/s figures) count. On a GPU
    CUDA events mark the two ends, so no hook waits for the device."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.first: Any = None
        self.last: Any = None
        self._hooks = [net.register_forward_pre_hook(self._enter), net.register_forward_hook(self._leave)]

    @staticmethod
    def _stamp() -> Any:
        if cuda():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _enter(self, *_: Any) -> None:
        if self.first is None:
            self.first = self._stamp()

    def _leave(self, *_: Any) -> None:
        self.last = self._stamp()

    def seconds(self) -> float:
        if self.first is None or self.last is None:
            return 0.0
        if cuda():
            self.last.synchronize()
            return self.first.elapsed_time(self.last) / 1000
        return self.last - self.first

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def measure(fn: Callable[[], Any], nets: tuple[Any, ...] = ()) -> tuple[float, int, float]:
    """(seconds, peak bytes, loop seconds) of one call: peak VRAM on a GPU (the allocator's high-water
    mark, reset first), the process's peak RSS on a CPU; the loop is timed at ``nets[0]``."""
    gc.collect()
    clock = LoopClock(nets[0]) if nets else None
    try:
        if cuda():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()
        started = time.perf_counter()
        fn()
        if cuda():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() if cuda() else peak_rss()
        return seconds, peak, clock.seconds() if clock else 0.0
    finally:
        if clock:
            clock.remove()


def summarize(times: list[float], peaks: list[int], loops: list[float]) -> dict[str, Any]:
    out = {"times": times, "median": statistics.median(times), "best": min(times), "worst": max(times),
           "peak_bytes": max(peaks), "peak_kind": "VRAM" if cuda() else "RSS"}
    if any(loops):
        out |= {"loop_times": loops, "loop_median": statistics.median(loops)}
    return out


def paired(studio_fn: Callable[[], Any], diffusers_fn: Callable[[], Any] | None, runs: int,
           net: Any) -> dict[str, Any]:
    return compare(studio_fn, diffusers_fn, runs, (net,), measure, summarize)


def in_turns(fns: dict[str, Callable[[], Any]], runs: int, nets: dict[str, Any],
             before: Callable[[str], None] = lambda key: None) -> dict[str, Any]:
    """Warm each up, then time them in turns, each one's loop at its own net; ``before(key)`` runs
    untimed ahead of each call (a switch)."""
    for key, fn in fns.items():
        before(key)
        fn()
    columns: dict[str, tuple[list[float], list[int], list[float]]] = {key: ([], [], []) for key in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            before(key)
            for column, value in zip(columns[key], measure(fn, (nets[key],))):
                column.append(value)
    return {key: summarize(*cols) for key, cols in columns.items()}


def timed(fn: Callable[[], Any]) -> float:
    if cuda():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if cuda():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def guarded(rec: Recorder, key: str, check: Check, fn: Callable[[], Any], margin: float = 5.0) -> Any:
    """One part of a case: its result under ``key``, or why it has none; the case goes on either way."""
    if check.left() < margin:
        rec.result[key] = {"skipped": "time budget"}
        rec.save()
        return None
    try:
        value = fn()
    except Exception as e:   # an out-of-memory or a missing feature in one part must not end the case
        log(f"  {key} failed: {reason(e)}")
        traceback.print_exc()
        rec.result[key] = {"failed": reason(e)}
        free_memory()
        value = None
    else:
        rec.result[key] = value
    rec.save()
    return value


# -- models -------------------------------------------------------------------------------------
def ensure_checkpoint(check: Check, family: str) -> float:
    """Write the random-weight checkpoint of ``family`` ("sd15" / "sdxl") if --work lacks it; seconds taken."""
    from bench.bench_txt2img import make_full_size_checkpoint
    from bench.suite import make_full_size_sdxl

    setup = check.suite()
    folder = Path(check.work) / "models" / "Stable-diffusion"
    path = folder / (setup.sd15 if family == "sd15" else setup.sdxl)
    if path.exists():
        return 0.0
    started = time.perf_counter()
    log(f"  writing {path.name}")
    if check.tiny:
        from studio.testing import make_checkpoint

        folder.mkdir(parents=True, exist_ok=True)
        make_checkpoint(path, "sd1" if family == "sd15" else "sdxl", seed=1)
    elif family == "sd15":
        make_full_size_checkpoint(Path(check.work))
    else:
        make_full_size_sdxl(Path(check.work), device="cuda" if cuda() else "cpu")
    free_memory()
    return time.perf_counter() - started


def ensure_helper(check: Check) -> None:
    """A tiny SD1 checkpoint: switching to it and back re-activates a model with the current flags."""
    from studio.testing import make_checkpoint

    path = Path(check.work) / "models" / "Stable-diffusion" / HELPER
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_checkpoint(path, "sd1", seed=2)


def flux_files(check: Check) -> dict[str, Path]:
    """FLUX.1 dev as bench/bench_dit.py makes it (full width, reduced depth; tiny with --tiny) in BFL's
    and ComfyUI's layouts, with its fp8 and GGUF Q8_0 re-saves; written once per --work."""
    from bench import bench_dit
    from studio.testing.flux import make_clip_l, make_flux_transformer, make_flux_vae, make_t5xxl
    from studio.testing.quantized import make_fp8_variant, make_gguf_variant

    models = Path(check.work) / "models"
    files = {"bf16": models / "diffusion_models" / bench_dit.FLUX_BF16,
             "fp8_e4m3fn": models / "diffusion_models" / bench_dit.FLUX_FP8,
             "gguf_q8_0": models / "unet" / bench_dit.FLUX_GGUF,
             "clip_l": models / "text_encoders" / "clip_l.safetensors",
             "t5xxl": models / "text_encoders" / "t5xxl_fp16.safetensors",
             "vae": models / "vae" / "ae.safetensors"}
    stamp = Path(check.work) / "gpu-check-flux.json"
    architecture = {"tiny": check.tiny, "flux_blocks": [bench_dit.FLUX_DOUBLE_BLOCKS, bench_dit.FLUX_SINGLE_BLOCKS],
                    "t5_layers": bench_dit.T5_LAYERS}
    if stamp.exists() and json.loads(stamp.read_text()) == architecture and all(p.exists() for p in files.values()):
        return files
    stamp.unlink(missing_ok=True)
    components = bench_dit.flux_components(check.tiny)
    make_flux_transformer(files["bf16"], components=components)
    make_clip_l(files["clip_l"], components=components)
    make_t5xxl(files["t5xxl"], components=components)
    make_flux_vae(files["vae"], components=components)
    del components
    free_memory()
    make_fp8_variant(files["bf16"], files["fp8_e4m3fn"])
    make_gguf_variant(files["bf16"], files["gguf_q8_0"], "Q8_0")
    stamp.write_text(json.dumps(architecture))
    return files


# -- cases --------------------------------------------------------------------------------------
def case_txt2img(check: Check, rec: Recorder, family: str) -> None:
    setup = check.suite()
    rec.result["build_s"] = ensure_checkpoint(check, family)
    studio, model = open_studio(setup, setup.sd15 if family == "sd15" else setup.sdxl)
    pipe = sd_pipeline(model, sampler_name=SAMPLER) if family == "sd15" else sdxl_pipeline(model, SAMPLER)
    size = check.sd15_size if family == "sd15" else check.sdxl_size
    rec.result |= {"size": size, "steps": check.steps, "sampler": SAMPLER, "cfg": CFG, "runs": check.runs,
                   "policy": model.policy.label, "model_bytes": model.nbytes}

    def pair(batch: int) -> dict[str, Any]:
        def run_diffusers() -> None:
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=check.steps, height=size, width=size,
                 guidance_scale=CFG, num_images_per_prompt=batch, generator=generator())

        req = txt2img_request(setup, size, batch, sampler_name=SAMPLER, cfg_scale=CFG)
        result = paired(lambda: studio.txt2img(req), on_worker(studio, run_diffusers), check.runs, model.unet)
        log(f"  {family} batch {batch}: studio {result['studio']['median']:.2f}s, "
            f"diffusers {result['diffusers']['median']:.2f}s, ratio {result['ratio']:.3f}")
        return result

    for batch in check.batches:
        guarded(rec, f"batch {batch}", check, lambda b=batch: pair(b))


def case_sd15(check: Check, rec: Recorder) -> None:
    case_txt2img(check, rec, "sd15")


def case_sdxl(check: Check, rec: Recorder) -> None:
    case_txt2img(check, rec, "sdxl")


def case_vae_nan(check: Check, rec: Recorder) -> None:
    """The studio's decode (generation/txt2img.py: ``decode_latents``) retries in float32 when a
    half-precision VAE gives NaNs. Its first convolution's weights are scaled so that, in fp16, its
    output passes 65504 (inf, then NaN after the group norm) while float32 holds it."""
    from studio.generation.txt2img import decode_latents

    setup = check.suite()
    rec.result["build_s"] = ensure_checkpoint(check, "sd15")
    studio, model = open_studio(setup, setup.sd15)
    vae, size = model.vae, check.sd15_size
    latents = torch.randn(1, 4, size // 8, size // 8, generator=generator())
    rec.result |= {"size": size, "policy_vae_dtype": str(vae.dtype).removeprefix("torch.")}

    def force_overflowing_fp16(state: Any) -> bool:
        with torch.no_grad():
            vae.to(torch.float32)
            weight = vae.decoder.conv_in.weight
            weight.mul_(30000.0 / weight.abs().max())   # representable in fp16; the sums are not
            vae.to(torch.float16)
            x = model.latent_codec.to_vae(latents).to(model.policy.device, torch.float16)
            return bool(torch.isnan(vae.decode(x).sample).any())

    rec.result["fp16_gives_nan"] = studio.queue.run(force_overflowing_fp16)
    outputs: list[bool] = []
    hook = vae.decoder.register_forward_hook(lambda m, a, out: outputs.append(bool(torch.isnan(out).any())))
    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    catcher = Catch(logging.WARNING)
    logger = logging.getLogger("studio")   # wherever in the studio the decode logs from
    logger.addHandler(catcher)
    try:
        seconds = studio.queue.run(lambda state: timed(lambda: decode_latents(model, latents)))
    finally:
        hook.remove()
        logger.removeHandler(catcher)
    after = vae.dtype
    plain = studio.queue.run(lambda state: timed(lambda: decode_latents(model, latents)))   # float32 now
    rec.result |= {"decodes": len(outputs), "output_has_nan": outputs[-1] if outputs else None,
                   "fallback_fired": after == torch.float32 and any("NaN" in w for w in warnings),
                   "vae_dtype_after": str(after).removeprefix("torch."), "seconds_with_fallback": seconds,
                   "seconds_float32": plain}
    log(f"  vae_nan: fp16 NaN {rec.result['fp16_gives_nan']}, fallback {rec.result['fallback_fired']}, "
        f"output NaN {rec.result['output_has_nan']}")


def case_switch(check: Check, rec: Recorder) -> None:
    """A = SD1.5, B = SDXL, the cache holding two (sd_checkpoints_limit 2): cold loads (the files in
    the page cache), then switches back and forth."""
    setup = check.suite()
    rec.result["build_s"] = ensure_checkpoint(check, "sd15") + ensure_checkpoint(check, "sdxl")
    from studio.config import Flags
    from studio.core import Studio

    ensure_helper(check)
    studio = Studio.create(Flags(data_dir=check.work, no_demo=True, no_hashing=True))
    studio.settings.update({"sd_checkpoints_limit": 2}, persist=False)
    a, b = setup.sd15, setup.sdxl
    # a tiny model first pays the first load's one-time costs (lazy imports, CUDA context); it is
    # the least recently used when B comes, so the cache then holds A and B
    rec.result["helper_s"] = timed(lambda: studio.select_checkpoint(HELPER))
    rec.result["cold_a_s"] = timed(lambda: studio.select_checkpoint(a))
    rec.result["cold_b_s"] = timed(lambda: studio.select_checkpoint(b))
    rec.result["disk_loads"] = studio.models.disk_loads
    rec.save()
    to_a, to_b = [], []
    for _ in range(max(check.runs, 2)):
        if check.left() < 5:
            rec.result["cut_short"] = "time budget"
            break
        to_a.append(timed(lambda: studio.select_checkpoint(a)))
        to_b.append(timed(lambda: studio.select_checkpoint(b)))
    rec.result |= {"a": a, "b": b, "switch_to_a": to_a, "switch_to_b": to_b,
                   "disk_loads_after": studio.models.disk_loads}
    log(f"  switch: cold {rec.result['cold_a_s']:.2f}s / {rec.result['cold_b_s']:.2f}s, cached "
        f"{statistics.median(to_a or [0]):.2f}s / {statistics.median(to_b or [0]):.2f}s")


def case_lora(check: Check, rec: Recorder) -> None:
    """A rank-32 kohya LoRA (rank 4 tiny) on the UNet and text encoder; in turns: a generation whose
    LoRA weight differs from the last one's (the set changed: the studio re-patches) and one with
    the same set again."""
    from studio.testing.loras import write_kohya_lora

    setup = check.suite()
    rec.result["build_s"] = ensure_checkpoint(check, "sd15")
    studio, model = open_studio(setup, setup.sd15)
    rank = 4 if check.tiny else 32
    path = Path(check.work) / "models" / "Lora" / f"gpu-check-rank{rank}.safetensors"
    if not path.exists():
        write_kohya_lora(path, {"unet": model.unet, "text_encoder": model.text_encoders[0]}, "sd1", rank=rank,
                         alpha=rank / 2, seed=1)
    studio.networks.refresh()
    size = check.sd15_size
    weights = iter([0.5, 0.6] * (check.runs + 2))
    current = {"weight": 0.5}

    def request(weight: float) -> Any:
        return txt2img_request(setup, size, sampler_name=SAMPLER, cfg_scale=CFG).with_changes(
            prompt=f"{PROMPT} <lora:{path.stem}:{weight}>")

    def changed() -> None:
        current["weight"] = next(weights)
        studio.txt2img(request(current["weight"]))

    def unchanged() -> None:
        studio.txt2img(request(current["weight"]))

    fns = {"changed": changed, "unchanged": unchanged}
    result = in_turns(fns, check.runs, dict.fromkeys(fns, model.unet))
    rec.result |= {"size": size, "rank": rank, **result,
                   "change_cost_s": result["changed"]["median"] - result["unchanged"]["median"]}
    log(f"  lora: changed {result['changed']['median']:.2f}s, unchanged {result['unchanged']['median']:.2f}s")


def case_compile(check: Check, rec: Recorder) -> None:
    """Eager runs, then the studio's option on with an emptied compile cache: the first generation
    pays the compile; then compiled runs. On the CPU the tiny check uses the "eager" backend (the
    studio's path through TorchDynamo, without inductor's C++ build, which takes minutes here)."""
    from studio.optimizations import compile_cache_dir

    setup = check.suite()
    rec.result["build_s"] = ensure_checkpoint(check, "sd15")
    studio, model = open_studio(setup, setup.sd15)
    backend = "inductor" if cuda() else "eager"
    size = check.sd15_size
    req = txt2img_request(setup, size, sampler_name=SAMPLER, cfg_scale=CFG)
    rec.result |= {"size": size, "steps": check.steps, "backend": backend}
    eager = paired(lambda: studio.txt2img(req), None, check.runs, model.unet)["studio"]
    rec.result["eager"] = eager
    rec.save()
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:   # the user's own cache is left alone
        shutil.rmtree(compile_cache_dir(Path(check.work)), ignore_errors=True)
        rec.result["cache"] = "emptied first"
    studio.settings.update({"sd_compile_unet": True, "sd_compile_backend": backend}, persist=False)
    first = timed(lambda: studio.txt2img(req))
    rec.result |= {"first_s": first, "compile_s": max(0.0, first - eager["median"])}
    rec.save()
    log(f"  compile: first generation {first:.1f}s")
    compiled = guarded(rec, "compiled", check,
                       lambda: paired(lambda: studio.txt2img(req), None, check.runs, model.unet)["studio"])
    if compiled:
        rec.result["speedup"] = eager["median"] / compiled["median"]
        if "loop_median" in compiled and "loop_median" in eager:
            rec.result["loop_speedup"] = eager["loop_median"] / compiled["loop_median"]
        log(f"  compile: speed-up {rec.result['speedup']:.2f}×")


def case_offload(check: Check, rec: Recorder) -> None:
    """One loaded SD1.5, re-activated under each mode (switching to a tiny helper checkpoint and
    back applies the manager's offload flags), timed in turns."""
    from studio.models.manager import OffloadFlags

    setup = check.suite()
    rec.result["build_s"] = ensure_checkpoint(check, "sd15")
    ensure_helper(check)
    studio, model = open_studio(setup, setup.sd15)
    studio.settings.update({"sd_checkpoints_limit": 2}, persist=False)
    size = check.sd15_size
    req = txt2img_request(setup, size, sampler_name=SAMPLER, cfg_scale=CFG)
    plans: dict[str, str] = {}
    active: dict[str, str] = {}

    def switch_to(mode: str) -> None:
        if active.get("mode") == mode:
            return
        studio.models.offload = OffloadFlags(medvram=mode == "medvram", lowvram=mode == "lowvram")
        studio.select_checkpoint(HELPER)
        studio.select_checkpoint(setup.sd15)
        free_memory()
        plans[mode] = studio.models.current.memory_plan
        active["mode"] = mode

    fns = {mode: (lambda: studio.txt2img(req)) for mode in ("none", "medvram", "lowvram")}
    result = in_turns(fns, check.runs, dict.fromkeys(fns, model.unet), switch_to)
    rec.result |= {"size": size, "steps": check.steps, "plans": plans, **result}
    for mode in ("medvram", "lowvram"):
        rec.result[mode]["slowdown"] = result[mode]["median"] / result["none"]["median"]
    log("  offload: " + ", ".join(f"{m} {r['median']:.2f}s" for m, r in result.items()))


def case_flux(check: Check, rec: Recorder) -> None:
    """The three files of one FLUX.1 transformer, all kept in the cache and timed in turns (a cached
    switch before each run, untimed); s/it is the denoising loop's time per step."""
    from bench import bench_dit
    from studio.models.storage import storage_label

    started = time.perf_counter()
    files = flux_files(check)
    rec.result |= {"build_s": time.perf_counter() - started, "size": check.flux_size, "steps": check.steps,
                   "depth": "tiny test model" if check.tiny else
                   f"full width, {bench_dit.FLUX_DOUBLE_BLOCKS} double + {bench_dit.FLUX_SINGLE_BLOCKS} single "
                   "blocks (real 19 + 38)"}
    rec.save()
    setup = check.suite()
    studio, model = open_studio(setup, files["bf16"].name)
    studio.settings.update({"sd_checkpoints_limit": 3}, persist=False)
    req = txt2img_request(setup, check.flux_size, cfg_scale=1.0, distilled_cfg_scale=FLUX_GUIDANCE,
                          scheduler="Simple")
    models = {"bf16": model}
    loads: dict[str, float] = {}
    for variant in ("fp8_e4m3fn", "gguf_q8_0"):
        loads[variant] = timed(lambda v=variant: models.__setitem__(v, studio.select_checkpoint(files[v].name)))
    rec.result["load_s"] = loads
    rec.save()
    fns = {variant: (lambda: studio.txt2img(req)) for variant in models}
    results = in_turns(fns, check.runs, {v: m.unet for v, m in models.items()},
                       lambda v: studio.select_checkpoint(files[v].name))
    for variant, entry in results.items():
        entry["s_per_it"] = entry.get("loop_median", entry["median"]) / check.steps
        entry["storage"] = storage_label(models[variant].unet)
    rec.result |= results
    log("  flux: " + ", ".join(f"{v} {r['s_per_it']:.3f} s/it" for v, r in results.items()))


CASE_FNS: dict[str, Callable[[Check, Recorder], None]] = {
    "sd15": case_sd15, "sdxl": case_sdxl, "vae_nan": case_vae_nan, "switch": case_switch, "lora": case_lora,
    "compile": case_compile, "offload": case_offload, "flux": case_flux,
}


def child_entry(name: str, check: Check, out: str) -> None:
    """A case's process: its results (partial ones too) in ``out``; exit code 1 after an error. It
    leads a session of its own, so that stopping it stops its compile workers too."""
    os.setsid()
    torch.manual_seed(0)
    if check.tiny and not cuda():
        # tiny models gain nothing from a second thread, and on a busy shared CPU OpenMP's threads
        # waiting for each other at every op can make a run 20× slower
        torch.set_num_threads(1)
    rec = Recorder(Path(out))
    code = 0
    try:
        if check.cuda:
            try:
                torch.zeros(1, device="cuda")
            except Exception as e:
                rec.result["error"] = f"CUDA unusable in a forked process: {reason(e)}"
                rec.save()
                os._exit(NO_CUDA_AFTER_FORK)
        CASE_FNS[name](check, rec)
    except Exception as e:
        traceback.print_exc()
        rec.result["error"] = reason(e)
        code = 1
    rec.save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # skip tearing down the worker thread and gigabytes of modules


def child_context() -> multiprocessing.context.BaseContext:
    """A fork server that has imported torch, diffusers and the studio but run nothing (no CUDA, no
    thread pools to break a fork): each case starts warm and otherwise fresh, with its own peak
    memory and its own CUDA context."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(CHILD_PRELOAD))
    return context


def run_case(name: str, check: Check, context: multiprocessing.context.BaseContext) -> dict[str, Any]:
    """The case in a process of its own, stopped (with its whole session) at the deadline. The
    result's "exitcode" tells the driver when the fork server's children cannot use CUDA."""
    from bench.gpu_check import child_entry  # by its module name: the fork server has it imported

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    proc = context.Process(target=child_entry, args=(name, check, str(out)), name=f"gpu-check-{name}")
    proc.start()
    proc.join(timeout=max(1.0, check.left()))
    stopped = proc.is_alive()
    if stopped:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.join()
    text = out.read_text() if out.exists() else ""
    out.unlink(missing_ok=True)
    partial = json.loads(text) if text.strip() else {}
    if stopped:
        return {"status": "failed", "reason": "stopped at the time budget", "result": partial}
    if proc.exitcode != 0:
        why = partial.pop("error", None) or f"exit code {proc.exitcode}"
        return {"status": "failed", "reason": why, "result": partial, "exitcode": proc.exitcode}
    return {"status": "ok", "result": partial}


# -- report -------------------------------------------------------------------------------------
def gpu_class(device: str) -> str | None:
    name = device.upper()
    if any(k in name for k in ("H100", "H200", "H800", "GH200")):
        return "H100"
    if any(k in name for k in ("A100", "A800")):
        return "A100"
    return None


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _spread(entry: dict[str, Any]) -> str:
    return f"{entry['median']:.2f} ({entry['best']:.2f}–{entry['worst']:.2f})"


def _its(entry: dict[str, Any], steps: int) -> float:
    return steps / entry.get("loop_median", entry["median"])


def _part(entry: Any) -> str | None:
    """'skipped: …' / 'failed: …' for a part without figures, else None."""
    if isinstance(entry, dict) and ("skipped" in entry or "failed" in entry):
        return f"skipped: {entry['skipped']}" if "skipped" in entry else f"failed: {entry['failed']}"
    return None


def headline(name: str, entry: dict[str, Any]) -> str:
    """The summary table's cell for one case."""
    if entry["status"] == "skipped":
        return f"skipped: {entry['reason']}"
    r = entry.get("result", {})
    prefix = f"failed: {entry['reason']}" if entry["status"] == "failed" else ""
    try:
        text = _headline(name, r)
    except (KeyError, TypeError, ZeroDivisionError):
        text = ""
    if prefix:
        return prefix + (f" (measured before: {text})" if text else "")
    return text or "no figures"


def _headline(name: str, r: dict[str, Any]) -> str:
    if name in ("sd15", "sdxl"):
        cells = []
        for key, part in r.items():
            if not key.startswith("batch "):
                continue
            cells.append(f"{key}: {_part(part)}" if _part(part) else
                         f"{key}: studio {_its(part['studio'], r['steps']):.2f} it/s, diffusers "
                         f"{_its(part['diffusers'], r['steps']):.2f} it/s, time ratio {part['ratio']:.3f}, "
                         f"peak {_gib(part['studio']['peak_bytes'])} / {_gib(part['diffusers']['peak_bytes'])} GiB")
        return "; ".join(cells)
    if name == "vae_nan":
        return (f"fp16 decode gave NaN: {r['fp16_gives_nan']}; fallback fired: {r['fallback_fired']}; "
                f"output has NaN: {r['output_has_nan']}; {r['seconds_with_fallback']:.2f} s with the retry, "
                f"{r['seconds_float32']:.2f} s in float32")
    if name == "switch":
        return (f"cold load {r['cold_a_s']:.2f} s (A) / {r['cold_b_s']:.2f} s (B); cached switch "
                f"{statistics.median(r['switch_to_a']):.2f} s (to A) / {statistics.median(r['switch_to_b']):.2f} s "
                f"(to B)")
    if name == "lora":
        return (f"after a change {_spread(r['changed'])} s, set unchanged {_spread(r['unchanged'])} s "
                f"(change costs {r['change_cost_s']:+.2f} s)")
    if name == "compile":
        text = f"compile {r['compile_s']:.1f} s (first generation {r['first_s']:.1f} s), eager {_spread(r['eager'])} s"
        if "compiled" not in r or _part(r["compiled"]):
            return text + f"; compiled runs {_part(r.get('compiled')) or 'not measured'}"
        return text + (f", compiled {_spread(r['compiled'])} s: speed-up {r['speedup']:.2f}×, "
                       f"{_its(r['compiled'], r['steps']):.2f} it/s")
    if name == "offload":
        return "; ".join(f"{m}: {_spread(r[m])} s, peak {_gib(r[m]['peak_bytes'])} GiB" for m in
                         ("none", "medvram", "lowvram"))
    if name == "flux":
        cells = [f"{v}: {r[v]['s_per_it']:.3f} s/it" for v in ("bf16", "fp8_e4m3fn", "gguf_q8_0") if v in r]
        return "; ".join(cells) + f" ({r['depth']}, {r['size']}², {r['steps']} steps)"
    return ""


def txt2img_rows(res: dict[str, Any]) -> list[str]:
    rows = ["| model | size | batch | studio s | diffusers s | ratio (best) | studio it/s | diffusers it/s | "
            "studio peak GiB | diffusers peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in (("sd15", "SD1.5"), ("sdxl", "SDXL")):
        r = res["cases"].get(name, {}).get("result", {})
        for key, part in r.items():
            if not key.startswith("batch "):
                continue
            batch = key.split()[1]
            if _part(part):
                rows.append(f"| {label} | {r['size']}² | {batch} | {_part(part)} | | | | | | |")
                continue
            st, di = part["studio"], part["diffusers"]
            flag = "" if part["ratio"] <= GOAL_RATIO else " ⚠"
            rows.append(f"| {label} | {r['size']}² | {batch} | {_spread(st)} | {_spread(di)} | "
                        f"{part['ratio']:.3f} ({part['ratio_best']:.3f}){flag} | {_its(st, r['steps']):.2f} | "
                        f"{_its(di, r['steps']):.2f} | {_gib(st['peak_bytes'])} | {_gib(di['peak_bytes'])} |")
    return rows if len(rows) > 2 else []


def published_lines(res: dict[str, Any]) -> list[str]:
    klass = gpu_class(res["device"])
    lines = [f"Published figures ({klass + ' class' if klass else 'no figures for this GPU: H100 and A100 shown'}; "
             "../shared/reference/performance.md; batch 1, fp16, their own stacks):", ""]
    for k in ([klass] if klass else list(PUBLISHED)):
        for model, who, its in PUBLISHED[k]:
            lines.append(f"- {k}, {'SD1.5 512²' if model == 'sd15' else 'SDXL 1024²'}: {who}: {its:g} it/s")
    return lines + ["- " + PUBLISHED_NOTE, ""]


def goal_lines(res: dict[str, Any]) -> list[str]:
    c = res["cases"]
    goals = ["| goal | measured | met |", "|---|---|---|"]
    ratios = [(f"{name} {key}", part["ratio"]) for name in ("sd15", "sdxl")
              for key, part in c.get(name, {}).get("result", {}).items()
              if key.startswith("batch ") and not _part(part)]
    if ratios:
        worst = max(ratios, key=lambda kr: kr[1])
        goals.append(f"| studio ≤ {GOAL_RATIO}× diffusers' time (median, end to end) | worst {worst[1]:.3f} "
                     f"({worst[0]}) | {'yes' if worst[1] <= GOAL_RATIO else 'no'} |")
    klass = gpu_class(res["device"])
    compiled = c.get("compile", {}).get("result", {}).get("compiled")
    if klass and compiled and not _part(compiled) and not res["tiny"]:
        best = max(its for model, _, its in PUBLISHED[klass] if model == "sd15")
        its = _its(compiled, c["compile"]["result"]["steps"])
        met = "yes" if its >= GOAL_PUBLISHED * best else "no"
        goals.append(f"| SD1.5 512² with compile on ≥ {GOAL_PUBLISHED:.0%} of the best published {klass}-class it/s "
                     f"({best:g}) | {its:.2f} it/s = {its / best:.0%} | {met} |")
    else:
        goals.append(f"| SD1.5 512² with compile on ≥ {GOAL_PUBLISHED:.0%} of the best published it/s of the GPU class "
                     f"| n/a ({'tiny models' if res['tiny'] else 'no compiled figure or no published class'}) | – |")
    return goals + [""]


def detail_lines(res: dict[str, Any]) -> list[str]:
    c = res["cases"]
    lines: list[str] = []
    off = c.get("offload", {}).get("result", {})
    if all(m in off and "median" in off[m] for m in ("none", "medvram", "lowvram")):
        lines += [f"Offload, SD1.5 {off['size']}², {off['steps']} steps, batch 1, one model re-activated under each "
                  "mode, in turns:", "", "| mode | seconds | it/s (loop) | slower than none | peak GiB | placement |",
                  "|---|---|---|---|---|---|"]
        for m in ("none", "medvram", "lowvram"):
            lines.append(f"| {m} | {_spread(off[m])} | {_its(off[m], off['steps']):.2f} | "
                         f"{off[m].get('slowdown', 1.0):.2f}× | {_gib(off[m]['peak_bytes'])} | "
                         f"{off['plans'].get(m, '') or '–'} |")
        lines.append("")
    fl = c.get("flux", {}).get("result", {})
    if any(v in fl for v in ("bf16", "fp8_e4m3fn", "gguf_q8_0")):
        lines += [f"FLUX.1 dev ({fl['depth']}), {fl['size']}², {fl['steps']} steps, distilled guidance "
                  f"{FLUX_GUIDANCE}, in turns:", "", "| file | storage | load s | seconds | s/it (loop) | peak GiB |",
                  "|---|---|---|---|---|---|"]
        for v in ("bf16", "fp8_e4m3fn", "gguf_q8_0"):
            if v in fl:
                load = fl.get("load_s", {}).get(v)
                lines.append(f"| {v} | {fl[v]['storage']} | {'first load' if load is None else f'{load:.2f}'} | "
                             f"{_spread(fl[v])} | {fl[v]['s_per_it']:.3f} | {_gib(fl[v]['peak_bytes'])} |")
        lines.append("")
    return lines


def report_lines(res: dict[str, Any]) -> list[str]:
    s = res["setup"]
    peak = "peak VRAM (torch.cuda.max_memory_allocated, reset before each run)" if res["cuda"] else \
        "peak RSS (the process's high-water mark, reset before each run)"
    lines = [HEADING + res["device"], "",
             f"Machine: {res['machine']}. One run of `bench/gpu_check.py{' --tiny' if res['tiny'] else ''}` "
             f"({res['date']}, {res['elapsed_s'] / 60:.1f} min of a {res['budget_s']:.0f} s budget). "
             + ("Tiny test models: a check of the harness, not a measurement. " if res["tiny"] else
                "Random-weight full-size architectures (fp16 files made on the fly). ")
             + f"txt2img: {s['steps']} steps of {SAMPLER}, CFG {CFG:g}, SD1.5 {s['sd15_size']}², SDXL "
               f"{s['sdxl_size']}², batch {' and '.join(map(str, s['batches']))}; the studio against diffusers' "
               f"pipeline on the very modules the studio loaded, {s['runs']} interleaved runs after a warm-up each. "
               f"Cells: median (min–max) seconds per call, end to end; ratio = studio / diffusers (⚠ over "
               f"{GOAL_RATIO}); it/s = steps / the denoising loop's time (first to last UNet call), as progress "
               f"bars count; {peak}. Each case runs in its own process.", "",
             "| case | result |", "|---|---|"]
    for name in CASES:
        entry = res["cases"].get(name, {"status": "skipped", "reason": "not selected (--cases)"})
        lines.append(f"| {name} | {TITLES[name]}: {headline(name, entry)} |")
    lines.append("")
    rows = txt2img_rows(res)
    if rows:
        lines += rows + [""]
    lines += published_lines(res)
    lines += ["Goals:", ""] + goal_lines(res)
    lines += detail_lines(res)
    return lines


# -- driver -------------------------------------------------------------------------------------
def device_name() -> str:
    if cuda():
        return torch.cuda.get_device_name(0)
    from bench.bench_dit import cpu_name

    return f"{cpu_name()} (CPU)"


def machine() -> str:
    import diffusers

    gpu = ""
    if cuda():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}, "
    return (f"{gpu}{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny test models (the harness on a CPU, in a minute or two)")
    ap.add_argument("--work", default=None, help="folder for the random models (kept between runs)")
    ap.add_argument("--report", default=None,
                    help="markdown file to write (default docs/benchmarks.md; with --tiny <work>/gpu_check-tiny.md)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="time budget for the whole run (default 450 s)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--cpu-compile", action="store_true",
                    help="run the compile case on a CPU too (TorchDynamo with the eager backend; minutes)")
    args = ap.parse_args(argv)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    started = time.time()
    default_work = Path(tempfile.gettempdir()) / ("studio-gpu-check-tiny" if args.tiny else "studio-gpu-check")
    work = Path(args.work or default_work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check = Check(work=str(work), tiny=args.tiny, steps=4 if args.tiny else 20, runs=2 if args.tiny else 3,
                  sd15_size=64 if args.tiny else 512, sdxl_size=64 if args.tiny else 1024,
                  flux_size=64 if args.tiny else 1024, batches=(1, 4), deadline=started + args.budget_s,
                  cpu_compile=args.cpu_compile, cuda=cuda())
    report = Path(args.report) if args.report else (work / "gpu_check-tiny.md" if args.tiny
                                                    else REPO / "docs" / "benchmarks.md")
    results_file = REPO / "bench" / "results" / ("gpu_check-tiny.json" if args.tiny else "gpu_check.json")
    results_file.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"device": device_name(), "machine": machine(), "cuda": cuda(), "tiny": args.tiny,
                           "date": time.strftime("%Y-%m-%d"), "budget_s": args.budget_s,
                           "setup": {k: v for k, v in asdict(check).items() if k != "deadline"}, "cases": {}}
    log(f"GPU check on {res['device']}: {', '.join(cases)}; budget {args.budget_s:.0f} s; work {work}")
    context = child_context()
    for name in cases:
        elapsed = time.time() - started
        if check.left() < MIN_CASE_S:
            res["cases"][name] = {"status": "skipped", "reason": "time budget"}
            log(f"[{elapsed:5.0f}s] {name}: skipped (time budget)")
        elif name == "compile" and not cuda() and not check.cpu_compile:
            res["cases"][name] = {"status": "skipped", "reason": "CPU (inductor compiles for minutes on a CPU; "
                                                                 "--cpu-compile runs the path with the eager backend)"}
            log(f"[{elapsed:5.0f}s] {name}: skipped (CPU)")
        else:
            log(f"[{elapsed:5.0f}s] {name}")
            res["cases"][name] = run_case(name, check, context)
            if res["cases"][name].pop("exitcode", 0) == NO_CUDA_AFTER_FORK:
                # the fork server touched the driver after all: fresh interpreters from now on
                log(f"  {res['cases'][name]['reason']}; running the cases in spawned processes")
                context = multiprocessing.get_context("spawn")
                res["cases"][name] = run_case(name, check, context)
                res["cases"][name].pop("exitcode", None)
            entry = res["cases"][name]
            if entry["status"] != "ok":
                log(f"  {name} failed: {entry['reason']}")
        res["elapsed_s"] = time.time() - started
        results_file.write_text(json.dumps(res, indent=2))
        write_section(report, report_lines(res))   # after every case: a stopped run leaves its report
    lines = report_lines(res)
    write_section(report, lines)
    log("\n".join(lines))
    log(f"wrote {report} and {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
