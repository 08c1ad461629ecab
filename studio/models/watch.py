"""Watch the model folders so a new file (a copied LoRA, a finished training run, a downloaded
checkpoint) is listed without the user pressing ↻.

One daemon thread polls: every ``interval`` seconds it lists each watched folder recursively with
``os.scandir`` (names, sizes and modification times; nothing is opened or hashed) and compares the
result with what its target last refreshed from. Polling rather than inotify because it works the
same on every OS, on network drives and inside containers, and a few thousand ``stat`` calls every
two seconds cost nothing next to a generation.

A change is acted on only once it has *settled*: the listing must stay the same for ``settle``
seconds. A checkpoint being copied grows on every poll, so its library is refreshed once, when the
copy is complete, not with a half-written file. A refresh that raises is logged and the watcher
carries on. Each target counts its refreshes (:meth:`FolderWatcher.version`), so a page can poll a
number cheaply and redraw a list only when it changed.

This module imports nothing of the engine: :func:`watch_targets` reads the libraries off whatever
studio object it is handed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.models.extra_paths import MODULE_SUBFOLDERS
from studio.models.module_source import extra_folders
from studio.restore.library import FOLDERS as FACE_FOLDERS

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
# A folder tree listed as {path: (size, mtime_ns)}
Listing = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class WatchTarget:
    """Folders whose files one library lists, and the call that makes it list them again."""

    name: str
    folders: tuple[Path, ...]
    refresh: Callable[[], Any]

    def __init__(self, name: str, folders: Iterable[Path | str], refresh: Callable[[], Any]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "folders", tuple(dict.fromkeys(Path(f) for f in folders)))
        object.__setattr__(self, "refresh", refresh)


def list_folder(folder: Path) -> Listing:
    """Every file below ``folder`` with its size and mtime. Hidden names (".x") are skipped, as the
    libraries skip them: atomic saves write ``.name.xxxx.tmp`` first and rename it when complete.
    Symlinked folders are followed once (a link loop is not walked twice). A missing or unreadable
    folder lists as empty; a file that vanishes while being listed is left out."""
    out: Listing = {}
    seen: set[tuple[int, int]] = set()
    stack = [str(folder)]
    while stack:
        current = stack.pop()
        try:
            info = os.stat(current)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_dir():
                            stack.append(entry.path)
                        elif entry.is_file():
                            st = entry.stat()
                            out[entry.path] = (st.st_size, st.st_mtime_ns)
                    except OSError:
                        continue
        except OSError:
            continue
    return out


@dataclass
class _State:
    applied: Listing | None = None        # what the target last refreshed from (None: not listed yet)
    pending: Listing | None = None        # a different listing, waiting to settle
    pending_since: float = 0.0
    version: int = 0


@dataclass
class FolderWatcher:
    """Polls the targets' folders on a daemon thread and calls a target's ``refresh`` once its
    folders changed and then stayed the same for ``settle`` seconds (default: one ``interval``)."""

    targets: Sequence[WatchTarget]
    interval: float = DEFAULT_INTERVAL_S
    settle: float | None = None
    _states: dict[str, _State] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"watch target names must be unique, got {names}")
        self.targets = list(self.targets)
        self._states = {name: _State() for name in names}
        if self.settle is None:
            self.settle = self.interval

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> FolderWatcher:
        """Take the current listings as the baseline (the libraries were just scanned), then poll.
        Calling it on a running watcher does nothing."""
        if self.running:
            return self
        self._stop.clear()
        self._baseline()
        self._thread = threading.Thread(target=self._loop, name="studio-folder-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling; waits up to ``timeout`` for a refresh in progress to finish."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- what the UI polls ---------------------------------------------------------------------
    def version(self, name: str) -> int:
        """How many times target ``name`` was refreshed by the watcher (KeyError for an unknown name)."""
        with self._lock:
            return self._states[name].version

    def versions(self) -> dict[str, int]:
        with self._lock:
            return {name: state.version for name, state in self._states.items()}

    def changed_since(self, seen: Mapping[str, int]) -> set[str]:
        """The targets refreshed since a caller recorded ``seen`` (a :meth:`versions` result)."""
        return {name for name, version in self.versions().items() if seen.get(name, 0) != version}

    # -- polling ---------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> list[str]:
        """One pass over every target; returns the names refreshed. The thread calls this; tests may
        call it directly for a deterministic step."""
        now = time.monotonic() if now is None else now
        listings: dict[Path, Listing] = {}   # a folder shared by two targets is listed once per pass
        refreshed: list[str] = []
        for target in self.targets:
            current = self._listing(target, listings)
            with self._lock:
                state = self._states[target.name]
                if state.applied is None:   # first pass without start(): this is the baseline
                    state.applied = current
                    continue
                if current == state.applied:
                    state.pending = None
                    continue
                if state.pending != current:
                    state.pending, state.pending_since = current, now
                    continue
                if now - state.pending_since < (self.settle or 0.0):
                    continue
                state.applied, state.pending = current, None
            if self._refresh(target):
                refreshed.append(target.name)
        return refreshed

    def _refresh(self, target: WatchTarget) -> bool:
        try:
            target.refresh()
        except Exception:  # noqa: BLE001 - a broken library must not stop the watching of the others
            log.exception("Refreshing %s after a change in %s failed", target.name,
                          ", ".join(map(str, target.folders)))
            return False
        with self._lock:
            self._states[target.name].version += 1
        log.info("Model folder changed: %s refreshed", target.name)
        return True

    def _baseline(self) -> None:
        listings: dict[Path, Listing] = {}
        for target in self.targets:
            current = self._listing(target, listings)
            with self._lock:
                state = self._states[target.name]
                state.applied, state.pending = current, None

    def _listing(self, target: WatchTarget, cache: dict[Path, Listing]) -> Listing:
        merged: Listing = {}
        for folder in target.folders:
            if folder not in cache:
                cache[folder] = list_folder(folder)
            merged.update(cache[folder])
        return merged

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher thread must outlive any surprise
                log.exception("Model folder watcher: a poll failed")


def _embeddings_refresh(studio: Any) -> Callable[[], None]:
    def refresh() -> None:
        # list the new files now (cards, GET /embeddings); hand them to the loaded model's prompt
        # encoder on the worker, where it cannot change under a running generation
        studio.embeddings.refresh()
        studio.queue.submit(lambda state: studio.engine.sync_embeddings(), "refresh embeddings")

    return refresh


def watch_targets(studio: Any) -> list[WatchTarget]:
    """The studio's model libraries as watch targets (``studio`` is a :class:`studio.core.Studio`).

    Each target watches the folders its library scans and refreshes only that library. Checkpoints
    are re-listed directly (the catalog swaps its list under a lock and reads hashes only from the
    cache), not through the job queue, so a running generation or training does not hold the
    watcher up. "modules" (separate text encoders / VAEs for SD3 and FLUX) has nothing to refresh:
    they are scanned at each load; the target exists so the UI learns that its picker is stale."""
    paths = studio.paths
    vaes = studio.vaes
    extra = extra_folders(paths)
    module_roots = [paths.models / sub for kind in ("text_encoders", "vae") for sub in MODULE_SUBFOLDERS[kind]]
    module_roots += [*paths.text_encoder_dirs, *extra.get("text_encoders", ()), *extra.get("vae", ()),
                     *paths.vae_dirs]
    faces = studio.engine.face_restorers
    face_roots = [faces.models_dir / name for names in FACE_FOLDERS.values() for name in names]
    return [
        WatchTarget("checkpoints", studio.models.catalog.folders, studio.models.refresh),
        WatchTarget("vae", [vaes.vae_dir, *vaes.ckpt_dirs], vaes.refresh),
        WatchTarget("lora", studio.networks.loras.folders, studio.networks.loras.refresh),
        WatchTarget("hypernetworks", studio.networks.hypernetworks.folders, studio.networks.hypernetworks.refresh),
        WatchTarget("embeddings", studio.embeddings.folders, _embeddings_refresh(studio)),
        WatchTarget("controlnet", studio.controlnets.library.folders, studio.controlnets.library.refresh),
        WatchTarget("upscalers", studio.upscalers.folders, studio.upscalers.refresh),
        WatchTarget("face_restorers", face_roots, faces.refresh),
        WatchTarget("modules", module_roots, lambda: None),
    ]
