"""The image ends of generation: latents to pixels and back through the VAE, and the neutral
image conditioning inpainting models get in txt2img.

Big images decode and encode in overlapping tiles (:func:`vae_tiling`), so the VAE's memory stays
about that of a 512² image whatever the size. A VAE that gives NaNs in half precision (SDXL's own,
some SD1 VAEs in fp16) is switched to float32 and the image done again, as A1111's
``auto_vae_precision`` does. The generation loop itself lives in generation/runner.py (all modes)
and generation/sampling.py (the denoising loop).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from studio.models.latent_codec import shift_factor  # noqa: F401 (re-exported)
from studio.models.loader import LoadedModel

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# Above this many pixels the VAE decodes (and encodes) in overlapping 512-px tiles: its memory then stays
# about that of a 512² image whatever the size, instead of growing with it (a 2048² decode would need
# gigabytes of activations). Below it, whole images are exact and as fast.
TILED_VAE_ABOVE = 1024 * 1024
VAE_TILE = 512


@contextmanager
def vae_tiling(vae: Any, width: int, height: int):
    """Tile ``vae`` for one decode/encode of a ``width`` × ``height`` image when it is big; the VAE's own
    settings are put back afterwards."""
    if width * height <= TILED_VAE_ABOVE or not hasattr(vae, "tiled_decode"):
        yield False
        return
    saved = {k: getattr(vae, k, None) for k in ("use_tiling", "tile_sample_min_size", "tile_latent_min_size",
                                                 "tile_overlap_factor")}
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, VAE_TILE, VAE_TILE // 8
    vae.tile_overlap_factor = 0.25
    try:
        yield True
    finally:
        for key, value in saved.items():
            setattr(vae, key, value)


def decode_latents(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    import torch
    vae = model.vae
    codec = model.latent_codec
    images = []
    scale = model.spec.latent.downscale
    height, width = latents.shape[-2] * scale, latents.shape[-1] * scale
    with torch.inference_mode(), vae_tiling(vae, width, height):
        for lat in latents:  # one at a time bounds VAE memory for big batches
            x = codec.to_vae(lat[None]).to(model.policy.device, vae.dtype)
            px = vae.decode(x).sample
            if torch.isnan(px).any() and vae.dtype != torch.float32:
                log.warning("VAE produced NaNs in %s; retrying this decode in float32", vae.dtype)
                vae.to(torch.float32)
                px = vae.decode(x.float()).sample
            px = (px[0].float() / 2 + 0.5).clamp(0, 1)
            arr = (px.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            images.append(Image.fromarray(arr))
    return images


def encode_images(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> scaled latents (the distribution's mean: deterministic)."""
    import torch
    vae = model.vae
    with torch.inference_mode(), vae_tiling(vae, pixels.shape[-1], pixels.shape[-2]):
        x = pixels.to(model.policy.device, vae.dtype)
        lat = vae.encode(x).latent_dist.mode()
        if torch.isnan(lat).any() and vae.dtype != torch.float32:
            vae.to(torch.float32)
            lat = vae.encode(x.float()).latent_dist.mode()
    return model.latent_codec.from_vae(lat.float())


def txt2img_image_conditioning(model: Any, batch: int, height: int, width: int) -> torch.Tensor:
    """9-channel UNets in txt2img get a full mask over a neutral gray image (A1111's
    ``txt2img_image_conditioning``): channel order mask(1) + masked-image latents(4)."""
    import torch
    gray = torch.zeros(1, 3, height, width)
    lat = encode_images(model, gray)
    mask = torch.ones(1, 1, height // 8, width // 8, device=lat.device, dtype=lat.dtype)
    return torch.cat([mask, lat], dim=1).expand(batch, -1, -1, -1).float()
