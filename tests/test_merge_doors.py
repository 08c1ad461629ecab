"""The Checkpoint Merger through its doors: the API route, the CLI, and the new file listed at once."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors import safe_open

from studio.cli import main
from studio.config import Flags
from studio.core import Studio
from studio.testing import make_checkpoint
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergedoors")
    folder = make_models_dir(root)
    make_checkpoint(folder / "other-sd1.safetensors", "sd1", seed=9)
    return root


def test_api_merge_lists_the_new_checkpoint(data_dir):
    from studio.api.routes import install_api

    studio = Studio.create(Flags(data_dir=str(data_dir), no_half=True))
    try:
        app = FastAPI()
        install_api(app, studio)
        client = TestClient(app)
        r = client.post("/studio/v1/merge", json={"primary_model_name": "tiny-sd1.safetensors",
                                                  "secondary_model_name": "other-sd1.safetensors",
                                                  "multiplier": 0.5, "custom_name": "half-half"})
        assert r.status_code == 200, r.text
        titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert any(t.startswith("half-half.safetensors") for t in titles)
        with safe_open(str(data_dir / "models" / "Stable-diffusion" / "half-half.safetensors"), "pt") as f:
            assert f.metadata()["format"] == "pt" and "sd_merge_recipe" in f.metadata()
        # the merged model generates
        out = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                     "override_settings": {"sd_model_checkpoint": "half-half"}})
        assert out.status_code == 200, out.text
        bad = client.post("/studio/v1/merge", json={"primary_model_name": "nope.safetensors",
                                                    "secondary_model_name": "other-sd1.safetensors"})
        assert bad.status_code == 400 and "nope" in bad.json()["detail"]
        refused = client.post("/studio/v1/merge", json={"primary_model_name": "tiny-sd1.safetensors",
                                                        "secondary_model_name": "other-sd1.safetensors",
                                                        "checkpoint_format": "ckpt"})
        assert refused.status_code == 422
    finally:
        studio.queue.shutdown()


def test_cli_merge(data_dir, capsys):
    code = main(["merge", "--data-dir", str(data_dir), "--no-half", "--primary-model-name", "tiny-sd1.safetensors",
                 "--secondary-model-name", "other-sd1.safetensors", "--multiplier", "1", "--custom-name", "all-b",
                 "--fp16"])
    assert code == 0
    assert "all-b.safetensors" in capsys.readouterr().out
    assert (data_dir / "models" / "Stable-diffusion" / "all-b.safetensors").is_file()
    code = main(["merge", "--data-dir", str(data_dir), "--primary-model-name", "missing",
                 "--secondary-model-name", "other-sd1.safetensors"])
    assert code == 2
