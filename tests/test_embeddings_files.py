"""Textual-inversion embedding files: every real layout, model matching, the library and safety."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from studio.networks.embeddings import (
    Embedding,
    EmbeddingFileError,
    EmbeddingLibrary,
    read_embedding,
)
from studio.testing.embeddings import (
    random_vectors,
    write_a1111_pt,
    write_diffusers,
    write_kohya_safetensors,
    write_sdxl_safetensors,
)

SD1 = {"default": 768}
SD2 = {"default": 1024}
SDXL = {"clip_l": 768, "clip_g": 1280}
ENTRY_KEYS = {"step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"}


class CodePayload:
    """Unpickling this runs code that creates ``marker`` (what a malicious .pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _write_bare_tensor(path: Path, vectors: torch.Tensor) -> Path:
    torch.save(vectors, path)
    return path


WRITERS = {
    "a1111.pt": lambda p, v: write_a1111_pt(p, v, name="other-name", step=7),
    "legacy.pt": lambda p, v: write_a1111_pt(p, v, legacy_parameter_dict=True),
    "kohya.safetensors": write_kohya_safetensors,
    "learned_embeds.bin": lambda p, v: write_diffusers(p, "<cat-toy>", v),
    "concept.safetensors": lambda p, v: write_diffusers(p, "<cat-toy>", v),
    "bare.pt": _write_bare_tensor,
}


@pytest.mark.parametrize("filename", sorted(WRITERS))
def test_each_format_round_trips(tmp_path, filename):
    vectors = random_vectors(3, 768, seed=1)
    path = WRITERS[filename](tmp_path / filename, vectors)

    emb = read_embedding(path)

    assert emb.name == Path(filename).stem  # the stem, never data["name"]
    assert emb.path == path
    assert list(emb.vectors) == ["default"]
    assert emb.vectors["default"].dtype == torch.float32
    assert emb.vectors["default"].device.type == "cpu"
    torch.testing.assert_close(emb.vectors["default"], vectors, rtol=0, atol=0)
    assert emb.n_vectors == 3 and emb.shape == 768


def test_a1111_metadata_is_kept(tmp_path):
    path = write_a1111_pt(
        tmp_path / "style.pt", random_vectors(2, 768, 0), step=1500,
        sd_checkpoint="abcdef1234", sd_checkpoint_name="v1-5-pruned",
    )
    emb = read_embedding(path)
    assert (emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name) == (1500, "abcdef1234", "v1-5-pruned")
    assert emb.api_dict() == {
        "step": 1500, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "v1-5-pruned",
        "shape": 768, "vectors": 2,
    }


def test_one_dimensional_vector_becomes_a_row(tmp_path):
    vec = random_vectors(1, 1024, 3)[0]
    emb = read_embedding(write_diffusers(tmp_path / "single.bin", "<tok>", vec))
    assert emb.vectors["default"].shape == (1, 1024)
    assert emb.step is None and emb.sd_checkpoint is None


def test_half_precision_is_read_as_float32(tmp_path):
    vectors = random_vectors(2, 768, 4).half()
    emb = read_embedding(write_kohya_safetensors(tmp_path / "half.safetensors", vectors))
    assert emb.vectors["default"].dtype == torch.float32
    torch.testing.assert_close(emb.vectors["default"], vectors.float(), rtol=0, atol=0)


def test_sdxl_file(tmp_path):
    clip_l, clip_g = random_vectors(3, 768, 5), random_vectors(3, 1280, 6)
    emb = read_embedding(write_sdxl_safetensors(tmp_path / "xl.safetensors", clip_l, clip_g))
    assert set(emb.vectors) == {"clip_l", "clip_g"}
    torch.testing.assert_close(emb.vectors["clip_l"], clip_l, rtol=0, atol=0)
    torch.testing.assert_close(emb.vectors["clip_g"], clip_g, rtol=0, atol=0)
    assert emb.n_vectors == 3
    assert emb.shape == 768 + 1280  # A1111 reports the summed width


@pytest.mark.parametrize(
    "data, message",
    [
        ({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, "multiple terms"),
        ({"string_to_param": {"*": torch.zeros(1, 8), "x": torch.zeros(1, 8)}}, "exactly one term"),
        ({"weights": [1, 2, 3]}, "neither"),
        ({"emb_params": torch.zeros(2, 3, 4)}, "shape"),
        ({"emb_params": torch.zeros(2, 8, dtype=torch.int64)}, "dtype"),
        ({"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(3, 16)}, "vector counts"),
        ([1, 2, 3], "list"),
    ],
)
def test_unrecognised_layouts_raise(tmp_path, data, message):
    path = tmp_path / "odd.pt"
    torch.save(data, path)
    with pytest.raises(EmbeddingFileError, match=message) as info:
        read_embedding(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_code_payload_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"emb": CodePayload(marker)}, folder / "evil.pt")

    lib = EmbeddingLibrary([folder])
    lib.refresh()
    with pytest.raises(EmbeddingFileError, match="refused"):
        read_embedding(folder / "evil.pt")

    assert not marker.exists()
    assert "evil" in lib.errors and "evil" not in lib.embeddings
    assert "exec" in lib.errors["evil"]

    # Prove the payload is real: an unsafe load of a copy does run it.
    unsafe_copy = shutil.copy(folder / "evil.pt", tmp_path / "copy.pt")
    torch.load(unsafe_copy, weights_only=False)
    assert marker.read_text() == "pwned"


def test_code_payload_beside_legacy_parameter_dict_is_refused(tmp_path):
    # The ParameterDict allow-list used for old A1111 files must not open the door to code.
    marker = tmp_path / "pwned.txt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(random_vectors(1, 768, 0))})
    path = tmp_path / "sneaky.pt"
    torch.save({"string_to_param": params, "extra": CodePayload(marker)}, path)

    with pytest.raises(EmbeddingFileError, match="refused"):
        read_embedding(path)
    assert not marker.exists()


def test_corrupt_files_are_errors_not_exceptions(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"this is not a zip or a pickle")
    (tmp_path / "broken2.safetensors").write_bytes(b"\xff" * 64)
    write_kohya_safetensors(tmp_path / "good.safetensors", random_vectors(1, 768, 0))

    lib = EmbeddingLibrary([tmp_path])
    lib.refresh()

    assert set(lib.embeddings) == {"good"}
    assert set(lib.errors) == {"broken", "broken2"}
    assert "broken.pt" in lib.errors["broken"]
    assert "broken2.safetensors" in lib.errors["broken2"]


def _mixed_library(tmp_path: Path) -> EmbeddingLibrary:
    write_a1111_pt(tmp_path / "sd1style.pt", random_vectors(2, 768, 1))
    write_kohya_safetensors(tmp_path / "sd2style.safetensors", random_vectors(4, 1024, 2))
    xl_l, xl_g = random_vectors(3, 768, 3), random_vectors(3, 1280, 4)
    write_sdxl_safetensors(tmp_path / "xlstyle.safetensors", xl_l, xl_g)
    bad_l, bad_g = random_vectors(1, 768, 5), random_vectors(1, 1024, 6)  # clip_g of the wrong width
    write_sdxl_safetensors(tmp_path / "badxl.safetensors", bad_l, bad_g)
    lib = EmbeddingLibrary([tmp_path])
    lib.refresh()
    return lib


def test_resolve_by_model_widths(tmp_path):
    lib = _mixed_library(tmp_path)

    loaded, skipped = lib.resolve(SD1)
    assert set(loaded) == {"sd1style"}
    assert skipped["sd2style"] == "width 1024 does not match this model (expects 768)"
    assert "xlstyle" in skipped and "badxl" in skipped  # A1111 never uses an SDXL file's clip_l on SD1

    loaded, skipped = lib.resolve(SD2)
    assert set(loaded) == {"sd2style"}
    assert skipped["sd1style"] == "width 768 does not match this model (expects 1024)"

    loaded, skipped = lib.resolve(SDXL)
    assert set(loaded) == {"xlstyle"}
    assert set(skipped) == {"sd1style", "sd2style", "badxl"}  # SDXL needs both parts
    assert "768" in skipped["sd1style"] and "clip_g 1280" in skipped["sd1style"]
    assert "clip_g 1024" in skipped["badxl"] and "clip_g 1280" in skipped["badxl"]


def test_api_dict_matches_a1111(tmp_path):
    lib = _mixed_library(tmp_path)
    body = lib.api_dict(SDXL)

    assert set(body) == {"loaded", "skipped"}
    assert set(body["loaded"]) == {"xlstyle"}
    assert set(body["skipped"]) == {"sd1style", "sd2style", "badxl"}
    for entry in body["loaded"].values():
        assert set(entry) == ENTRY_KEYS
    for entry in body["skipped"].values():
        assert set(entry) == ENTRY_KEYS | {"reason"}  # A1111's keys, plus why
    assert body["loaded"]["xlstyle"] == {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 2048, "vectors": 3,
    }
    assert body["skipped"]["sd1style"] == {
        "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 2,
        "reason": "single-encoder embedding of width 768 does not match this model (expects clip_l 768 + clip_g 1280)",
    }
    assert body["skipped"]["sd2style"]["shape"] == 1024 and body["skipped"]["sd2style"]["vectors"] == 4


def test_refused_files_are_listed_as_skipped_with_the_reason(tmp_path):
    marker = tmp_path / "pwned.txt"
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"emb": CodePayload(marker)}, folder / "evil.pt")  # a pickle that would run exec
    (folder / "garbage.pt").write_bytes(b"\x00not a checkpoint at all" * 10)
    torch.save({"a": 1, "b": "two"}, folder / "odd.pt")  # readable, but no embedding layout
    write_a1111_pt(folder / "good.pt", random_vectors(2, 768, 1))
    write_a1111_pt(folder / "wide.pt", random_vectors(1, 1024, 2))
    second = tmp_path / "more"
    write_a1111_pt(second / "good.pt", random_vectors(1, 768, 3))  # a second "good": not listed twice
    lib = EmbeddingLibrary([folder, second])
    lib.refresh()
    body = lib.api_dict(SD1)

    assert not marker.exists()
    assert set(body["loaded"]) == {"good"} and body["loaded"]["good"]["vectors"] == 2
    assert set(body["skipped"]) == {"evil", "garbage", "odd", "wide"}
    for name in ("evil", "garbage", "odd"):
        entry = body["skipped"][name]
        assert set(entry) == ENTRY_KEYS | {"reason"}
        assert entry["shape"] == 0 and entry["vectors"] == 0 and entry["step"] is None
        assert f"{name}.pt" in entry["reason"]
    assert "refused" in body["skipped"]["evil"]["reason"] and "exec" in body["skipped"]["evil"]["reason"]
    assert "neither a textual inversion embedding" in body["skipped"]["odd"]["reason"]
    assert body["skipped"]["wide"]["reason"] == "width 1024 does not match this model (expects 768)"
    assert body["skipped"]["wide"]["shape"] == 1024


def test_hash_is_sha256_prefix_and_cached(tmp_path):
    path = write_a1111_pt(tmp_path / "hashed.pt", random_vectors(1, 768, 9))
    emb = read_embedding(path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert emb.hash == expected and len(emb.hash) == 12
    path.unlink()  # cached after the first computation, no re-read
    assert emb.hash == expected


def test_refresh_sees_added_changed_and_removed_files(tmp_path):
    lib = EmbeddingLibrary([tmp_path])
    lib.refresh()
    assert lib.embeddings == {} and lib.errors == {}

    keep = write_a1111_pt(tmp_path / "keep.pt", random_vectors(1, 768, 0))
    change = write_kohya_safetensors(tmp_path / "change.safetensors", random_vectors(1, 768, 1))
    lib.refresh()
    assert set(lib.embeddings) == {"keep", "change"}
    kept_object = lib.embeddings["keep"]

    write_kohya_safetensors(change, random_vectors(2, 768, 2))  # new size -> must be re-read
    write_diffusers(tmp_path / "sub" / "added.bin", "<added>", random_vectors(1, 768, 3))
    lib.refresh()
    assert set(lib.embeddings) == {"keep", "change", "added"}
    assert lib.embeddings["change"].n_vectors == 2
    assert lib.embeddings["keep"] is kept_object  # unchanged file not re-read

    keep.unlink()
    lib.refresh()
    assert set(lib.embeddings) == {"change", "added"}

    (tmp_path / "sub" / "added.bin").write_bytes(b"garbage")  # a good file going bad becomes an error
    lib.refresh()
    assert set(lib.embeddings) == {"change"} and set(lib.errors) == {"added"}


def test_scan_rules(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    write_a1111_pt(first / "dup.pt", random_vectors(1, 768, 0))
    write_a1111_pt(second / "dup.pt", random_vectors(1, 768, 1))
    write_a1111_pt(first / "deep" / "deeper" / "nested.pt", random_vectors(1, 768, 2))
    write_a1111_pt(first / ".hidden.pt", random_vectors(1, 768, 3))
    write_a1111_pt(first / ".git" / "inside.pt", random_vectors(1, 768, 4))
    (first / "empty.pt").write_bytes(b"")  # A1111 skips empty files silently
    (first / "notes.txt").write_text("not an embedding")
    (first / "preview.png").write_bytes(b"\x89PNG")  # PNG embeddings are not read (yet)

    lib = EmbeddingLibrary([first, second, tmp_path / "missing"])
    lib.refresh()

    assert set(lib.embeddings) == {"dup", "nested"}
    assert lib.embeddings["dup"].path == first / "dup.pt"  # first folder wins
    assert set(lib.errors) == {"dup"}
    assert str(second / "dup.pt") in lib.errors["dup"]


def test_embedding_dataclass_directly():
    emb = Embedding(name="x", path=Path("x.pt"), vectors={"default": torch.zeros(5, 32)})
    assert (emb.n_vectors, emb.shape) == (5, 32)
    assert emb.api_dict()["vectors"] == 5
