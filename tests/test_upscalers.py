"""Upscaler registry: the A1111 list and API shapes, PIL and latent resizing, ESRGAN files via spandrel."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.testing.upscalers import write_esrgan
from studio.upscale import (
    LATENT_MODES,
    UpscalerError,
    UpscalerInfo,
    UpscalerLibrary,
    default_folders,
    is_latent_mode,
    latent_modes_api,
    latent_upscale,
    scale_from_name,
)
from studio.upscale.models import tile_spans

CPU = torch.device("cpu")
API_KEYS = {"name", "model_name", "model_path", "model_url", "scale"}


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus a little noise: something an upscaler has to follow."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 200 / width, yy * 200 / height, (xx + yy) * 100 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upscalers") / "models"
    write_esrgan(root / "ESRGAN" / "tinyA.pth", seed=1)
    write_esrgan(root / "ESRGAN" / "tinyB.safetensors", seed=2)
    write_esrgan(root / "ESRGAN" / "oldstyle.pth", seed=3, layout="old")
    write_esrgan(root / "ESRGAN" / "emawrapped.pt", seed=4, wrap="params_ema")
    write_esrgan(root / "ESRGAN" / "sub" / "half.pth", scale=2, seed=5)  # Real-ESRGAN x2 style
    write_esrgan(root / "DAT" / "4x_named.safetensors", seed=6)
    (root / "ESRGAN" / "notes.txt").write_text("not a model")
    return root


@pytest.fixture(scope="module")
def library(models_dir) -> UpscalerLibrary:
    return UpscalerLibrary(default_folders(models_dir), CPU, torch.float32)


# ---------------------------------------------------------------------------------------------
# Listing and API shapes


def test_list_order_and_api_shapes(library, models_dir):
    names = [info.name for info in library.items()]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    assert names[3:] == ["4x_named", "emawrapped", "half", "oldstyle", "tinyA", "tinyB"]
    for item in library.api_list():
        assert set(item) == API_KEYS
    none = library.find("None").api_dict()
    assert none == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
    assert library.find("Lanczos").kind == "pil" and library.find("None").kind == "none"
    named = library.find("4x_named")
    assert named.kind == "model" and named.family == "DAT" and named.scale == 4  # announced by the name
    item = library.find("tinyA").api_dict()
    assert item["model_name"] == "ESRGAN"
    assert item["model_path"] == str(models_dir / "ESRGAN" / "tinyA.pth")
    assert item["model_url"] is None


def test_find_by_any_case_and_file_name(library):
    assert library.find("TINYA").name == "tinyA"
    assert library.find("tinyB.safetensors").name == "tinyB"
    assert library.find("lanczos").name == "Lanczos"
    assert library.find("missing") is None and library.find("") is None
    assert library.find("Latent") is None  # latent modes are not pixel upscalers
    with pytest.raises(UpscalerError, match="unknown upscaler"):
        library.upscale(picture(8, 8), "missing", scale=2)


def test_refresh_rules(tmp_path):
    folder = tmp_path / "ESRGAN"
    other = tmp_path / "SwinIR"
    write_esrgan(folder / "Lanczos.pth")  # may not shadow a built-in
    write_esrgan(folder / "Latent (bicubic).pth")
    write_esrgan(folder / "dup.pth", seed=1)
    write_esrgan(other / "dup.pth", seed=2)
    (folder / "empty.pth").write_bytes(b"")
    library = UpscalerLibrary([folder, other, tmp_path / "RealESRGAN"], CPU, torch.float32)
    models = [info for info in library.items() if info.kind == "model"]
    assert [(info.name, info.path) for info in models] == [("dup", folder / "dup.pth")]
    write_esrgan(folder / "RealESRGAN_x2plus.pth", scale=2)
    library.refresh()
    assert library.find("RealESRGAN_x2plus").scale == 2
    (folder / "dup.pth").unlink()
    library.refresh()
    assert library.find("dup").path == other / "dup.pth"


def test_scale_from_name():
    assert scale_from_name("4x-UltraSharp") == 4
    assert scale_from_name("4xNomos8kDAT") == 4
    assert scale_from_name("ESRGAN_4x") == 4
    assert scale_from_name("RealESRGAN_x2plus") == 2
    assert scale_from_name("1x-ITF-SkinDiffDetail") == 1
    assert scale_from_name("tinyA") is None and scale_from_name("Nomos8k") is None


# ---------------------------------------------------------------------------------------------
# Latent modes


def test_latent_modes_names_and_api():
    assert LATENT_MODES == (
        "Latent",
        "Latent (antialiased)",
        "Latent (bicubic)",
        "Latent (bicubic antialiased)",
        "Latent (nearest)",
        "Latent (nearest-exact)",
    )
    assert latent_modes_api() == [{"name": name} for name in LATENT_MODES]
    assert is_latent_mode("latent (Bicubic)") and not is_latent_mode("Lanczos") and not is_latent_mode(None)


@pytest.mark.parametrize("mode", LATENT_MODES)
def test_latent_upscale_shapes(mode):
    latents = torch.randn(2, 4, 8, 12)
    up = latent_upscale(latents, mode, 16, 20)
    assert up.shape == (2, 4, 16, 20) and up.dtype == latents.dtype and torch.isfinite(up).all()
    down = latent_upscale(latents, mode, 5, 7)
    assert down.shape == (2, 4, 5, 7)
    half = latent_upscale(latents.half(), mode, 12, 18)  # CPU half has no bicubic kernel of its own
    assert half.dtype == torch.float16 and half.shape == (2, 4, 12, 18)


def test_latent_nearest_is_repeat_and_modes_differ():
    latents = torch.randn(1, 4, 6, 5)
    manual = latents.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(latent_upscale(latents, "Latent (nearest)", 12, 10), manual)
    assert torch.equal(latent_upscale(latents, "latent (NEAREST-exact)", 12, 10), manual)
    bilinear = latent_upscale(latents, "Latent", 12, 10)
    assert not torch.allclose(bilinear, manual)
    # antialiasing only changes a reduction
    assert not torch.allclose(
        latent_upscale(latents, "Latent", 3, 2), latent_upscale(latents, "Latent (antialiased)", 3, 2)
    )
    with pytest.raises(UpscalerError, match="unknown latent upscale mode"):
        latent_upscale(latents, "Latent (wobbly)", 12, 10)


# ---------------------------------------------------------------------------------------------
# PIL upscalers


def test_pil_upscalers_exact_sizes(library):
    image = picture(30, 20)
    for name in ("Lanczos", "Nearest", "None"):
        assert library.upscale(image, name, scale=2.5).size == (75, 50)
        assert library.upscale(image, name, size=(64, 41)).size == (64, 41)
        assert library.upscale(image, name, scale=0.5).size == (15, 10)
    nearest = library.upscale(image, "Nearest", scale=2)
    assert np.array_equal(pixels(nearest), pixels(image).repeat(2, axis=0).repeat(2, axis=1))
    assert np.array_equal(pixels(library.upscale(image, "None", scale=1)), pixels(image))
    rgba = library.upscale(image.convert("RGBA"), "Lanczos", scale=2)
    assert rgba.mode == "RGB"
    with pytest.raises(UpscalerError, match="exactly one"):
        library.upscale(image, "Lanczos", scale=2, size=(60, 40))
    with pytest.raises(UpscalerError, match="exactly one"):
        library.upscale(image, "Lanczos")
    with pytest.raises(UpscalerError):
        library.upscale(image, "Lanczos", scale=0)


# ---------------------------------------------------------------------------------------------
# Model upscalers


def test_esrgan_files_load_with_their_scale(library):
    for name in ("tinyA", "tinyB", "oldstyle", "emawrapped"):
        assert library.find(name).scale is None  # nothing in the name, not loaded yet
        info = library.probe(name)
        assert info.scale == 4 and info.kind == "model"
        assert library.find(name).api_dict()["scale"] == 4.0
    assert library.probe("half").scale == 2


def test_esrgan_4x_upscale(library):
    image = picture(24, 20, seed=1)
    for name in ("tinyA", "tinyB"):
        out = library.upscale(image, name, scale=4)
        assert out.size == (96, 80) and out.mode == "RGB"
        lanczos = library.upscale(image, "Lanczos", scale=4)
        assert np.abs(pixels(out) - pixels(lanczos)).mean() > 2
        # it follows the picture: a different input gives a different output
        other = library.upscale(picture(24, 20, seed=2), name, scale=4)
        assert np.abs(pixels(out) - pixels(other)).mean() > 2
    # two files with different weights really are two models
    assert not np.array_equal(
        pixels(library.upscale(image, "tinyA", scale=4)), pixels(library.upscale(image, "tinyB", scale=4))
    )


def test_esrgan_any_scale_is_exact(library):
    image = picture(20, 14, seed=3)
    assert library.upscale(image, "tinyA", scale=2.5).size == (50, 35)
    assert library.upscale(image, "tinyA", size=(33, 70)).size == (33, 70)
    assert library.upscale(image, "half", scale=4).size == (80, 56)  # two passes of a 2x model
    assert library.upscale(image, "half", scale=1.5).size == (30, 21)
    gray = library.upscale(image.convert("L"), "tinyA", scale=2)
    assert gray.mode == "RGB" and gray.size == (40, 28)


def test_reduced_precision_dtypes(models_dir):
    image = picture(16, 12, seed=5)
    folders = default_folders(models_dir)
    reference = pixels(UpscalerLibrary(folders, CPU, torch.float32).upscale(image, "tinyA", scale=4))
    for dtype, worst in ((torch.float16, 0), (torch.bfloat16, 12)):  # CPU float16 runs in float32
        out = UpscalerLibrary(folders, CPU, dtype).upscale(image, "tinyA", scale=4)
        assert out.size == (64, 48)
        assert np.abs(pixels(out) - reference).max() <= worst, dtype


def test_tiled_matches_untiled(models_dir):
    image = picture(56, 44, seed=4)
    folders = default_folders(models_dir)
    whole = UpscalerLibrary(folders, CPU, torch.float32, tile=0)
    tiled = UpscalerLibrary(folders, CPU, torch.float32, tile=32, overlap=8)
    # "half" pixel-unshuffles its input, so its tiles must also start on even pixels
    for name, scale, worst, mean in (("tinyA", 4, 6, 0.3), ("half", 2, 24, 1.0)):
        a = pixels(whole.upscale(image, name, scale=scale))
        b = pixels(tiled.upscale(image, name, scale=scale))
        assert np.abs(a - b).max() <= worst, name
        assert np.abs(a - b).mean() < mean, name


def test_tile_spans_cover_and_align():
    for length, tile, overlap, align in (
        (1000, 192, 16, 1),
        (201, 64, 16, 4),
        (90, 32, 0, 4),
        (50, 192, 16, 1),
    ):
        spans = tile_spans(length, tile, overlap, align)
        assert spans[0][0] == 0 and spans[-1][1] == length
        for (start, end), (next_start, _) in itertools.pairwise(spans):
            assert start % align == 0 and next_start % align == 0
            assert end - next_start >= overlap
        assert all(end - start <= tile + align for start, end in spans)


def test_changed_file_is_read_again(tmp_path):
    path = write_esrgan(tmp_path / "ESRGAN" / "swap.pth", seed=1)
    library = UpscalerLibrary([tmp_path / "ESRGAN"], CPU, torch.float32, max_cached=1)
    image = picture(12, 10)
    first = pixels(library.upscale(image, "swap", scale=4))
    write_esrgan(path, seed=9)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert not np.array_equal(first, pixels(library.upscale(image, "swap", scale=4)))


# ---------------------------------------------------------------------------------------------
# Bad files


def test_bad_files_give_clear_errors_and_the_list_still_works(tmp_path):
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    (folder / "garbage.pth").write_bytes(os.urandom(512))
    (folder / "garbage2.safetensors").write_bytes(os.urandom(512))
    torch.save({"encoder.weight": torch.zeros(4, 4)}, folder / "stranger.pth")
    torch.save([torch.zeros(2)], folder / "alist.pth")
    torch.save(
        {320: {"linear.0.weight": torch.zeros(2)}, "state_dict": {7: torch.zeros(2)}}, folder / "intkeys.pt"
    )
    write_esrgan(folder / "wronggrowth.pth", gc=4)  # keys look right, shapes do not fit
    write_esrgan(folder / "good.pth")
    library = UpscalerLibrary([folder], CPU, torch.float32)
    names = [info.name for info in library.items()]
    assert names == [
        "None",
        "Lanczos",
        "Nearest",
        "alist",
        "garbage",
        "garbage2",
        "good",
        "intkeys",
        "stranger",
        "wronggrowth",
    ]
    image = picture(8, 8)
    expected = {
        "garbage": "garbage.pth",
        "garbage2": "not a readable safetensors file",
        "stranger": "not an upscaler model spandrel recognises",
        "alist": "not a state dict",
        "intkeys": "does not hold a state dict",
        "wronggrowth": "weights do not load",
    }
    for name, message in expected.items():
        with pytest.raises(UpscalerError, match=message) as caught:
            library.upscale(image, name, scale=2)
        assert str(folder / name) in str(caught.value)
    assert library.upscale(image, "good", scale=4).size == (32, 32)
    assert len(library.api_list()) == 10


class _Payload:
    """Pickles as a call to os.mkdir: loading it the unsafe way would create a folder."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model.0.weight": torch.zeros(1), "hook": _Payload(str(marker))}, folder / "evil.pth")
    library = UpscalerLibrary([folder], CPU, torch.float32)
    assert library.find("evil") is not None
    with pytest.raises(UpscalerError, match="refused to load") as caught:
        library.upscale(picture(8, 8), "evil", scale=2)
    assert "evil.pth" in str(caught.value)
    assert not marker.exists()


def test_info_is_a_frozen_value():
    info = UpscalerInfo("x", "model", Path("/m/x.pth"), 4, "ESRGAN")
    with pytest.raises(AttributeError):
        info.scale = 2  # type: ignore[misc]
    assert info.api_dict() == {
        "name": "x",
        "model_name": "ESRGAN",
        "model_path": str(Path("/m/x.pth")),
        "model_url": None,
        "scale": 4.0,
    }
