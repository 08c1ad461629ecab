"""Model upscalers: reading a file with spandrel and running it over an image in tiles.

The file is read here, not by spandrel's own loader: its ``.pt`` path tries ``torch.jit.load``
(a TorchScript archive carries code), so pickles go through ``torch.load(weights_only=True)``,
which rebuilds tensors and plain containers only, and safetensors through ``safetensors``.
spandrel then only sees a state dict, from which it works out the architecture and its sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from safetensors import SafetensorError

from studio.networks.files import load_weights_only, pickle_failure_message
from studio.upscale.errors import UpscalerError

if TYPE_CHECKING:  # spandrel takes ~2 s to import: only when a model file is first used
    import spandrel
    import torch
    from torch import Tensor

MODEL_SUFFIXES = (".pth", ".pt", ".safetensors")

# Face restorers (GFPGAN, CodeFormer) and inpainters are recognised by spandrel too, but they
# do something else than enlarging a whole picture.
_UPSCALING_PURPOSES = ("SR", "Restoration")
_IMAGE_MODES: Mapping[int, str] = MappingProxyType({1: "L", 3: "RGB"})


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of ``path`` (``.pth``/``.pt``/``.ckpt`` pickle or ``.safetensors``), on the CPU.

    Wrappers trainers put around the weights (``params_ema``, ``state_dict``, a ``module.``
    prefix, ...) are removed the way spandrel expects; non-tensor entries are dropped.
    """
    import spandrel
    from safetensors.torch import load_file
    from torch import Tensor

    suffix = path.suffix.lower()
    raw: Any
    if suffix == ".safetensors":
        try:
            raw = load_file(str(path), device="cpu")
        except FileNotFoundError as exc:
            raise UpscalerError(f"{path}: file not found") from exc
        except (SafetensorError, OSError, ValueError) as exc:
            raise UpscalerError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            raw = load_weights_only(path)
        except FileNotFoundError as exc:
            raise UpscalerError(f"{path}: file not found") from exc
        except Exception as exc:
            raise UpscalerError(_pickle_message(path, exc)) from exc
    if not isinstance(raw, Mapping):
        raise UpscalerError(f"{path}: holds a {type(raw).__name__}, not a state dict of model weights")
    try:
        state = spandrel.canonicalize_state_dict(
            {key: value for key, value in raw.items() if isinstance(key, str)}
        )
    except (AttributeError, TypeError) as exc:  # a nested dict keyed by something else than names
        raise UpscalerError(f"{path}: does not hold a state dict of model weights") from exc
    tensors = {
        key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, Tensor)
    }
    if not tensors:
        raise UpscalerError(f"{path}: holds no model weights")
    return tensors


def _pickle_message(path: Path, exc: Exception) -> str:
    return pickle_failure_message(path, exc, "an upscaler model")


def load_model(path: Path) -> spandrel.ImageModelDescriptor:
    """The upscaler model in ``path``, on the CPU in float32 and in eval mode.

    Every failure is an :class:`UpscalerError` naming the file: unreadable, refused pickle, an
    architecture spandrel does not know, weights that do not fit it, or a model that is no
    upscaler.
    """
    import spandrel

    state = read_state_dict(path)
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError as exc:
        raise UpscalerError(
            f"{path}: not an upscaler model spandrel recognises ({len(state)} tensors, none of the "
            "known architectures' key layouts)"
        ) from exc
    except Exception as exc:
        # Detection matched an architecture but the weights did not fit it (truncated or edited file).
        raise UpscalerError(f"{path}: looks like an upscaler but its weights do not load ({exc})") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(
            f"{path}: is a {descriptor.architecture.name} {descriptor.purpose} model, not an upscaler"
        )
    if descriptor.purpose not in _UPSCALING_PURPOSES:
        raise UpscalerError(
            f"{path}: is a {descriptor.architecture.name} {descriptor.purpose} model, not an upscaler"
        )
    if descriptor.input_channels not in _IMAGE_MODES or descriptor.output_channels not in _IMAGE_MODES:
        raise UpscalerError(
            f"{path}: the model maps {descriptor.input_channels} to {descriptor.output_channels} channels; "
            "only grayscale and RGB models are supported"
        )
    return descriptor.float().eval()


def place_model(
    descriptor: spandrel.ImageModelDescriptor, device: torch.device, dtype: torch.dtype
) -> spandrel.ImageModelDescriptor:
    """``descriptor`` moved to ``device`` in the closest dtype it can run in there."""
    import torch
    wanted = dtype
    if device.type == "cpu" and wanted == torch.float16:
        # CPU half-precision convolutions are missing or far slower than float32.
        wanted = torch.float32
    if (wanted == torch.float16 and not descriptor.supports_half) or (
        wanted == torch.bfloat16 and not descriptor.supports_bfloat16
    ):
        wanted = torch.float32
    if descriptor.device != device or descriptor.dtype != wanted:
        descriptor.to(device=device, dtype=wanted)
    return descriptor


