"""Derived configs written as a folder laid out like a diffusers repo: diffusers' single-file loaders take
a folder, never a dict."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def write_config_dir(configs: dict[str, dict[str, Any]], cache_root: Path) -> Path:
    """A folder laid out like a diffusers repo (``<component>/config.json``), reused when
    the same architecture is loaded again."""
    blob = json.dumps(configs, sort_keys=True).encode()
    target = cache_root / hashlib.sha1(blob).hexdigest()[:16]
    if not (target / "done").exists():
        for name, cfg in configs.items():
            (target / name).mkdir(parents=True, exist_ok=True)
            (target / name / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        (target / "done").write_text("ok", encoding="utf-8")
    return target
