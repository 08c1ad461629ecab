"""Model files on every node, without the user copying folders.

A worker on another machine needs the checkpoint, VAE, LoRAs... a job names. Either the node
already sees the file (shared storage, or a copy the user made) or it fetches it from the front,
chunk by chunk, through whatever transport the caller passes in (the Ray glue passes a function
that asks an actor on the front's node). This module is that logic without Ray:

- the front describes a file by a :class:`FileRef` (folder key, relative path, size, sha256) and
  serves it only through :class:`FileOffers`, so a worker can read offered files and nothing else;
- a worker calls :func:`ensure_local`, which trusts a same-size file already there (rehashing
  gigabytes before every job would cost more than the job), downloads a missing one into a temp
  file while hashing it, and moves it into place only once size and sha256 match.

Files the studio fetched itself are listed in ``<root>/.studio-fetched.json`` so a later version of
the same name can replace them; any other file on the node belongs to the user and is never
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

try:  # Ray runs multi-node clusters on Linux and macOS only; fetching needs flock there.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

RECORD_NAME = ".studio-fetched.json"
# One read answers at most this much: a caller cannot make the front load a whole checkpoint into
# memory (or one Ray object) with a single call.
MAX_READ = 256 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"^[A-Za-z]:")


class FileSyncError(RuntimeError):
    """A model file could not be made available on this node; the message says what to do."""


@dataclass(frozen=True)
class FileRef:
    """One model file as the front knows it: enough for a node to find it, fetch it and verify it."""

    folder: str  # model-folder key: "Stable-diffusion", "VAE", "Lora", ...
    relpath: str  # posix path below that folder's root
    size: int
    sha256: str  # lowercase hex

    def __post_init__(self) -> None:
        if not isinstance(self.folder, str) or not self.folder:
            raise ValueError(f"FileRef.folder must be a non-empty string, got {self.folder!r}")
        if not isinstance(self.relpath, str) or not self.relpath:
            raise ValueError(f"FileRef.relpath must be a non-empty string, got {self.relpath!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ValueError(f"FileRef.size must be a non-negative int, got {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"FileRef.sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    @property
    def label(self) -> str:
        return f"{self.folder}/{self.relpath}"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> FileRef:
        return cls(
            folder=str(data["folder"]),
            relpath=str(data["relpath"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]).lower(),
        )


def sha256_of(path: Path | str, chunk: int = 8 << 20) -> str:
    """The file's sha256, read in chunks so a 7 GB checkpoint never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_relpath(relpath: str) -> PurePosixPath:
    """The relative path as parts that cannot leave the folder root; ValueError otherwise.

    Checked by text, not by resolving: symlinked subfolders inside a model folder are a normal
    shared-storage setup, while "..", absolute paths, drive letters and backslashes (a Windows
    separator that posix would keep inside one name) only ever come from a bad or hostile ref."""
    if not relpath or "\\" in relpath or "\x00" in relpath:
        raise ValueError(f"bad relative path {relpath!r}")
    if relpath.startswith("/") or _DRIVE.match(relpath):
        raise ValueError(f"relative path {relpath!r} is absolute")
    parts = relpath.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"relative path {relpath!r} has an empty, '.' or '..' component")
    return PurePosixPath(*parts)


def file_ref(folder: str, root: Path, path: Path, sha256: str | None = None) -> FileRef:
    """Describe ``path`` (a file below ``root``, the folder ``folder``'s root) for other nodes.

    Pass ``sha256`` when it is already known (the model catalog's hash cache) to skip hashing."""
    root_abs = Path(os.path.abspath(root))
    path_abs = Path(os.path.abspath(path))
    try:
        rel = path_abs.relative_to(root_abs)
    except ValueError:
        raise ValueError(f"{path} is not inside the {folder} folder {root}") from None
    relpath = rel.as_posix()
    _check_relpath(relpath)
    if not path_abs.is_file():
        raise ValueError(f"{path} is not a file")
    size = path_abs.stat().st_size
    digest = sha256.lower() if sha256 is not None else sha256_of(path_abs)
    return FileRef(folder=folder, relpath=relpath, size=size, sha256=digest)


