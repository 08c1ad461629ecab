"""img2img and inpainting on the shared generation loop.

The steps follow A1111's ``StableDiffusionProcessingImg2Img``:

1. the init image is brought to the generation size with the resize mode (enlarged by the
   ``upscale`` callable, A1111's ``upscaler_for_img2img``, where it grows); with a mask and
   "Only masked", the blurred mask's bounding box plus padding (grown to the generation's
   aspect ratio) is cut out and brought to the generation size instead;
2. unless masked content is "original", the masked area is painted with colours from its
   surroundings first (A1111 fills for "latent noise" / "latent nothing" too: the encoded
   latents next to the mask, and 9-channel conditioning, see the filled picture);
3. the image is encoded; the sampler enters the schedule at the denoising strength
   (generation/sampling.py); with a mask, the unmasked area stays on the init latents and
   9-channel inpainting models also get mask + masked-image latents;
4. with ``color_correction`` (A1111's ``img2img_color_correction``) each decoded image's colour
   histogram is matched to the (filled) init image's;
5. the original is laid back over the result with the blurred mask, so pixels outside the
   mask are the original ones; "Only masked" pastes the crop back first.

The pixel steps are in generation/img2img_pixels.py.

Denoising strength 0 decodes the init latents without sampling (A1111 runs one step at the
smallest sigma, which changes nothing visible either).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from studio.generation import imageops
from studio.generation import img2img_pixels as pixels
from studio.generation.img2img_pixels import Upscale
from studio.generation.request import INPAINT_FILL, Img2ImgRequest
from studio.generation.sampling import encode_images
from studio.generation.runner import GenerationResult, ModeHooks, run_generation
from studio.jobs import JobState

LATENT_UPSCALE = 3  # resize mode "Just resize (latent upscale)"


@dataclass
class PreparedImage:
    """One init image, ready for the loop."""

    original: Image.Image                 # the user's image, RGB
    work: Image.Image                     # what is encoded, at the generation size
    overlay_base: Image.Image | None      # what is laid back over the result: the original ("Only
                                          # masked") or the resized init image ("Whole picture")
    overlay_mask: Image.Image | None      # its mask: blurred at the original's size, or blurred, resized
                                          # and doubled at the generation size (A1111's mask_for_overlay)
    work_mask: Image.Image | None         # mask at the generation size, for the latent mask
    box: tuple[int, int, int, int] | None  # "Only masked" crop in the original
    notes: list[str] = field(default_factory=list)
    color_reference: np.ndarray | None = None  # LAB init image, with colour correction


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] in [-1, 1] (diffusers' VaeImageProcessor steps, A1111's arithmetic)."""
    p = VaeImageProcessor
    return p.normalize(p.numpy_to_pt(p.pil_to_numpy(image.convert("RGB"))))


