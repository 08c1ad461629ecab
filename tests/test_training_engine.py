"""Training through the studio on tiny models: each trainer lowers the loss, the results load where
they belong, resume continues, interrupt leaves a loadable file, bad input is refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from studio.config import Flags
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from studio.testing.trainable import make_trainable_checkpoint
from studio.training.base import TrainingError, TrainSettings
from studio.training.runner import TrainingRequest


def make_images(folder: Path, count: int = 4, size: int = 96) -> Path:
    """Simple pictures a tiny model can learn: a bright square on a dark ground, captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        arr = np.full((size, size, 3), 30, np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        arr[y:y + size // 2, x:x + size // 2] = (230, 200, 40)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a yellow square, dark background", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_trainable_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.select_checkpoint("tiny-sd1.safetensors")
    yield s
    s.queue.shutdown()


@pytest.fixture(scope="module")
def data(studio):
    return make_images(Path(studio.paths.data) / "dataset")


def settings(data: Path, name: str, **changes) -> TrainSettings:
    base = dict(data_dir=str(data), output_name=name, steps=30, resolution=64, min_bucket_reso=64,
                max_bucket_reso=128, learning_rate=5e-3, seed=1, mixed_precision="no", batch_size=2)
    return TrainSettings(**{**base, **changes})


def generate(studio, prompt: str) -> np.ndarray:
    req = Txt2ImgRequest(prompt=prompt, steps=3, width=64, height=64, seed=7, sampler_name="Euler",
                         save_images=False, checkpoint="tiny-sd1.safetensors")
    return np.asarray(studio.txt2img(req).images[0], dtype=np.int16)


def assert_learned(result) -> None:
    assert len(result.losses) == result.step - result.resumed_from
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    print(f"{result.kind}: loss {first:.3f} -> {last:.3f}")
    assert last < first, (first, last, result.losses)


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_lora_trains_saves_and_loads(studio, data):
    from safetensors import safe_open

    from studio.training.lora import LoraSettings

    req = TrainingRequest("lora", settings(data, "sq_lora", learning_rate=1e-2),
                          lora=LoraSettings(rank=4, alpha=4, train_text_encoder=True))
    result = studio.submit_training(req).wait()
    assert result.step == 30 and not result.interrupted
    assert_learned(result)
    path = Path(studio.paths.lora_dirs[0]) / "sq_lora.safetensors"
    assert result.output_path == path and path.is_file()
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_output_name"] == "sq_lora" and meta["ss_steps"] == "30"
    assert meta["ss_sd_model_name"].startswith("tiny-sd1")
    # usable at once: the library knows it and it changes the image at weight 1, not at 0
    assert studio.networks.loras.find("sq_lora") is not None
    plain = generate(studio, "a yellow square")
    assert np.array_equal(plain, generate(studio, "a yellow square <lora:sq_lora:0>"))
    assert np.abs(plain - generate(studio, "a yellow square <lora:sq_lora:1>")).max() > 0
    # training left the model as it was
    assert np.array_equal(plain, generate(studio, "a yellow square"))


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_resume_continues_with_the_optimizer_state(studio, data):
    from studio.training.loop import STATE_FILE, work_dir
    from studio.training.lora import LoraSettings

    lora = LoraSettings(rank=2, alpha=2)
    first = studio.submit_training(TrainingRequest("lora", settings(data, "resumed", steps=6), lora=lora)).wait()
    state_file = work_dir(studio.paths.data, "lora", "resumed") / STATE_FILE
    saved = torch.load(state_file, weights_only=True)
    assert first.step == 6 and saved["step"] == 6
    adam_steps = {int(v["step"]) for v in saved["optimizer"]["state"].values()}
    assert adam_steps == {6}
    second = studio.submit_training(TrainingRequest("lora", settings(data, "resumed", steps=10), lora=lora)).wait()
    assert second.resumed_from == 6 and second.step == 10 and len(second.losses) == 4
    saved = torch.load(state_file, weights_only=True)
    assert {int(v["step"]) for v in saved["optimizer"]["state"].values()} == {10}
    # the same steps again: nothing left to do, said clearly
    with pytest.raises(TrainingError, match="already trained for 10 steps"):
        studio.submit_training(TrainingRequest("lora", settings(data, "resumed", steps=10), lora=lora)).wait()
    # without resume, an existing name is refused unless overwrite
    with pytest.raises(TrainingError, match="already exists"):
        studio.submit_training(TrainingRequest("lora", settings(data, "resumed", resume=False), lora=lora))


def test_interrupt_keeps_a_loadable_file(studio, data):
    from studio.networks.lora import LoraLibrary
    from studio.training.lora import LoraSettings

    job = studio.submit_training(TrainingRequest("lora", settings(data, "stopped", steps=500),
                                                 lora=LoraSettings(rank=2, alpha=2)))

    def stop_after_three_steps():
        while job.state.step < 3 and not job.done.is_set():
            time.sleep(0.05)
        studio.queue.interrupt()

    threading.Thread(target=stop_after_three_steps, daemon=True).start()
    result = job.wait(600)
    assert result.interrupted and 3 <= result.step < 500
    assert any("Interrupted" in n for n in result.notes)
    library = LoraLibrary(list(studio.paths.lora_dirs), None)
    library.refresh()
    assert library.find("stopped") is not None
    # the file loads into a generation, and the steps it saved change the image
    tagged = studio.txt2img(Txt2ImgRequest(prompt="a square <lora:stopped:1>", steps=3, width=64, height=64, seed=7,
                                           sampler_name="Euler", save_images=False,
                                           checkpoint="tiny-sd1.safetensors"))
    assert "stopped: " in tagged.infotexts[0] and not any("stopped" in n for n in tagged.notes), tagged.notes
    assert np.abs(generate(studio, "a square") - np.asarray(tagged.images[0], dtype=np.int16)).max() > 0


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_embedding_created_trained_and_used(studio, data):
    path = studio.create_embedding("sqemb", init_text="square", vectors_per_token=2)
    assert path.is_file()
    with pytest.raises(TrainingError, match="exists"):
        studio.create_embedding("sqemb", init_text="square")
    before = generate(studio, "a photo of sqemb")
    req = TrainingRequest("embedding", settings(data, "sqemb", template="a photo of [name], [filewords]"),
                          learn_rate="0.05")
    result = studio.submit_training(req).wait()
    assert result.step == 30
    assert_learned(result)
    after = studio.txt2img(Txt2ImgRequest(prompt="a photo of sqemb", steps=3, width=64, height=64, seed=7,
                                          sampler_name="Euler", save_images=False))
    assert "TI hashes" in after.infotexts[0]
    assert np.abs(before - np.asarray(after.images[0], dtype=np.int16)).max() > 0


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_hypernetwork_created_and_trained(studio, data):
    from studio.networks.hypernetworks import read_hypernetwork

    path = studio.create_hypernetwork("sqhn", sizes=(32,))
    assert read_hypernetwork(path).name == "sqhn"
    req = TrainingRequest("hypernetwork", settings(data, "sqhn"), learn_rate="0.005")
    result = studio.submit_training(req).wait()
    assert result.step == 30
    assert_learned(result)
    assert read_hypernetwork(path).step == 30
    assert np.abs(generate(studio, "a square <hypernet:sqhn:0>")
                  - generate(studio, "a square <hypernet:sqhn:1>")).max() > 0


def test_bad_input_is_refused_before_the_queue(studio, tmp_path):
    from studio.training.lora import LoraSettings

    empty = tmp_path / "empty"
    empty.mkdir()
    lora = LoraSettings(rank=2)
    with pytest.raises(TrainingError, match="no images"):
        studio.submit_training(TrainingRequest("lora", settings(empty, "x"), lora=lora))
    with pytest.raises(TrainingError, match="not a valid file name"):
        studio.submit_training(TrainingRequest("lora", settings(empty, "../evil"), lora=lora))
    with pytest.raises(ValidationError, match="steps"):   # a range: refused where the settings are made
        studio.submit_training(TrainingRequest("lora", settings(empty, "x", steps=0), lora=lora))
    with pytest.raises(TrainingError, match="no embedding named 'ghost'"):
        studio.submit_training(TrainingRequest("embedding", settings(empty, "ghost")))
    assert studio.queue.job_count == 0


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
@pytest.mark.parametrize("family", ["sdxl", "sd2-v"])
def test_lora_loop_runs_on_sdxl_and_v_prediction(tmp_path, family):
    """SDXL needs pooled text + size/crop time ids, sd2-v the velocity target: a short run of each."""
    from safetensors import safe_open

    from studio.training.lora import LoraSettings

    make_trainable_checkpoint(tmp_path / "models" / "Stable-diffusion" / f"tiny-{family}.safetensors", family)
    s = Studio.create(Flags(data_dir=str(tmp_path), no_half=True))
    try:
        model = s.select_checkpoint(f"tiny-{family}.safetensors")
        assert (model.scheduler_config.get("prediction_type") == "v_prediction") == (family == "sd2-v")
        data = make_images(tmp_path / "data", count=2)
        result = s.submit_training(TrainingRequest("lora", settings(data, f"l_{family}", steps=4, batch_size=1),
                                                   lora=LoraSettings(rank=2, alpha=2, train_text_encoder=True))).wait()
        assert result.step == 4 and all(np.isfinite(result.losses))
        with safe_open(str(result.output_path), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        if family == "sdxl":
            assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
            assert any(k.startswith("lora_te2_") for k in keys)
            assert meta["ss_base_model_version"].startswith("sdxl")
        else:
            assert meta["ss_v2"] == "True"
        plain = np.asarray(s.txt2img(Txt2ImgRequest(prompt="a square", steps=2, width=64, height=64, seed=3,
                                                    sampler_name="Euler", save_images=False)).images[0], np.int16)
        tagged = np.asarray(s.txt2img(Txt2ImgRequest(prompt=f"a square <lora:l_{family}:1>", steps=2, width=64,
                                                     height=64, seed=3, sampler_name="Euler",
                                                     save_images=False)).images[0], np.int16)
        assert np.abs(plain - tagged).max() > 0
    finally:
        s.queue.shutdown()
