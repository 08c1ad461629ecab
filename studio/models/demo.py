"""The built-in demo checkpoint offered when the user has none yet: a tiny SD1-family
model with random weights from the test factory, in the real single-file format. It runs
anywhere in seconds and makes abstract images; the UI labels it as such."""

from __future__ import annotations

from pathlib import Path

from studio.models.catalog import CheckpointInfo

DEMO_NAME = "demo-tiny-sd15.safetensors"
DEMO_SEED = 20240601


def demo_checkpoint_info(folder: Path) -> CheckpointInfo:
    """The demo's catalog entry; the file may not exist yet (:func:`ensure_demo_checkpoint` writes it)."""
    return CheckpointInfo(path=folder / DEMO_NAME, name=DEMO_NAME, is_demo=True)


def ensure_demo_checkpoint(folder: Path) -> CheckpointInfo:
    """The demo's entry, its file written first if missing (the test factory: imports torch)."""
    path = folder / DEMO_NAME
    if not path.exists():
        from studio.testing import make_checkpoint

        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.safetensors")
        make_checkpoint(tmp, "sd1", seed=DEMO_SEED)
        tmp.replace(path)
    return demo_checkpoint_info(folder)