def _latent_upscale_source(original: Image.Image) -> Image.Image:
    # encoded at its own size (to a multiple of 8); the latents are resized instead
    w, h = max(8, original.width // 8 * 8), max(8, original.height // 8 * 8)
    return original if (w, h) == original.size else original.resize((w, h), Image.Resampling.LANCZOS)


def prepare(req: Img2ImgRequest, image: Image.Image, upscale: Upscale | None = None,
            color_correction: bool = False) -> PreparedImage:
    """One init image through A1111's img2img preparation (``StableDiffusionProcessingImg2Img.init``)."""
    original = imageops.normalize_image(image)
    if req.mask is None:
        if req.resize_mode == LATENT_UPSCALE:
            work = _latent_upscale_source(original)
        else:
            work = pixels.resize_image(req.resize_mode, original, req.width, req.height, upscale)
        return PreparedImage(original, work, None, None, None, None,
                             color_reference=pixels.color_reference(work) if color_correction else None)
    mask, notes = imageops.normalize_mask(req.mask, original.size, round_alpha=req.mask_round)
    if req.inpainting_mask_invert:
        mask = imageops.invert_mask(mask)
    blurred = pixels.blur_mask(mask, req.mask_blur_x, req.mask_blur_y)
    box = None
    if req.inpaint_full_res:
        # A1111 takes the region of the blurred mask; an empty mask crops nothing away
        box = pixels.crop_region(blurred, req.inpaint_full_res_padding, req.width, req.height) \
            or (0, 0, *original.size)
        work = pixels.extract_crop(original, box, req.width, req.height, upscale)
        work_mask = pixels.extract_crop(blurred, box, req.width, req.height)
        overlay_base, overlay_mask = original, blurred
    else:
        work = pixels.resize_image(req.resize_mode, original, req.width, req.height, upscale)
        work_mask = pixels.resize_image(req.resize_mode, blurred, req.width, req.height)
        overlay_base, overlay_mask = work, pixels.double_mask(work_mask)
    if INPAINT_FILL[req.inpainting_fill] != "original":
        work = pixels.fill_masked(work, work_mask)
    return PreparedImage(original, work, overlay_base, overlay_mask, work_mask, box, notes,
                         color_reference=pixels.color_reference(work) if color_correction else None)


def latent_mask(mask: Image.Image, width: int, height: int, round_mask: bool = True, scale: int = 8) -> torch.Tensor:
    """The mask at latent size (``scale`` pixels per latent cell: 8, 16 for FLUX.2), rounded to 0/1 as
    A1111's ``latmask`` when ``round_mask`` (its ``mask_round``; off keeps the soft edge), resized with
    Pillow's default filter, bicubic, as A1111's ``.resize()`` without one."""
    small = mask.convert("L").resize((width // scale, height // scale), Image.Resampling.BICUBIC)
    arr = np.asarray(small, dtype=np.float32) / 255.0
    arr = np.round(arr) if round_mask else arr
    return torch.from_numpy(arr)[None, None]


def run_img2img(model: Any, req: Img2ImgRequest, state: JobState, controls: Any = None,
                color_correction: bool = False, upscale: Upscale | None = None, **options: Any) -> GenerationResult:
    """img2img / inpainting as hooks on the generic runner; ``options`` go to ``run_generation`` as they
    are (saver, previews, networks, VAE, ENSD, NGMS...). ``color_correction``: A1111's ``img2img_color_correction``. ``upscale(image, width, height)``:
    A1111's ``upscaler_for_img2img``, used where an init image (or an "Only masked" crop, or the crop
    pasted back) is enlarged; None resizes with Lanczos."""
    prepared = [prepare(req, image, upscale, color_correction) for image in req.init_images]
    if controls and prepared[0].box is not None:
        controls = controls.cropped(prepared[0].box, prepared[0].original.size)
    notes = [n for p in prepared for n in p.notes]
    latent_ch = model.vae.config.latent_channels
    scale = model.spec.latent.downscale   # pixels per latent cell of the sampler's latents
    nine_channel = model.unet.config.in_channels == latent_ch + 5
    flux_fill = model.spec.is_flow and model.probe.variant == "fill"
    kontext = model.spec.is_flow and model.probe.variant == "kontext"
    init_cache: dict[int, torch.Tensor] = {}

    def item(index: int) -> PreparedImage:
        return prepared[index % len(prepared)]

    def init_latents(index: int) -> torch.Tensor:
        key = index % len(prepared)
        if key not in init_cache:
            lat = encode_images(model, to_tensor(prepared[key].work))
            target = (req.height // scale, req.width // scale)
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
        if kontext:
            # FLUX Kontext edits the init image: it is a reference input, the sample starts from noise
            extras["reference_latents"] = extras.pop("init_latents")
            extras.pop("strength")
            return extras
        if flux_fill:
            # FLUX Fill repaints from the masked image and the mask it is given as input, with no blending
            extras["image_conditioning"] = torch.cat(
                [fill_conditioning(model, item(i).work, m) for i, m in zip(indices, masks)])
            return extras
        if masks[0] is not None:
            device = model.policy.device
            lat_masks = torch.cat([latent_mask(m, req.width, req.height, req.mask_round, scale) for m in masks])
            lat_masks = lat_masks.to(device)
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
        if p.color_reference is not None:
            # before the overlay, as A1111: the original laid back keeps its own colours
            image = pixels.correct_colors(image, p.color_reference)
        if p.overlay_mask is None:
            return image
        return pixels.overlay(p.overlay_base, image, p.overlay_mask, p.box, upscale)

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
    return run_generation(model, req, state, hooks=hooks, controls=controls, **options)


def fill_conditioning(model: Any, image: Image.Image, mask: Image.Image | None) -> torch.Tensor:
    """FLUX.1 Fill's extra input (``FluxFillPipeline.prepare_mask_latents``): the latents of the image with
    the masked area blanked (16 channels), then the binarized pixel mask folded into 64 channels, one per
    pixel of a latent cell's 8x8 block; [1, 80, h, w], packed with the latents by the denoiser."""
    pixels = to_tensor(image)
    if mask is None:
        m = torch.ones(1, 1, *pixels.shape[2:])
    else:
        m = torch.from_numpy((np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))
        m = m[None, None]
    lat = encode_images(model, pixels * (1 - m))
    h, w = lat.shape[2:]
    folded = m[:, 0].view(1, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(1, 64, h, w)
    return torch.cat([lat, folded.to(lat.device, lat.dtype)], dim=1)


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
