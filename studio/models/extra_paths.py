"""ComfyUI's ``extra_model_paths.yaml`` and the folders the separate model parts live in.

The file has one section per installation (``comfyui:``, ``a111:`` ...), each with an
optional ``base_path`` and ``is_default`` and folder kinds mapped to a path, or to
several in a ``|`` block, one a line::

    comfyui:
        base_path: ~/ComfyUI/
        text_encoders: |
            models/text_encoders/
            models/clip/  # legacy location still supported
        diffusion_models: models/diffusion_models

Relative paths are relative to ``base_path``; a relative ``base_path``, or a section
without one, is relative to the yaml's folder (as ComfyUI reads it). ``~`` and
environment variables are expanded in both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

from studio.models.state_dict import ModelFileError

# ComfyUI folder kind -> studio folder kind. Kinds not listed (clip_vision, configs,
# hypernetworks, custom_nodes ...) are nothing the studio reads from these files.
COMFY_TO_STUDIO = {
    "checkpoints": "checkpoints",
    "diffusion_models": "diffusion_models",
    "unet": "diffusion_models",
    "text_encoders": "text_encoders",
    "clip": "text_encoders",
    "vae": "vae",
    "loras": "loras",
    "controlnet": "controlnet",
    "embeddings": "embeddings",
    "upscale_models": "upscalers",
}
_SECTION_SETTINGS = ("base_path", "is_default")

# Sub-folders of models/ for each kind of module: Forge's (text_encoder, VAE), ComfyUI's
# (text_encoders, clip, vae, diffusion_models, unet).
MODULE_SUBFOLDERS = {
    "text_encoders": ("text_encoder", "text_encoders", "clip"),
    "vae": ("VAE", "vae"),
    "diffusion_models": ("diffusion_models", "unet"),
}

# ComfyUI's own example puts "  # legacy location still supported" after a path inside a
# "|" block, where YAML keeps it as text; ComfyUI then registers a folder of that name.
_TRAILING_COMMENT = re.compile(r"(^|\s+)#.*$")


def _expand(text: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(text.strip())))


def _load(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: cannot read ({e})") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ModelFileError(f"{path}: broken YAML at {where}: {problem}") from e


def _lines(value: object, where: str) -> list[str]:
    """The paths of one entry: a string (one path a line) or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        raw = value.splitlines()
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        raw = value
    else:
        raise ModelFileError(f"{where}: expected a path or a '|' block of paths, got {type(value).__name__}")
    stripped = (_TRAILING_COMMENT.sub("", line).strip() for line in raw)
    return [line for line in stripped if line]


def _base(section: Mapping[str, object], yaml_dir: Path, where: str) -> Path:
    base_path = section.get("base_path")
    if base_path is None:
        return yaml_dir
    if not isinstance(base_path, str):
        raise ModelFileError(f"{where}: base_path must be a path, got {type(base_path).__name__}")
    base = _expand(base_path)
    return base if base.is_absolute() else yaml_dir / base


def _unique_dirs(folders: Iterable[Path]) -> tuple[Path, ...]:
    """The folders that exist, each once, in order. A folder is "the same" by device and
    inode, so models/VAE and models/vae on a case-insensitive disk, or a symlink and its
    target, count once."""
    seen: set[object] = set()
    out: list[Path] = []
    for folder in folders:
        try:
            stat = folder.stat()
        except OSError:
            continue
        if not folder.is_dir():
            continue
        key = (stat.st_dev, stat.st_ino) if stat.st_ino else folder.resolve()
        if key not in seen:
            seen.add(key)
            out.append(folder)
    return tuple(out)


def read_extra_model_paths(path: Path) -> dict[str, tuple[Path, ...]]:
    """Studio folder kind -> the folders ``path`` lists for it that exist, in file order.
    A missing file is no extra folders; a broken one is a ModelFileError naming the line."""
    path = Path(path)
    config = _load(path)
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected sections such as 'comfyui:' at the top level")
    yaml_dir = path.resolve().parent
    found: dict[str, list[Path]] = {}
    for name, section in config.items():
        if section is None:
            continue
        where = f"{path}: section {name!r}"
        if not isinstance(section, dict):
            raise ModelFileError(f"{where}: expected folder kinds mapped to paths")
        base = _base(section, yaml_dir, where)
        # is_default only orders ComfyUI's download targets; the studio downloads nothing.
        for comfy_kind, value in section.items():
            kind = COMFY_TO_STUDIO.get(str(comfy_kind))
            if comfy_kind in _SECTION_SETTINGS or kind is None:
                continue
            for line in _lines(value, f"{where}, {comfy_kind!r}"):
                folder = _expand(line)
                found.setdefault(kind, []).append(Path(os.path.normpath(base / folder)))
    return {kind: dirs for kind, folders in found.items() if (dirs := _unique_dirs(folders))}


def module_folders(
    models: Path,
    extra: Mapping[str, Sequence[Path]] | None = None,
    text_encoder_dirs: Sequence[Path] = (),
) -> dict[str, tuple[Path, ...]]:
    """The existing folders of each module kind ("text_encoders", "vae",
    "diffusion_models"): the sub-folders of ``models`` Forge and ComfyUI use, then
    ``text_encoder_dirs`` (--text-encoder-dir) for text encoders, then the folders from
    ``extra`` (:func:`read_extra_model_paths`)."""
    models = Path(models)
    extra = extra or {}
    out: dict[str, tuple[Path, ...]] = {}
    for kind, subfolders in MODULE_SUBFOLDERS.items():
        folders = [models / sub for sub in subfolders]
        if kind == "text_encoders":
            folders += [Path(d).expanduser() for d in text_encoder_dirs]
        folders += [Path(d) for d in extra.get(kind, ())]
        out[kind] = _unique_dirs(folders)
    return out
