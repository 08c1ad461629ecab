"""Face restoration (A1111's "Restore faces"): finding the files, loading them through spandrel, pasting faces back.

RestoreFormer shrinks to a tiny model (0.5 M parameters) and carries the fast tests. spandrel
only loads GFPGAN at full size and CodeFormer with a full-size autoencoder, so the tests that
run those are marked slow.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.restore.face_boxes import detect
from studio.restore.library import FaceRestoreError, FaceRestorers, find_face_models, kind_from_name
from studio.restore.restorer import blend, face_square, feather_mask, restore_faces
from studio.testing.face_restorers import make_face_restorer
from studio.testing.upscalers import write_esrgan

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    """skimage's astronaut at 256 px: one frontal face, box about (86, 30)-(139, 83)."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS)


def no_face(size: int = 128) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 / size, yy * 255 / size, np.full_like(xx, 90)], -1)
    return Image.fromarray(base.astype(np.uint8))


def outside(square, shape) -> np.ndarray:
    """A boolean [H, W] mask: True where ``square`` does not reach."""
    keep = np.ones(shape[:2], dtype=bool)
    keep[max(0, square.top):square.top + square.side, max(0, square.left):square.left + square.side] = False
    return keep


def check_restored(original: Image.Image, restored: Image.Image) -> None:
    """The face changed, everything outside its square is bit-for-bit the original."""
    before, after = np.asarray(original.convert("RGB")), np.asarray(restored)
    assert after.shape == before.shape and restored.mode == "RGB"
    box = detect(original)[0]
    square = face_square(box)
    far = outside(square, before.shape)
    assert far.mean() > 0.7
    np.testing.assert_array_equal(after[far], before[far])
    face = (slice(box.y0, box.y1), slice(box.x0, box.x1))
    assert np.abs(after[face].astype(int) - before[face].astype(int)).mean() > 5


# ---------------------------------------------------------------------------------------------
# Files and names


def test_kinds_from_names_and_folders():
    assert kind_from_name(Path("codeformer-v0.1.0.pth"), "GFPGAN") == "CodeFormer"
    assert kind_from_name(Path("model.pth"), "Codeformer") == "CodeFormer"
    assert kind_from_name(Path("GFPGANv1.4.pth"), "GFPGAN") == "GFPGAN"
    assert kind_from_name(Path("RestoreFormer.pth"), "GFPGAN") == "RestoreFormer"
    assert kind_from_name(Path("weights.safetensors"), "RestoreFormer") == "RestoreFormer"
    assert kind_from_name(Path("other.pth"), "GFPGAN") == "GFPGAN"
    # facexlib's helpers, which A1111 downloads next to GFPGAN
    assert kind_from_name(Path("detection_Resnet50_Final.pth"), "GFPGAN") is None
    assert kind_from_name(Path("parsing_parsenet.pth"), "GFPGAN") is None


def test_listing_reads_no_weights_and_defaults_to_codeformer(tmp_path):
    models = tmp_path / "models"
    for name in ("GFPGAN/GFPGANv1.4.pth", "GFPGAN/detection_Resnet50_Final.pth", "GFPGAN/notes.txt",
                 "ESRGAN/4x.pth"):
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        (models / name).write_bytes(b"not read while listing")
    restorers = FaceRestorers(models)
    assert restorers.names() == ["GFPGAN"]
    assert restorers.resolve(None) == "GFPGAN"
    assert restorers.api_list() == [{"name": "GFPGAN", "cmd_dir": str(models / "GFPGAN")}]

    (models / "Codeformer").mkdir()
    (models / "Codeformer" / "codeformer-v0.1.0.pth").write_bytes(b"x")
    (models / "GFPGAN" / "RestoreFormer.pth").write_bytes(b"x")
    restorers.refresh()
    assert restorers.names() == ["CodeFormer", "GFPGAN", "RestoreFormer"]
    assert restorers.resolve(None) == "CodeFormer"  # A1111's default
    assert restorers.resolve("gfpgan") == "GFPGAN"
    assert [item["name"] for item in restorers.api_list()] == ["CodeFormer", "GFPGAN", "RestoreFormer"]


def test_newest_file_of_a_kind_wins(tmp_path):
    models = tmp_path / "models"
    older = make_face_restorer(models / "GFPGAN" / "RestoreFormer.pth", "RestoreFormer", seed=1)
    newer = make_face_restorer(models / "RestoreFormer" / "rf_new.safetensors", "RestoreFormer", seed=2)
    os.utime(older, (time.time() - 100, time.time() - 100))
    files = find_face_models(models)
    assert [item.path for item in files] == [newer, older]
    assert FaceRestorers(models).file_for("RestoreFormer").path == newer


