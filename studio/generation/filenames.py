"""A1111's file-name patterns: ``[seed]``, ``[prompt_words]``, ``[datetime<%Y-%m-%d><Asia/Tokyo>]`` ...

The rules are those of A1111 v1.10 (``modules/images.py`` ``FilenameGenerator``), so a pattern
copied from an A1111 config names files the same way here:

- a tag is ``[name]`` or ``[name<arg1><arg2>...]``; names are case-insensitive;
- an unknown tag, or one whose value cannot be known, stays in the name as ``[name]``
  (its ``<args>`` dropped);
- ``[batch_number]``, ``[generation_number]``, ``[seed_last]`` and ``[denoising]`` vanish together
  with the literal text just before them when they do not apply (a single image, txt2img
  without hires. fix), so ``BatchNo_[batch_number]`` gives nothing for a batch of one;
- values taken from text (prompt, sampler, model, styles) are sanitised with
  :func:`sanitize_filename_part`; the literal text of the pattern itself is not.

One addition of ours: ``[negative_prompt]`` (the negative prompt, sanitised like ``[prompt]``);
A1111 leaves that tag as it is.
"""

from __future__ import annotations

import hashlib
import logging
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from PIL import Image

from studio.generation.samplers import UnknownSamplerError, find_sampler

log = logging.getLogger(__name__)

INVALID_FILENAME_CHARS = '#<>:"/\\|?*\n\r\t'
MAX_FILENAME_PART_LENGTH = 128   # A1111's --filenames-max-length default
DEFAULT_TIME_FORMAT = "%Y%m%d%H%M%S"
DEFAULT_MAX_PROMPT_WORDS = 8     # A1111's directories_max_prompt_words default

_TAG = re.compile(r"(.*?)(?:\[([^\[\]]+)\]|$)", re.DOTALL)
_TAG_ARG = re.compile(r"(.*)<([^>]*)>$", re.DOTALL)
_NON_LETTERS = re.compile(r"[\s" + re.escape(string.punctuation) + r"]+")
_TO_UNDERSCORE = str.maketrans({c: "_" for c in INVALID_FILENAME_CHARS})

# A tag's value that removes the tag *and* the literal text before it (A1111's
# NOTHING_AND_SKIP_PREVIOUS_TEXT).
SKIP_WITH_PREVIOUS_TEXT = object()


def sanitize_filename_part(text: str, replace_spaces: bool = True) -> str:
    """A1111's ``sanitize_filename_part``: characters no file system accepts become ``_``, leading
    spaces go, the text is cut to 128 characters, then trailing spaces and dots go (Windows drops
    them silently, which would make two names collide)."""
    if replace_spaces:
        text = text.replace(" ", "_")
    text = text.translate(_TO_UNDERSCORE)
    text = text.lstrip(" ")[:MAX_FILENAME_PART_LENGTH]
    return text.rstrip(" .")


@dataclass(frozen=True)
class NameContext:
    """Everything a pattern can name, for one image of a job."""

    request: Any                 # the generation request (typed; read with getattr)
    image: Image.Image           # the image being saved (or the grid)
    seed: int | None
    prompt: str                  # the prompt with styles applied and extra-network tags removed
    index: int                   # the image's position in the job, 0-based
    first_seed: int              # A1111's all_seeds[0] and all_seeds[-1]
    last_seed: int
    now: datetime
    job_timestamp: str = ""
    kind: str = "txt2img"
    model_name: str = ""
    model_hash: str = ""
    vae_filename: str = ""
    styles: tuple[tuple[str, str], ...] = ()   # (name, style prompt) of the styles applied
    max_prompt_words: int = DEFAULT_MAX_PROMPT_WORDS
    basename: str = ""           # "grid" for grids
    clip_skip: int = 1           # the CLIP_stop_at_last_layers option, used when the request has none

    def field(self, name: str, default: Any = None) -> Any:
        value = getattr(self.request, name, default)
        return default if value is None else value

    @property
    def batch_size(self) -> int:
        return int(self.field("batch_size", 1))

    @property
    def n_iter(self) -> int:
        return int(self.field("n_iter", 1))


