"""The training dataset: a folder of images with captions, read the way kohya's sd-scripts and A1111's
Train tab read it.

* Images (png, jpg, jpeg, webp, bmp) in the dataset folder itself count once per epoch; images in a kohya
  sub-folder ``<repeats>_<name>`` (``10_cat``) count ``repeats`` times. Other sub-folders are ignored.
* The caption is the text file beside the image (``settings.caption_extension``, ``.txt`` by default, with
  ``.caption`` / ``.txt`` accepted as a fallback); without one, A1111's rule gives it from the file name:
  ``00012-a_red_car.png`` -> ``a red car``.
* With bucketing (kohya's ``--enable_bucket``) each image trains at the bucket of the closest aspect ratio
  whose area is at most ``resolution``²; without it everything is cropped to ``resolution`` square.
* Every file is checked at scan time so that a corrupt image is reported before training, not half-way.

Captions are processed per sample like kohya (``shuffle_caption`` with ``keep_tokens``, tag dropout,
caption dropout) and, for embeddings and hypernetworks, put into A1111 prompt templates
(``[name]`` / ``[filewords]``).
"""

from __future__ import annotations

import math
import random
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from studio.generation.imageops import MAX_PIXELS, MAX_SIDE, ImageInputError, normalize_image
from studio.training.base import Batch, TrainingError, TrainSettings

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_FALLBACKS = (".txt", ".caption")
BUCKET_STEP = 64

# A kohya dataset sub-folder: "<repeats>_<name>".
RE_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
# A1111 drops the numbering its own outputs carry ("00012-") before using a file name as a caption.
RE_LEADING_NUMBERS = re.compile(r"^[\d\s-]+")

# Per-kind notes name at most this many files; the rest are counted.
_NAMED_NOTES = 10

# Prompt templates for embeddings / hypernetworks, in the spirit of A1111's textual_inversion_templates.
DEFAULT_TEMPLATES: dict[str, list[str]] = {
    "subject": [
        "a photo of a [name]",
        "a close-up photo of a [name]",
        "a picture of the [name]",
        "a good photo of a [name]",
        "a cropped photo of the [name]",
        "a bright photo of a [name]",
        "a dim photo of the [name]",
        "a rendering of a [name]",
        "a photo of one [name]",
        "a photo of a small [name]",
    ],
    "subject_filewords": [
        "a photo of a [name], [filewords]",
        "a close-up photo of a [name], [filewords]",
        "a picture of the [name], [filewords]",
        "a good photo of a [name], [filewords]",
        "a cropped photo of the [name], [filewords]",
        "a rendering of a [name], [filewords]",
        "a photo of one [name], [filewords]",
    ],
    "style": [
        "a painting in the style of [name]",
        "a picture in the style of [name]",
        "an artwork in the style of [name]",
        "a rendering in the style of [name]",
        "a drawing in the style of [name]",
        "an illustration, [name] style",
        "a beautiful painting in the style of [name]",
    ],
    "style_filewords": [
        "a painting of [filewords], in the style of [name]",
        "a picture of [filewords], in the style of [name]",
        "an artwork of [filewords], [name] style",
        "a rendering of [filewords], in the style of [name]",
        "a drawing of [filewords], by [name]",
        "[filewords], art by [name]",
    ],
    "none": ["[filewords]"],
}


