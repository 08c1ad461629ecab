"""The model-folder watcher: a copied file is picked up without ↻, a file still being written is
picked up once, after it settles, and a failing refresh never stops the watching."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from studio.models.watch import FolderWatcher, WatchTarget, list_folder

# a polling thread's seconds of waiting: the CI's slow step
pytestmark = pytest.mark.slow

FAST = 0.2


class Recorder:
    """A refresh callback that records when it was called and what the folder held then."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.calls: list[dict[str, int]] = []
        self.event = threading.Event()

    def __call__(self) -> None:
        seen = {} if self.folder is None else {p.name: p.stat().st_size for p in self.folder.rglob("*") if p.is_file()}
        self.calls.append(seen)
        self.event.set()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def lora_dir(tmp_path):
    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    (folder / "old.safetensors").write_bytes(b"x" * 100)
    return folder


def test_a_copied_file_triggers_the_refresh_within_seconds(lora_dir, tmp_path):
    source = tmp_path / "download.safetensors"
    source.write_bytes(b"y" * 5000)
    refresh = Recorder(lora_dir)
    watcher = FolderWatcher([WatchTarget("lora", [lora_dir], refresh)], interval=FAST).start()
    try:
        time.sleep(3 * FAST)
        assert refresh.calls == [], "nothing changed: no refresh"
        assert watcher.version("lora") == 0
        started = time.monotonic()
        (lora_dir / "sub").mkdir()
        shutil.copy(source, lora_dir / "sub" / "new.safetensors")
        assert refresh.event.wait(5.0), "the copied LoRA was not noticed"
        assert time.monotonic() - started < 3.0
        assert refresh.calls[0] == {"old.safetensors": 100, "new.safetensors": 5000}
        assert wait_for(lambda: watcher.version("lora") == 1)
        assert watcher.changed_since({"lora": 0}) == {"lora"}
        assert watcher.changed_since(watcher.versions()) == set()
        time.sleep(5 * FAST)
        assert len(refresh.calls) == 1, "one change, one refresh"
    finally:
        watcher.stop()


def test_a_file_still_being_written_is_picked_up_once_it_settles(lora_dir):
    refresh = Recorder(lora_dir)
    watcher = FolderWatcher([WatchTarget("lora", [lora_dir], refresh)], interval=FAST, settle=0.6).start()
    try:
        with open(lora_dir / "training_output.safetensors", "wb") as f:
            for _ in range(30):                 # ~1.5 s of writing, the size changes at every poll
                f.write(b"z" * 1000)
                f.flush()
                time.sleep(0.05)
        assert refresh.calls == [], "refreshed while the file was still growing"
        assert refresh.event.wait(5.0)
        time.sleep(1.0)
        assert len(refresh.calls) == 1
        assert refresh.calls[0]["training_output.safetensors"] == 30_000, "refreshed with a partial file"
    finally:
        watcher.stop()


def test_stop_stops_the_thread_and_the_refreshes(lora_dir):
    refresh = Recorder()
    watcher = FolderWatcher([WatchTarget("lora", [lora_dir], refresh)], interval=FAST).start()
    assert watcher.running
    watcher.stop()
    assert not watcher.running
    assert not any(t.name == "studio-folder-watcher" and t.is_alive() for t in threading.enumerate())
    (lora_dir / "late.safetensors").write_bytes(b"1")
    time.sleep(5 * FAST)
    assert refresh.calls == []
    watcher.start()   # and it can start again, from the folder as it is now
    try:
        time.sleep(3 * FAST)
        assert refresh.calls == []
        (lora_dir / "later.safetensors").write_bytes(b"2")
        assert refresh.event.wait(5.0)
    finally:
        watcher.stop()


