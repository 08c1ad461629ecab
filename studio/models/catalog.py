"""Checkpoint catalog: scanning folders, A1111 names and titles, sha256 hashes cached by mtime.

A1111 semantics (``modules/sd_models.CheckpointInfo``):
- ``name`` is the path relative to the scanned folder, with extension;
- ``model_name`` is that path without extension, separators replaced by ``_``;
- ``title`` is ``name [shorthash]`` once the full-file sha256 is known (first 10 hex chars);
- hashes live in ``cache.json`` under ``"hashes"`` as ``"checkpoint/<name>": {mtime, sha256}``.
Hashing a multi-GB file takes seconds, so like A1111 it happens when a model is loaded
(or from the cache), not while scanning.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from studio.config import atomic_write_text

CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".gguf")


class ModelFileNames:
    """A1111's names for a model file or diffusers folder, shared by checkpoints and ControlNets.
    Needs ``path``, ``name`` (relative, with extension), ``is_diffusers`` and ``sha256``."""

    path: Path
    name: str
    is_diffusers: bool
    sha256: str | None

    @property
    def model_name(self) -> str:
        stem = self.name.rsplit(".", 1)[0] if not self.is_diffusers else self.name
        return stem.replace("/", "_").replace("\\", "_")

    @property
    def stem(self) -> str:
        return self.path.stem if not self.is_diffusers else self.path.name

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return self.name if self.shorthash is None else f"{self.name} [{self.shorthash}]"


@dataclass
class CheckpointInfo(ModelFileNames):
    path: Path
    name: str                  # relative path with extension, "/" separated
    is_diffusers: bool = False
    is_demo: bool = False
    sha256: str | None = None

    @property
    def name_for_extra(self) -> str:
        """What A1111 writes as ``Model:`` in the infotext: the file stem."""
        return self.stem

    @property
    def short_title(self) -> str:
        """A1111's ``short_title`` (the infotext's "Hires checkpoint" and "Refiner"): stem [short hash]."""
        return self.stem if self.shorthash is None else f"{self.stem} [{self.shorthash}]"

    def api_dict(self) -> dict:
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.shorthash,
            "sha256": self.sha256,
            "filename": str(self.path),
            "config": None,
        }


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """cache.json shared with A1111's layout so an A1111 data dir keeps its hashes."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str, path: Path, section: str = "hashes") -> str | None:
        with self._lock:
            entry = self._read().get(section, {}).get(key)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        if isinstance(entry, dict) and entry.get("mtime") == mtime:
            return entry.get("sha256")
        return None

    def compute(self, key: str, path: Path, section: str = "hashes",
                hasher: Callable[[Path], str] = sha256_file) -> str:
        """The cached digest of ``path`` or a fresh one. A1111 keeps whole-file hashes in
        ``"hashes"`` and LoRA addnet hashes (a different digest) in ``"hashes-addnet"``."""
        cached = self.get(key, path, section)
        if cached:
            return cached
        digest = hasher(path)
        mtime = path.stat().st_mtime
        with self._lock:
            data = self._read()
            data.setdefault(section, {})[key] = {"mtime": mtime, "sha256": digest}
            atomic_write_text(self.path, json.dumps(data, indent=2))
        return digest


def _is_diffusers_folder(path: Path) -> bool:
    """A diffusers pipeline folder: SD's (``unet/``) or a DiT family's (``transformer/``)."""
    return (path / "model_index.json").is_file() and ((path / "unet").is_dir() or (path / "transformer").is_dir())


def scan_checkpoints(folders: tuple[Path, ...] | list[Path]) -> list[CheckpointInfo]:
    found: dict[Path, CheckpointInfo] = {}
    for root in folders:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            rel = path.relative_to(root).as_posix()
            if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
                # "x.vae.safetensors" next to checkpoints is a VAE (A1111 convention).
                if ".vae." in path.name.lower():
                    continue
                found.setdefault(path.resolve(), CheckpointInfo(path=path, name=rel))
            elif path.is_dir() and _is_diffusers_folder(path):
                found.setdefault(path.resolve(), CheckpointInfo(path=path, name=rel, is_diffusers=True))
    return sorted(found.values(), key=lambda c: c.name.lower())


class Catalog:
    def __init__(self, folders: tuple[Path, ...], hash_cache: HashCache, hashing: bool = True):
        self.folders = folders
        self.hash_cache = hash_cache
        self.hashing = hashing
        self._lock = threading.Lock()
        self._items: list[CheckpointInfo] = []
        self._extra: list[CheckpointInfo] = []

    def refresh(self) -> list[CheckpointInfo]:
        items = scan_checkpoints(self.folders)
        for item in items:
            if not item.is_diffusers:
                item.sha256 = self.hash_cache.get(f"checkpoint/{item.name}", item.path)
        with self._lock:
            self._items = items
        return self.items()

    def add_extra(self, info: CheckpointInfo) -> None:
        """Entries that are not in the scanned folders (the built-in demo model)."""
        with self._lock:
            self._extra = [e for e in self._extra if e.path != info.path] + [info]

    def clear_extra(self) -> None:
        with self._lock:
            self._extra = []

    def items(self) -> list[CheckpointInfo]:
        with self._lock:
            return list(self._items) + list(self._extra)

    def ensure_hash(self, info: CheckpointInfo) -> None:
        if info.sha256 or info.is_diffusers or not self.hashing:
            return
        info.sha256 = self.hash_cache.compute(f"checkpoint/{info.name}", info.path)

    def find(self, query: str) -> CheckpointInfo | None:
        """Match like A1111's ``checkpoint_aliases``: title, name, model name, stem, hash."""
        q = (query or "").strip()
        if not q:
            return None
        items = self.items()
        for getter in (
            lambda c: c.title, lambda c: c.name, lambda c: c.model_name,
            lambda c: c.name_for_extra, lambda c: c.shorthash, lambda c: c.sha256,
        ):
            for c in items:
                if getter(c) and getter(c) == q:
                    return c
        # A title whose hash part differs or is absent (e.g. cached before hashing).
        bare = q.rsplit(" [", 1)[0] if q.endswith("]") else q
        for c in items:
            if bare in (c.name, c.model_name, c.name_for_extra):
                return c
        return None