def _scheduler_label(sampler_name: str, scheduler: str) -> str:
    """A1111's ``get_scheduler_str``: "Automatic" stands for the sampler's own schedule when it
    has one (DPM++ 2M -> karras); the result is capitalised ("SGM Uniform" -> "Sgm uniform")."""
    if scheduler.strip().lower() in ("", "automatic"):
        try:
            default = find_sampler(sampler_name).default_schedule
        except UnknownSamplerError:
            default = "uniform"
        # our samplers without a schedule option of their own say "uniform"; A1111 keeps Automatic
        scheduler = "Automatic" if default == "uniform" else default
    return scheduler.capitalize()


def _scheduler(ctx: NameContext) -> str:
    return _scheduler_label(str(ctx.field("sampler_name", "")), str(ctx.field("scheduler", "")))


def _string_hash(text: str, *args: str) -> str:
    length = int(args[0]) if args and args[0] != "" else 8
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _image_hash(ctx: NameContext, *args: str) -> str:
    length = int(args[0]) if args and args[0] != "" else None
    return hashlib.sha256(ctx.image.tobytes()).hexdigest()[:length]


def _datetime(ctx: NameContext, *args: str) -> str:
    """``[datetime]``, ``[datetime<format>]``, ``[datetime<format><time zone>]``; a bad format falls
    back to the default one and an unknown zone to the local time, as in A1111."""
    time_format = args[0] if args and args[0] != "" else DEFAULT_TIME_FORMAT
    zone = None
    if len(args) > 1:
        try:
            zone = ZoneInfo(args[1])
        except (ZoneInfoNotFoundError, ValueError):
            zone = None
    moment = ctx.now.astimezone(zone)
    try:
        text = moment.strftime(time_format)
    except (ValueError, TypeError):
        text = moment.strftime(DEFAULT_TIME_FORMAT)
    return sanitize_filename_part(text, replace_spaces=False)


def _prompt_no_styles(ctx: NameContext) -> str:
    """The prompt with each applied style's text taken out again (A1111's ``prompt_no_style``:
    the parts around ``{prompt}`` are removed one by one, then stray commas)."""
    prompt = ctx.prompt
    for _, style in ctx.styles:
        if not style:
            continue
        for part in style.split("{prompt}"):
            prompt = prompt.replace(part, "").replace(", ,", ",").strip().strip(",")
        prompt = prompt.replace(style, "").strip().strip(",").strip()
    return sanitize_filename_part(prompt, replace_spaces=False)


def _prompt_words(ctx: NameContext) -> str:
    words = [word for word in _NON_LETTERS.split(ctx.prompt) if word] or ["empty"]
    return sanitize_filename_part(" ".join(words[:ctx.max_prompt_words]), replace_spaces=False)


def _has_prompt(ctx: NameContext, *args: str) -> str:
    """``[hasprompt<girl|nogirl><boy>]``: each word found in the prompt, or its default."""
    lower = ctx.prompt.lower()
    found = ""
    for arg in args:
        if arg == "":
            continue
        division = arg.split("|")
        expected = division[0].lower()
        default = division[1] if len(division) > 1 else ""
        found += expected if expected in lower else default
    return sanitize_filename_part(found)


def _styles(ctx: NameContext) -> str:
    names = [name for name, _ in ctx.styles] or list(ctx.field("styles", ()) or ())
    return sanitize_filename_part(", ".join(n for n in names if n != "None") or "None", replace_spaces=False)


def _vae_filename(ctx: NameContext) -> str:
    """The VAE file's name up to its first dot ("NoneType" without an external VAE, as A1111)."""
    if not ctx.vae_filename:
        return "NoneType"
    name = ctx.vae_filename.replace("\\", "/").rsplit("/", 1)[-1]
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "" else parts[0]


def _denoising(ctx: NameContext) -> Any:
    """img2img's denoising strength; txt2img has one only with hires. fix."""
    if ctx.kind == "img2img":
        strength = ctx.field("denoising_strength")
    elif ctx.field("enable_hr", False):
        strength = ctx.field("hr_denoising_strength", ctx.field("denoising_strength"))
    else:
        strength = None
    return float(strength) if strength else SKIP_WITH_PREVIOUS_TEXT


def _generation_number(ctx: NameContext) -> Any:
    if ctx.n_iter == 1 and ctx.batch_size == 1:
        return SKIP_WITH_PREVIOUS_TEXT
    return ctx.index + 1


