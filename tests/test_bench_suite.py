"""The benchmark suite's harness on tiny models: each case in its own process, the report's tables
and goals filled from what was measured. Timings are not checked (never timing asserts in tests);
that the harness runs, measures both sides and reports them is.

Marked slow (each case is a fresh Python process): CI runs them in its second step (``pytest -m slow``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_suite_runs_cases_in_processes_and_writes_the_report(tmp_path):
    report = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "suite.py"), "--tiny", "--cases", "sd15_img2img,vae_decode",
         "--work", str(tmp_path / "work"), "--report", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = report.read_text()
    assert text.startswith("# Benchmarks") and "## Suite (bench/suite.py)" in text
    row = next(line for line in text.splitlines() if line.startswith("| SD1.5 img2img"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # studio s, diffusers s, ratio: "median (best)" numbers; own cost outside the UNet on each side,
    # the overhead ratio; then the two peak RSS figures
    for cell in cells[2:5]:
        assert re.fullmatch(r"\d+\.\d+ \(\d+\.\d+\)( ⚠)?", cell), row
    assert re.fullmatch(r"\d+\.\d+ / \d+\.\d+", cells[5]) and float(cells[6]) > 0, row
    assert all(float(c) > 0.1 for c in cells[7:9]), "peak RSS in GiB of a process with torch loaded"
    assert "worst overhead" in text
    assert "tiled decode peak" in text and "Tiny test models" in text
    results = json.loads((REPO / "bench" / "results" / "suite-tiny.json").read_text())
    decode = results["cases"]["vae_decode"]["decode"]
    assert set(decode) == {"64", "256"} and all(d["peak_rss"] >= d["before"] for d in decode.values())
    img2img = results["cases"]["sd15_img2img"]["img2img"]
    for side in ("studio", "diffusers"):   # the time outside the UNet is part of each run, not all of it
        assert 0 < img2img[side]["outside"] < img2img[side]["median"]
    assert not results["failed"]


def test_suite_refuses_unknown_cases(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "suite.py"), "--cases", "warp_drive"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown cases ['warp_drive']" in proc.stderr
