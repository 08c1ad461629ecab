"""The images in the output folders, newest first: what the History tab and ``/studio/v1/history`` show.

:class:`OutputHistory` lists every PNG / JPEG / WebP under the folders the saving options name (the
``outdir_*`` settings, relative to the data dir) and under ``outputs/`` as a whole, so earlier runs
made with other settings are found too. Listing stays cheap with thousands of images:

- each call walks the folders with ``os.scandir`` (names and stat only, no file is opened);
- a file's infotext is read once and kept in an in-memory index keyed by (path, mtime, size): PIL
  opens files lazily, so reading a PNG's text chunks or a JPEG/WebP's EXIF decodes no pixels;
- thumbnails (256 px) are made on demand for the page shown and cached under
  ``<data dir>/cache/thumbs``, named by path, mtime and size so a changed file gets a new one.

Deleting is refused for anything outside the output folders, whatever the path says (``..``, links).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shlex
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from studio.errors import RequestError
from studio.generation.imageops import ImageInputError, check_size
from studio.generation.infotext import parse_infotext
from studio.generation.outputs import ImageReadError, read_infotext
from studio.generation.saving import DEFAULT_DIRS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# every saving option that names a folder, with the folder an empty value means
OUTPUT_DIR_OPTIONS = {
    **DEFAULT_DIRS,
    "outdir_extras_samples": "outputs/extras-images",
    "outdir_samples": "",
    "outdir_grids": "",
}
THUMB_SIDE = 256
DEFAULT_PAGE_SIZE = 48
MAX_PAGE_SIZE = 500
RE_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class HistoryFileMissing(RequestError):
    """The path names no file (deleted or moved since it was listed): the API answers 404."""

    status = 404


@dataclass(frozen=True)
class HistoryItem:
    """One image: where it is, when it was written, and what its infotext says."""

    path: Path
    rel: str  # the path relative to the data dir (absolute when the folder is outside it), with "/"
    mtime: float
    size: int
    width: int
    height: int
    infotext: str
    prompt: str
    negative_prompt: str
    model: str
    model_hash: str
    date: str  # YYYY-MM-DD: the dated folder the image is in, else the day it was written

    def summary(self) -> dict[str, Any]:
        """The JSON-ready fields (the API's item, less the thumbnail URL)."""
        return {"path": self.rel, "mtime": self.mtime, "size": self.size, "width": self.width,
                "height": self.height, "date": self.date, "prompt": self.prompt,
                "negative_prompt": self.negative_prompt, "model": self.model, "model_hash": self.model_hash,
                "infotext": self.infotext}


@dataclass(frozen=True)
class HistoryPage:
    """One page of the listing. ``index`` is 0-based and already clamped to the pages there are."""

    items: list[HistoryItem]
    total: int
    pages: int
    index: int = 0
    size: int = DEFAULT_PAGE_SIZE


@dataclass(frozen=True)
class Query:
    """A search: every word must be in the prompt or the path; ``model:`` a substring of the model's
    name or hash; ``date:`` a prefix of the date (``date:2026-12`` is the whole month);
    ``negative:`` (or ``neg:``) a word of the negative prompt. All case-insensitive."""

    words: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    dates: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Query:
        try:
            tokens = shlex.split(text or "")
        except ValueError:  # an unclosed quote: take the words as they are
            tokens = (text or "").split()
        parts: dict[str, list[str]] = {"words": [], "models": [], "dates": [], "negatives": []}
        prefixes = {"model": "models", "date": "dates", "negative": "negatives", "neg": "negatives"}
        for token in tokens:
            key, sep, value = token.partition(":")
            target = prefixes.get(key.lower()) if sep and value else None
            parts[target or "words"].append((value if target else token).lower())
        return cls(**{k: tuple(v) for k, v in parts.items()})

    def __bool__(self) -> bool:
        return bool(self.words or self.models or self.dates or self.negatives)

    def matches(self, item: HistoryItem) -> bool:
        text = f"{item.prompt}\n{item.rel}".lower()
        model = f"{item.model}\n{item.model_hash}".lower()
        days = (item.date, datetime.fromtimestamp(item.mtime).strftime("%Y-%m-%d"))
        negative = item.negative_prompt.lower()
        return (all(w in text for w in self.words)
                and all(m in model for m in self.models)
                and all(any(day.startswith(d) for day in days) for d in self.dates)
                and all(n in negative for n in self.negatives))


@dataclass
class _Stamp:
    mtime_ns: int
    size: int


@dataclass
class OutputHistory:
    """The output folders' images. ``options_getter`` returns the current settings (the pydantic
    ``StudioOptions`` or a mapping), read on every call so a changed ``outdir_*`` applies at once."""

    data_dir: Path
    options_getter: Callable[[], Any]
    thumb_side: int = THUMB_SIDE
    _index: dict[Path, tuple[_Stamp, HistoryItem | None]] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    @property
    def thumbs_dir(self) -> Path:
        return self.data_dir / "cache" / "thumbs"

    # -- folders -------------------------------------------------------------------------------

    def roots(self) -> list[Path]:
        """The output folders, resolved, none inside another (so no image is listed twice)."""
        options = _as_mapping(self.options_getter())
        found = [self.data_dir / "outputs"]
        for key, default in OUTPUT_DIR_OPTIONS.items():
            value = str(options.get(key) or default)
            if value:
                path = Path(value).expanduser()
                found.append(path if path.is_absolute() else self.data_dir / path)
        resolved = sorted({p.resolve() for p in found}, key=lambda p: len(p.parts))
        roots: list[Path] = []
        for path in resolved:
            if not any(path.is_relative_to(root) for root in roots):
                roots.append(path)
        return roots

    def _files(self) -> Iterator[tuple[Path, os.stat_result]]:
        skip = self.data_dir.resolve() / "cache"
        for root in self.roots():
            yield from _walk(root, skip)

    # -- listing -------------------------------------------------------------------------------

    def items(self, query: str | Query | None = None) -> list[HistoryItem]:
        """Every readable image, newest first (the later name first within one mtime), filtered."""
        query = query if isinstance(query, Query) else Query.parse(query)
        seen: set[Path] = set()
        found: list[HistoryItem] = []
        for path, stat in self._files():
            seen.add(path)
            item = self._indexed(path, stat)
            if item is not None and (not query or query.matches(item)):
                found.append(item)
        with self._lock:  # forget files that are gone
            for gone in self._index.keys() - seen:
                del self._index[gone]
        found.sort(key=lambda i: (i.mtime, i.rel), reverse=True)
        return found

    def page(self, index: int = 0, size: int = DEFAULT_PAGE_SIZE, query: str | Query | None = None) -> HistoryPage:
        """Page ``index`` (0-based, clamped) of ``size`` items (1 to 500) of :meth:`items`."""
        size = min(MAX_PAGE_SIZE, max(1, int(size)))
        found = self.items(query)
        pages = max(1, math.ceil(len(found) / size))
        index = min(max(0, int(index)), pages - 1)
        return HistoryPage(found[index * size:(index + 1) * size], len(found), pages, index, size)

    def entry(self, path: str | Path) -> HistoryItem:
        """The image at ``path`` (relative to the data dir, or absolute) with its full infotext."""
        target = self.resolve(path)
        item = self._indexed(target, target.stat())
        if item is None:
            raise RequestError(f"{path} is not a readable image (PNG, JPEG or WebP expected)")
        return item

    def _indexed(self, path: Path, stat: os.stat_result) -> HistoryItem | None:
        stamp = _Stamp(stat.st_mtime_ns, stat.st_size)
        with self._lock:
            known = self._index.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        item = self._read(path, stat)
        with self._lock:
            self._index[path] = (stamp, item)
        return item

    def _read(self, path: Path, stat: os.stat_result) -> HistoryItem | None:
        """The item for one file: its header and text only; None when it is not a readable image."""
        try:
            with Image.open(path) as image:
                width, height = image.size
                infotext = _embedded_infotext(image)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            log.debug("History: skipping %s (%s)", path, e)
            return None
        if not infotext:
            infotext = _sidecar_text(path)
        params = parse_infotext(infotext) if infotext else {}
        return HistoryItem(
            path=path, rel=self.relative(path), mtime=stat.st_mtime, size=stat.st_size, width=width,
            height=height, infotext=infotext, prompt=params.get("Prompt", ""),
            negative_prompt=params.get("Negative prompt", ""), model=params.get("Model", ""),
            model_hash=params.get("Model hash", ""), date=_folder_date(path, stat.st_mtime))

    def relative(self, path: Path) -> str:
        """``path`` relative to the data dir with "/" (absolute when outside it), as listed."""
        base = self.data_dir.resolve()
        return path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()

    # -- one file ------------------------------------------------------------------------------

    def resolve(self, path: str | Path) -> Path:
        """``path`` (relative to the data dir, or absolute) as an existing image file inside an output
        folder; anything else is a :class:`RequestError` that says why."""
        text = str(path or "").strip()
        if not text:
            raise RequestError("no path given: pass an image's path as the history lists it")
        given = Path(text).expanduser()
        target = (given if given.is_absolute() else self.data_dir / given).resolve()
        roots = self.roots()
        if not any(target.is_relative_to(root) for root in roots):
            folders = ", ".join(self.relative(r) for r in roots)
            raise RequestError(f"{text} is not inside the output folders ({folders}); "
                               "only images there can be shown or deleted")
        if target.suffix.lower() not in IMAGE_SUFFIXES:
            raise RequestError(f"{text} is not an image (PNG, JPEG or WebP expected)")
        if not target.is_file():
            raise HistoryFileMissing(f"{text} does not exist (deleted, or moved since the list was made): refresh")
        return target

    def delete(self, path: str | Path) -> list[Path]:
        """Delete the image, its ``.txt`` sidecar (``save_txt``) and its thumbnail; the files removed."""
        target = self.resolve(path)
        stat = target.stat()
        removed = [target]
        target.unlink()
        sidecar = target.with_suffix(".txt")
        if sidecar.is_file():
            sidecar.unlink()
            removed.append(sidecar)
        self._thumb_path(target, stat).unlink(missing_ok=True)
        with self._lock:
            self._index.pop(target, None)
        log.info("History: deleted %s", ", ".join(str(p) for p in removed))
        return removed

    def thumbnail(self, path: str | Path) -> Path:
        """The cached thumbnail (JPEG, at most ``thumb_side`` px a side) of the image, made if needed."""
        target = self.resolve(path)
        stat = target.stat()
        thumb = self._thumb_path(target, stat)
        if thumb.is_file():
            return thumb
        try:
            with Image.open(target) as image:
                check_size(image.size)
                image.draft("RGB", (self.thumb_side, self.thumb_side))  # JPEG: decode at a smaller scale
                image.thumbnail((self.thumb_side, self.thumb_side))
                small = _flattened(image)
        except ImageInputError as e:
            raise ImageReadError(str(e)) from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ImageReadError(f"{path} is not a readable image (PNG, JPEG or WebP expected)") from e
        thumb.parent.mkdir(parents=True, exist_ok=True)
        temp = thumb.with_name(f".{thumb.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        small.save(temp, format="JPEG", quality=85)
        os.replace(temp, thumb)  # a reader never sees half a thumbnail
        return thumb

    def _thumb_path(self, path: Path, stat: os.stat_result) -> Path:
        key = hashlib.sha1(f"{path}|{stat.st_mtime_ns}|{stat.st_size}|{self.thumb_side}".encode()).hexdigest()
        return self.thumbs_dir / key[:2] / f"{key}.jpg"


def _as_mapping(options: Any) -> Mapping[str, Any]:
    if isinstance(options, Mapping):
        return options
    dump = getattr(options, "model_dump", None)
    return dump() if callable(dump) else vars(options)


def _walk(folder: Path, skip: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Image files under ``folder`` with their stat; hidden entries (staging files) and linked
    folders (which could loop) are left out."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                if path != skip:
                    yield from _walk(path, skip)
            elif entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
                yield path, entry.stat()
        except OSError:
            continue


def _embedded_infotext(image: Image.Image) -> str:
    """The infotext in the file's header, without decoding pixels: a PNG's ``parameters`` chunk, or
    the EXIF UserComment (JPEG, WebP, a PNG's eXIf chunk). A PNG with neither is not searched further:
    PIL would decode it to look for text after the pixels."""
    if image.format == "PNG" and "parameters" not in image.info and "exif" not in image.info:
        return ""
    try:
        return read_infotext(image) or ""
    except ImageReadError:  # over the size limit: listed, its text not read
        return ""


def _sidecar_text(path: Path) -> str:
    """The ``.txt`` A1111 writes beside the image with ``save_txt`` (an image saved without infotext)."""
    sidecar = path.with_suffix(".txt")
    try:
        return sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
    except OSError:
        return ""


def _folder_date(path: Path, mtime: float) -> str:
    for part in reversed(path.parent.parts):
        if RE_DATE.match(part):
            return part
    return datetime.fromtimestamp(mtime).strftime("%Y-%m-%d")


def _flattened(image: Image.Image) -> Image.Image:
    """RGB for JPEG: transparency over a neutral grey, as the gallery's background."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
