"""img2img and inpainting on the shared generation loop.

The steps follow A1111's ``StableDiffusionProcessingImg2Img``:

1. the init image is brought to the generation size with the resize mode; with a mask and
   "Only masked", the mask's bounding box plus padding (grown to the generation's aspect
   ratio) is cut out and brought to the generation size instead;
2. masked content "fill" paints the masked area with colours from its surroundings first;
3. the image is encoded; the sampler enters the schedule at the denoising strength
   (generation/sampling.py); with a mask, the unmasked area stays on the init latents and
   9-channel inpainting models also get mask + masked-image latents;
4. the decoded image is composited over the original with the blurred mask, so pixels
   outside the mask are the original ones; "Only masked" pastes the crop back first.

Denoising strength 0 decodes the init latents without sampling (A1111 runs one step at the
smallest sigma, which changes nothing visible either).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from studio.generation import imageops
from studio.generation.request import INPAINT_FILL, Img2ImgRequest
from studio.generation.sampling import encode_images
from studio.generation.txt2img import GenerationResult, ModeHooks, run_txt2img
from studio.jobs import JobState

LATENT_UPSCALE = 3  # resize mode "Just resize (latent upscale)"


@dataclass
class PreparedImage:
    """One init image, ready for the loop."""

    original: Image.Image                 # the user's image, RGB (compositing target)
    work: Image.Image                     # what is encoded, at the generation size
    overlay_mask: Image.Image | None      # blurred mask at the original's size, for compositing
    work_mask: Image.Image | None         # mask at the generation size, for the latent mask
    box: tuple[int, int, int, int] | None  # "Only masked" crop in the original
    notes: list[str] = field(default_factory=list)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def prepare(req: Img2ImgRequest, image: Image.Image) -> PreparedImage:
    original = imageops.normalize_image(image)
    if req.mask is None:
        if req.resize_mode == LATENT_UPSCALE:
            # encoded at its own size (to a multiple of 8); the latents are resized instead
            w, h = max(8, original.width // 8 * 8), max(8, original.height // 8 * 8)
            work = original if (w, h) == original.size else original.resize((w, h), Image.Resampling.LANCZOS)
        else:
            work = imageops.resize_image(req.resize_mode, original, req.width, req.height)
        return PreparedImage(original, work, None, None, None)
    mask, notes = imageops.normalize_mask(req.mask, original.size)
    if req.inpainting_mask_invert:
        mask = imageops.invert_mask(mask)
    overlay = imageops.blur_mask(mask, req.mask_blur_x, req.mask_blur_y)
    box = None
    if req.inpaint_full_res:
        box = imageops.crop_region(mask, req.inpaint_full_res_padding)
        box = imageops.expand_to_aspect(box, req.width, req.height, *original.size)
        work = imageops.extract_crop(original, box, req.width, req.height)
        work_mask = imageops.extract_crop(overlay, box, req.width, req.height)
    else:
        work = imageops.resize_image(req.resize_mode, original, req.width, req.height)
        work_mask = imageops.resize_image(req.resize_mode, overlay, req.width, req.height)
    if INPAINT_FILL[req.inpainting_fill] == "fill":
        work = imageops.fill_masked(work, work_mask)
    return PreparedImage(original, work, overlay, work_mask.convert("L"), box, notes)


def latent_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """The mask at latent size, rounded to 0/1 as A1111's ``latmask``."""
    small = mask.resize((width // 8, height // 8), Image.Resampling.BILINEAR)
    arr = np.round(np.asarray(small, dtype=np.float32) / 255.0)
    return torch.from_numpy(arr)[None, None]


def run_img2img(model: Any, req: Img2ImgRequest, state: JobState, outdir: Path | None, preview_every: int = 0,
                networks: Any = None, vae: Any = None, controls: Any = None, save_format: Any = None) -> GenerationResult:
    prepared = [prepare(req, image) for image in req.init_images]
    if controls and prepared[0].box is not None:
        controls = controls.cropped(prepared[0].box, prepared[0].original.size)
    notes = [n for p in prepared for n in p.notes]
    latent_ch = model.vae.config.latent_channels
    nine_channel = model.unet.config.in_channels == latent_ch + 5
    init_cache: dict[int, torch.Tensor] = {}

    def item(index: int) -> PreparedImage:
        return prepared[index % len(prepared)]

    def init_latents(index: int) -> torch.Tensor:
        key = index % len(prepared)
        if key not in init_cache:
            lat = encode_images(model, to_tensor(prepared[key].work))
            target = (req.height // 8, req.width // 8)
            if tuple(lat.shape[2:]) != target:  # "Just resize (latent upscale)"
                lat = torch.nn.functional.interpolate(lat, size=target, mode="bilinear")
            init_cache[key] = lat
        return init_cache[key]

    def batch_items(batch_index: int, seeds: list[int]) -> list[int]:
        return [batch_index * req.batch_size + j for j in range(len(seeds))]

    def spec_extras(batch_index: int, seeds: list[int]) -> dict[str, Any]:
        indices = batch_items(batch_index, seeds)
        extras: dict[str, Any] = {"init_latents": torch.cat([init_latents(i) for i in indices]),
                                  "strength": req.denoising_strength}
        masks = [item(i).work_mask for i in indices]
        if masks[0] is not None:
            device = model.policy.device
            lat_masks = torch.cat([latent_mask(m, req.width, req.height) for m in masks]).to(device)
            extras["mask"] = lat_masks
            fill = INPAINT_FILL[req.inpainting_fill]
            extras["latent_fill"] = fill if fill in ("latent noise", "latent nothing") else None
            if nine_channel:
                extras["image_conditioning"] = torch.cat(
                    [inpaint_conditioning(model, item(i).work, m) for i, m in zip(indices, masks)])
        elif nine_channel:
            extras["image_conditioning"] = torch.cat(
                [inpaint_conditioning(model, item(i).work, None) for i in indices])
        return extras

    def decode(batch_index: int, seeds: list[int]) -> torch.Tensor | None:
        if req.denoising_strength > 0:
            return None
        return torch.cat([init_latents(i) for i in batch_items(batch_index, seeds)])

    def postprocess(index: int, image: Image.Image) -> Image.Image:
        p = item(index)
        if p.overlay_mask is None:
            return image
        if p.box is not None:
            pasted = imageops.paste_crop(p.original, image, p.box)
            return imageops.composite(p.original, pasted, p.overlay_mask)
        original = imageops.resize_image(req.resize_mode, p.original, req.width, req.height)
        mask = imageops.resize_image(req.resize_mode, p.overlay_mask, req.width, req.height).convert("L")
        # A1111 doubles the blurred mask for "Whole picture" before overlaying: the generated
        # pixels win over the inner half of the blur, the original fades in over the outer half
        doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        return imageops.composite(original, image, Image.fromarray(doubled, "L"))

    params: dict[str, Any] = {"Denoising strength": f"{req.denoising_strength:g}"}
    if req.mask is not None:
        params["Mask blur"] = max(req.mask_blur_x, req.mask_blur_y)
        if req.inpainting_mask_invert:
            params["Mask mode"] = "Inpaint not masked"
        params["Masked content"] = INPAINT_FILL[req.inpainting_fill]
        if req.inpaint_full_res:
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = req.inpaint_full_res_padding
    hooks = ModeHooks(spec_extras=spec_extras, postprocess=postprocess, decode=decode, params=params,
                      denoising_strength=req.denoising_strength)
    req = req.with_changes(notes=tuple([*req.notes, *notes]))
    return run_txt2img(model, req, state, outdir, preview_every, networks=networks, vae=vae, hooks=hooks,
                       controls=controls, save_format=save_format)


def inpaint_conditioning(model: Any, image: Image.Image, mask: Image.Image | None) -> torch.Tensor:
    """9-channel models' extra input: the rounded mask at latent size + the latents of the image
    with the masked area blanked (A1111 ``inpainting_image_conditioning``; no mask = all masked)."""
    pixels = to_tensor(image)
    if mask is None:
        m = torch.ones(1, 1, *pixels.shape[2:])
    else:
        m = torch.from_numpy(np.round(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0))[None, None]
    masked = pixels * (1 - m)
    lat = encode_images(model, masked)
    small = torch.nn.functional.interpolate(m, size=lat.shape[2:]).to(lat.device, lat.dtype)
    return torch.cat([small, lat], dim=1)
