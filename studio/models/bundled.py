"""Configs shipped with the package for the published architectures (SD1.5, SD2.x 512 and
768-v, SDXL base, and their inpainting variants), so real checkpoints load with no hub.
They are exactly what :mod:`studio.models.arch` derives from a real file's shapes
(tools/write_bundled_configs.py writes them, tests/test_bundled_configs.py checks them)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

BUNDLED_DIR = Path(__file__).parent / "configs"


@functools.lru_cache(maxsize=1)
def bundled_configs() -> dict[str, dict[str, dict[str, Any]]]:
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for folder in sorted(BUNDLED_DIR.iterdir()):
        if folder.name == "scheduler" or not (folder / "unet" / "config.json").is_file():
            continue
        found[folder.name] = {
            sub.name: json.loads((sub / "config.json").read_text(encoding="utf-8"))
            for sub in sorted(folder.iterdir()) if (sub / "config.json").is_file()
        }
    return found


def match_bundled(configs: dict[str, dict[str, Any]]) -> Path | None:
    """The bundled folder whose configs equal ``configs``, if the file is a standard size."""
    for name, bundled in bundled_configs().items():
        if bundled == json.loads(json.dumps(configs)):
            return BUNDLED_DIR / name
    return None
