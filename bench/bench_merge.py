"""Checkpoint Merger memory and speed: the studio's streamed merge vs the whole-file way (load both
state dicts, compute, ``save_file``, what A1111's merger does), in the same run, interleaved, each
run in a fresh process so its peak RSS is its own. Two full-size SD1.5 files with random weights
(fp16, 2.1 GB each) are made on the fly.

    .venv/bin/python bench/bench_merge.py [--runs 3]

Writes bench/results/merge.json and the "Checkpoint Merger" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_txt2img import make_full_size_checkpoint  # noqa: E402
from bench.report import write_section  # noqa: E402

# each run: (seconds, peak RSS in MiB) on stdout as JSON
STUDIO_RUN = """
import json, re, sys, time
from pathlib import Path
# VmHWM: this process's peak resident memory (ru_maxrss would count the parent's, inherited across exec)
PEAK = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
from studio.merge import MergeRequest, merge_checkpoints
a, b, out = map(Path, sys.argv[1:4])
start = time.perf_counter()
req = MergeRequest(primary_model_name=str(a), secondary_model_name=str(b), multiplier=0.5,
                   save_as_half=True, custom_name="streamed", overwrite=True)
merge_checkpoints(req, lambda name: Path(name), lambda name: None, out)
print(json.dumps([time.perf_counter() - start, PEAK()]))
"""
WHOLE_RUN = """
import json, re, sys, time
from pathlib import Path
# VmHWM: this process's peak resident memory (ru_maxrss would count the parent's, inherited across exec)
PEAK = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
from safetensors.torch import load_file, save_file
a, b, out = map(Path, sys.argv[1:4])
start = time.perf_counter()
sa, sb = load_file(str(a)), load_file(str(b))
merged = {k: (v.float() * 0.5 + sb[k].float() * 0.5).half() if k in sb and v.is_floating_point() else v
          for k, v in sa.items()}
save_file(merged, str(out / "whole.safetensors"))
print(json.dumps([time.perf_counter() - start, PEAK()]))
"""


def run(code: str, a: Path, b: Path, out: Path) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", code, str(a), str(b), str(out)], capture_output=True, text=True,
                          check=True, cwd=REPO)
    seconds, peak = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = make_full_size_checkpoint(root, "a.safetensors", seed=0)
        b = make_full_size_checkpoint(root, "b.safetensors", seed=1)
        out = root / "out"
        out.mkdir()
        results: dict[str, list[tuple[float, float]]] = {"studio": [], "whole": []}
        for _ in range(ns.runs):   # interleaved, so both see the same machine state
            results["studio"].append(run(STUDIO_RUN, a, b, out))
            results["whole"].append(run(WHOLE_RUN, a, b, out))
        size_mb = a.stat().st_size / 2**20
    summary = {name: {"seconds_median": statistics.median(r[0] for r in runs),
                      "seconds_spread": [min(r[0] for r in runs), max(r[0] for r in runs)],
                      "peak_rss_mib_median": statistics.median(r[1] for r in runs)}
               for name, runs in results.items()}
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "input_mib": round(size_mb), "runs": ns.runs, **summary}
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "merge.json").write_text(json.dumps(report, indent=2))
    s, w = summary["studio"], summary["whole"]
    write_section(REPO / "docs" / "benchmarks.md", [
        "## Checkpoint Merger (bench/bench_merge.py)",
        "",
        f"Two full-size SD1.5 checkpoints (random weights, fp16, {report['input_mib']} MiB each), weighted sum "
        f"0.5 to fp16; {ns.runs} runs of each, interleaved, each in a fresh process. {report['machine']}.",
        "",
        "| merge | time, median (min–max) | peak RSS, median |",
        "|---|---|---|",
        f"| studio (streamed: one tensor at a time, safetensors written as it goes) | {s['seconds_median']:.1f} s "
        f"({s['seconds_spread'][0]:.1f}–{s['seconds_spread'][1]:.1f}) | {s['peak_rss_mib_median']:.0f} MiB |",
        f"| whole files (load both, merge, `save_file`: A1111's way) | {w['seconds_median']:.1f} s "
        f"({w['seconds_spread'][0]:.1f}–{w['seconds_spread'][1]:.1f}) | {w['peak_rss_mib_median']:.0f} MiB |",
        "",
        "Peak RSS is the process's high-water mark (VmHWM), Python and torch included (~0.4 GB). The studio "
        "reads each tensor with a positioned file read rather than a memory map, so the pages of the inputs "
        "never count against the process; the output is written as it is computed.",
        "",
    ])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
