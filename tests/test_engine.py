"""Engine tests: tiny models in the real file formats through the real loader."""

from __future__ import annotations

import pickle
import socket
import zipfile
from pathlib import Path

import numpy as np
import time

import pytest
import torch

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import parse_infotext
from studio.generation.outputs import read_infotext
from studio.generation.request import RequestError, Txt2ImgRequest, build_request
from studio.models.probe import probe_checkpoint
from studio.models.state_dict import ModelFileError, read_shapes
from studio.testing import make_checkpoint, make_diffusers_folder, tiny_components
from tests.helpers import make_models_dir

FAMILIES = [("sd1", ".safetensors"), ("sd2", ".safetensors"), ("sd2-v", ".ckpt"), ("sdxl", ".safetensors"),
            ("sd1-inpaint", ".safetensors"), ("sdxl-inpaint", ".ckpt")]

EXPECTED_PROBE = {
    "sd1": ("sd1", "base"), "sd2": ("sd2", "base"), "sd2-v": ("sd2", "base"), "sdxl": ("sdxl", "base"),
    "sd1-inpaint": ("sd1", "inpaint"), "sdxl-inpaint": ("sdxl", "inpaint"),
}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    make_models_dir(root, FAMILIES)
    make_diffusers_folder(root / "models" / "Stable-diffusion" / "tiny-diffusers-sd1", "sd1", seed=1)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def small(**kw) -> Txt2ImgRequest:
    base = dict(prompt="a red cube", negative_prompt="blurry", steps=3, width=64, height=64, seed=1234,
                sampler_name="Euler a", save_images=False)
    base.update(kw)
    return Txt2ImgRequest(**base)


@pytest.mark.parametrize("family,suffix", FAMILIES)
def test_probe_family_from_shapes(studio, family, suffix):
    path = studio.paths.ckpt_dirs[0] / f"tiny-{family}{suffix}"
    probe = probe_checkpoint(read_shapes(path), path.name)
    assert (probe.family, probe.variant) == EXPECTED_PROBE[family]


@pytest.mark.parametrize("family,suffix", FAMILIES)
def test_load_each_family_reproduces_weights(studio, family, suffix):
    model = studio.select_checkpoint(f"tiny-{family}{suffix}")
    ref = tiny_components(family, seed=1)
    assert model.prediction_type == ref["prediction_type"]
    for name, ours in (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoders[0])):
        theirs = ref[name].state_dict()
        mine = ours.state_dict()
        for key, tensor in theirs.items():
            if key.endswith("position_ids"):
                continue
            assert torch.equal(mine[key].float(), tensor.float()), f"{family} {name} {key} differs"
    if family.startswith("sdxl"):
        assert len(model.text_encoders) == 2


def test_diffusers_folder_loads(studio):
    model = studio.select_checkpoint("tiny-diffusers-sd1")
    assert model.family == "sd1"
    result = studio.txt2img(small())
    assert result.images[0].size == (64, 64)


def test_catalog_titles_and_hash_cache(studio):
    studio.select_checkpoint("tiny-sd1.safetensors")
    info = studio.models.catalog.find("tiny-sd1.safetensors")
    assert info.title == f"tiny-sd1.safetensors [{info.sha256[:10]}]"
    import hashlib
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    cache = (Path(studio.paths.hash_cache_file)).read_text()
    assert "checkpoint/tiny-sd1.safetensors" in cache
    # found again by title, short hash and model name
    assert studio.models.catalog.find(info.title) is info
    assert studio.models.catalog.find(info.shorthash) is info
    assert studio.models.catalog.find("tiny-sd1") is info


def test_same_seed_same_pixels_and_batch_seeds_follow_a1111(studio):
    studio.select_checkpoint("tiny-sd1.safetensors")
    a = studio.txt2img(small(seed=77, batch_size=2))
    b = studio.txt2img(small(seed=77, batch_size=2))
    assert a.seeds == [77, 78]
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    # image 2 of the batch is exactly what seed 78 gives alone (A1111: seed + index)
    c = studio.txt2img(small(seed=78))
    assert np.array_equal(np.asarray(a.images[1]), np.asarray(c.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))
    # batch count continues the sequence
    d = studio.txt2img(small(seed=10, batch_size=2, n_iter=2))
    assert d.seeds == [10, 11, 12, 13]


def test_random_seed_is_reported(studio):
    r = studio.txt2img(small(seed=-1))
    assert r.seeds[0] >= 0
    assert f"Seed: {r.seeds[0]}" in r.infotexts[0]


SLOW = pytest.mark.slow   # the same check on more samplers: the CI's slow step


@pytest.mark.parametrize("sampler,schedule", [
    ("DPM++ 2M", "Karras"), pytest.param("DPM++ SDE", "Automatic", marks=SLOW),
    pytest.param("DDIM", "Automatic", marks=SLOW), pytest.param("LCM", "Automatic", marks=SLOW),
    pytest.param("Heun", "Exponential", marks=SLOW), pytest.param("UniPC", "SGM Uniform", marks=SLOW)])
