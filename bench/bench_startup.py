"""Start-up (issue 22): how long ``python app.py`` takes to answer HTTP 200 on / against a bare Gradio
Blocks app with as many components, and the time to the first image afterwards.

The studio's UI is built once in a subprocess (fresh data dir) and its blocks are counted by type; the bare
app is generated with the same number of blocks of each type (layout blocks empty, components with their
defaults, no events), so both sides pay Gradio's per-component cost. The two are then started as processes,
alternately (studio, bare, studio, bare, …), each with a fresh data dir, and timed from ``Popen`` to the first
200 on ``/``; medians, min–max and the ratio of the medians are reported, so a busy host slows both sides.
After the rounds one more studio is started (default flags: the demo model loads after the server answers)
and the first ``POST /sdapi/v1/txt2img`` (demo model, 64², 2 steps) is timed: the imports deferred past
HTTP 200 (torch, diffusers, transformers) are paid there.

    .venv/bin/python bench/bench_startup.py [--rounds 5] [--repo PATH] [--out bench/results/startup.json]
        [--report docs/benchmarks.md]

``--repo`` times another checkout (e.g. a ``git worktree`` of an older commit) with this interpreter.
Prints the "## Start-up (bench/bench_startup.py)" section (``--report docs/benchmarks.md`` writes it there);
writes the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADING = "## Start-up (bench/bench_startup.py)"

# Builds the studio's UI the way serve() does (no server) and prints its blocks counted by type.
COUNT_SCRIPT = """
import json, sys
from collections import Counter
from studio.config import force_offline, parse_flags
force_offline()
from studio.core import Studio
from studio.ui.app import build_ui
flags = parse_flags(["--data-dir", sys.argv[1], "--skip-load-model-at-start"])
studio = Studio.create(flags)
blocks = build_ui(studio)
print(json.dumps(dict(Counter(type(b).__name__ for b in blocks.blocks.values()))))
"""

# A bare Blocks app: the counted blocks, each with its defaults, in the same number per type.
BARE_SCRIPT = """
import json, sys
import gradio as gr
counts = json.loads(sys.argv[1])
LAYOUTS = {"Row", "Column", "Group", "Accordion", "Tab", "Tabs", "Sidebar", "Walkthrough", "Step"}
with gr.Blocks(title="bare", analytics_enabled=False) as demo:
    for name, n in sorted(counts.items()):
        cls = getattr(gr, name, None)
        if name in ("Tabs",):
            continue  # a Tabs is made around each run of Tab blocks below
        for _ in range(n):
            if name == "Tab":
                with gr.Tabs(), gr.Tab("t"):
                    pass
            elif name in LAYOUTS and cls is not None:
                with cls():
                    pass
            else:
                try:
                    cls()
                except Exception:  # a component that wants arguments (or a custom one): a Textbox in its place
                    gr.Textbox()
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[2]), quiet=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_200(proc: subprocess.Popen, url: str, log: Path, limit: float = 600) -> float:
    """Wait until ``url`` answers 200 (polled every 50 ms); returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        if proc.poll() is not None:
            raise SystemExit(f"the process exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no HTTP 200 from {url} in {limit:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")


def count_blocks(repo: Path, work: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, str(work / "count-data")], cwd=repo, env=env(),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_process(args: list[str], cwd: Path, log: Path, port: int) -> tuple[float, subprocess.Popen]:
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env())
    wait_http_200(proc, f"http://127.0.0.1:{port}/", log)
    return time.perf_counter() - started, proc


def studio_args(repo: Path, data: Path, port: int, skip_load: bool = True) -> list[str]:
    args = [sys.executable, str(repo / "app.py"), "--data-dir", str(data), "--port", str(port)]
    return args + (["--skip-load-model-at-start"] if skip_load else [])


def first_image(repo: Path, work: Path) -> dict[str, float]:
    """Start with default flags (the demo model loads after HTTP 200), then the first txt2img."""
    port, data = free_port(), work / "first-image"
    log = work / "first-image.log"
    http, proc = time_process(studio_args(repo, data, port, skip_load=False), repo, log, port)
    try:
        wait_http_200(proc, f"http://127.0.0.1:{port}/sdapi/v1/sd-models", log)  # the API is installed after /
        body = json.dumps({"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler",
                           "seed": 1}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", data=body,
                                         headers={"Content-Type": "application/json"})
        sent = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as r:
            images = json.loads(r.read())["images"]
        image = time.perf_counter() - sent
    finally:
        stop(proc)
    if not images:
        raise SystemExit("txt2img returned no image")
    return {"http_200_s": http, "first_image_after_200_s": image, "start_to_first_image_s": http + image}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(repo: Path, rounds: int) -> dict:
    """The alternating rounds and the first image, as a JSON-able result."""
    repo = repo.resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        counts = count_blocks(repo, work)
        bare_file = work / "bare_app.py"
        bare_file.write_text(BARE_SCRIPT)
        times: dict[str, list[float]] = {"studio": [], "bare": []}
        for i in range(rounds):
            for side in ("studio", "bare"):
                port = free_port()
                if side == "studio":
                    cmd, cwd = studio_args(repo, work / f"data-{i}", port), repo
                else:
                    cmd, cwd = [sys.executable, str(bare_file), json.dumps(counts), str(port)], work
                seconds, proc = time_process(cmd, cwd, work / f"{side}-{i}.log", port)
                stop(proc)
                times[side].append(seconds)
                print(f"round {i + 1}: {side} {seconds:.2f} s", file=sys.stderr, flush=True)
        first = first_image(repo, work)
    stats = {side: summary(v) for side, v in times.items()}
    ratio = stats["studio"]["median"] / stats["bare"]["median"]
    return {"repo_commit": commit + ("+changes" if dirty else ""), "rounds": rounds,
            "blocks": sum(counts.values()), "blocks_by_type": counts, "times_s": times, "stats_s": stats,
            "ratio_of_medians": ratio, "first_image": first, "python": platform.python_version(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def section(result: dict) -> list[str]:
    s, b = result["stats_s"]["studio"], result["stats_s"]["bare"]
    first = result["first_image"]
    return [
        HEADING, "",
        f"`python app.py --skip-load-model-at-start` (fresh data dir) to the first HTTP 200 on `/`, against a bare "
        f"Gradio Blocks app with as many blocks ({result['blocks']}, same count per type, no events); "
        f"processes alternated, {result['rounds']} rounds, {result['cpus']} CPUs, commit {result['repo_commit']}, "
        f"{result['date']}.", "",
        "| app | median | min–max |", "|---|---|---|",
        f"| studio | {s['median']:.2f} s | {s['min']:.2f}–{s['max']:.2f} s |",
        f"| bare Gradio | {b['median']:.2f} s | {b['min']:.2f}–{b['max']:.2f} s |", "",
        f"Ratio of medians: **{result['ratio_of_medians']:.2f}×** (goal ≤ 1.5×).", "",
        f"First image afterwards (default flags, demo model, `POST /sdapi/v1/txt2img` 64², 2 steps, sent once "
        f"HTTP 200 came after {first['http_200_s']:.2f} s): {first['first_image_after_200_s']:.2f} s, "
        f"{first['start_to_first_image_s']:.2f} s from start; whatever start-up left for later (the imports of "
        f"torch, diffusers and transformers, the demo model's load) is paid in it.", "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to time (default: this one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    parser.add_argument("--report", type=Path, default=None,
                        help="also write the section into this markdown file (e.g. docs/benchmarks.md)")
    args = parser.parse_args()
    result = measure(args.repo, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = section(result)
    print("\n".join(lines))
    if args.report is not None:
        sys.path.insert(0, str(REPO))
        from bench.report import write_section

        write_section(args.report, lines)


if __name__ == "__main__":
    main()
