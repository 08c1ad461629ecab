"""Saving images the A1111 way: ``outputs/txt2img-images/<YYYY-MM-DD>/<NNNNN>-<seed>.png``
with the infotext in the PNG ``parameters`` text chunk; reading it back from PNG/JPEG/WebP."""

from __future__ import annotations

import io
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

RE_NUMBERED = re.compile(r"^(\d+)-")


class ImageReadError(ValueError):
    pass


def next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := RE_NUMBERED.match(p.name))] \
        if folder.is_dir() else []
    return max(numbers, default=-1) + 1


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
    straight in ``outdir`` when not ``dated`` (the CLI's --out, img2img Batch's output directory)."""
    folder = outdir / date.today().isoformat() if dated else outdir
    folder.mkdir(parents=True, exist_ok=True)
    data = image_bytes(image, infotext, save_format)
    suffix = save_format.suffix if save_format else ".png"
    # Write to a temp file then rename: an interrupted save never leaves a broken file.
    while True:
        target = folder / f"{next_number(folder):05d}-{seed}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, target)  # fails if a concurrent writer took the name
            return target
        except FileExistsError:
            continue
        except OSError:
            # filesystems without hard links: a plain rename (no race protection needed there)
            os.replace(tmp, target)
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def read_infotext(image: Image.Image) -> str | None:
    """The ``parameters`` chunk of a PNG, or the EXIF UserComment of a JPEG/WebP."""
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
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageReadError("The file is not a readable image (PNG, JPEG or WebP expected).") from e
    return img
