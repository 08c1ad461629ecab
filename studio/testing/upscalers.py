"""Writer for tiny ESRGAN (RRDBNet) upscaler files in the two key layouts found in the wild.

"new" is BasicSR's / Real-ESRGAN's naming (``conv_first``, ``body.{i}.rdb{j}.conv{k}``,
``conv_body``, ``conv_up1``/``conv_up2``, ``conv_hr``, ``conv_last``); a 2x or 1x model in that
layout keeps both upsampling convs and takes a pixel-unshuffled input (12 or 48 channels), as
RealESRGAN_x2plus does. "old" is the original ESRGAN ``model.{n}`` Sequential, with one
``nearest upsample, conv, LeakyReLU`` triple per doubling. The keys are worked out here rather
than taken from spandrel's module, so a test that loads these files checks spandrel's detection
on an independent layout.

The weights are not random noise alone: each conv carries an identity on its first three
channels plus noise, so the network roughly repeats the input pixels, the output is a picture
(finite, in range, following the input) and it still differs from any PIL resampler.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

# spandrel builds RRDB blocks with a growth of 32 channels whatever the file says, so that is
# the only growth a file can have and still load.
SPANDREL_GROWTH = 32
_NEW_SCALES = {4: 1, 2: 2, 1: 4}  # scale -> pixel-unshuffle factor of the input


def write_esrgan(
    path: Path,
    scale: int = 4,
    nf: int = 8,
    nb: int = 1,
    gc: int = SPANDREL_GROWTH,
    seed: int = 0,
    layout: str = "new",
    noise: float = 0.1,
    wrap: str | None = None,
) -> Path:
    """Write a tiny RRDBNet of ``nb`` blocks and ``nf`` features to ``path``; returns ``path``.

    ``path``'s suffix picks the format: ``.safetensors``, or a ``torch.save`` pickle of the plain
    state dict for anything else (``.pth``, ``.pt``). ``wrap`` (pickles only) nests the state dict
    under that key, as BasicSR's ``params_ema`` files do. "new" supports scales 1, 2 and 4; "old"
    1, 2, 4 and 8. ``noise`` sets how far the weights stray from copying the input.
    """
    state = esrgan_state_dict(scale=scale, nf=nf, nb=nb, gc=gc, seed=seed, layout=layout, noise=noise)
    return write_weights(path, state, wrap)


def write_weights(path: Path, state: dict[str, Tensor], wrap: str | None = None) -> Path:
    """``state`` as the file a user has: ``.safetensors`` (flat tensors), else a ``torch.save`` pickle,
    nested under ``wrap`` when given (BasicSR's ``params_ema``). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        if wrap is not None:
            raise ValueError("safetensors files hold flat tensors only; wrap needs a pickle")
        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap is not None else state, path)
    return path


def esrgan_state_dict(
    scale: int = 4,
    nf: int = 8,
    nb: int = 1,
    gc: int = SPANDREL_GROWTH,
    seed: int = 0,
    layout: str = "new",
    noise: float = 0.1,
) -> dict[str, Tensor]:
    """The tensors :func:`write_esrgan` writes."""
    if nf < 3:
        raise ValueError("nf must be at least 3 (the identity path uses three channels)")
    generator = torch.Generator().manual_seed(seed)

    def conv(out_ch: int, in_ch: int, identity: dict[int, int] | None = None) -> tuple[Tensor, Tensor]:
        std = noise / math.sqrt(in_ch * 9)
        weight = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * std
        for dst, src in (identity or {}).items():
            weight[dst, src, 1, 1] += 1.0
        bias = torch.randn(out_ch, generator=generator) * noise * 0.1
        return weight, bias

    rgb = {k: k for k in range(3)}
    if layout == "new":
        if scale not in _NEW_SCALES:
            raise ValueError(f"the new layout has scales {sorted(_NEW_SCALES)}, not {scale}")
        factor = _NEW_SCALES[scale]
        # pixel_unshuffle puts channel c's sub-pixels at c*f*f ... c*f*f + f*f - 1; take the first.
        first = {k: k * factor * factor for k in range(3)}
        names = {"first": "conv_first", "body": "conv_body", "hr": "conv_hr", "last": "conv_last"}
        ups = ["conv_up1", "conv_up2"]
        in_ch = 3 * factor * factor

        def rdb_key(block: int, rdb: int, index: int) -> str:
            return f"body.{block}.rdb{rdb}.conv{index}"
    elif layout == "old":
        if scale not in (1, 2, 4, 8):
            raise ValueError(f"the old layout has scales 1, 2, 4 and 8, not {scale}")
        doublings = int(math.log2(scale))
        first = rgb
        names = {
            "first": "model.0",
            "body": f"model.1.sub.{nb}",
            "hr": f"model.{3 * doublings + 2}",
            "last": f"model.{3 * doublings + 4}",
        }
        ups = [f"model.{3 * (i + 1)}" for i in range(doublings)]
        in_ch = 3

        def rdb_key(block: int, rdb: int, index: int) -> str:
            return f"model.1.sub.{block}.RDB{rdb}.conv{index}.0"
    else:
        raise ValueError(f"layout must be 'new' or 'old', not {layout!r}")

    state: dict[str, Tensor] = {}

    def put(name: str, pair: tuple[Tensor, Tensor]) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = pair

    put(names["first"], conv(nf, in_ch, first))
    for block in range(nb):
        for rdb in (1, 2, 3):
            for index in range(1, 5):
                put(rdb_key(block, rdb, index), conv(gc, nf + (index - 1) * gc))
            put(rdb_key(block, rdb, 5), conv(nf, nf + 4 * gc))
    put(names["body"], conv(nf, nf))
    for name in ups:
        put(name, conv(nf, nf, rgb))
    put(names["hr"], conv(nf, nf, rgb))
    put(names["last"], conv(3, nf, rgb))
    return state
