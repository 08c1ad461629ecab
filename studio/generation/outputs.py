"""Saving images the A1111 way: ``outputs/txt2img-images/<YYYY-MM-DD>/<NNNNN>-<seed>.png``
with the infotext in the PNG ``parameters`` text chunk; reading it back from PNG/JPEG/WebP."""

from __future__ import annotations

import io
import itertools
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from studio.config import atomic_write
from studio.generation.imageops import ImageInputError, ImageTooLargeError, check_size, open_unloaded

UNREADABLE = "The file is not a readable image (PNG, JPEG or WebP expected)."


class ImageReadError(ValueError):
    """A file that is not a readable image, or is over the size limit; the message is for the user."""


def next_number(folder: Path, basename: str = "") -> int:
    """The next free sequence number in ``folder`` (A1111's ``get_next_sequence_number``): one more
    than the largest number any file there starts with (``00012-....png``, ``00013.png``), or,
    with a ``basename``, that follows ``<basename>-`` (``grid-0004.png``); 0 in an empty folder."""
    prefix = f"{basename}-" if basename else ""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    # the number is what comes before the first "-" after the prefix: "00012-1234-x.png" -> 12
    leads = [os.path.splitext(n[len(prefix):])[0].split("-")[0] for n in names if n.startswith(prefix)]
    return max((int(lead) for lead in leads if lead.isascii() and lead.isdigit()), default=-1) + 1


def write_new_file(folder: Path, names: Iterable[str], data: bytes) -> Path:
    """Write ``data`` as ``folder/<name>`` for the first of ``names`` that is free; an existing file is
    never replaced. The bytes first go to a hidden staging file (``atomic_write``: complete and
    synced), which is then hard-linked to its name: the link fails when the name is taken, even by
    another process at the same moment, and a reader never sees half an image."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = atomic_write(folder / f".saving-{uuid.uuid4().hex}.tmp", lambda temp: temp.write_bytes(data))
    try:
        for name in names:
            target = folder / name
            try:
                os.link(staging, target)
                return target
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: claim the name, then move the file onto it
                try:
                    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os.replace(staging, target)
                return target
        raise FileExistsError(f"no free file name in {folder}")
    finally:
        staging.unlink(missing_ok=True)


def png_bytes(image: Image.Image, infotext: str | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_itxt("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@dataclass(frozen=True)
class SaveFormat:
    """A1111's ``samples_format`` (png / jpg / webp) with ``jpeg_quality`` and ``webp_lossless``."""

    fmt: str = "png"
    quality: int = 80
    lossless: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> SaveFormat:
        fmt = str(settings.get("samples_format", "png") or "png").lower()
        try:
            quality = int(settings.get("jpeg_quality", 80))
        except (TypeError, ValueError):
            quality = 80
        return cls("jpg" if fmt == "jpeg" else fmt if fmt in ("png", "jpg", "webp") else "png",
                   min(100, max(1, quality)), bool(settings.get("webp_lossless", False)))

    @property
    def suffix(self) -> str:
        return f".{self.fmt}"


def image_bytes(image: Image.Image, infotext: str | None, save_format: SaveFormat | None = None) -> bytes:
    """The file's bytes: PNG with the infotext in its ``parameters`` chunk, JPEG / WebP with it in the
    EXIF UserComment (where A1111 puts it, and where :func:`read_infotext` finds it)."""
    fmt = save_format.fmt if save_format else "png"
    if fmt == "png":
        return png_bytes(image, infotext)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    exif = Image.Exif()
    if infotext:
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + infotext.encode("utf-16-be")  # Exif IFD → UserComment
    buf = io.BytesIO()
    if fmt == "webp":
        image.save(buf, format="WEBP", exif=exif, quality=save_format.quality, lossless=save_format.lossless)
    else:
        image.save(buf, format="JPEG", exif=exif, quality=save_format.quality)
    return buf.getvalue()


def save_image(image: Image.Image, infotext: str, outdir: Path, seed: int, dated: bool = True,
               save_format: SaveFormat | None = None) -> Path:
    """``outdir/<date>/NNNNN-seed.png`` (A1111's layout; ``.jpg`` / ``.webp`` with ``samples_format``), or
    straight in ``outdir`` when not ``dated`` (the CLI's --out, img2img Batch's output directory).
    Generations use :class:`studio.generation.saving.OutputSaver`, which honours the saving options."""
    folder = outdir / date.today().isoformat() if dated else outdir
    save_format = save_format or SaveFormat()
    names = (f"{n:05d}-{seed}{save_format.suffix}" for n in itertools.count(next_number(folder)))
    return write_new_file(folder, names, image_bytes(image, infotext, save_format))


def read_infotext(image: Image.Image) -> str | None:
    """The ``parameters`` chunk of a PNG, or the EXIF UserComment of a JPEG/WebP.

    An image whose size is over the limit (``imageops.MAX_PIXELS`` / ``MAX_SIDE``) is refused with
    :class:`ImageReadError` first: looking for the EXIF block of a lazily opened PNG decodes its pixels.
    The text of any image within the limit is read."""
    try:
        check_size(image.size)
    except ImageInputError as e:
        raise ImageReadError(str(e)) from e
    text = image.info.get("parameters")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text:
        return text
    exif = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
    if isinstance(exif, bytes):
        body = exif[8:] if exif[:8] in (b"UNICODE\0", b"ASCII\0\0\0") else exif
        enc = "utf-16-be" if exif.startswith(b"UNICODE") else "utf-8"
        text = body.decode(enc, errors="replace").strip("\0")
    elif isinstance(exif, str):
        text = exif
    return text or None


def open_image(data: bytes) -> Image.Image:
    """The decoded image in a file's bytes. The size in its header is checked against the limit
    (``imageops.MAX_PIXELS`` / ``MAX_SIDE``) before any pixel is decoded, so a decompression bomb (a
    small file declaring a huge picture) is refused with an :class:`ImageReadError` that names its size."""
    try:
        img = open_unloaded(data)
        img.load()
    except ImageTooLargeError as e:
        raise ImageReadError(str(e)) from e
    except Image.DecompressionBombError as e:  # a format whose frames outgrow the size in its header
        raise ImageReadError(f"image is too large ({e})") from e
    except (ImageInputError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageReadError(UNREADABLE) from e
    return img