_TAGS: Mapping[str, Callable[..., Any]] = MappingProxyType({
    "basename": lambda ctx: ctx.basename or "img",
    "seed": lambda ctx: ctx.seed if ctx.seed is not None else "",
    "seed_first": lambda ctx: ctx.seed if ctx.batch_size == 1 else ctx.first_seed,
    "seed_last": lambda ctx: SKIP_WITH_PREVIOUS_TEXT if ctx.batch_size == 1 else ctx.last_seed,
    "steps": lambda ctx: ctx.field("steps"),
    "cfg": lambda ctx: float(ctx.field("cfg_scale")),
    "width": lambda ctx: ctx.image.width,
    "height": lambda ctx: ctx.image.height,
    "styles": _styles,
    "sampler": lambda ctx: sanitize_filename_part(str(ctx.field("sampler_name", "")), replace_spaces=False),
    "scheduler": lambda ctx: sanitize_filename_part(_scheduler(ctx), replace_spaces=False),
    "sampler_scheduler": lambda ctx: sanitize_filename_part(
        f"{ctx.field('sampler_name', '')} {_scheduler(ctx)}", replace_spaces=False),
    "model_hash": lambda ctx: ctx.model_hash,
    "model_name": lambda ctx: sanitize_filename_part(ctx.model_name, replace_spaces=False),
    "date": lambda ctx: ctx.now.strftime("%Y-%m-%d"),
    "datetime": _datetime,
    "job_timestamp": lambda ctx: ctx.job_timestamp,
    "prompt_hash": lambda ctx, *args: _string_hash(ctx.prompt, *args),
    "negative_prompt_hash": lambda ctx, *args: _string_hash(str(ctx.field("negative_prompt", "")), *args),
    "full_prompt_hash": lambda ctx, *args: _string_hash(
        f"{ctx.field('prompt', '')} {ctx.field('negative_prompt', '')}", *args),
    "prompt": lambda ctx: sanitize_filename_part(ctx.prompt),
    "prompt_no_styles": _prompt_no_styles,
    "prompt_spaces": lambda ctx: sanitize_filename_part(ctx.prompt, replace_spaces=False),
    "prompt_words": _prompt_words,
    "negative_prompt": lambda ctx: sanitize_filename_part(str(ctx.field("negative_prompt", ""))),
    "batch_number": lambda ctx: SKIP_WITH_PREVIOUS_TEXT if ctx.batch_size == 1
    else ctx.index % ctx.batch_size + 1,
    "batch_size": lambda ctx: ctx.batch_size,
    "generation_number": _generation_number,
    "hasprompt": _has_prompt,
    "clip_skip": lambda ctx: ctx.field("clip_skip", ctx.clip_skip),
    "denoising": _denoising,
    "vae_filename": _vae_filename,
    "image_hash": _image_hash,
    "none": lambda ctx: "",
})


def _split_args(tag: str) -> tuple[str, list[str]]:
    """``datetime<%Y><UTC>`` -> ("datetime", ["%Y", "UTC"])."""
    args: list[str] = []
    while (m := _TAG_ARG.match(tag)) is not None:
        tag, arg = m.groups()
        args.insert(0, arg)
    return tag, args


def _tag_value(ctx: NameContext, name: str, args: list[str]) -> Any:
    """The tag's value, or None when it is unknown or cannot be computed (then it stays as text)."""
    compute = _TAGS.get(name.lower())
    if compute is None:
        return None
    try:
        return compute(ctx, *args)
    except Exception:  # as in A1111, a tag that fails stays in the name instead of failing the save
        log.warning("Filename pattern: cannot fill [%s]", name, exc_info=True)
        return None


def apply_pattern(pattern: str, ctx: NameContext) -> str:
    """Replace the pattern's tags with the values for ``ctx`` (A1111's ``FilenameGenerator.apply``)."""
    out = ""
    for m in _TAG.finditer(pattern):
        text, tag = m.groups()
        if tag is None:
            out += text
            continue
        name, args = _split_args(tag)
        value = _tag_value(ctx, name, args)
        if value is SKIP_WITH_PREVIOUS_TEXT:
            continue
        out += text + (f"[{name}]" if value is None else str(value))
    return out