def test_missing_kind_names_the_folder(tmp_path):
    models = tmp_path / "models"
    make_face_restorer(models / "GFPGAN" / "RestoreFormer.safetensors", "RestoreFormer")
    restorers = FaceRestorers(models)
    # a picture with no face needs no model, installed or not
    assert restorers.restore(no_face(), "CodeFormer")[1] == 0
    with pytest.raises(FaceRestoreError, match="CodeFormer") as caught:
        restorers.resolve("CodeFormer")
    message = str(caught.value)
    assert str(Path("models") / "Codeformer") in message and "RestoreFormer" in message
    with pytest.raises(FaceRestoreError, match=r"models.GFPGAN"):
        restorers.resolve("GFPGAN")
    with pytest.raises(FaceRestoreError, match="Unknown face restorer 'Foo'"):
        restorers.resolve("Foo")
    with pytest.raises(FaceRestoreError, match="No face restoration model"):
        FaceRestorers(tmp_path / "empty").resolve(None)


def test_file_added_later_is_found_without_refresh(tmp_path):
    models = tmp_path / "models"
    restorers = FaceRestorers(models)
    assert restorers.names() == []
    make_face_restorer(models / "GFPGAN" / "RestoreFormer.safetensors", "RestoreFormer")
    assert restorers.resolve("RestoreFormer") == "RestoreFormer"


# ---------------------------------------------------------------------------------------------
# Loading through spandrel


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_restores_the_astronauts_face(tmp_path, astronaut):
    models = tmp_path / "models"
    make_face_restorer(models / "GFPGAN" / "RestoreFormer.safetensors", "RestoreFormer", seed=3)
    restorers = FaceRestorers(models)
    restored, count = restorers.restore(astronaut, None)
    assert count == 1
    check_restored(astronaut, restored)
    # the bottom half is far from the face: untouched
    np.testing.assert_array_equal(np.asarray(restored)[140:], np.asarray(astronaut)[140:])
    # cached: the second call reuses the loaded model and gives the same picture
    assert restorers.load("RestoreFormer") is restorers.load("RestoreFormer")
    again, _ = restorers.restore(astronaut, "RestoreFormer")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(restored))


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_pth_and_safetensors_give_the_same_model(tmp_path, astronaut):
    safe_dir, pth_dir = tmp_path / "a" / "models", tmp_path / "b" / "models"
    make_face_restorer(safe_dir / "GFPGAN" / "RestoreFormer.safetensors", "RestoreFormer", seed=4)
    make_face_restorer(pth_dir / "RestoreFormer" / "RestoreFormer.pth", "RestoreFormer", seed=4, wrap="params_ema")
    from_safe, _ = FaceRestorers(safe_dir).restore(astronaut, "RestoreFormer")
    from_pth, _ = FaceRestorers(pth_dir).restore(astronaut, "RestoreFormer")
    np.testing.assert_array_equal(np.asarray(from_safe), np.asarray(from_pth))


def test_changed_file_is_read_again(tmp_path):
    models = tmp_path / "models"
    path = make_face_restorer(models / "GFPGAN" / "RestoreFormer.safetensors", "RestoreFormer", seed=5)
    restorers = FaceRestorers(models)
    first = restorers.load("RestoreFormer")
    make_face_restorer(path, "RestoreFormer", seed=6)
    os.utime(path, (time.time() + 10, time.time() + 10))
    second = restorers.load("RestoreFormer")
    assert second is not first
    assert not torch.equal(first.model.quant_conv.weight, second.model.quant_conv.weight)


def test_no_face_comes_back_unchanged_without_loading(tmp_path):
    models = tmp_path / "models"
    # not a model at all: with no face in the picture it must not even be read
    (models / "GFPGAN").mkdir(parents=True)
    (models / "GFPGAN" / "RestoreFormer.pth").write_bytes(b"garbage")
    image = no_face()
    result, count = FaceRestorers(models).restore(image, "RestoreFormer")
    assert count == 0 and result is image


def test_non_face_model_is_refused(tmp_path, astronaut):
    models = tmp_path / "models"
    write_esrgan(models / "GFPGAN" / "GFPGANv1.4.pth", seed=1)
    with pytest.raises(FaceRestoreError, match="not a face restoration model.*ESRGAN"):
        FaceRestorers(models).restore(astronaut, "GFPGAN")


def test_unreadable_and_mislabelled_files_are_refused(tmp_path, astronaut):
    models = tmp_path / "models"
    (models / "Codeformer").mkdir(parents=True)
    (models / "Codeformer" / "codeformer.safetensors").write_bytes(b"garbage")
    make_face_restorer(models / "GFPGAN" / "GFPGANv1.4.safetensors", "RestoreFormer")
    restorers = FaceRestorers(models)
    with pytest.raises(FaceRestoreError, match="codeformer.safetensors: not a readable safetensors"):
        restorers.restore(astronaut, "CodeFormer")
    with pytest.raises(FaceRestoreError, match="is a RestoreFormer model, not GFPGAN"):
        restorers.restore(astronaut, "GFPGAN")