class FileOffers:
    """The files the front lets workers read, by sha256; nothing else can be read through it.

    Thread-safe: the Ray actor serving reads may run calls concurrently while the front offers
    new files."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offers: dict[str, tuple[FileRef, Path]] = {}

    def offer(self, ref: FileRef, path: Path) -> None:
        """Make ``path`` readable as ``ref``. Its size must match; its hash is trusted (the worker
        verifies the sha256 of what it received, so a wrong hash fails there, loudly)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"cannot offer {path}: not a file")
        size = path.stat().st_size
        if size != ref.size:
            raise ValueError(f"cannot offer {path} as {ref.label}: it has {size} bytes, the ref says {ref.size}")
        with self._lock:
            self._offers[ref.sha256] = (ref, path)

    def withdraw(self, sha256: str) -> bool:
        """Stop serving a file (deleted or replaced on the front); True when it was offered."""
        with self._lock:
            return self._offers.pop(sha256.lower(), None) is not None

    def refs(self) -> list[FileRef]:
        with self._lock:
            return [ref for ref, _ in self._offers.values()]

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the offered file from ``offset``; b"" exactly at its end."""
        with self._lock:
            entry = self._offers.get(str(sha256).lower())
        if entry is None:
            raise LookupError(f"no file with sha256 {sha256} is offered by the front")
        ref, path = entry
        if offset < 0 or length < 0:
            raise ValueError(f"bad read of {ref.label}: offset {offset}, length {length}")
        if length > MAX_READ:
            raise ValueError(f"bad read of {ref.label}: {length} bytes asked, at most {MAX_READ} per read")
        if offset > ref.size:
            raise ValueError(f"bad read of {ref.label}: offset {offset} is past its end ({ref.size} bytes)")
        try:
            with open(path, "rb") as f:
                # Checked on the open file, so a file replaced by a different-size one between
                # offering and reading is refused instead of served as a mix of two files.
                size = os.fstat(f.fileno()).st_size
                if size != ref.size:
                    raise FileSyncError(
                        f"{ref.label} changed on the front since it was offered ({path}: {size} bytes now, "
                        f"{ref.size} when offered); rescan the model folders on the front and retry"
                    )
                f.seek(offset)
                return f.read(min(length, ref.size - offset))
        except FileNotFoundError:
            raise FileSyncError(
                f"{ref.label} is gone from the front ({path}); rescan the model folders on the front and retry"
            ) from None


def ensure_local(
    refs: Iterable[FileRef],
    roots: Mapping[str, Path],
    read_chunk: Callable[[str, int, int], bytes],
    chunk_size: int = 32 << 20,
    on_progress: Callable[[FileRef, int], None] | None = None,
) -> list[tuple[Path, bool]]:
    """Make every ref a verified file on this node; return (path, fetched?) per ref, in order.

    ``roots`` maps folder keys to this node's folder roots; ``read_chunk(sha256, offset, length)``
    returns bytes of the front's file (a short read is fine, an empty one before the end is not);
    ``on_progress(ref, bytes_done)`` is called after each chunk of a download."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [_ensure_one(ref, roots, read_chunk, chunk_size, on_progress) for ref in refs]


def _node() -> str:
    return socket.gethostname()


def _target(ref: FileRef, roots: Mapping[str, Path]) -> tuple[Path, Path]:
    if ref.folder not in roots:
        known = ", ".join(sorted(roots)) or "none"
        raise FileSyncError(
            f"{ref.label}: this node ({_node()}) has no '{ref.folder}' model folder configured "
            f"(known: {known}); start the worker with the same model folder options as the front"
        )
    try:
        rel = _check_relpath(ref.relpath)
    except ValueError as exc:
        raise FileSyncError(f"refusing to place model file {ref.folder}/{ref.relpath!r}: {exc}") from None
    root = Path(roots[ref.folder])
    return root, root.joinpath(*rel.parts)


