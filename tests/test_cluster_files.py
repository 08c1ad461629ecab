"""Model files reaching a worker node: fetched from the front's offers, verified, never clobbering."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import threading
from pathlib import Path

import pytest

from studio.cluster.files import (
    RECORD_NAME,
    FileOffers,
    FileRef,
    FileSyncError,
    ensure_local,
    file_ref,
    sha256_of,
)

CHUNK = 256 << 10


def _front(tmp_path: Path, relpath: str = "sd15/model.safetensors", size: int = 3 << 20, seed: int = 0):
    """A front with one random checkpoint offered; returns (offers, ref, source path)."""
    root = tmp_path / "front" / "Stable-diffusion"
    src = root / relpath
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(os.urandom(size) if seed == 0 else bytes([seed]) * size)
    ref = file_ref("Stable-diffusion", root, src)
    offers = FileOffers()
    offers.offer(ref, src)
    return offers, ref, src


def _node_roots(tmp_path: Path) -> dict[str, Path]:
    return {"Stable-diffusion": tmp_path / "node" / "Stable-diffusion", "Lora": tmp_path / "node" / "Lora"}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial-" in p.name)


def test_round_trip_through_offers(tmp_path):
    offers, ref, src = _front(tmp_path)
    roots = _node_roots(tmp_path)
    progress: list[int] = []

    [(path, fetched)] = ensure_local([ref], roots, offers.read, chunk_size=CHUNK,
                                     on_progress=lambda r, done: progress.append(done))

    assert fetched
    assert path == roots["Stable-diffusion"] / "sd15" / "model.safetensors"  # nested folder created
    assert path.read_bytes() == src.read_bytes()
    assert sha256_of(path) == ref.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert progress[-1] == ref.size and len(progress) == ref.size // CHUNK
    assert _leftovers(tmp_path / "node") == []
    record = json.loads((roots["Stable-diffusion"] / RECORD_NAME).read_text())
    assert record["files"]["sd15/model.safetensors"]["sha256"] == ref.sha256

    # A second job finds it cached and does not ask the front again.
    def no_read(*args):
        raise AssertionError("read_chunk called for a cached file")

    assert ensure_local([ref], roots, no_read) == [(path, False)]


def test_fileref_pickles_and_round_trips_as_dict(tmp_path):
    _, ref, _ = _front(tmp_path, size=1000)
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert FileRef.from_dict(json.loads(json.dumps(ref.as_dict()))) == ref
    assert FileRef.from_dict({**ref.as_dict(), "sha256": ref.sha256.upper()}) == ref
    with pytest.raises(ValueError):
        FileRef("Lora", "x.safetensors", 1, "not-a-hash")


def test_file_ref_refuses_a_path_outside_its_root(tmp_path):
    root = tmp_path / "Lora"
    root.mkdir()
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    with pytest.raises(ValueError, match="not inside"):
        file_ref("Lora", root, outside)
    with pytest.raises(ValueError, match="not inside"):
        file_ref("Lora", root, root / ".." / "elsewhere.safetensors")


def test_existing_same_size_file_is_used_without_fetching(tmp_path):
    _, ref, src = _front(tmp_path, size=4096)
    roots = _node_roots(tmp_path)
    target = roots["Stable-diffusion"] / ref.relpath
    target.parent.mkdir(parents=True)
    target.write_bytes(src.read_bytes())  # shared storage or a copy the user made

    def no_read(*args):
        raise AssertionError("read_chunk called for a file already on the node")

    assert ensure_local([ref], roots, no_read) == [(target, False)]


def test_corrupted_transfer_leaves_nothing_behind(tmp_path):
    offers, ref, _ = _front(tmp_path)
    roots = _node_roots(tmp_path)

    def flipping(sha, offset, length):
        data = bytearray(offers.read(sha, offset, length))
        if offset == CHUNK:
            data[7] ^= 0xFF
        return bytes(data)

    with pytest.raises(FileSyncError, match="sha256") as info:
        ensure_local([ref], roots, flipping, chunk_size=CHUNK)
    assert "Stable-diffusion/sd15/model.safetensors" in str(info.value)
    assert not (roots["Stable-diffusion"] / ref.relpath).exists()
    assert _leftovers(tmp_path / "node") == []


def test_transport_failure_is_a_clear_error_and_cleans_up(tmp_path):
    offers, ref, _ = _front(tmp_path, size=CHUNK * 3)
    roots = _node_roots(tmp_path)

    def dying(sha, offset, length):
        if offset >= CHUNK:
            raise ConnectionError("front went away")
        return offers.read(sha, offset, length)

    with pytest.raises(FileSyncError, match="front went away"):
        ensure_local([ref], roots, dying, chunk_size=CHUNK)
    assert not (roots["Stable-diffusion"] / ref.relpath).exists()
    assert _leftovers(tmp_path / "node") == []


def test_different_size_file_of_the_user_is_never_overwritten(tmp_path):
    offers, ref, _ = _front(tmp_path, size=4096)
    roots = _node_roots(tmp_path)
    target = roots["Stable-diffusion"] / ref.relpath
    target.parent.mkdir(parents=True)
    target.write_bytes(b"the user's own model")

    with pytest.raises(FileSyncError, match="different file of that name") as info:
        ensure_local([ref], roots, offers.read)
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"the user's own model"


def test_own_fetched_file_is_replaced_when_the_front_has_a_new_version(tmp_path):
    roots = _node_roots(tmp_path)
    offers_v1, ref_v1, _ = _front(tmp_path / "v1", size=5000, seed=1)
    offers_v2, ref_v2, src_v2 = _front(tmp_path / "v2", size=5000, seed=2)  # same name and size
    [(path, _)] = ensure_local([ref_v1], roots, offers_v1.read)

    assert ensure_local([ref_v2], roots, offers_v2.read) == [(path, True)]
    assert path.read_bytes() == src_v2.read_bytes()

    # The same name written by the user afterwards is theirs again: kept, not replaced.
    path.write_bytes(b"u" * 5000)
    os.utime(path, ns=(1, 1))
    assert ensure_local([ref_v1], roots, offers_v1.read) == [(path, False)]
    assert path.read_bytes() == b"u" * 5000


@pytest.mark.parametrize("relpath", ["../x", "/etc/passwd", "a/../../b", "a\\..\\b", "C:/x", "a//b", "./a"])
def test_path_traversal_refs_are_refused(tmp_path, relpath):
    ref = FileRef("Lora", relpath, 1, "0" * 64)

    def no_read(*args):
        raise AssertionError("read_chunk called for a refused ref")

    with pytest.raises(FileSyncError, match="refusing"):
        ensure_local([ref], _node_roots(tmp_path), no_read)
    assert not (tmp_path / "x").exists() and not (tmp_path / "node" / "b").exists()


def test_unknown_folder_key_is_refused(tmp_path):
    ref = FileRef("ControlNet", "canny.safetensors", 1, "0" * 64)
    with pytest.raises(FileSyncError, match="no 'ControlNet' model folder"):
        ensure_local([ref], _node_roots(tmp_path), lambda *a: b"x")


def test_offers_serve_only_offered_files(tmp_path):
    offers, ref, src = _front(tmp_path, size=1000)
    with pytest.raises(LookupError):
        offers.read("f" * 64, 0, 10)
    assert offers.read(ref.sha256, 990, 100) == src.read_bytes()[990:]
    assert offers.read(ref.sha256, 1000, 10) == b""
    with pytest.raises(ValueError):
        offers.read(ref.sha256, 1001, 10)
    with pytest.raises(ValueError):
        offers.read(ref.sha256, -1, 10)
    assert offers.refs() == [ref]
    assert offers.withdraw(ref.sha256)
    with pytest.raises(LookupError):
        offers.read(ref.sha256, 0, 10)


def test_offers_refuse_a_file_whose_size_changed(tmp_path):
    offers, ref, src = _front(tmp_path, size=1000)
    src.write_bytes(b"a new, shorter file")
    with pytest.raises(FileSyncError, match="changed on the front"):
        offers.read(ref.sha256, 0, 10)
    with pytest.raises(ValueError, match="bytes"):
        offers.offer(ref, src)


def test_two_threads_fetching_the_same_file_download_it_once(tmp_path):
    offers, ref, src = _front(tmp_path, size=CHUNK * 4)
    roots = _node_roots(tmp_path)
    calls: list[int] = []
    started = threading.Event()

    def slow_read(sha, offset, length):
        calls.append(offset)
        started.set()
        threading.Event().wait(0.01)  # keep the first download in progress while the other waits
        return offers.read(sha, offset, length)

    results: list = [None, None]

    def fetch(i):
        results[i] = ensure_local([ref], roots, slow_read, chunk_size=CHUNK)[0]

    first = threading.Thread(target=fetch, args=(0,))
    first.start()
    started.wait(5)
    second = threading.Thread(target=fetch, args=(1,))
    second.start()
    first.join(10)
    second.join(10)

    target = roots["Stable-diffusion"] / ref.relpath
    assert sorted(fetched for _, fetched in results) == [False, True]
    assert all(path == target for path, _ in results)
    assert calls == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
    assert target.read_bytes() == src.read_bytes()
    assert _leftovers(tmp_path / "node") == []


def _fetch_in_child(ref_dict: dict, roots: dict, src: str, log: str) -> None:
    """Runs in a child process: fetch with a slow transport that logs each read to ``log``."""
    data = Path(src).read_bytes()

    def logged_read(sha, offset, length):
        with open(log, "a") as f:
            f.write(f"{offset}\n")
        threading.Event().wait(0.01)
        return data[offset:offset + length]

    ensure_local([FileRef.from_dict(ref_dict)], roots, logged_read, chunk_size=CHUNK)


def test_two_processes_fetching_the_same_file_download_it_once(tmp_path):
    _, ref, src = _front(tmp_path, size=CHUNK * 4)
    roots = _node_roots(tmp_path)
    log = tmp_path / "reads.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_fetch_in_child, args=(ref.as_dict(), roots, str(src), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(int(x) for x in log.read_text().split()) == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
    assert (roots["Stable-diffusion"] / ref.relpath).read_bytes() == src.read_bytes()
