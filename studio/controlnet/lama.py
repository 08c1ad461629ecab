"""``inpaint_only+lama``'s fill: LaMa paints the masked area first, so the inpaint ControlNet starts
from a plausible picture instead of a hole (large removals come out cleaner).

The network is loaded with spandrel (its LaMa architecture; no pickled code runs) from the
annotators folder, under the extension's file name; as the extension, it runs at 256 pixels (what
LaMa was trained at) and its output is used only inside the mask.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# the A1111 extension's file name first, then the names the LaMa weights are published under
LAMA_FILES = ("ControlNetLama.pth", "big-lama.pt", "big-lama.pth", "lama.pth")
LAMA_RESOLUTION = 256


class LamaMissing(ValueError):
    """No LaMa weights in the annotators folder (the caller turns it into its own error type)."""


def find_lama(annotators_dir: Path) -> Path:
    for name in LAMA_FILES:
        path = Path(annotators_dir) / name
        if path.is_file():
            return path
    raise LamaMissing(f"inpaint_only+lama needs LaMa's weights: put {LAMA_FILES[0]} (from lllyasviel/Annotators) "
                      f"in {Path(annotators_dir).resolve()}")


def load_lama(path: Path) -> Any:
    import spandrel

    descriptor = spandrel.ModelLoader().load_from_file(str(path))
    if type(descriptor.model).__name__ != "LaMa":
        raise LamaMissing(f"{path.name} is not a LaMa model (spandrel reads it as {descriptor.architecture.name})")
    return descriptor.eval()


def lama_fill(image: Image.Image, mask: Image.Image, annotators_dir: Path, models: dict, lock: threading.Lock,
              ) -> Image.Image:
    """``image`` with its masked area (white in ``mask``) painted by LaMa at 256 px, scaled back."""
    import torch

    with lock:
        model = models.get("lama")
        if model is None:
            model = load_lama(find_lama(annotators_dir))
            models["lama"] = model
    rgb = image.convert("RGB")
    m = mask.convert("L").resize(rgb.size, Image.NEAREST)
    scale = LAMA_RESOLUTION / min(rgb.size)
    size = (max(8, round(rgb.width * scale / 8) * 8), max(8, round(rgb.height * scale / 8) * 8))
    small = torch.from_numpy(np.asarray(rgb.resize(size, Image.LANCZOS), dtype=np.float32) / 255.0)
    small_mask = torch.from_numpy((np.asarray(m.resize(size, Image.NEAREST), dtype=np.float32) > 127))
    with torch.inference_mode():
        out = model(small.permute(2, 0, 1)[None], small_mask.float()[None, None])
    filled = (out[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    painted = Image.fromarray(filled).resize(rgb.size, Image.LANCZOS)
    alpha = np.asarray(m, dtype=np.float32)[:, :, None] / 255.0
    blended = np.asarray(painted, dtype=np.float32) * alpha + np.asarray(rgb, dtype=np.float32) * (1 - alpha)
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
