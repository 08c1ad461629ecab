"""LoRA files on disk: :class:`LoraLibrary` lists ``models/Lora`` (names are file stems, the alias is
the metadata's ``ss_output_name``, hashes are A1111's "addnet" sha256 cached in ``cache.json`` under
``hashes-addnet``) and parses files on demand, keeping the last few parsed. Apart from the merging
code (studio.networks.lora, torch) so that the studio lists LoRAs at start-up without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.models.catalog import HashCache
from studio.models.state_dict import (
    SAFETENSORS_SUFFIXES,
    ModelFileError,
    load_state_dict,
    read_safetensors_header,
)
from studio.networks.files import walk_files
from studio.networks.lora_formats import (
    LoraFileError,
    ParsedNetwork,
    detect_family,
    family_from_keys,
    parse_network,
)

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
SHORTHASH_LENGTH = 12
_HASH_BLOCK = 1 << 20
_PARSED_CACHE_SIZE = 3


# --------------------------------------------------------------------------- files


@dataclass
class LoraInfo:
    """One file in models/Lora."""

    name: str                   # file stem, as used in ``<lora:NAME:1>``
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)   # safetensors metadata ({} for pickles)
    alias: str = ""             # metadata ss_output_name, else the name
    family: str | None = None   # "sd1" | "sd2" | "sdxl" | "flux1" | "sd3" | None when unknown
    sha256: str | None = None   # addnet hash, once computed
    error: str | None = None    # why the file cannot be read, for files listed anyway

    def __post_init__(self) -> None:
        self.alias = self.alias or self.name

    def shorthash(self) -> str | None:
        return self.sha256[:SHORTHASH_LENGTH] if self.sha256 else None

    def api_dict(self) -> dict[str, Any]:
        """An item of A1111's ``GET /sdapi/v1/loras``; like A1111, JSON-looking metadata values
        (``ss_tag_frequency``, ``ss_dataset_dirs``…) are returned parsed."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path),
                "metadata": {k: _maybe_json(v) for k, v in self.metadata.items()}}


def _maybe_json(value: str) -> Any:
    if isinstance(value, str) and value[:1] == "{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash: for safetensors the sha256 of everything after the header (so editing
    metadata keeps it), for other files the sha256 of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix.lower() in SAFETENSORS_SUFFIXES:
            header_size = int.from_bytes(f.read(8), "little")
            f.seek(8 + header_size)
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _scan(folders: Iterable[Path]) -> Iterable[Path]:
    # Unlike embeddings and hypernetworks, LoRA folders are listed without following symlinked
    # sub-folders, and empty or unreadable files are kept (refresh reports why they fail). A file
    # reached under two names (a symlinked file, overlapping folders) is listed once, first seen.
    seen: set[Path] = set()
    for path in walk_files(folders, LORA_SUFFIXES, follow_links=False):
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            yield path


class LoraLibrary:
    def __init__(self, folders: list[Path], hash_cache: HashCache):
        self.folders = [Path(f) for f in folders]
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._items: list[LoraInfo] = []
        self._parsed: OrderedDict[tuple[str, int, int], ParsedNetwork] = OrderedDict()

    def refresh(self) -> list[LoraInfo]:
        """Rescan the folders, reading safetensors headers only; never raises for a bad file."""
        items = [self._describe(path) for path in _scan(self.folders)]
        items.sort(key=lambda i: (i.name.lower(), str(i.path)))
        with self._lock:
            self._items = items
        return list(items)

    def _describe(self, path: Path) -> LoraInfo:
        info = LoraInfo(name=path.stem, path=path)
        try:
            if path.suffix.lower() in SAFETENSORS_SUFFIXES:
                header = read_safetensors_header(path)
                raw = header.get("__metadata__") or {}
                info.metadata = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
                shapes = {k: tuple(v.get("shape", ())) for k, v in header.items()
                          if k != "__metadata__" and isinstance(v, dict)}
                info.family = detect_family(info.metadata, shapes)
            info.alias = info.metadata.get("ss_output_name") or info.name
            info.sha256 = self.hash_cache.get(f"lora/{info.name}", path, section="hashes-addnet")
        except (ModelFileError, OSError, ValueError, AttributeError, TypeError) as e:
            info.error = str(e)
            log.warning("Lora %s: %s", path, e)
        return info

    def items(self) -> list[LoraInfo]:
        with self._lock:
            return list(self._items)

    def find(self, name: str) -> LoraInfo | None:
        """By file stem first, then by alias (A1111's ``available_network_aliases``)."""
        items = self.items()
        for info in items:
            if info.name == name:
                return info
        for info in items:
            if info.alias == name:
                return info
        return None

    def hash(self, info: LoraInfo) -> str:
        info.sha256 = self.hash_cache.compute(f"lora/{info.name}", info.path, section="hashes-addnet",
                                              hasher=addnet_hash)
        return info.sha256

    def load(self, info: LoraInfo) -> ParsedNetwork:
        """The parsed file, from a small cache keyed by (path, mtime, size)."""
        try:
            stat = info.path.stat()
        except OSError as e:
            raise LoraFileError(f"{info.name}: cannot read {info.path}: {e}") from e
        key = (str(info.path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._parsed:
                self._parsed.move_to_end(key)
                return self._parsed[key]
        try:
            state_dict = load_state_dict(info.path)
            metadata = info.metadata
            if info.path.suffix.lower() in SAFETENSORS_SUFFIXES:
                raw = read_safetensors_header(info.path).get("__metadata__") or {}
                metadata = {str(k): str(v) for k, v in raw.items()}
        except ModelFileError as e:
            raise LoraFileError(f"{info.name}: {e}") from e
        try:
            parsed = parse_network(state_dict, metadata, info.name)
        except LoraFileError:
            raise
        except (RuntimeError, IndexError, TypeError, ValueError) as e:
            raise LoraFileError(f"{info.name}: unreadable LoRA weights ({e})") from e
        if not parsed.modules:
            sample = ", ".join(list(state_dict)[:3]) or "no tensors"
            raise LoraFileError(f"{info.name}: no LoRA/LyCORIS weights found (keys: {sample}…)")
        if info.family is None:
            info.family = family_from_keys({k: tuple(v.shape) for k, v in state_dict.items()})
        with self._lock:
            self._parsed[key] = parsed
            while len(self._parsed) > _PARSED_CACHE_SIZE:
                self._parsed.popitem(last=False)
        return parsed
