"""Saving images the A1111 way: ``outputs/txt2img-images/<YYYY-MM-DD>/<NNNNN>-<seed>.png``
with the infotext in the PNG ``parameters`` text chunk; reading it back from PNG/JPEG/WebP."""

from __future__ import annotations

import io
import os
import re
import tempfile
from datetime import date
from pathlib import Path

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


def save_image(image: Image.Image, infotext: str, outdir: Path, seed: int, dated: bool = True) -> Path:
    """``outdir/<date>/NNNNN-seed.png`` (A1111's layout), or straight in ``outdir`` when not
    ``dated`` (the CLI's --out, img2img Batch's output directory)."""
    folder = outdir / date.today().isoformat() if dated else outdir
    folder.mkdir(parents=True, exist_ok=True)
    data = png_bytes(image, infotext)
    # Write to a temp file then rename: an interrupted save never leaves a broken PNG.
    while True:
        target = folder / f"{next_number(folder):05d}-{seed}.png"
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
