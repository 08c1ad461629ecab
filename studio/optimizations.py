"""Opt-in fast modes, off by default because each trades something for speed:

- token merging (ToMe, the ``tomesd`` package): merges similar image tokens inside the UNet's
  attention blocks; faster at large sizes, but it changes the image (lossy), so it is written
  into the infotext like A1111 does ("Token merging ratio");
- regional ``torch.compile``: diffusers' ``compile_repeated_blocks`` compiles the UNet's
  transformer block once and reuses the code for every copy of it, so compiling costs one
  block, not the whole UNet; the compiled code is cached on disk (<data>/cache/torch-compile),
  so only the first run on a machine pays the compile time.

channels_last is not here: the device policy turns it on where it was measured to help
(studio/devices.py), and ``--opt-channelslast`` forces it elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.generation.step_callbacks import PassInfo, StepCallback
from studio.options import COMPILE_BACKENDS, MAX_TOKEN_MERGING

log = logging.getLogger(__name__)



class OptimizationError(RuntimeError):
    """An opt-in mode that cannot run here (package missing, compiler failure)."""


@dataclass(frozen=True)
class CompileOptions:
    enabled: bool = False
    backend: str = "inductor"

    @classmethod
    def from_settings(cls, settings: Any) -> CompileOptions:
        backend = settings.get("sd_compile_backend", "inductor")
        return cls(enabled=bool(settings.get("sd_compile_unet", False)),
                   backend=backend if backend in COMPILE_BACKENDS else "inductor")


def token_merging_ratios(settings: Any, img2img: bool) -> tuple[float, float]:
    """(first pass, hires pass) ratios from A1111's settings: img2img has its own ratio when it is
    not 0, and the hires pass falls back to the first pass's ratio, as in A1111."""
    base = _ratio(settings.get("token_merging_ratio", 0.0))
    if img2img:
        base = _ratio(settings.get("token_merging_ratio_img2img", 0.0)) or base
    return base, _ratio(settings.get("token_merging_ratio_hr", 0.0)) or base


def _ratio(value: Any) -> float:
    # config.json may be edited by hand: an unusable value means "off", never a crash
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if 0.0 < value <= MAX_TOKEN_MERGING else 0.0


@contextlib.contextmanager
def token_merging(unet: Any, ratio: float, seed: int) -> Iterator[None]:
    """Merge ``ratio`` of the image tokens in the UNet's highest-resolution attention blocks
    while the context is open. tomesd draws which tokens to merge from a generator it forks from
    torch's global one; we give it one seeded from the image seed, so a seed still means one image."""
    import torch
    if ratio <= 0:
        yield
        return
    try:
        import tomesd
    except ImportError:
        raise OptimizationError("token merging needs the tomesd package: pip install tomesd") from None
    tomesd.apply_patch(unet, ratio=ratio)
    try:
        device = next(unet.parameters()).device
        unet._tome_info["args"]["generator"] = torch.Generator(device=device).manual_seed(int(seed))
        yield
    finally:
        tomesd.remove_patch(unet)
        # remove_patch restores the blocks' classes but leaves its bookkeeping on every module
        for module in unet.modules():
            module.__dict__.pop("_tome_info", None)


class TokenMerging(StepCallback):
    """Token merging for one sampling pass, as a step callback: the UNet is patched when the pass
    starts, seeded from the batch's first seed, and restored when it ends, however it ends."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self._patch: contextlib.AbstractContextManager | None = None

    def on_pass_start(self, run: PassInfo) -> None:
        self._patch = token_merging(run.model.unet, self.ratio, run.seeds[0])
        self._patch.__enter__()

    def on_pass_end(self, run: PassInfo) -> None:
        if self._patch is not None:
            patch, self._patch = self._patch, None
            patch.__exit__(None, None, None)


def compile_cache_dir(data_dir: Path) -> Path:
    return data_dir / "cache" / "torch-compile"


def set_compiled(unet: Any, options: CompileOptions, cache_dir: Path) -> bool:
    """Compile (or un-compile) the UNet's repeated transformer blocks to match ``options``;
    True when something changed. Idempotent: the backend in use is remembered on the UNet."""
    current = getattr(unet, "_studio_compiled", None)
    wanted = options.backend if options.enabled else None
    if current == wanted:
        return False
    blocks = [m for m in unet.modules() if type(m).__name__ in getattr(unet, "_repeated_blocks", ())]
    if wanted is None:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; eager again
        unet._studio_compiled = None
        return True
    if not blocks:
        raise OptimizationError(f"{type(unet).__name__} has no repeated blocks to compile")
    # Inductor reads its cache folder when it first compiles; a user's own setting wins.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    for block in blocks:
        block._compiled_call_impl = None
        # not fullgraph: hypernetwork and ControlNet hooks may break a graph, and a break must
        # fall back to eager for that piece rather than fail the generation
        block.compile(backend=options.backend, dynamic=None)
    unet._studio_compiled = wanted
    log.info("torch.compile (%s) on %d %s blocks; the first generation at each size compiles",
             options.backend, len(blocks), type(blocks[0]).__name__)
    return True
