"""Start-up without torch (issue 22): everything serve() builds before it listens — the Studio, the
Gradio UI, the FastAPI app with the A1111 routes — imports neither torch nor diffusers nor
transformers; they load on first use, and the first generation through the same Studio works.

Run in a fresh interpreter: this test process has long imported torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# a fresh Python process that imports the whole UI (~30 s): CI's slow step runs it
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers")

# What app.py and serve() do, minus listening: gradio's launch() builds its app with App.create_app.
SCRIPT = r"""
import json, sys
from studio.config import force_offline, parse_flags
force_offline()
from gradio.routes import App
from studio.api.auth import check_flags
from studio.api.routes import install_api
from studio.server import build_blocks, build_studio

flags = parse_flags(["--data-dir", sys.argv[1], "--port", "0"])   # default flags: the demo model is offered
check_flags(flags)
studio = build_studio(flags)
blocks = build_blocks(studio)
app = App.create_app(blocks, app_kwargs={"docs_url": "/docs"})
install_api(app, studio)
report = {"heavy_at_start": [m for m in sys.argv[2].split(",") if m in sys.modules],
          "policy_resolved_at_start": studio.deferred_policy.resolved,
          "checkpoints": [c.name for c in studio.checkpoints()],
          "api_routes": sorted(p for p in app.openapi()["paths"] if p.startswith("/sdapi/v1/"))}
from studio.generation.request import Txt2ImgRequest

result = studio.txt2img(Txt2ImgRequest(prompt="a red cube", width=64, height=64, steps=2, seed=1), timeout=300)
report.update(images=[image.size for image in result.images], policy=studio.policy.label,
              heavy_after=[m for m in sys.argv[2].split(",") if m in sys.modules])
studio.shutdown()
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def startup(tmp_path_factory) -> dict:
    data = tmp_path_factory.mktemp("fresh-data")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(data), ",".join(HEAVY)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_ui_and_api_are_built_without_torch_diffusers_or_transformers(startup):
    assert startup["heavy_at_start"] == []
    assert startup["policy_resolved_at_start"] is False     # resolved on first use, not by Studio.create
    assert startup["checkpoints"] == ["demo-tiny-sd15.safetensors"]   # listed; its file is written on load
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/sd-models", "/sdapi/v1/options"} <= set(startup["api_routes"])


def test_the_first_generation_through_the_same_studio_imports_what_it_needs(startup):
    assert startup["images"] == [[64, 64]]
    assert startup["heavy_after"] == list(HEAVY)
    assert startup["policy"]      # the device policy was resolved by the generation
