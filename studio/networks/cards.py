"""Extra-network cards: what the UI's browser shows for every checkpoint, LoRA, embedding
and hypernetwork, and the text a click inserts.

Previews follow A1111's convention: an image next to the file with the same stem, plain or
with ``.preview`` (``x.png``, ``x.preview.png``, jpg/jpeg/webp/gif). Files without one get a
drawn placeholder so every card has the same shape.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
CARD_SIZE = (256, 320)
KINDS = ("checkpoints", "lora", "textual_inversion", "hypernetworks")
KIND_LABELS = {"checkpoints": "Checkpoints", "lora": "Lora", "textual_inversion": "Textual Inversion",
               "hypernetworks": "Hypernetworks"}
FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux1": "FLUX.1", "sd3": "SD3", None: ""}


@dataclass(frozen=True)
class Card:
    kind: str
    name: str
    path: Path
    insert: str                 # text added to the prompt (checkpoints: the title to select)
    family: str | None = None   # "sd1" | "sd2" | "sdxl" | None when unknown
    note: str = ""              # e.g. "skipped: width 1024 does not fit"

    @property
    def caption(self) -> str:
        family = FAMILY_LABELS.get(self.family, self.family or "")
        return " · ".join(part for part in (self.name, family, self.note) if part)

    def matches(self, query: str) -> bool:
        q = query.strip().lower()
        return not q or q in self.name.lower() or q in str(self.path).lower()


def find_preview(path: Path) -> Path | None:
    stem = path.with_suffix("") if path.suffix else path
    for middle in ("", ".preview"):
        for suffix in PREVIEW_SUFFIXES:
            candidate = stem.parent / f"{stem.name}{middle}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def lora_tag(name: str, multiplier: float = 1.0) -> str:
    return f"<lora:{name}:{multiplier:g}>"


def hypernet_tag(name: str, multiplier: float = 1.0) -> str:
    return f"<hypernet:{name}:{multiplier:g}>"


def insert_into_prompt(prompt: str, text: str) -> str:
    """A1111's card click: append the text after a space (A1111's default separator), or
    remove it when it is already there, so a second click undoes the first."""
    prompt = prompt or ""
    if text in prompt:
        before, _, after = prompt.partition(text)
        return f"{before.rstrip()} {after.lstrip()}".strip()
    return f"{prompt.rstrip()} {text}" if prompt.strip() else text


def placeholder(card: Card) -> Image.Image:
    """A card image drawn from the name: a colour from its hash, the name and the family."""
    digest = hashlib.sha1(f"{card.kind}/{card.name}".encode()).digest()
    base = tuple(60 + b % 120 for b in digest[:3])
    image = Image.new("RGB", CARD_SIZE, base)
    draw = ImageDraw.Draw(image)
    # the band is at the top: the gallery puts its caption over the bottom edge
    draw.rectangle((0, 0, CARD_SIZE[0], 96), fill=tuple(c // 2 for c in base))
    title = ImageFont.load_default(size=22)
    small = ImageFont.load_default(size=16)
    y = 10
    for line in _wrap(card.name, 20)[:2]:
        draw.text((12, y), line, fill=(255, 255, 255), font=title)
        y += 28
    label = " · ".join(p for p in (KIND_LABELS.get(card.kind, card.kind), FAMILY_LABELS.get(card.family, ""))
                       if p)
    draw.text((12, y + 2), label, fill=(230, 230, 230), font=small)
    return image


def card_image(card: Card) -> Image.Image | str:
    preview = find_preview(card.path)
    return str(preview) if preview is not None else placeholder(card)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.replace("_", " ").replace("-", " ").split() or [text]:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return [ln[:width] for ln in lines]
