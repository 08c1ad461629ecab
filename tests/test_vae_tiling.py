"""Big images decode and encode in VAE tiles (memory stays flat), small ones whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.config import Flags
from studio.core import Studio
from studio.generation import txt2img
from studio.generation.sampling import encode_images
from studio.generation.txt2img import TILED_VAE_ABOVE, decode_latents
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaetile")
    make_models_dir(root)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s.select_checkpoint("tiny-sd1.safetensors")
    s.queue.shutdown()


def spy(monkeypatch, vae):
    calls = {"decode": 0, "encode": 0}
    tiled_decode, tiled_encode = vae.tiled_decode, vae._tiled_encode

    def decode(*a, **k):
        calls["decode"] += 1
        return tiled_decode(*a, **k)

    def encode(*a, **k):
        calls["encode"] += 1
        return tiled_encode(*a, **k)

    monkeypatch.setattr(vae, "tiled_decode", decode)
    monkeypatch.setattr(vae, "_tiled_encode", encode)
    return calls


def test_small_images_decode_whole(model, monkeypatch):
    calls = spy(monkeypatch, model.vae)
    decode_latents(model, torch.randn(1, 4, 64, 64))
    encode_images(model, torch.rand(1, 3, 512, 512) * 2 - 1)
    assert calls == {"decode": 0, "encode": 0}


def test_big_images_use_tiles_close_to_whole(model, monkeypatch):
    side = 1032                      # just above the threshold
    assert side * side > TILED_VAE_ABOVE
    latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    before = (model.vae.use_tiling, model.vae.tile_sample_min_size)
    calls = spy(monkeypatch, model.vae)
    tiled = np.asarray(decode_latents(model, latents)[0], dtype=np.int16)
    assert calls["decode"] == 1 and tiled.shape == (side, side, 3)
    assert (model.vae.use_tiling, model.vae.tile_sample_min_size) == before   # the VAE's settings are back
    monkeypatch.setattr(txt2img, "TILED_VAE_ABOVE", 10**9)
    whole = np.asarray(decode_latents(model, latents)[0], dtype=np.int16)
    # tiles are blended over their overlap: only the seams differ a little
    assert np.abs(tiled - whole).mean() < 4
    monkeypatch.setattr(txt2img, "TILED_VAE_ABOVE", 1024 * 1024)
    encode_images(model, torch.rand(1, 3, side, side) * 2 - 1)
    assert calls["encode"] == 1
