"""Regenerate studio/models/configs/<family>/ from the published full-size architectures.

Each model is built on the meta device (no memory, no weights), turned into the original
single-file key layout, and run through the loader's own shape-based derivation, so the
bundled files are exactly what the loader derives from a real checkpoint of that family.
Run: .venv/bin/python tools/write_bundled_configs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.models.bundled import BUNDLED_DIR  # noqa: E402
from studio.testing.fullsize import STANDARD, full_size_shapes  # noqa: E402
from studio.models.arch import derive_configs  # noqa: E402
from studio.models.probe import probe_checkpoint  # noqa: E402


def main() -> None:
    for name, spec in STANDARD.items():
        shapes = full_size_shapes(spec)
        probe = probe_checkpoint(shapes, name)
        configs = derive_configs(shapes, probe)
        for component, cfg in configs.items():
            folder = BUNDLED_DIR / name / component
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        print(name, {k: len(v) for k, v in configs.items()})


if __name__ == "__main__":
    main()