# ---------------------------------------------------------------------------------------------
# Running


def image_to_tensor(image: Image.Image, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``image`` as a [1, channels, H, W] tensor in [0, 1]."""
    import torch
    array = np.asarray(image.convert(_IMAGE_MODES[channels]), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    # contiguous: tiles sliced from a permuted (channels-last) array hit a conv path ~10x slower
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
    return tensor.to(device=device, dtype=dtype)


def tensor_to_image(tensor: Tensor) -> Image.Image:
    """A [1, 1|3, H, W] tensor in [0, 1] as an RGB image."""
    import torch
    array = tensor[0].float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L").convert("RGB")
    return Image.fromarray(array, mode="RGB")


def tile_spans(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, end) of windows about ``tile`` long covering ``length``, neighbours sharing >= ``overlap``.

    The windows are spread evenly rather than stepped from 0, so no last tile ends up almost on
    top of its neighbour with a thin, badly blended strip. Starts are multiples of ``align``:
    a model that pixel-unshuffles its input sees other sub-pixels at an odd offset and would
    give a different picture; the last window stretches to the end to make up for the rounding.
    """
    align = max(1, align)
    tile = max(align, tile - tile % align)
    if length <= tile:
        return [(0, length)]
    # Rounding a start down can take up to align - 1 pixels off the overlap with the next window.
    needed = min(overlap + align - 1, tile // 2)
    count = math.ceil((length - needed) / (tile - needed))
    span = length - tile
    starts = sorted({round(span * i / (count - 1)) // align * align for i in range(count)})
    ends = [min(start + tile, length) for start in starts[:-1]] + [length]
    return list(zip(starts, ends))


def _ramp(size: int, lead: int, trail: int) -> Tensor:
    """Blend weights along one axis of a tile: rising over ``lead`` px, falling over ``trail`` px.

    Where two tiles overlap their ramps add up to one, so the blend is a straight cross-fade.
    """
    import torch
    weights = torch.ones(size)
    if lead > 0:
        weights[:lead] = torch.minimum(weights[:lead], (torch.arange(lead) + 0.5) / lead)
    if trail > 0:
        falling = (trail - torch.arange(trail) - 0.5) / trail
        weights[size - trail :] = torch.minimum(weights[size - trail :], falling)
    return weights


def _axis_weights(spans: list[tuple[int, int]], scale: int) -> list[Tensor]:
    ramps = []
    for i, (start, end) in enumerate(spans):
        lead = (spans[i - 1][1] - start) * scale if i > 0 else 0
        trail = (end - spans[i + 1][0]) * scale if i + 1 < len(spans) else 0
        ramps.append(_ramp((end - start) * scale, max(0, lead), max(0, trail)))
    return ramps


def run_model(descriptor: spandrel.ImageModelDescriptor, image: Tensor, tile: int, overlap: int) -> Tensor:
    """One pass of the model over ``image`` ([1, C, H, W]), in overlapping tiles if it is large.

    ``tile`` is the input tile side in pixels (0 or less: whole image at once). Tiles are
    cross-faded over their overlap in float32 so no seam shows where a tile's border pixels,
    which saw zero padding instead of their neighbours, would otherwise meet.
    """
    import spandrel
    import torch

    _, _, height, width = image.shape
    untiled = (
        tile <= 0 or (height <= tile and width <= tile) or descriptor.tiling == spandrel.ModelTiling.INTERNAL
    )
    if untiled:
        return descriptor(image)
    scale = descriptor.scale
    align = descriptor.size_requirements.multiple_of
    ys = tile_spans(height, tile, max(0, overlap), align)
    xs = tile_spans(width, tile, max(0, overlap), align)
    y_weights = _axis_weights(ys, scale)
    x_weights = _axis_weights(xs, scale)
    out = torch.zeros(1, descriptor.output_channels, height * scale, width * scale, device=image.device)
    total = torch.zeros(1, 1, height * scale, width * scale, device=image.device)
    for (y0, y1), wy in zip(ys, y_weights):
        for (x0, x1), wx in zip(xs, x_weights):
            piece = descriptor(image[:, :, y0:y1, x0:x1].contiguous()).float()
            weight = (wy[:, None] * wx[None, :]).to(image.device)
            rows = slice(y0 * scale, y1 * scale)
            cols = slice(x0 * scale, x1 * scale)
            out[:, :, rows, cols] += piece * weight
            total[:, :, rows, cols] += weight
    return out / total
