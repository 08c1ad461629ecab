"""Restoring the faces of a picture: crop each face, run a 512 px face model, paste it back softly.

A1111 finds faces with facexlib (RetinaFace plus five landmarks), warps each onto the FFHQ
template the models were trained on, and pastes the result back through the inverse warp with
an eroded, blurred mask. We have no landmark model (no download, no pickled detector), so each
face is the honest substitute: a square, upright crop around the Haar box of
:mod:`studio.restore.face_boxes`, :data:`CROP_SCALE` times the box side. On the FFHQ template the
eyes are ~127 px apart in 512 px and a frontal Haar box is about twice the eye distance, so a
crop twice the box frames the face at the scale the models expect. What is lost is the
rotation: a tilted head reaches the model tilted, and restores less well than in A1111.

Pixels outside the pasted squares are left bit-for-bit as they were; inside, the model's face is
cross-faded in over the outer :data:`FEATHER` of the square so no seam shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from studio.restore.face_boxes import Box

if TYPE_CHECKING:
    import spandrel

FACE_SIZE = 512  # every released GFPGAN / CodeFormer / RestoreFormer model works on 512 px faces
CROP_SCALE = 2.0
FEATHER = 0.15  # share of the square's side over which the restored face fades in

# A face model call: a [1, 3, 512, 512] face in [-1, 1] to the restored face in [-1, 1].
FaceModel = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Square:
    """A square window in image pixels; it may reach past the image's edges."""

    left: int
    top: int
    side: int


def face_square(box: Box, scale: float = CROP_SCALE) -> Square:
    """The square crop around ``box``: centred on it, ``scale`` times its longer side."""
    side = max(2, round(max(box.width, box.height) * scale))
    centre_x = (box.x0 + box.x1) / 2
    centre_y = (box.y0 + box.y1) / 2
    return Square(round(centre_x - side / 2), round(centre_y - side / 2), side)


def feather_mask(side: int, feather: float = FEATHER) -> np.ndarray:
    """A [side, side] float32 weight: 0 on the outer pixel ring, rising smoothly to 1 inwards.

    The rise is a smoothstep over ``feather * side`` pixels from each edge, so the cross-fade has
    no visible edge of its own (a linear ramp shows a faint line where it reaches 1).
    """
    ramp = max(1.0, feather * side)
    index = np.arange(side, dtype=np.float32)
    edge = np.minimum(index, side - 1 - index)  # distance to the nearer edge along one axis
    distance = np.minimum(edge[:, None], edge[None, :])
    t = np.clip(distance / ramp, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _take(pixels: np.ndarray, square: Square) -> np.ndarray:
    """``square`` of an [H, W, 3] array; the parts outside the image repeat its edge pixels.

    Edge repetition rather than black: a black band would read as part of the face to the model
    and darken what it returns near the image border.
    """
    height, width = pixels.shape[:2]
    x0, y0 = max(0, square.left), max(0, square.top)
    x1, y1 = min(width, square.left + square.side), min(height, square.top + square.side)
    pad = (
        (y0 - square.top, square.top + square.side - y1),
        (x0 - square.left, square.left + square.side - x1),
        (0, 0),
    )
    return np.pad(pixels[y0:y1, x0:x1], pad, mode="edge")


def _resize(batch: Tensor, size: int) -> Tensor:
    # antialias: a face larger than 512 px is shrunk without aliasing, as PIL would
    return F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def restore_face_crop(crop: np.ndarray, model: FaceModel, device: torch.device, dtype: torch.dtype) -> np.ndarray:
    """A [S, S, 3] uint8 crop run through ``model`` at 512 px; the result as float32 [S, S, 3] in 0..255."""
    side = crop.shape[0]
    tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).unsqueeze(0).float().div(255.0)
    face = _resize(tensor.to(device), FACE_SIZE).clamp(0, 1)
    with torch.inference_mode():
        restored = model((face * 2 - 1).to(dtype))
    restored = (restored.float().clamp(-1, 1) + 1) / 2
    back = _resize(restored, side).clamp(0, 1).mul(255)
    return back[0].permute(1, 2, 0).cpu().numpy()


def paste_face(pixels: np.ndarray, restored: np.ndarray, square: Square) -> None:
    """Cross-fade ``restored`` (float [S, S, 3]) into ``pixels`` (uint8 [H, W, 3]) over ``square``, in place.

    Only the part of the square inside the image is written; where the mask is 0 the original
    values come back exactly (integers survive the float round trip).
    """
    height, width = pixels.shape[:2]
    x0, y0 = max(0, square.left), max(0, square.top)
    x1, y1 = min(width, square.left + square.side), min(height, square.top + square.side)
    if x1 <= x0 or y1 <= y0:
        return
    inside = (slice(y0 - square.top, y1 - square.top), slice(x0 - square.left, x1 - square.left))
    mask = feather_mask(square.side)[inside][:, :, None]
    original = pixels[y0:y1, x0:x1].astype(np.float32)
    mixed = original + (restored[inside] - original) * mask
    pixels[y0:y1, x0:x1] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def restore_faces(
    image: Image.Image,
    boxes: Sequence[Box],
    model: FaceModel,
    device: torch.device,
    dtype: torch.dtype,
    scale: float = CROP_SCALE,
) -> Image.Image:
    """``image`` with every face in ``boxes`` restored by ``model``; ``image`` itself if there are none.

    All crops are taken from the original picture (as facexlib does), so where two squares
    overlap the second face is cross-faded over the first one's result, never fed it. The result
    is RGB; an RGBA picture keeps its alpha channel.
    """
    if not boxes:
        return image
    original = np.asarray(image.convert("RGB"))
    pixels = original.copy()
    for box in boxes:
        square = face_square(box, scale)
        restored = restore_face_crop(_take(original, square), model, device, dtype)
        paste_face(pixels, restored, square)
    result = Image.fromarray(pixels, mode="RGB")
    if image.mode == "RGBA":
        result.putalpha(image.getchannel("A"))
    return result


def blend(original: Image.Image, restored: Image.Image, visibility: float) -> Image.Image:
    """A1111's Extras mix (``gfpgan_visibility``, ``codeformer_visibility``): 0 = original, 1 = restored."""
    if visibility >= 1.0:
        return restored
    if visibility <= 0.0:
        return original
    mode = restored.mode
    return Image.blend(original.convert(mode), restored, visibility)


def face_model(descriptor: spandrel.ImageModelDescriptor, codeformer_weight: float) -> FaceModel:
    """The call of ``descriptor``'s network on a face in [-1, 1], per architecture.

    The network is called directly, not through the descriptor: spandrel's call clamps the
    output to [0, 1], which would cut off the dark half of GFPGAN's and CodeFormer's [-1, 1]
    output. GFPGAN runs with the noise maps stored in the file instead of fresh noise each call,
    so the same picture restores the same way every time (the noise weights of a trained model
    are small: film grain, not features). ``codeformer_weight`` is CodeFormer's fidelity (0 = the
    model's own face, 1 = closest to the input), as A1111's ``code_former_weight``.
    """
    network = descriptor.model
    arch = str(descriptor.architecture.id)
    if arch == "GFPGAN":
        return lambda face: network(face, return_rgb=False, randomize_noise=False)[0]
    if arch == "CodeFormer":
        return lambda face: network(face, weight=codeformer_weight)[0]
    if arch == "RestoreFormer":
        return lambda face: network(face)[0]

    # Any other face model spandrel may learn: its own [0, 1] call convention.
    def through_descriptor(face: Tensor) -> Tensor:
        return descriptor((face + 1) / 2) * 2 - 1

    return through_descriptor