# --------------------------------------------------------------------------------------------------------
# Buckets


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = BUCKET_STEP
) -> list[tuple[int, int]]:
    """The training resolutions ``(w, h)`` for aspect-ratio bucketing.

    Each side is a multiple of ``divisible`` between ``min_size`` and ``max_size``; the area never exceeds
    the area of ``max_reso``. For every width the tallest allowed height is taken (and the same pair turned
    on its side), so each bucket uses as much of the pixel budget as it can. The square whose side is the
    square root of the budget, rounded down to ``divisible``, is always included when it fits the bounds.
    """
    if divisible <= 0:
        raise ValueError("divisible must be positive")
    budget = int(max_reso[0]) * int(max_reso[1])
    lowest = -(-int(min_size) // divisible) * divisible          # min_size rounded up to the step
    highest = int(max_size) // divisible * divisible             # max_size rounded down to the step
    found: set[tuple[int, int]] = set()

    side = math.isqrt(budget) // divisible * divisible
    if lowest <= side <= highest:
        found.add((side, side))

    for width in range(max(lowest, divisible), highest + 1, divisible):
        height = min(highest, budget // width // divisible * divisible)
        if height >= lowest and height > 0:
            found.add((width, height))
            found.add((height, width))
    if not found:
        raise ValueError(
            f"no bucket fits: {max_reso[0]}x{max_reso[1]} with sides from {min_size} to {max_size} "
            f"in steps of {divisible}"
        )
    return sorted(found)


def select_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio (w / h) is closest to the image's; on a tie, the larger bucket."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    aspect = width / height
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - aspect), -(b[0] * b[1]), b))


# --------------------------------------------------------------------------------------------------------
# Items and captions


@dataclass
class TrainItem:
    path: Path
    caption: str                  # as read, before shuffling / dropout / templates
    repeats: int
    size: tuple[int, int]         # (w, h) of the upright image
    bucket: tuple[int, int]       # (w, h) it trains at
    caption_source: str           # "file" | "filename"


def caption_from_filename(path: Path) -> str:
    """A1111's caption for an image without a caption file: the file name without its leading numbering,
    with underscores as spaces."""
    text = RE_LEADING_NUMBERS.sub("", path.stem).replace("_", " ")
    return " ".join(text.split())


def _read_caption(path: Path) -> str:
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    return " ".join(text.split())


def _find_caption(image: Path, files: dict[str, Path], extension: str) -> Path | None:
    """The caption file beside ``image``: the configured extension first, then the usual other one.
    ``files`` maps lower-cased names of the folder's files to their paths (case-insensitive match)."""
    candidates = [extension] + [e for e in CAPTION_FALLBACKS if e != extension]
    for ext in candidates:
        found = files.get((image.stem + ext).lower())
        if found is not None:
            return found
    return None


def _normalize_extension(ext: str | None) -> str:
    ext = (ext or ".txt").strip().lower()
    return ext if ext.startswith(".") else "." + ext


def _template_lines(template: str | None) -> list[str] | None:
    """The prompt lines of ``settings.template``: the text itself (one prompt per line) or the name of one
    of :data:`DEFAULT_TEMPLATES`."""
    if template is None or not template.strip():
        return None
    key = template.strip().lower()
    if key in DEFAULT_TEMPLATES:
        return list(DEFAULT_TEMPLATES[key])
    lines = [line.strip() for line in template.splitlines() if line.strip()]
    return lines


def _tidy(text: str) -> str:
    """Clean the separators left behind when [filewords] is empty ("a photo of a cat, ")."""
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    text = re.sub(r"\s+", " ", text)
    return text.strip().strip(",").strip()


# --------------------------------------------------------------------------------------------------------
# Scanning


