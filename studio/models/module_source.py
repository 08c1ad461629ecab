"""Where the studio finds model files beyond A1111's folders: Forge's and ComfyUI's
(``models/text_encoder(s)``, ``models/clip``, ``models/vae``, ``models/diffusion_models``,
``models/unet``), ``--text-encoder-dir``, and ComfyUI's ``extra_model_paths.yaml``, so a shared
ComfyUI folder works as it is."""

from __future__ import annotations

import logging
from collections.abc import Callable

from studio.config import Paths
from studio.models.extra_paths import module_folders, read_extra_model_paths
from studio.models.modules import ModuleFile, scan_modules
from studio.models.state_dict import ModelFileError

log = logging.getLogger(__name__)


def extra_folders(paths: Paths) -> dict[str, tuple]:
    """The folders ComfyUI's extra_model_paths.yaml lists, by studio kind; a broken file is logged, not fatal."""
    if paths.extra_model_paths is None or not paths.extra_model_paths.is_file():
        return {}
    try:
        return read_extra_model_paths(paths.extra_model_paths)
    except ModelFileError as e:
        log.warning("extra_model_paths.yaml ignored: %s", e)
        return {}


def checkpoint_folders(paths: Paths) -> tuple:
    """Checkpoint folders: A1111's and ComfyUI's, then the yaml's checkpoints and diffusion models."""
    extra = extra_folders(paths)
    folders = [*paths.ckpt_dirs, *extra.get("checkpoints", ()), *extra.get("diffusion_models", ())]
    return tuple(dict.fromkeys(folders))


def module_scanner(paths: Paths) -> Callable[[], list[ModuleFile]]:
    """A function listing the separate text encoders and VAEs, scanned afresh on each call (a file
    dropped into a folder is found at the next load, as the checkpoint list is at refresh)."""

    def scan() -> list[ModuleFile]:
        folders = module_folders(paths.models, extra_folders(paths), paths.text_encoder_dirs)
        roots = [*folders.get("text_encoders", ()), *folders.get("vae", ()), *paths.vae_dirs]
        return [m for m in scan_modules(dict.fromkeys(roots)) if m.kind not in ("transformer", "unknown")]

    return scan
