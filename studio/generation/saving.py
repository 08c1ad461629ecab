"""Saving a job's images and grid as A1111's saving options say.

One :class:`OutputSaver` per generation job, made from the settings with
:meth:`OutputSaver.from_options`; the runner calls :meth:`~OutputSaver.save` for each image, in
order, and :meth:`~OutputSaver.save_grid` after the batch. The options and their A1111 defaults:

- ``samples_save`` (True), ``grid_save`` (True), ``grid_only_if_multiple`` (True): whether to save.
- ``outdir_samples`` / ``outdir_grids`` (""): one folder for every mode; else the mode's own
  ``outdir_txt2img_samples`` ("outputs/txt2img-images"), ``outdir_img2img_samples``,
  ``outdir_txt2img_grids``, ``outdir_img2img_grids``. Relative folders are under the data dir;
  an empty one means its default.
- ``save_to_dirs`` / ``grid_save_to_dirs`` (True) with ``directories_filename_pattern`` ("[date]"):
  a subfolder named by the pattern (``directories_max_prompt_words`` (8) for ``[prompt_words]``).
- ``samples_filename_pattern`` (""): the name; empty means ``[seed]`` (``[seed]-[prompt_spaces]``
  without subfolders). ``save_images_add_number`` (True) puts ``NNNNN-`` in front (always when
  the pattern gives nothing). Grids are ``grid-NNNN``, plus the pattern with
  ``grid_extended_filename``.
- ``samples_format`` / ``grid_format`` (png), ``jpeg_quality`` (80), ``webp_lossless``;
  ``enable_pnginfo`` (True) embeds the infotext; ``save_txt`` (False) writes it to a ``.txt`` beside.
- ``n_rows`` (-1), ``grid_prevent_empty_spots``, ``grid_background_color``: the grid's layout.

Where A1111 would overwrite (no number and a name already taken), ``-1``, ``-2``... is added
instead (A1111's "Add number suffix" action): a save never replaces a file.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from studio.generation.filenames import DEFAULT_MAX_PROMPT_WORDS, NameContext, apply_pattern
from studio.generation.grids import GridLayout
from studio.generation.outputs import SaveFormat, image_bytes, next_number, write_new_file
from studio.prompts.parser import extract_extra_networks

log = logging.getLogger(__name__)

KINDS = ("txt2img", "img2img")
DEFAULT_DIRS = {
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images",
    "outdir_txt2img_grids": "outputs/txt2img-grids",
    "outdir_img2img_grids": "outputs/img2img-grids",
}
DEFAULT_NAME_LENGTH = 255
# Larger images do not fit the format (A1111 then saves a PNG instead).
MAX_SIDE = {"jpg": 65535, "webp": 16383}


@dataclass(frozen=True)
class NamingOptions:
    """The options that decide folders and file names."""

    filename_pattern: str = ""
    directories_pattern: str = "[date]"
    save_to_dirs: bool = True
    grid_save_to_dirs: bool = True
    add_number: bool = True
    grid_extended_filename: bool = False
    max_prompt_words: int = DEFAULT_MAX_PROMPT_WORDS

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> NamingOptions:
        return cls(
            filename_pattern=str(options.get("samples_filename_pattern") or ""),
            # a missing option is A1111's default "[date]"; one the user emptied means "[prompt_words]"
            directories_pattern=str(_option(options, "directories_filename_pattern", "[date]")),
            save_to_dirs=bool(_option(options, "save_to_dirs", True)),
            grid_save_to_dirs=bool(_option(options, "grid_save_to_dirs", True)),
            add_number=bool(_option(options, "save_images_add_number", True)),
            grid_extended_filename=bool(_option(options, "grid_extended_filename", False)),
            max_prompt_words=_int(options.get("directories_max_prompt_words"), DEFAULT_MAX_PROMPT_WORDS),
        )

    def decoration_pattern(self) -> str:
        """The name pattern; A1111's default adds the prompt only when there is no subfolder."""
        return self.filename_pattern or ("[seed]" if self.save_to_dirs else "[seed]-[prompt_spaces]")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def _option(options: Mapping[str, Any], key: str, default: Any) -> Any:
    value = options.get(key)
    return default if value is None else value


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _folder(options: Mapping[str, Any], data_dir: Path, shared_key: str, own_key: str) -> Path:
    """``outdir_samples or outdir_<kind>_samples`` (A1111's precedence), relative to the data dir."""
    value = str(options.get(shared_key) or options.get(own_key) or DEFAULT_DIRS[own_key])
    path = Path(value).expanduser()
    return path if path.is_absolute() else data_dir / path


def _format(options: Mapping[str, Any], format_key: str) -> SaveFormat:
    return SaveFormat.from_settings({**options, "samples_format": options.get(format_key) or "png"})


def _fitting_format(save_format: SaveFormat, image: Image.Image) -> SaveFormat:
    limit = MAX_SIDE.get(save_format.fmt)
    if limit is not None and max(image.size) > limit:
        log.info("Image of %dx%d is too large for %s; saving it as PNG", *image.size, save_format.fmt)
        return SaveFormat("png", save_format.quality, save_format.lossless)
    return save_format