def test_values_are_checked(tmp_path, astronaut):
    models = tmp_path / "models"
    make_face_restorer(models / "GFPGAN" / "RestoreFormer.safetensors", "RestoreFormer")
    restorers = FaceRestorers(models)
    with pytest.raises(FaceRestoreError, match="codeformer_weight"):
        restorers.restore(astronaut, None, codeformer_weight=1.5)
    with pytest.raises(FaceRestoreError, match="visibility"):
        restorers.restore(astronaut, None, visibility=-0.1)
    assert restorers.restore(astronaut, None, visibility=0.0) == (astronaut, 0)


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_visibility_blends_as_extras(tmp_path, astronaut):
    models = tmp_path / "models"
    make_face_restorer(models / "GFPGAN" / "RestoreFormer.safetensors", "RestoreFormer", seed=7)
    restorers = FaceRestorers(models)
    full, _ = restorers.restore(astronaut, None)
    half, count = restorers.restore(astronaut, None, visibility=0.5)
    assert count == 1
    np.testing.assert_array_equal(np.asarray(half), np.asarray(Image.blend(astronaut, full, 0.5)))
    assert blend(astronaut, full, 1.0) is full and blend(astronaut, full, 0.0) is astronaut


# ---------------------------------------------------------------------------------------------
# The paste-back, with a stand-in model


def test_identity_model_puts_the_face_back_in_place(astronaut):
    """A model that returns its input gives back the picture: the crop is neither shifted nor scaled."""
    boxes = detect(astronaut)
    result = restore_faces(astronaut, boxes, lambda face: face, CPU, torch.float32)
    before, after = np.asarray(astronaut).astype(int), np.asarray(result).astype(int)
    square = face_square(boxes[0])
    inside = slice(square.top, square.top + square.side), slice(square.left, square.left + square.side)
    # only the 106 -> 512 -> 106 px resampling is left (a mean of ~1.3 levels, soft edges) ...
    error = np.abs(after - before)[inside].mean()
    assert error < 2.5
    # ... far less than if the face came back one pixel off in any direction (~9.5)
    for shift in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        assert np.abs(after - np.roll(before, shift, (0, 1)))[inside].mean() > 3 * error


def test_paste_is_feathered_and_clipped_at_the_border():
    mask = feather_mask(100)
    assert mask[0].max() == 0 and mask[:, -1].max() == 0 and mask[50, 50] == 1
    np.testing.assert_array_equal(mask, mask.T)
    assert np.all(np.diff(mask[50, :50]) >= 0)  # rises steadily towards the middle

    # a face at the corner: the square reaches past the image, only its inside is written
    from studio.restore.face_boxes import Box

    image = no_face(96)
    box = Box(0, 0, 30, 30)
    white = restore_faces(image, [box], lambda face: torch.ones_like(face), CPU, torch.float32)
    before, after = np.asarray(image).astype(int), np.asarray(white).astype(int)
    square = face_square(box)
    np.testing.assert_array_equal(after[outside(square, before.shape)], before[outside(square, before.shape)])
    assert after[10, 10].min() == 255  # the middle of the face is all model
    inside = slice(0, square.top + square.side), slice(0, square.left + square.side)
    assert (after[inside] >= before[inside]).all()  # the cross-fade never overshoots


def test_alpha_is_kept():
    from studio.restore.face_boxes import Box

    image = no_face(64).convert("RGBA")
    image.putalpha(Image.new("L", image.size, 77))
    result = restore_faces(image, [Box(20, 20, 40, 40)], lambda face: face, CPU, torch.float32)
    assert result.mode == "RGBA" and np.asarray(result)[..., 3].min() == 77


# ---------------------------------------------------------------------------------------------
# Full-size architectures (spandrel accepts no smaller GFPGAN, nor a smaller CodeFormer autoencoder)


@pytest.mark.slow
def test_gfpgan_restores_deterministically(tmp_path, astronaut):
    models = tmp_path / "models"
    make_face_restorer(models / "GFPGAN" / "GFPGANv1.4.pth", "GFPGAN", seed=8, wrap="params_ema")
    restorers = FaceRestorers(models)
    restored, count = restorers.restore(astronaut, "GFPGAN")
    assert count == 1
    check_restored(astronaut, restored)
    again, _ = restorers.restore(astronaut, "GFPGAN")  # the file's noise maps, not fresh noise
    np.testing.assert_array_equal(np.asarray(again), np.asarray(restored))


@pytest.mark.slow
def test_codeformer_weight_reaches_the_model(tmp_path, astronaut):
    models = tmp_path / "models"
    make_face_restorer(models / "Codeformer" / "codeformer-v0.1.0.pth", "CodeFormer", seed=9, wrap="params_ema")
    restorers = FaceRestorers(models)
    assert restorers.resolve(None) == "CodeFormer"
    faithful, count = restorers.restore(astronaut, None, codeformer_weight=1.0)
    assert count == 1
    check_restored(astronaut, faithful)
    free, _ = restorers.restore(astronaut, None, codeformer_weight=0.0)
    assert not np.array_equal(np.asarray(faithful), np.asarray(free))
