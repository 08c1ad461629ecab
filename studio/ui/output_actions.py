"""A1111's buttons under a gallery: *Save* (the chosen picture into ``log/images`` with a row in
``log/log.csv``, offered as a download), *Zip* (every picture of the gallery in one archive) and
*Open folder* (the tab's output folder in the file manager of the machine the studio runs on).

Pictures were already saved by the job when ``save_images`` is on; these buttons are for keeping a
chosen one apart, or taking them all home from a remote browser.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from studio.generation.infotext import parse_infotext
from studio.ui.send_to import gallery_pick

# A1111's log.csv columns (modules/ui_common.py save_files)
LOG_FIELDS = ("prompt", "seed", "width", "height", "sampler", "cfgs", "steps", "filename", "negative_prompt",
              "sd_model_name", "sd_model_hash")


def log_folder(data_dir: Path) -> Path:
    """A1111's ``outdir_save`` default: ``log/images`` under the data dir."""
    return Path(data_dir) / "log" / "images"


def _unique(folder: Path, stem: str, suffix: str) -> Path:
    path = folder / f"{stem}{suffix}"
    n = 1
    while path.exists():
        path = folder / f"{stem}-{n}{suffix}"
        n += 1
    return path


def save_chosen(data_dir: Path, gallery: Any, index: Any, infotexts: list[str] | None) -> Path | None:
    """Save the chosen picture (with its infotext in the PNG) to log/images and log it to log.csv;
    returns the new file, or None when the gallery is empty."""
    from studio.generation.outputs import save_image

    image, i = gallery_pick(gallery, index)
    if image is None:
        return None
    texts = list(infotexts or [])
    text = texts[i] if i < len(texts) else (texts[0] if texts else None)
    folder = log_folder(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    params = parse_infotext(text) if text else {}
    try:
        seed = int(params.get("Seed", 0))
    except (TypeError, ValueError):
        seed = 0
    path = Path(save_image(image, text or "", folder, seed, dated=False))
    log = folder.parent / "log.csv"
    new = not log.exists()
    with open(log, "a", newline="", encoding="utf8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(LOG_FIELDS)
        writer.writerow([params.get("Prompt", ""), params.get("Seed", ""), image.width, image.height,
                         params.get("Sampler", ""), params.get("CFG scale", ""), params.get("Steps", ""),
                         path.name, params.get("Negative prompt", ""), params.get("Model", ""),
                         params.get("Model hash", "")])
    return path


def zip_gallery(data_dir: Path, gallery: Any) -> Path | None:
    """Every picture of the gallery in one zip under log/images (A1111's "Zip")."""
    items = list(gallery or [])
    if not items:
        return None
    folder = log_folder(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    archive = _unique(folder, time.strftime("images-%Y%m%d-%H%M%S"), ".zip")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        for n in range(len(items)):
            image, _ = gallery_pick(items, n)
            if image is None:
                continue
            tmp = _unique(folder, f".zip-part-{n}", ".png")
            image.save(tmp)
            z.write(tmp, f"{n:05d}.png")
            tmp.unlink()
    return archive


def samples_folder(options: Any, data_dir: Path, kind: str) -> Path:
    """Where the tab's pictures are saved (the outdir_* options)."""
    from studio.generation.saving import OutputSaver

    return OutputSaver.from_options(options.model_dump(), Path(data_dir), kind).samples_dir


def may_open_folders(flags: Any) -> bool:
    """A file manager opens on the machine the studio runs on: only when it is not served to others
    (--listen, --share), as A1111 does."""
    return not (getattr(flags, "listen", False) or getattr(flags, "share", False))


def open_folder(folder: Path, allowed: bool = True) -> str:
    """Open ``folder`` in the file manager of this machine (A1111's "Open folder"); when that is not
    allowed (served to others) or there is no file manager (a server), say where it is instead."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not allowed:
        return f"The folder is {folder} (opening folders is off when the studio is served to other machines)"
    opener = None
    if sys.platform == "darwin":
        opener = ["open", str(folder)]
    elif os.name == "nt":
        os.startfile(str(folder))  # type: ignore[attr-defined]  # noqa: S606 - the user's own folder
        return f"Opened {folder}"
    elif shutil.which("xdg-open") and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        opener = ["xdg-open", str(folder)]
    if opener is None:
        return f"The pictures are in {folder} (no file manager on this machine)"
    subprocess.Popen(opener, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    return f"Opened {folder}"
