"""Start-up clean-up: temporary files of saves that were killed half-way are removed from the data
dir, and nothing else is."""

from __future__ import annotations

import os
import time
from pathlib import Path

from studio.config import STALE_TEMP_AGE_S, Paths, atomic_write, atomic_write_text, remove_stale_temp_files


def temp_name_of_a_save(target: Path) -> str:
    """The name atomic_write really gives its temporary file for ``target``."""
    seen: list[str] = []

    def write(temp: Path) -> None:
        seen.append(temp.name)
        temp.write_text("{}", encoding="utf-8")

    atomic_write(target, write)
    return seen[0]


def leave(path: Path, age_s: float) -> Path:
    path.write_text("half a save", encoding="utf-8")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_ensure_removes_stale_save_temp_files_only(tmp_path):
    data = tmp_path / "data"
    config = data / "config.json"
    data.mkdir()
    stale = leave(data / temp_name_of_a_save(config), STALE_TEMP_AGE_S * 3)
    fresh = leave(data / temp_name_of_a_save(data / "cache.json"), 0)
    lookalikes = [
        leave(data / ".config.json.tmp", 600),            # no random part
        leave(data / "config.json.abcd1234.tmp", 600),    # not hidden
        leave(data / ".config.json.ABCD1234.tmp", 600),   # tempfile's names are lower case
        leave(data / ".config.json.abc123.tmp", 600),     # too short a random part
        leave(data / ".styles.csv.abcd1234.tmp.bak", 600),
        leave(data / "styles.csv", 600),
    ]
    nested = data / "outputs"
    nested.mkdir()
    below = leave(nested / stale.name, 600)               # only the data dir itself is cleaned
    folder = data / ".cache.json.abcd1234.tmp"            # a folder with the shape of the name
    folder.mkdir()
    os.utime(folder, (time.time() - 600,) * 2)

    Paths(data=data, models=data / "models", ckpt_dirs=()).ensure()

    assert not stale.exists()
    assert fresh.exists() and below.exists() and folder.is_dir()
    assert all(p.exists() for p in lookalikes)
    assert config.read_text(encoding="utf-8") == "{}"  # the saved file itself is untouched


def test_remove_reports_what_it_removed_and_tolerates_a_missing_folder(tmp_path):
    atomic_write_text(tmp_path / "cache.json", "{}")
    stale = leave(tmp_path / temp_name_of_a_save(tmp_path / "cache.json"), 120)
    assert remove_stale_temp_files(tmp_path, older_than_s=60) == [stale]
    assert remove_stale_temp_files(tmp_path / "missing") == []
