"""A1111's "Tiling" option: seamless textures through circular convolution padding.

While :func:`seamless` is active every padded ``nn.Conv2d`` inside the given modules (UNet, VAE)
pads by wrapping around instead of with zeros, so the left edge of the picture sees the right
edge as its neighbour (and the top the bottom) and the result tiles without a seam. The rest of
these networks is already shift-equivariant on a torus: norms and attention have no notion of
position, and up/down-sampling is nearest-neighbour or a strided conv.

torch's ``Conv2d`` applies ``padding_mode`` in ``_conv_forward`` and diffusers' own subclass
(``LoRACompatibleConv``) pads by ``padding_mode`` itself, as do PEFT LoRA layers' inner convs,
which copy the base layer's padding. The one place diffusers pads by hand is ``Downsample2D``
built with ``padding=0`` (the VAE encoder's down-sampling, matching the original LDM code): it
zero-pads one row and column on the bottom/right with ``F.pad`` before an unpadded stride-2
conv. That pad is made circular too, so img2img encodes a tiling image into tiling latents;
A1111 leaves it zero, which only touches the encoder and keeps edges very slightly seamed there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def _padded(conv: nn.Conv2d) -> bool:
    # A string padding is "same" (pads when the kernel is wider than 1) or "valid" (never pads).
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _wrap_bottom_right(_conv: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # The conv's input is Downsample2D's zero-padded tensor: drop that zero row and column and
    # append the first row and column instead, which is the same (0, 1, 0, 1) pad done circularly.
    padded, *rest = args
    return (F.pad(padded[..., :-1, :-1], (0, 1, 0, 1), mode="circular"), *rest)


def _manual_zero_pad(module: nn.Module) -> bool:
    return (
        isinstance(module, Downsample2D)
        and module.use_conv
        and module.padding == 0
        and isinstance(module.conv, nn.Conv2d)
    )


@contextmanager
def seamless(*modules: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Make every padded convolution in ``modules`` wrap around for the duration of the block.

    Each layer's own ``padding_mode`` is put back on exit, exceptions included, so layers that were
    already non-zero-padded stay as they were. ``enabled=False`` makes it a no-op, so a caller can
    write ``with seamless(unet, vae, enabled=request.tiling):``.
    """
    if not enabled:
        yield
        return
    changed: list[tuple[nn.Conv2d, str]] = []
    hooks: list[RemovableHandle] = []
    seen: set[int] = set()
    try:
        for root in modules:
            for module in root.modules():
                # Models may share submodules (and Downsample2D keeps its conv under two names),
                # so each layer is changed once and its recorded mode is its real original one.
                if id(module) in seen:
                    continue
                seen.add(id(module))
                if isinstance(module, nn.Conv2d) and _padded(module) and module.padding_mode != "circular":
                    changed.append((module, module.padding_mode))
                    module.padding_mode = "circular"
                elif _manual_zero_pad(module):
                    hooks.append(module.conv.register_forward_pre_hook(_wrap_bottom_right))
        yield
    finally:
        for handle in reversed(hooks):
            handle.remove()
        for conv, mode in reversed(changed):
            conv.padding_mode = mode
