"""File helpers shared by the network modules (embeddings, hypernetworks, LoRA).

What lives here must behave the same for every kind of network file: how model folders are
walked, how a pickle is opened without running code, how torch's refusal becomes a one-line
message, and how optional metadata values are read. Each module keeps its own error class, its
own suffixes and its own rules on top (which file wins a name, how the listing is ordered).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

Stamp = tuple[int, int]  # (mtime_ns, size): a cached file is re-read only when either changes


# ---------------------------------------------------------------------------------------------
# Folder scanning


def walk_files(
    folders: Iterable[Path],
    suffixes: tuple[str, ...],
    *,
    follow_links: bool = True,
    seen_dirs: set[str] | None = None,
) -> Iterator[Path]:
    """Files under ``folders`` (recursively) whose name ends in one of ``suffixes`` (lowercase).

    The order is deterministic: folders as given, each walked top-down with sub-folders and files
    sorted by name, so "the first file wins" rules give the same answer on every run. Names
    starting with "." (files and folders: ``.git``, editor temp files) are skipped, and a folder
    that does not exist yet is simply empty.

    With ``follow_links`` symlinked folders are walked too, as A1111 does. A folder whose real
    path was already walked is skipped: that stops link loops, and overlapping folders are not
    listed twice. Pass ``seen_dirs`` to share that memory between calls.
    """
    seen = set() if seen_dirs is None else seen_dirs
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for root, dirs, files in os.walk(folder, followlinks=follow_links):
            real = os.path.realpath(root)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for filename in sorted(files):
                if filename.startswith(".") or not filename.lower().endswith(suffixes):
                    continue
                yield Path(root) / filename


def scan_files(
    folders: Iterable[Path],
    suffixes: tuple[str, ...],
    *,
    seen_dirs: set[str] | None = None,
) -> Iterator[tuple[Path, Stamp]]:
    """:func:`walk_files` (following links), with each file's :data:`Stamp`.

    Files that vanish between listing and ``stat`` are left out, and so are empty files: A1111
    skips them, and they are usually a copy still in progress.
    """
    for path in walk_files(folders, suffixes, seen_dirs=seen_dirs):
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_size == 0:
            continue
        yield path, (st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------------------------------
# Pickles


def load_weights_only(path: Path, allowed_globals: Sequence[type] = ()) -> Any:
    """``torch.load`` of ``path`` onto the CPU that only rebuilds tensors and plain containers.

    Anything else in the pickle (a class, a function such as ``exec``) makes torch raise instead
    of running it. ``allowed_globals`` adds classes that carry no code of their own (old A1111
    embeddings hold an ``nn.ParameterDict``); it needs ``torch.serialization.safe_globals``
    (torch >= 2.5), which the caller checks so it can say why an old file cannot be read.
    """
    import torch
    if not allowed_globals:
        return torch.load(path, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals(list(allowed_globals)):
        return torch.load(path, map_location="cpu", weights_only=True)


def pickle_failure_message(path: Path, exc: Exception, what: str) -> str:
    """One line saying why :func:`load_weights_only` failed on ``path``.

    ``what`` names the kind of file expected ("a hypernetwork", "an embedding"): a refused
    global is something such a file never contains, which is worth saying plainly.
    """
    text = str(exc)
    # torch words it "Unsupported global: GLOBAL x.y" or, for blocked modules (2.14),
    # "Trying to load unsupported GLOBAL x.y whose module x is blocked"
    wanted = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if wanted:
        return (
            f"{path}: refused to load, the file needs the Python object {wanted.group(1)}, which "
            f"{what} never contains and which could run code when loaded"
        )
    # torch's weights_only message is a long how-to-bypass text; keep only the actual reason,
    # which may sit on the line after "WeightsUnpickler error:" (e.g. "Unsupported operand 149").
    reason = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|Please |$)", text, re.DOTALL)
    if reason and reason.group(1).strip():
        return f"{path}: refused to load, the pickle holds more than tensors ({reason.group(1).strip()})"
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{path}: not a readable torch file ({first_line})"


# ---------------------------------------------------------------------------------------------
# Optional metadata values


def optional_int(value: Any) -> int | None:
    """``value`` as an int if it is one (a one-element integer tensor counts), else None.

    Trainers store counters such as ``step`` either way; bools are ints in Python but never a
    count, so they read as missing.
    """
    import torch
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    return None


def optional_str(value: Any) -> str | None:
    """``value`` if it is a string, else None (metadata from a file is not to be trusted)."""
    return value if isinstance(value, str) else None
