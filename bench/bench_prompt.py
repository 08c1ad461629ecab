"""Prompt encoding cost on the full-size SD1.5 text encoder (CLIP-L, random weights).

    .venv/bin/python bench/bench_prompt.py

Encodes a ~150-token weighted prompt (two chunks, emphasis, an editing construct) the way the
sampler loop does, first uncached, then again (the cache makes a repeated prompt free).
Writes its table into docs/benchmarks.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_txt2img import make_full_size_checkpoint  # noqa: E402
from bench.report import write_section  # noqa: E402

PROMPT = ", ".join(
    ["(masterpiece:1.2)", "best quality", "a [red:blue:0.5] lighthouse on a cliff at dusk", "((dramatic sky))",
     "[film grain]", "oil painting by an old master", "sharp focus"] * 5)


def main() -> None:
    from studio.config import Flags
    from studio.core import Studio
    from studio.prompts.schedule import ConditioningPlan

    work = Path(tempfile.gettempdir()) / "studio-bench"
    make_full_size_checkpoint(work)
    rows = []
    for no_half in (True, False):
        studio = Studio.create(Flags(data_dir=str(work), no_half=no_half, no_demo=True))
        model = studio.select_checkpoint("random-sd15.safetensors")
        cond = model.conditioner
        tokens = studio.token_count(PROMPT)[0]
        chunks = len(cond.chunks(PROMPT))
        cold = []
        from studio.prompts.schedule import cached_schedule
        for _ in range(5):
            cond._cache.clear()
            cond._chunks.clear()
            cached_schedule.cache_clear()
            t = time.perf_counter()
            plan = ConditioningPlan(cond, PROMPT, "lowres, blurry", 20, 1)
            for step in range(20):
                plan.at(step)
            cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        plan = ConditioningPlan(cond, PROMPT, "lowres, blurry", 20, 1)
        for step in range(20):
            plan.at(step)
        warm = time.perf_counter() - t
        rows.append((str(model.policy.dtype).removeprefix("torch."), tokens, chunks, len(plan.all_texts),
                     statistics.median(cold), warm))
        studio.queue.shutdown()
        del studio, model, cond, plan

    lines = [
        "## Prompt encoding (bench/bench_prompt.py)",
        "",
        "Full-size SD1.5 text encoder (CLIP-L, random weights) on this 2-core CPU. A weighted prompt of "
        f"{rows[0][1]} tokens ({rows[0][2]} chunks of 75) with an editing construct, so each generation "
        f"encodes {rows[0][3]} distinct texts (two schedule phases and the negative), all steps of a 20-step run "
        "resolved. Uncached: median of 5 runs with every cache cleared (prompt-editing parse, tokenization, "
        "encoding). Repeated prompt: the next generation with the same prompt.",
        "",
        "| dtype | tokens | chunks | texts encoded | uncached s | repeated prompt s |",
        "|---|---|---|---|---|---|",
        *[f"| {d} | {t} | {k} | {n} | {c:.3f} | {w:.4f} |" for d, t, k, n, c, w in rows],
        "",
    ]
    write_section(REPO / "docs" / "benchmarks.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