def _upright_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):  # a broken EXIF block: use the header size
        orientation = None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_image(path: Path) -> tuple[int, int]:
    """The upright size of an image after checking that it decodes; raises ValueError with the reason.

    The size comes from the header; a second open checks the data. PNG is checked with ``verify()`` (every chunk read and its CRC checked,
    no pixels decoded); JPEG is decoded at 1/8 scale (``draft``), which still reads the whole stream; other
    formats are decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                size = _upright_size(img)
                fmt = img.format
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ValueError(f"empty image ({w}x{h})")
                if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
                    raise ValueError(f"too large ({w}x{h}; at most {MAX_SIDE} px a side, "
                                     f"{MAX_PIXELS / 1e6:.0f} MP)")
            # a second open: reading the EXIF block above may already have moved through the file
            with Image.open(path) as img:
                if fmt == "PNG":
                    img.verify()
                else:
                    if fmt == "JPEG":
                        img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                    img.load()
        except Image.DecompressionBombError as e:
            raise ValueError(f"too large ({e})") from e
        except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"not a readable image: {e}") from e
    return size


def _list_images(folder: Path) -> tuple[list[Path], dict[str, Path], list[Path]]:
    """(images, {lower-cased file name: path}, sub-folders) of a folder, hidden entries skipped."""
    images: list[Path] = []
    files: dict[str, Path] = {}
    folders: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            folders.append(entry)
        elif entry.is_file():
            files[entry.name.lower()] = entry
            if entry.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(entry)
    return images, files, folders


def _named(paths: list[str], limit: int = _NAMED_NOTES) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


# --------------------------------------------------------------------------------------------------------
# The dataset


class TrainDataset:
    """The scanned images of a run; :meth:`batches` plans an epoch, :meth:`make_batch` loads one."""

    def __init__(
        self,
        items: list[TrainItem],
        settings: TrainSettings,
        name: str | None = None,
        notes: list[str] | None = None,
    ):
        self.items = items
        self.settings = settings
        self.name = name if name is not None else settings.output_name
        self.notes = list(notes or [])
        self.template_lines = _template_lines(settings.template)
        self.root = Path(settings.train_data_dir).expanduser()

    # ---- scanning

    @classmethod
    def from_settings(cls, settings: TrainSettings, name: str | None = None) -> TrainDataset:
        """Scan ``settings.train_data_dir``; ``name`` is what ``[name]`` in a template becomes (the embedding
        or hypernetwork name; ``settings.output_name`` when not given)."""
        if not settings.train_data_dir.strip():
            raise TrainingError("choose the folder with the training images")
        root = Path(settings.train_data_dir).expanduser()
        if not root.exists():
            raise TrainingError(f"the dataset folder {root} does not exist")
        if not root.is_dir():
            raise TrainingError(f"the dataset path {root} is not a folder")
        _check_settings(settings)

        extension = _normalize_extension(settings.caption_extension)
        bucketing = settings.enable_bucket
        res = settings.resolution
        buckets = (make_bucket_resolutions((res, res), settings.min_bucket_reso, settings.max_bucket_reso,
                                           BUCKET_STEP) if bucketing else [(res, res)])

        notes: list[str] = []
        # (folder, images, files, repeats)
        sources: list[tuple[Path, list[Path], dict[str, Path], int]] = []
        top_images, top_files, folders = _list_images(root)
        sources.append((root, top_images, top_files, 1))
        ignored: list[str] = []
        for folder in folders:
            m = RE_REPEATS_FOLDER.match(folder.name)
            if not m or int(m.group(1)) < 1:
                ignored.append(folder.name)
                continue
            images, files, _ = _list_images(folder)
            if not images:
                notes.append(f"folder {folder.name} has no images")
                continue
            sources.append((folder, images, files, int(m.group(1))))
        if ignored:
            notes.append(
                f"ignored sub-folder{'s' if len(ignored) > 1 else ''} {_named(ignored)}: only folders named "
                "<repeats>_<name> (like 10_cat) are read"
            )

        total = sum(len(images) for _, images, _, _ in sources)
        if total == 0:
            raise TrainingError(f"no images in {root} (png, jpg, webp, bmp)")

        items: list[TrainItem] = []
        unreadable: list[str] = []
        too_small: list[str] = []
        no_caption = 0
        for _folder, images, files, repeats in sources:
            for path in images:
                rel = path.relative_to(root).as_posix()
                try:
                    size = _check_image(path)
                except ValueError as e:
                    unreadable.append(rel)
                    if len(unreadable) <= _NAMED_NOTES:
                        notes.append(f"skipped {rel}: {e}")
                    continue
                if bucketing and min(size) < settings.min_bucket_reso:
                    too_small.append(rel)
                    continue
                caption_file = _find_caption(path, files, extension)
                if caption_file is not None:
                    try:
                        caption, source = _read_caption(caption_file), "file"
                    except OSError as e:
                        notes.append(f"could not read {caption_file.name} ({e}); the file name is the caption")
                        caption, source = caption_from_filename(path), "filename"
                        no_caption += 1
                else:
                    caption, source = caption_from_filename(path), "filename"
                    no_caption += 1
                bucket = select_bucket(size[0], size[1], buckets) if bucketing else (res, res)
                items.append(TrainItem(path=path, caption=caption, repeats=repeats, size=size,
                                       bucket=bucket, caption_source=source))

        if len(unreadable) > _NAMED_NOTES:
            notes.append(f"skipped {len(unreadable) - _NAMED_NOTES} more unreadable images")
        if too_small:
            s = settings.min_bucket_reso
            notes.append(
                f"skipped {len(too_small)} image{'s' if len(too_small) > 1 else ''} too small to train: "
                f"{_named(too_small)} (needs at least {s} px on each side; lower min_bucket_reso or "
                "upscale them)"
            )
        if no_caption:
            notes.append(
                f"{no_caption} image{'s' if no_caption > 1 else ''} had no caption file ({extension}); "
                "the file name was used as the caption"
            )
        if not items:
            reasons = []
            if unreadable:
                reasons.append(f"{len(unreadable)} unreadable")
            if too_small:
                reasons.append(f"{len(too_small)} smaller than {settings.min_bucket_reso} px on a side")
            raise TrainingError(f"all {total} images in {root} were skipped ({', '.join(reasons)}): "
                                + "; ".join(notes))
        return cls(items, settings, name=name, notes=notes)

    # ---- sizes

    def __len__(self) -> int:
        """Samples in one epoch: every image counted ``repeats`` times."""
        return sum(item.repeats for item in self.items)

    def buckets(self) -> dict[tuple[int, int], int]:
        """Images per bucket ``(w, h)``."""
        return dict(sorted(Counter(item.bucket for item in self.items).items()))

    # ---- planning

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[list[TrainItem]]:
        """One epoch in batches: every image ``repeats`` times, a batch never mixes buckets (the last batch
        of a bucket may be short), and the order is a shuffle fixed by ``(seed, epoch)``."""
        if batch_size < 1:
            raise TrainingError("the batch size must be at least 1")
        rng = random.Random(f"studio-dataset:{seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[TrainItem]] = defaultdict(list)
        for item in self.items:
            by_bucket[item.bucket].extend([item] * item.repeats)
        plan: list[list[TrainItem]] = []
        for bucket in sorted(by_bucket):
            samples = by_bucket[bucket]
            rng.shuffle(samples)
            plan.extend(samples[i:i + batch_size] for i in range(0, len(samples), batch_size))
        rng.shuffle(plan)
        yield from plan

    # ---- captions

    def process_tags(self, caption: str, rng: random.Random) -> str:
        """kohya's per-sample caption processing: caption dropout, then (when asked) tag dropout and tag
        shuffling of the comma-separated tags after the first ``keep_tokens``."""
        s = self.settings
        if s.caption_dropout > 0 and rng.random() < s.caption_dropout:
            return ""
        if not (s.shuffle_caption or s.tag_dropout > 0):
            return caption
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        keep = max(0, s.keep_tokens)
        fixed, rest = tags[:keep], tags[keep:]
        if s.tag_dropout > 0:
            rest = [t for t in rest if rng.random() >= s.tag_dropout]
        if s.shuffle_caption:
            rng.shuffle(rest)
        return ", ".join(fixed + rest)

    def caption(self, item: TrainItem, rng: random.Random) -> str:
        """The caption one sample trains with; with a template, a random line of it with ``[name]`` and
        ``[filewords]`` (the processed caption) filled in."""
        words = self.process_tags(item.caption, rng)
        if not self.template_lines:
            return words
        line = rng.choice(self.template_lines)
        text = line.replace("[name]", self.name).replace("[filewords]", words)
        return _tidy(text)

    # ---- pixels

    def load(self, item: TrainItem) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The image at its bucket: RGB (transparency flattened on white), scaled to cover the bucket with
        its aspect kept and centre-cropped. Returns ``(pixels [3, H, W] in [-1, 1], original size (h, w),
        crop (top, left) in the scaled image)``."""
        import torch
        try:
            img = normalize_image(item.path.read_bytes())
        except (OSError, ImageInputError) as e:
            raise TrainingError(f"could not read the training image {item.path}: {e}") from e
        bw, bh = item.bucket
        w, h = img.size
        scale = max(bw / w, bh / h)
        sw, sh = max(bw, round(w * scale)), max(bh, round(h * scale))
        if (sw, sh) != (w, h):
            img = img.resize((sw, sh), Image.Resampling.LANCZOS)
        top, left = (sh - bh) // 2, (sw - bw) // 2
        if (sw, sh) != (bw, bh):
            img = img.crop((left, top, left + bw, top + bh))
        a = np.asarray(img, dtype=np.uint8)
        pixels = torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return pixels, (h, w), (top, left)

    def make_batch(self, items: Sequence[TrainItem], rng: random.Random) -> Batch:
        """Load and caption ``items`` (all from one bucket, as :meth:`batches` gives them)."""
        import torch
        if not items:
            raise ValueError("an empty batch")
        if len({item.bucket for item in items}) > 1:
            raise ValueError("a batch mixes buckets: " + ", ".join(sorted({f"{i.bucket[0]}x{i.bucket[1]}"
                                                                            for i in items})))
        pixels, sizes, crops = [], [], []
        for item in items:
            px, size, crop = self.load(item)
            pixels.append(px)
            sizes.append(size)
            crops.append(crop)
        captions = [self.caption(item, rng) for item in items]
        return Batch(captions=captions, pixels=torch.stack(pixels), original_sizes=sizes, crops=crops)

    # ---- UI

    def preview(self, limit: int = 64) -> list[dict]:
        """The first ``limit`` images as the UI lists them."""
        rows = []
        for item in self.items[:max(0, limit)]:
            try:
                shown = item.path.relative_to(self.root).as_posix()
            except ValueError:
                shown = str(item.path)
            rows.append({
                "path": shown,
                "caption": item.caption,
                "bucket": f"{item.bucket[0]}x{item.bucket[1]}",
                "size": f"{item.size[0]}x{item.size[1]}",
                "repeats": item.repeats,
                "caption_source": item.caption_source,
            })
        return rows