def _request_saves(request: Any, refusal: str) -> bool:
    """A1111's API saves only with ``save_images``, and then not what ``do_not_save_*`` refuses."""
    return bool(getattr(request, "save_images", True)) and not getattr(request, refusal, False)


def _max_name_length(folder: Path) -> int:
    try:
        return os.statvfs(folder).f_namemax
    except (AttributeError, OSError):  # no statvfs on Windows
        return DEFAULT_NAME_LENGTH


@dataclass
class OutputSaver:
    """Saves one job's images and grid; see the module docstring for the options."""

    kind: str
    samples_dir: Path
    grids_dir: Path
    samples_save: bool = True
    grid_save: bool = True
    save_txt: bool = False
    embed_infotext: bool = True
    samples_format: SaveFormat = field(default_factory=SaveFormat)
    grid_format: SaveFormat = field(default_factory=SaveFormat)
    naming: NamingOptions = field(default_factory=NamingOptions)
    grid_layout: GridLayout = field(default_factory=GridLayout)
    model_name: str = ""
    model_hash: str = ""
    vae_filename: str = ""
    styles: tuple[tuple[str, str], ...] = ()
    clip_skip: int = 1
    now: Callable[[], datetime] = datetime.now
    job_timestamp: str = ""
    # the job so far: how many images were handed to save(), and the first one's seed
    _count: int = field(default=0, init=False, repr=False)
    _first_seed: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if not self.job_timestamp:
            self.job_timestamp = self.now().strftime("%Y%m%d%H%M%S")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], data_dir: Path, kind: str, model_name: str = "",
                     model_hash: str = "", vae_filename: str = "",
                     styles: Mapping[str, str] | None = None) -> OutputSaver:
        """``styles``: the styles applied to the job's prompt, name -> style prompt (for ``[styles]``
        and ``[prompt_no_styles]``); without it ``[styles]`` reads the request's ``styles``."""
        _check_kind(kind)
        data_dir = Path(data_dir)
        return cls(
            kind=kind,
            samples_dir=_folder(options, data_dir, "outdir_samples", f"outdir_{kind}_samples"),
            grids_dir=_folder(options, data_dir, "outdir_grids", f"outdir_{kind}_grids"),
            samples_save=bool(_option(options, "samples_save", True)),
            grid_save=bool(_option(options, "grid_save", True)),
            save_txt=bool(_option(options, "save_txt", False)),
            embed_infotext=bool(_option(options, "enable_pnginfo", True)),
            samples_format=_format(options, "samples_format"),
            grid_format=_format(options, "grid_format"),
            naming=NamingOptions.from_options(options),
            grid_layout=GridLayout.from_options(options),
            model_name=model_name or "",
            model_hash=model_hash or "",
            vae_filename=vae_filename or "",
            styles=tuple((styles or {}).items()),
            clip_skip=_int(options.get("CLIP_stop_at_last_layers"), 1),
        )

    # -- the runner's calls ------------------------------------------------------------------

    def save(self, image: Image.Image, infotext: str | None, seed: int, request: Any,
             index: int | None = None) -> Path | None:
        """Save one image of the job; None when ``samples_save`` is off or the request says not to
        save (``save_images`` false or ``do_not_save_samples``, as in A1111's API). ``index`` is the
        image's place in the job (0-based); by default, how many images this saver was given before."""
        index = self._count if index is None else index
        self._count = max(self._count, index + 1)
        if self._first_seed is None:
            self._first_seed = seed
        if not (self.samples_save and _request_saves(request, "do_not_save_samples")):
            return None
        ctx = self._context(image, seed, request, index)
        decoration = apply_pattern(self.naming.decoration_pattern(), ctx)
        folder = self._subfolder(self.samples_dir, ctx, self.naming.save_to_dirs)
        return self._store(image, infotext, folder, "", decoration, self.samples_format)

    def grid_image(self, images: Sequence[Image.Image], request: Any) -> Image.Image:
        """The grid of ``images`` as A1111 lays it out (for showing it as well as saving it)."""
        return self.grid_layout.make(images, _int(getattr(request, "batch_size", 1), 1))

    def save_grid(self, images: Sequence[Image.Image], infotext: str | None, request: Any) -> Path | None:
        """Save the grid of the job's images, named ``grid-NNNN``; None when ``grid_save`` is off, the
        request says not to save (``save_images`` false or ``do_not_save_grid``), or there are too
        few images (``grid_only_if_multiple``)."""
        wanted = self.grid_save and _request_saves(request, "do_not_save_grid")
        if not (wanted and self.grid_layout.wanted(len(images))):
            return None
        grid = self.grid_image(images, request)
        seed = self._job_seeds(request, self._first_seed, 0)[0]
        ctx = self._context(grid, seed, request, max(self._count, len(images)) - 1, basename="grid")
        decoration = apply_pattern(self.naming.decoration_pattern(), ctx) \
            if self.naming.grid_extended_filename else ""
        folder = self._subfolder(self.grids_dir, ctx, self.naming.grid_save_to_dirs)
        return self._store(grid, infotext, folder, "grid", decoration, self.grid_format)

    def save_finished_grid(self, grid: Image.Image, infotext: str | None, request: Any,
                           basename: str = "grid") -> Path | None:
        """Save a grid a script drew itself (X/Y/Z plot, prompt matrix) as ``<basename>-NNNN`` in the
        grids folder; None when ``grid_save`` is off. A1111's scripts save their grids whatever the
        API's ``save_images`` says, so the request is only used for the file name."""
        if not self.grid_save:
            return None
        seed = int(getattr(request, "seed", 0) or 0)
        ctx = self._context(grid, seed, request, 0, basename=basename)
        decoration = apply_pattern(self.naming.decoration_pattern(), ctx) \
            if self.naming.grid_extended_filename else ""
        folder = self._subfolder(self.grids_dir, ctx, self.naming.grid_save_to_dirs)
        return self._store(grid, infotext, folder, basename, decoration, self.grid_format)

    # -- naming --------------------------------------------------------------------------------

    def _job_seeds(self, request: Any, seed: int | None, index: int) -> tuple[int, int]:
        """The job's first and last seed (A1111's ``all_seeds[0]`` / ``all_seeds[-1]``): image k has
        ``seed + k``, or the same seed for all when variation (subseed strength) is on."""
        varied = float(getattr(request, "subseed_strength", 0) or 0) > 0
        base = getattr(request, "seed", -1)
        if base is None or base < 0:
            base = (seed or 0) - (0 if varied else index)
        count = _int(getattr(request, "batch_size", 1), 1) * _int(getattr(request, "n_iter", 1), 1)
        return base, base + (0 if varied else count - 1)

    def _context(self, image: Image.Image, seed: int | None, request: Any, index: int,
                 basename: str = "") -> NameContext:
        first, last = self._job_seeds(request, seed, index)
        prompt, _ = extract_extra_networks(str(getattr(request, "prompt", "") or ""))
        return NameContext(
            request=request, image=image, seed=seed, prompt=prompt, index=index, first_seed=first,
            last_seed=last, now=self.now(), job_timestamp=self.job_timestamp, kind=self.kind,
            model_name=self.model_name, model_hash=self.model_hash, vae_filename=self.vae_filename,
            styles=self.styles, max_prompt_words=self.naming.max_prompt_words, basename=basename,
            clip_skip=self.clip_skip)

    def _subfolder(self, base: Path, ctx: NameContext, to_dirs: bool) -> Path:
        if not to_dirs:
            return base
        name = apply_pattern(self.naming.directories_pattern or "[prompt_words]", ctx)
        return base / name.lstrip(" ").rstrip("\\ /")

    # -- writing -------------------------------------------------------------------------------

    def _store(self, image: Image.Image, infotext: str | None, folder: Path, basename: str,
               decoration: str, save_format: SaveFormat) -> Path:
        save_format = _fitting_format(save_format, image)
        folder.mkdir(parents=True, exist_ok=True)
        # A1111 keeps the name within the file system's limit, room left for the extension
        limit = _max_name_length(folder) - max(4, len(save_format.suffix))
        numbered = self.naming.add_number or decoration == ""
        stems = _numbered_stems(folder, basename, decoration, limit) if numbered \
            else _suffixed_stems(decoration, limit)
        write_txt = self.save_txt and infotext is not None
        names = (stem + save_format.suffix for stem in stems
                 if not (write_txt and (folder / f"{stem}.txt").exists()))
        data = image_bytes(image, infotext if self.embed_infotext else None, save_format)
        path = write_new_file(folder, names, data)
        if write_txt:
            self._write_txt(path.with_suffix(".txt"), infotext)
        return path

    @staticmethod
    def _write_txt(path: Path, infotext: str) -> None:
        try:
            write_new_file(path.parent, [path.name], f"{infotext}\n".encode())
        except FileExistsError:  # another writer took the name after we checked: keep theirs
            log.warning("Not overwriting %s", path)


def _numbered_stems(folder: Path, basename: str, decoration: str, limit: int) -> Iterator[str]:
    """``00012-<decoration>`` (``grid-0004-<decoration>`` with a basename), counting up from the next
    free number."""
    tail = f"-{decoration}" if decoration else ""
    for n in itertools.count(next_number(folder, basename)):
        number = f"{n:05}" if basename == "" else f"{basename}-{n:04}"
        yield (number + tail)[:limit]


def _suffixed_stems(decoration: str, limit: int) -> Iterator[str]:
    """``<decoration>``, then ``<decoration>-1``, ``-2``... cut so the number always fits."""
    yield decoration[:limit]
    for n in itertools.count(1):
        suffix = f"-{n}"
        yield decoration[:limit - len(suffix)] + suffix
