"""bench/bench_dit.py's harness on tiny models: FLUX.1 and SD3 files in their real layouts loaded by
the studio, timed against diffusers' pipelines on the same modules, and the FLUX.1 transformer as
bf16, fp8 and GGUF in a process each, all written into the report. Timings are not checked (never
timing asserts in tests); that both sides ran, made the same pixels and were reported is.

Marked slow (a run loads five tiny models in four processes): CI runs it in its second step
(``pytest -m slow``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

SECONDS = r"\d+\.\d+ \(\d+\.\d+–\d+\.\d+\)"   # median (min–max)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| " + first_cell)]


def test_tiny_run_reports_overhead_and_storage(tmp_path):
    report = tmp_path / "bench.md"
    report.write_text("# Benchmarks\n\n## Other section\n\nkept\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_dit.py"), "--tiny", "--work", str(tmp_path / "work"),
         "--report", str(report)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = report.read_text()
    assert "## Other section\n\nkept" in text and "## SD3 / FLUX.1 engine overhead (issue 17)" in text
    assert "Machine: " in text and "Tiny test models" in text

    overhead = table_rows(text, "FLUX.1 dev") + table_rows(text, "SD3 Medium")
    assert len(overhead) == 2
    for cells in overhead:
        studio, diffusers, ratio, own, factor, pixel_diff = cells[2:8]
        assert re.fullmatch(SECONDS, studio) and re.fullmatch(SECONDS, diffusers), cells
        ratios = re.fullmatch(r"(\d+\.\d+) \((\d+\.\d+)\)( ⚠)?", ratio)   # of medians (of bests)
        assert ratios and float(ratios[1]) > 0 and float(ratios[2]) > 0 and float(factor) > 0, cells
        assert re.fullmatch(r"\d+\.\d+ / \d+\.\d+", own), cells
        assert int(pixel_diff) <= 1, "the studio and diffusers made different images from the same noise"

    storage = {cells[0].split(" (")[0]: cells for cells in table_rows(text, "") if "`flux1-dev-bench" in cells[0]}
    assert set(storage) == {"bf16", "fp8_e4m3fn", "gguf Q8_0"}
    disk = {k: float(c[1]) for k, c in storage.items()}
    memory = {k: float(c[2]) for k, c in storage.items()}
    # fp8 and Q8_0 stay compact in memory: one byte per weight (plus Q8_0's scales), not bf16's two
    assert disk["fp8_e4m3fn"] < disk["bf16"] and disk["gguf Q8_0"] < disk["bf16"]
    assert memory["fp8_e4m3fn"] < memory["bf16"] and memory["gguf Q8_0"] < memory["bf16"]
    for cells in storage.values():
        assert re.fullmatch(SECONDS, cells[4]), cells
        assert re.fullmatch(r"\d+\.\d+× \(\d+\.\d+×\)", cells[5]), cells      # time vs bf16
        assert re.fullmatch(r"\d+\.\d+ \(\d+\.\d+\)", cells[6]), cells        # transformer s/step
        assert float(cells[7]) > 0.1 and float(cells[8]) > 0.1, "peak RSS in GiB of a process with torch loaded"
    assert storage["bf16"][5] == "1.00× (1.00×)" and storage["bf16"][9] == "0.00 / 0"

    results = json.loads((REPO / "bench" / "results" / "dit-tiny.json").read_text())
    for family in ("flux1", "sd3"):
        result = results["overhead"][family]["result"]
        for side in ("studio", "diffusers"):   # the time outside the shared modules is part of each run
            assert 0 < result[side]["outside"] < result[side]["median"]
