"""SDXL v-prediction and zero-terminal-SNR files (NoobAI-XL v-pred and its kind), recognised by
ComfyUI's marker keys and sampled with the matching noise schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.config import Flags
from studio.core import Studio
from studio.errors import RequestError
from studio.generation.request import Txt2ImgRequest
from studio.generation.samplers import find_sampler, find_schedule, make_scheduler
from studio.models.probe import probe_checkpoint
from studio.models.state_dict import read_shapes
from studio.testing import make_checkpoint


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("vpred")
    path = make_checkpoint(root / "models" / "Stable-diffusion" / "noob-vpred.safetensors", "sdxl", seed=3)
    weights = load_file(str(path))
    weights |= {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}   # ComfyUI's markers
    save_file(weights, str(path))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def test_markers_are_read_from_the_file(studio):
    path = studio.paths.ckpt_dirs[0] / "noob-vpred.safetensors"
    probe = probe_checkpoint(read_shapes(path), path.name)
    assert probe.prediction_type == "v_prediction" and probe.zero_terminal_snr
    assert probe.label == "SDXL (v-prediction) (ZTSNR)"


def test_the_schedule_reaches_zero_terminal_snr(studio):
    model = studio.engine.load("noob-vpred.safetensors")
    config = model.scheduler_config
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    scheduler = make_scheduler(find_sampler("Euler"), find_schedule("automatic"), config)
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6       # signal gone at the last timestep
    plain = make_scheduler(find_sampler("Euler"), find_schedule("automatic"), {**config,
                                                                             "rescale_betas_zero_snr": False})
    assert float(plain.alphas_cumprod[-1]) > 1e-3


def test_generation_runs_and_unsupported_samplers_are_refused(studio):
    req = Txt2ImgRequest(prompt="a cat", steps=3, width=64, height=64, seed=1, sampler_name="Euler",
                         save_images=False, override_settings={"sd_model_checkpoint": "noob-vpred.safetensors"})
    result = studio.engine.submit(req).wait()
    assert np.isfinite(np.asarray(result.images[0], dtype=np.float32)).all()
    with pytest.raises(RequestError, match="zero-terminal-SNR"):
        studio.engine.submit(req.with_changes(sampler_name="Heun")).wait()