def _ensure_one(
    ref: FileRef,
    roots: Mapping[str, Path],
    read_chunk: Callable[[str, int, int], bytes],
    chunk_size: int,
    on_progress: Callable[[FileRef, int], None] | None,
) -> tuple[Path, bool]:
    root, target = _target(ref, roots)
    if _usable(ref, root, target):
        return target, False
    if fcntl is None:  # pragma: no cover - Windows
        raise FileSyncError(
            f"{ref.label} is missing on this node at {target} and fetching needs a Linux or macOS node; "
            "copy the file there or put the model folders on shared storage"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileSyncError(f"{ref.label}: cannot create {target.parent} on {_node()}: {exc}") from exc
    with _flocked(target.parent / f".{target.name}.lock"):
        # Another thread or process may have fetched it while this one waited for the lock.
        if _usable(ref, root, target):
            return target, False
        _download(ref, target, read_chunk, chunk_size, on_progress)
        _record(root, ref, target)
    return target, True


def _usable(ref: FileRef, root: Path, target: Path) -> bool:
    """True when ``target`` can be used as is, False when it must be (re)fetched; raises when a
    file of the user's is in the way."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    if not target.is_file():
        raise FileSyncError(
            f"{ref.label}: {target} on {_node()} exists but is not a file; move it away so the worker can fetch it"
        )
    fetched = _read_record(root).get(ref.relpath)
    ours = (
        isinstance(fetched, dict)
        and fetched.get("size") == st.st_size
        and fetched.get("mtime_ns") == st.st_mtime_ns
    )
    if ours:
        # Our own earlier download: trust its recorded hash, replace it if the front's file changed.
        return fetched.get("sha256") == ref.sha256
    if st.st_size == ref.size:
        return True  # shared storage or the user's copy: same size, trusted without rehashing
    raise FileSyncError(
        f"{ref.label}: this node ({_node()}) has a different file of that name at {target} "
        f"({st.st_size} bytes, the front's has {ref.size}); the studio never overwrites it. "
        "Rename or remove it on this node, or give the front's file another name"
    )


def _download(
    ref: FileRef,
    target: Path,
    read_chunk: Callable[[str, int, int], bytes],
    chunk_size: int,
    on_progress: Callable[[FileRef, int], None] | None,
) -> None:
    free = shutil.disk_usage(target.parent).free
    if free < ref.size:
        raise FileSyncError(
            f"{ref.label}: not enough disk space on {_node()} for {target} "
            f"({ref.size} bytes needed, {free} free); free some space or use shared storage"
        )
    partial = target.parent / f".{target.name}.partial-{ref.sha256[:8]}"
    digest = hashlib.sha256()
    done = 0
    try:
        with open(partial, "wb") as f:
            while done < ref.size:
                want = min(chunk_size, ref.size - done)
                try:
                    data = read_chunk(ref.sha256, done, want)
                except FileSyncError:
                    raise
                except Exception as exc:
                    raise FileSyncError(
                        f"{ref.label}: fetching it from the front for {target} on {_node()} failed at byte "
                        f"{done}: {exc}; check the front is running and still has the file, then retry"
                    ) from exc
                if not data or len(data) > want:
                    raise FileSyncError(
                        f"{ref.label}: the front sent {len(data)} bytes at offset {done} (asked {want}); "
                        "its file may have changed: rescan the model folders on the front and retry"
                    )
                f.write(data)
                digest.update(data)
                done += len(data)
                if on_progress is not None:
                    on_progress(ref, done)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != ref.sha256:
            raise FileSyncError(
                f"{ref.label}: the copy fetched for {target} on {_node()} has sha256 {digest.hexdigest()}, "
                f"expected {ref.sha256}; it was discarded. The file may have changed on the front "
                "(rescan its model folders) or the transfer was corrupted; retry"
            )
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _record(root: Path, ref: FileRef, target: Path) -> None:
    """Note that the studio fetched ``target`` itself, so a later version may replace it."""
    st = target.stat()
    record_path = root / RECORD_NAME
    with _flocked(root / f"{RECORD_NAME}.lock"):
        files = _read_record(root)
        files[ref.relpath] = {"sha256": ref.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        tmp = root / f".{RECORD_NAME}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, record_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _read_record(root: Path) -> dict:
    """The fetched-files record of one root; empty when absent or unreadable (then every file there
    is treated as the user's, the safe side)."""
    try:
        data = json.loads((root / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return dict(files) if isinstance(files, dict) else {}


class _flocked:
    """An exclusive flock on ``path`` for the ``with`` block. flock locks belong to the open file,
    so it excludes other threads of this process (each opens its own) as well as other processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> _flocked:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # Closing the descriptor releases the lock. The lock file stays: unlinking it while another
        # process waits on it would let a third one lock a new file of the same name.
        os.close(self._fd)


def _fsync_dir(path: Path) -> None:
    """Persist the rename itself, so a power cut does not leave the record pointing at nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