def test_a_failing_refresh_is_logged_and_the_others_keep_working(tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    calls: list[str] = []

    def broken() -> None:
        calls.append("a")
        raise RuntimeError("library exploded")

    good = Recorder()
    watcher = FolderWatcher([WatchTarget("a", [a], broken), WatchTarget("b", [b], good)], interval=FAST)
    watcher.poll(now=0.0)   # baseline
    (a / "x.pt").write_bytes(b"1")
    (b / "y.pt").write_bytes(b"1")
    with caplog.at_level(logging.ERROR, logger="studio.models.watch"):
        assert watcher.poll(now=1.0) == []       # seen, not settled
        assert watcher.poll(now=2.0) == ["b"]    # settled: a raised, b refreshed
    assert calls == ["a"] and len(good.calls) == 1
    assert "library exploded" in caplog.text and "Refreshing a" in caplog.text
    assert watcher.versions() == {"a": 0, "b": 1}
    assert watcher.poll(now=3.0) == [], "a failed refresh is not retried every poll"
    (a / "z.pt").write_bytes(b"2")
    watcher.poll(now=4.0)
    watcher.poll(now=5.0)
    assert calls == ["a", "a"], "the next change tries again"


def test_hidden_temp_files_are_ignored_and_the_rename_counts(lora_dir):
    refresh = Recorder()
    watcher = FolderWatcher([WatchTarget("lora", [lora_dir], refresh)], interval=FAST)
    watcher.poll(now=0.0)
    temp = lora_dir / ".result.safetensors.abcd1234.tmp"
    temp.write_bytes(b"half")
    assert watcher.poll(now=1.0) == [] and watcher.poll(now=2.0) == []
    os.replace(temp, lora_dir / "result.safetensors")
    watcher.poll(now=3.0)
    assert watcher.poll(now=4.0) == ["lora"]
    (lora_dir / "result.safetensors").unlink()
    watcher.poll(now=5.0)
    assert watcher.poll(now=6.0) == ["lora"], "a removed file is a change too"


def test_listing_is_recursive_survives_missing_folders_and_link_loops(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.ckpt").write_bytes(b"12345")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    listing = list_folder(root)
    assert [Path(p).name for p in listing] == ["deep.ckpt"]
    assert next(iter(listing.values()))[0] == 5
    assert list_folder(tmp_path / "missing") == {}
    missing = tmp_path / "later"
    refresh = Recorder()
    watcher = FolderWatcher([WatchTarget("x", [missing], refresh)], interval=FAST)
    watcher.poll(now=0.0)
    missing.mkdir()
    (missing / "m.pt").write_bytes(b"1")
    watcher.poll(now=1.0)
    assert watcher.poll(now=2.0) == ["x"], "a folder created after start is watched too"


def test_target_names_must_be_unique(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        FolderWatcher([WatchTarget("a", [tmp_path], print), WatchTarget("a", [tmp_path], print)])
    with pytest.raises(KeyError):
        FolderWatcher([WatchTarget("a", [tmp_path], print)]).version("b")


def test_watch_targets_cover_every_library_and_a_copied_lora_is_listed(tmp_path):
    from safetensors.numpy import save_file

    from studio.config import Flags
    from studio.core import Studio
    from studio.models.watch import watch_targets
    from tests.helpers import make_models_dir

    make_models_dir(tmp_path)
    studio = Studio.create(Flags(data_dir=str(tmp_path), no_half=True, no_demo=True))
    try:
        targets = {t.name: t for t in watch_targets(studio)}
        assert set(targets) == {"checkpoints", "vae", "lora", "hypernetworks", "embeddings", "controlnet",
                                "upscalers", "face_restorers", "modules"}
        models = studio.paths.models
        assert models / "Lora" in targets["lora"].folders
        assert models / "Stable-diffusion" in targets["checkpoints"].folders
        assert models / "VAE" in targets["vae"].folders and models / "ControlNet" in targets["controlnet"].folders
        assert studio.paths.data / "embeddings" in targets["embeddings"].folders
        assert models / "ESRGAN" in targets["upscalers"].folders
        assert models / "text_encoders" in targets["modules"].folders

        watcher = FolderWatcher(list(targets.values()), interval=FAST).start()
        try:
            assert [i.name for i in studio.networks.loras.refresh()] == []
            staging = tmp_path / "staging.safetensors"
            # only the header is read when listing: a small kohya-named file is enough
            save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 8), np.float32),
                       "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((8, 4), np.float32)},
                      str(staging), metadata={"ss_output_name": "fresh"})
            shutil.copy(staging, models / "Lora" / "fresh.safetensors")
            assert wait_for(lambda: watcher.version("lora") == 1, 5.0)
            assert [i.name for i in studio.networks.loras.items()] == ["fresh"]
            assert watcher.versions()["checkpoints"] == 0, "only the changed library is refreshed"
        finally:
            watcher.stop()
    finally:
        studio.queue.shutdown()
