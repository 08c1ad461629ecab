"""Big images decode and encode in VAE tiles (memory stays flat), small ones whole.

The tiled path is exercised on a 192-px image with the threshold and the tile size scaled down (128-px
tiles above 160²): the same diffusers tiling code and the same blending as 512-px tiles above 1024², at a
fraction of the cost. The real threshold and tile size are checked on the context manager itself."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from studio.config import Flags
from studio.core import Studio
from studio.generation import txt2img
from studio.generation.sampling import encode_images
from studio.generation.txt2img import decode_latents, vae_tiling
from tests.helpers import make_models_dir

SMALL_THRESHOLD = 160 * 160   # 192² is above it, 160² not
SMALL_TILE = 128              # a 192-px image is 2 x 2 tiles overlapping by 32 px


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaetile")
    make_models_dir(root)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s.select_checkpoint("tiny-sd1.safetensors")
    s.queue.shutdown()


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(txt2img, "TILED_VAE_ABOVE", SMALL_THRESHOLD)
    monkeypatch.setattr(txt2img, "VAE_TILE", SMALL_TILE)


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


def test_real_threshold_and_tile_size():
    """1024² still decodes whole, anything above in 512-px tiles with a quarter overlap; the VAE's own
    settings come back afterwards."""
    vae = SimpleNamespace(tiled_decode=None, use_tiling=False, tile_sample_min_size=256, tile_latent_min_size=32,
                          tile_overlap_factor=0.5)
    with vae_tiling(vae, 1024, 1024) as tiled:
        assert not tiled and not vae.use_tiling
    with vae_tiling(vae, 1032, 1032) as tiled:
        assert tiled and vae.use_tiling
        assert (vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == (512, 64, 0.25)
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == \
        (False, 256, 32, 0.5)
    with vae_tiling(SimpleNamespace(), 4096, 4096) as tiled:   # a VAE without tiling support runs whole
        assert not tiled


def test_small_images_decode_whole(model, monkeypatch, small_tiles):
    calls = spy(monkeypatch, model.vae)
    decode_latents(model, torch.randn(1, 4, 8, 8))
    encode_images(model, torch.rand(1, 3, 160, 160) * 2 - 1)    # at the threshold: still whole
    assert calls == {"decode": 0, "encode": 0}


def decode_whole(model, monkeypatch, latents) -> np.ndarray:
    monkeypatch.setattr(txt2img, "TILED_VAE_ABOVE", 10**9)
    try:
        return np.asarray(decode_latents(model, latents)[0], dtype=np.int16)
    finally:
        monkeypatch.setattr(txt2img, "TILED_VAE_ABOVE", SMALL_THRESHOLD)


def test_big_images_use_tiles_close_to_whole(model, monkeypatch, small_tiles):
    side = 192
    assert side * side > SMALL_THRESHOLD and side > SMALL_TILE
    latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    other = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(5))
    before = (model.vae.use_tiling, model.vae.tile_sample_min_size)
    calls = spy(monkeypatch, model.vae)
    tiled = np.asarray(decode_latents(model, latents)[0], dtype=np.int16)
    assert calls["decode"] == 1 and tiled.shape == (side, side, 3)
    assert (model.vae.use_tiling, model.vae.tile_sample_min_size) == before   # the VAE's settings are back
    whole, unrelated = decode_whole(model, monkeypatch, latents), decode_whole(model, monkeypatch, other)
    assert calls["decode"] == 1
    # tiles are blended over their overlap: the tiled image is the whole one but for small differences
    # (each tile's own GroupNorm statistics, the seams), far from what other latents decode to
    difference, scale = np.abs(tiled - whole).mean(), np.abs(unrelated - whole).mean()
    assert 0 < difference < 0.25 * scale, (difference, scale)

    encoded = encode_images(model, torch.rand(1, 3, side, side) * 2 - 1)
    assert calls["encode"] == 1 and encoded.shape == (1, 4, side // 8, side // 8)
