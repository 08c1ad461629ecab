"""Generation workers (issue 21): how much faster 8 txt2img requests finish on 2 workers than on 1.

app.py is started as a user starts it, ``--nowebui --workers 2 --worker-threads 1`` (each worker one
torch thread), on a local Ray cluster. The same 8 requests are then sent, interleaved round by round,
(a) one at a time: one worker busy at any moment, the throughput of a 1-worker studio, and (b) all 8
at once: both workers busy. Same processes, same warm caches, same model; the front's overhead is in
both. Requires the cluster extra (``pip install -e .[cluster]``).

    .venv/bin/python bench/bench_cluster.py [--rounds 2] [--model full|tiny]

Writes bench/results/cluster.json and the "Generation workers" section of docs/benchmarks.md.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import write_section  # noqa: E402

REQUESTS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path, kind: str) -> tuple[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "full":
        from bench.bench_txt2img import make_full_size_checkpoint

        make_full_size_checkpoint(folder)
        return "SD1.5 (full size, random weights), 256², 8 steps, Euler", {"width": 256, "height": 256, "steps": 8}
    from studio.testing import make_checkpoint

    make_checkpoint(folder / "tiny-sd1.safetensors", "sd1", seed=1)
    return "tiny SD1 (harness check), 256², 20 steps, Euler", {"width": 256, "height": 256, "steps": 20}


def start(data: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(data / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--nowebui", "--no-demo", "--data-dir", str(data),
                             "--port", str(port), "--workers", str(workers), "--worker-threads", "1"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 900
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit("the studio exited:\n" + (data / "server.log").read_text()[-3000:])
        try:
            status = requests.get(f"{url}/studio/v1/workers", timeout=5).json()
            if status.get("error"):
                raise SystemExit(status["error"])
            if status.get("ready") and len(status["workers"]) >= workers:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("the workers did not start in 15 minutes")


def batch(url: str, fields: dict, concurrency: int, seed0: int) -> float:
    def one(i: int) -> None:
        body = {"prompt": f"a lighthouse at dusk, {i}", "sampler_name": "Euler", "seed": seed0 + i, **fields}
        r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=3600)
        r.raise_for_status()

    start_t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(REQUESTS)))
    return time.perf_counter() - start_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", choices=("full", "tiny"), default="full")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        data = Path(tmp)
        label, fields = make_model(data / "models" / "Stable-diffusion", args.model)
        proc, url = start(data, 2)
        try:
            batch(url, fields, 2, 10_000)   # warm-up: each worker loads the checkpoint
            times: dict[str, list[float]] = {"1 worker busy (one request at a time)": [],
                                             "2 workers busy (8 requests at once)": []}
            names = list(times)
            for r in range(args.rounds):
                for name in (names if r % 2 == 0 else names[::-1]):   # interleaved, order alternating
                    seconds = batch(url, fields, 1 if name == names[0] else REQUESTS, 1000 * r)
                    times[name].append(seconds)
                    print(f"round {r + 1}: {name}: {seconds:.1f} s", flush=True)
            status = requests.get(f"{url}/studio/v1/workers", timeout=30).json()
        finally:
            proc.terminate()
            proc.wait(60)
    one, two = (statistics.median(times[n]) for n in names)
    result = {"model": label, "requests": REQUESTS, "rounds": args.rounds, "times": times, "speedup": one / two,
              "workers": [{k: w.get(k) for k in ("id", "pid", "threads", "jobs_done", "loads")}
                          for w in status["workers"]],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    out = REPO / "bench" / "results" / "cluster.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.no_write:
        return
    import torch

    rows = [f"| {n} | {statistics.median(v):.1f} | {min(v):.1f}–{max(v):.1f} "
            f"| {REQUESTS / statistics.median(v) * 60:.1f} |" for n, v in times.items()]
    write_section(REPO / "docs" / "benchmarks.md", [
        "## Generation workers (bench/bench_cluster.py)",
        "",
        f"Machine: {result['machine']}, torch {torch.__version__}, Ray {_ray_version()}. {result['date']}. "
        f"`app.py --nowebui --workers 2 --worker-threads 1` on a local Ray cluster, {label}; {REQUESTS} requests "
        f"over the A1111 API, sent one at a time (one worker busy: a 1-worker studio's throughput) or all at once "
        f"(both busy), {args.rounds} interleaved rounds after a warm-up in which each worker loaded the checkpoint. "
        "Same processes and caches for both; the front (HTTP, queue, PNG encoding, saving) runs on the same 2 cores.",
        "",
        "| mode | median s for 8 | range s | images / min |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Speed-up with 2 workers: **{one / two:.2f}×** (goal ≥ 1.6×: {'met' if one / two >= 1.6 else 'not met'}).",
        "",
    ])


def _ray_version() -> str:
    try:
        import ray

        return ray.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    main()