def _check_settings(s: TrainSettings) -> None:
    if s.resolution < 64:
        raise TrainingError(f"resolution {s.resolution} is too small (at least 64)")
    if s.enable_bucket:
        if s.min_bucket_reso < BUCKET_STEP:
            raise TrainingError(f"min_bucket_reso must be at least {BUCKET_STEP}")
        if s.min_bucket_reso > s.resolution:
            raise TrainingError(f"min_bucket_reso ({s.min_bucket_reso}) is above the resolution ({s.resolution})")
        if s.max_bucket_reso < s.resolution:
            raise TrainingError(f"max_bucket_reso ({s.max_bucket_reso}) is below the resolution ({s.resolution})")
    for what, p in (("caption_dropout", s.caption_dropout), ("tag_dropout", s.tag_dropout)):
        if not 0.0 <= p <= 1.0:
            raise TrainingError(f"{what} must be between 0 and 1, got {p}")
    if s.keep_tokens < 0:
        raise TrainingError("keep_tokens cannot be negative")


def summary(dataset: TrainDataset) -> str:
    """One paragraph about a scanned dataset for the UI."""
    n = len(dataset.items)
    steps = len(dataset)
    in_folders = sum(1 for item in dataset.items if item.repeats != 1 or item.path.parent != dataset.root)
    parts = [f"{n} image{'s' if n != 1 else ''}"]
    if in_folders:
        parts[0] += f" ({in_folders} in <repeats>_<name> folders)"
    parts.append(f"{steps} step{'s' if steps != 1 else ''} per epoch at batch size 1")
    buckets = dataset.buckets()
    if dataset.settings.enable_bucket:
        parts.append(f"{len(buckets)} bucket{'s' if len(buckets) != 1 else ''}: "
                     + ", ".join(f"{w}x{h} ({c})" for (w, h), c in buckets.items()))
    else:
        r = dataset.settings.resolution
        parts.append(f"no bucketing: every image is cropped to {r}x{r}")
    text = "; ".join(parts) + "."
    if dataset.notes:
        text += " Notes: " + "; ".join(dataset.notes) + "."
    return text
