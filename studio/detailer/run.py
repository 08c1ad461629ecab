"""The Detailer's loop: for each unit, detect on the current image, build the masks, and inpaint
each one at full resolution with the unit's prompt and settings (ADetailer's ``postprocess_image``).

The inpaint itself is the caller's (the engine runs a real img2img inpaint on the worker): it gets
the current image, one mask and the request fields to change, and returns the new image, which
the next mask and the next unit start from.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from PIL import Image

from studio.detailer.args import (
    SAME_CHECKPOINT,
    SAME_SAMPLER,
    SAME_SCHEDULER,
    SAME_VAE,
    DetailerConfig,
    DetailerUnit,
    ordinal,
)
from studio.detailer.detectors import DetectorRegistry
from studio.detailer.masks import build_masks, filter_by_ratio, filter_k, touching

log = logging.getLogger(__name__)

# inpaint(image, mask, overrides) -> image; ``overrides`` are Img2ImgRequest field names
InpaintFn = Callable[[Image.Image, Image.Image, dict[str, Any]], Image.Image]

RE_SEP = re.compile(r"\s*\[SEP\]\s*")
RE_SKIP = re.compile(r"^\s*\[SKIP\]\s*$")


def expand_prompts(ad_prompt: str, main_prompt: str) -> list[str]:
    """ADetailer's prompt syntax: "[SEP]" splits it into one prompt per detection (the last one is
    reused for the rest), "[PROMPT]" stands for the main prompt, and an empty part is the main prompt."""
    return [part.replace("[PROMPT]", main_prompt) if part else main_prompt for part in RE_SEP.split(ad_prompt)]


def inpaint_overrides(unit: DetailerUnit) -> dict[str, Any]:
    """The img2img fields a unit sets for each of its inpaints (ADetailer's ``get_i2i_p``). What it
    doesn't set (size, steps, CFG, sampler, ...) stays as the main generation's."""
    o: dict[str, Any] = {
        "denoising_strength": unit.ad_denoising_strength,
        "mask_blur": unit.ad_mask_blur,
        "inpainting_fill": 1,                     # "original": start from the picture, not noise
        "inpaint_full_res": unit.ad_inpaint_only_masked,
        "inpaint_full_res_padding": unit.ad_inpaint_only_masked_padding,
        "inpainting_mask_invert": 0,
        "resize_mode": 0,
        "restore_faces": unit.ad_restore_face,    # ADetailer sets it either way: the main value is not inherited
    }
    if unit.ad_use_inpaint_width_height:
        o["width"], o["height"] = unit.ad_inpaint_width, unit.ad_inpaint_height
    if unit.ad_use_steps:
        o["steps"] = unit.ad_steps
    if unit.ad_use_cfg_scale:
        o["cfg_scale"] = unit.ad_cfg_scale
    if unit.ad_use_sampler:
        if unit.ad_sampler != SAME_SAMPLER:
            o["sampler_name"] = unit.ad_sampler
        if unit.ad_scheduler != SAME_SCHEDULER:
            o["scheduler"] = unit.ad_scheduler
    if unit.ad_use_clip_skip:
        o["clip_skip"] = unit.ad_clip_skip
    settings: dict[str, Any] = {}
    if unit.ad_use_checkpoint and unit.ad_checkpoint and unit.ad_checkpoint not in SAME_CHECKPOINT:
        settings["sd_model_checkpoint"] = unit.ad_checkpoint
    if unit.ad_use_vae and unit.ad_vae and unit.ad_vae not in SAME_VAE:
        settings["sd_vae"] = unit.ad_vae
    if settings:
        o["override_settings"] = settings
    return o


def run_detailer(image: Image.Image, config: DetailerConfig, registry: DetectorRegistry, inpaint: InpaintFn,
                 main_prompt: str, main_negative: str, *, seed: int | None = None, subseed: int | None = None,
                 region: Image.Image | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Detail ``image``: returns the final image and the infotext parameters ADetailer writes.

    ``main_prompt`` / ``main_negative``: this image's prompts (what "[PROMPT]" and empty prompts
    stand for). ``seed`` / ``subseed``: this image's; detection j of a unit is inpainted with
    ``seed + j`` (ADetailer's default), left out of the overrides when None. ``region``: the user's
    mask when the main job is an img2img inpaint of the whole picture — only detections touching it
    are detailed. ``should_stop``: checked before each inpaint (interrupt / skip).
    """
    current = image.convert("RGB")
    for n, unit in config.enabled_units():
        found = registry.detect(unit.ad_model, current, unit.ad_confidence, unit.ad_model_classes)
        found = filter_by_ratio(found, current.size, unit.ad_mask_min_ratio, unit.ad_mask_max_ratio)
        found = filter_k(found, unit.ad_mask_k, unit.ad_mask_filter_method)
        masks = build_masks(found, current.size, dilate=unit.ad_dilate_erode, x_offset=unit.ad_x_offset,
                            y_offset=unit.ad_y_offset, mode=unit.ad_mask_merge_invert)
        if region is not None:
            masks = touching(masks, region)
        if not masks:
            log.info("ADetailer: nothing detected with the %s unit (%s)", ordinal(n + 1), unit.ad_model)
            continue
        prompts = expand_prompts(unit.ad_prompt, main_prompt)
        negatives = expand_prompts(unit.ad_negative_prompt, main_negative)
        base = inpaint_overrides(unit)
        for j, mask in enumerate(masks):
            if should_stop is not None and should_stop():
                return current, config.infotext_params()
            prompt = prompts[min(j, len(prompts) - 1)]
            if RE_SKIP.match(prompt):  # "[SKIP]" for detection j: leave it as it is
                continue
            overrides = {**base, "prompt": prompt, "negative_prompt": negatives[min(j, len(negatives) - 1)]}
            if seed is not None:
                overrides["seed"] = seed + j
            if subseed is not None:
                overrides["subseed"] = subseed + j
            current = inpaint(current, mask, overrides).convert("RGB")
    return current, config.infotext_params()