def test_samplers_run_on_every_family(studio, sampler, schedule):
    for name in ("tiny-sd1.safetensors", "tiny-sd2-v.ckpt", "tiny-sdxl.safetensors"):
        studio.select_checkpoint(name)
        r = studio.txt2img(small(sampler_name=sampler, scheduler=schedule, steps=2))
        arr = np.asarray(r.images[0])
        assert arr.shape == (64, 64, 3) and arr.std() > 0


def test_long_prompt_and_clip_skip(studio):
    studio.select_checkpoint("tiny-sd1.safetensors")
    long_prompt = ", ".join(["a very detailed tower"] * 40)  # > 75 tokens: two chunks
    r1 = studio.txt2img(small(prompt=long_prompt))
    r2 = studio.txt2img(small(prompt=long_prompt, clip_skip=2))
    assert not np.array_equal(np.asarray(r1.images[0]), np.asarray(r2.images[0]))
    assert "Clip skip: 2" in r2.infotexts[0]


def test_saved_png_carries_infotext(studio):
    studio.select_checkpoint("tiny-sd1.safetensors")
    r = studio.txt2img(small(prompt='a "quoted", prompt: ünïcode', save_images=True))
    path = r.paths[0]
    assert path.parent.parent.name == "txt2img-images"
    from PIL import Image
    parsed = parse_infotext(read_infotext(Image.open(path)))
    assert parsed["Prompt"] == 'a "quoted", prompt: ünïcode'
    assert parsed["Seed"] == "1234" and parsed["Model"] == "tiny-sd1"
    assert parsed["Model hash"] == studio.models.current.info.shorthash


def test_generation_opens_no_socket(studio, monkeypatch):
    studio.models.unload()

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    studio.select_checkpoint("tiny-sdxl.safetensors")
    r = studio.txt2img(small())
    assert len(r.images) == 1


def test_interrupt_stops_within_a_step(studio):
    studio.select_checkpoint("tiny-sd1.safetensors")
    job = studio.submit_txt2img(small(steps=150, n_iter=3, width=128, height=128))
    while job.state.step < 2 and not job.done.is_set():
        time.sleep(0.01)  # a bare spin holds the interpreter lock the worker needs
    studio.queue.interrupt()
    result = job.wait(60)
    assert result.interrupted and len(result.images) == 1
    assert job.state.step < 150


# --- bad input --------------------------------------------------------------------------

def _bad_file(studio, name: str, data: bytes) -> str:
    path = studio.paths.ckpt_dirs[0] / name
    path.write_bytes(data)
    studio.refresh_checkpoints()
    return name


def test_bad_model_files_give_clear_errors_and_keep_previous_model(studio, tmp_path):
    good = studio.select_checkpoint("tiny-sd1.safetensors")
    source = (studio.paths.ckpt_dirs[0] / "tiny-sd1.safetensors").read_bytes()
    cases = {
        "truncated.safetensors": (source[: len(source) // 2], "truncated"),
        "corrupt.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "corrupt"),
        "empty.ckpt": (b"", "corrupt or truncated"),
    }
    for name, (data, message) in cases.items():
        _bad_file(studio, name, data)
        with pytest.raises(ModelFileError, match=message):
            studio.select_checkpoint(name)
        assert studio.models.current is good
    r = studio.txt2img(small())
    assert r.model is good


class Payload:
    def __reduce__(self):
        return (Path("/tmp/studio-pwned").write_text, ("executed",))


def test_malicious_ckpt_is_refused_not_executed(studio, tmp_path):
    target = Path("/tmp/studio-pwned")
    target.unlink(missing_ok=True)
    path = studio.paths.ckpt_dirs[0] / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    studio.refresh_checkpoints()
    with pytest.raises(ModelFileError, match="refused"):
        studio.select_checkpoint("evil.ckpt")
    assert not target.exists()
    assert zipfile.is_zipfile(path)  # a real torch.save file, so the refusal is the unpickler's


def test_not_a_checkpoint(studio):
    path = studio.paths.ckpt_dirs[0] / "lora-like.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path))
    studio.refresh_checkpoints()
    with pytest.raises(ModelFileError, match="LoRA; put it in models/Lora"):
        studio.select_checkpoint("lora-like.safetensors")


def test_missing_model_file(studio):
    path = studio.paths.ckpt_dirs[0] / "gone.safetensors"
    make_checkpoint(path, "sd1", seed=3)
    studio.refresh_checkpoints()
    path.unlink()
    with pytest.raises(ModelFileError, match="not found"):
        studio.select_checkpoint("gone.safetensors")


def test_unknown_checkpoint_lists_available(studio):
    from studio.models.manager import ModelNotFoundError
    with pytest.raises(ModelNotFoundError, match="Available: .*tiny-sd1"):
        studio.select_checkpoint("../../etc/passwd")


def test_bad_request_rejected_before_queue(studio):
    with pytest.raises(RequestError, match="Unknown sampler"):
        studio.submit_txt2img(small(sampler_name="no such sampler"))
    with pytest.raises(RequestError, match="width"):
        studio.submit_txt2img(build_request(Txt2ImgRequest, {"prompt": "a cube", "width": 10}))
    assert studio.queue.job_count == 0


def test_pickle_module_unused_for_safetensors():
    # the loader never unpickles .safetensors: a pickle inside one is just bytes
    assert pickle.dumps(1)
