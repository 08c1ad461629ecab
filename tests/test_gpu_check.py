"""bench/gpu_check.py on the CPU with tiny models: every case runs (or says why not) in its own
process, the report has its section and one row per case, the raw figures parse, and
docs/benchmarks.md is left alone. No timing asserts: only that the harness measures and reports,
and what the studio must do whatever the timings (the fp16 VAE's NaNs are caught, a cached switch
reads no file).

Marked slow (the whole run takes a minute or more on a shared 2-core machine): CI runs it in its
second step (``pytest -m slow``)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

HEADING = "## GPU check (bench/gpu_check.py) — "
CASES = ("sd15", "sdxl", "vae_nan", "switch", "lora", "compile", "offload", "flux")
# a cell with a figure, or a part/case without one that says why
ROW_OK = re.compile(r"\d|skipped: \S|failed: \S")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in CASES and len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def test_tiny_run_reports_every_case_and_leaves_the_docs_alone(tmp_path):
    docs = REPO / "docs" / "benchmarks.md"
    before = _digest(docs)
    report = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--report", str(report),
         "--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _digest(docs) == before, "a --tiny run must not rewrite docs/benchmarks.md"

    text = report.read_text()
    heading = next(line for line in text.splitlines() if line.startswith(HEADING))
    assert heading.removeprefix(HEADING).strip(), "the section is named after the device"
    rows = _rows(text)
    assert set(rows) == set(CASES), rows
    for case, cell in rows.items():
        assert ROW_OK.search(cell.split(":", 1)[1]), f"{case}: {cell}"
    assert "studio ≤ 1.03× diffusers' time" in text and "Published figures" in text

    results = json.loads((REPO / "bench" / "results" / "gpu_check-tiny.json").read_text())
    assert results["tiny"] is True and set(results["cases"]) == set(CASES)
    for case, entry in results["cases"].items():
        assert entry["status"] in ("ok", "skipped", "failed"), case
        if entry["status"] != "ok":
            assert entry["reason"], case
    # the CPU run skips only the compile case (by design), and everything else measures
    assert results["cases"]["compile"] == {"status": "skipped", "reason": results["cases"]["compile"]["reason"]}
    assert results["cases"]["compile"]["reason"].startswith("CPU")
    ok = {case: e["result"] for case, e in results["cases"].items() if e["status"] == "ok"}
    assert set(ok) == set(CASES) - {"compile"}, {c: e.get("reason") for c, e in results["cases"].items()}

    for family in ("sd15", "sdxl"):
        for batch in ("batch 1", "batch 4"):
            pair = ok[family][batch]
            assert pair["ratio"] > 0 and len(pair["studio"]["times"]) == results["setup"]["runs"]
            assert pair["studio"]["loop_median"] > 0 and pair["diffusers"]["peak_bytes"] > 0
    vae = ok["vae_nan"]
    assert vae["fp16_gives_nan"] and vae["fallback_fired"] and vae["output_has_nan"] is False
    switch = ok["switch"]
    assert switch["switch_to_a"] and switch["disk_loads_after"] == switch["disk_loads"], "switches read no file"
    assert set(ok["offload"]["plans"]) == {"none", "medvram", "lowvram"}
    assert {"bf16", "fp8_e4m3fn", "gguf_q8_0"} <= set(ok["flux"])
    assert ok["flux"]["fp8_e4m3fn"]["storage"] != ok["flux"]["gguf_q8_0"]["storage"]


def test_no_time_left_skips_every_case(tmp_path):
    report = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--report", str(report),
         "--work", str(tmp_path / "work"), "--budget-s", "0", "--cases", "sd15,flux"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(report.read_text())
    assert "skipped: time budget" in rows["sd15"] and "skipped: time budget" in rows["flux"]
    assert "not selected" in rows["lora"]


def test_report_says_why_a_case_has_no_figures():
    sys.path.insert(0, str(REPO))
    from bench.gpu_check import report_lines

    res = {"device": "NVIDIA H200", "machine": "test", "cuda": True, "tiny": False, "date": "2026-01-01",
           "budget_s": 450, "elapsed_s": 60,
           "setup": {"steps": 20, "runs": 3, "sd15_size": 512, "sdxl_size": 1024, "batches": [1, 4]},
           "cases": {"sd15": {"status": "failed", "reason": "OutOfMemoryError: CUDA out of memory",
                              "result": {"steps": 20, "size": 512, "batch 1": {"skipped": "time budget"}}},
                     "sdxl": {"status": "skipped", "reason": "time budget"}}}
    text = "\n".join(report_lines(res))
    assert text.startswith(HEADING + "NVIDIA H200")
    rows = _rows(text)
    assert rows["sd15"].split(": ", 1)[1].startswith("failed: OutOfMemoryError")
    assert rows["sdxl"].endswith("skipped: time budget")
    assert "H100, SD1.5 512²" in text and "A100, SD1.5" not in text, "the H200 is compared with its class"
