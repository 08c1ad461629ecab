"""txt2img: our own thin sampler loop over diffusers models and schedulers.

Owning the loop (rather than calling StableDiffusionPipeline) lets one place handle
interrupt/skip between steps, throttled previews, per-image seeds and, later, prompt
schedules and ControlNet, without re-wrapping a pipeline for each feature.

Noise is drawn on the CPU from one generator per image seeded ``seed + index`` (A1111's
batch rule), so a seed gives the same image on any device and in any batch position;
the same generators feed ancestral samplers' per-step noise.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from studio import __version__
from studio.generation.hires import infotext_params as hires_params
from studio.generation.hires import make_plan, second_pass
from studio.generation.infotext import build_infotext
from studio.generation.noise import batch_seeds
from studio.generation.outputs import save_image
from studio.generation.request import Txt2ImgRequest, resolve_seed
from studio.generation.samplers import effective_schedule, split_sampler_name
from studio.generation.sampling import BatchSpec, sample
from studio.generation.tiling import seamless
from studio.jobs import JobState
from studio.models.loader import LoadedModel
from studio.networks.activation import ExtraNetworks, NetworkActivation
from studio.optimizations import token_merging
from studio.prompts.parser import extract_extra_networks
from studio.prompts.schedule import ConditioningPlan

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    paths: list[Path]
    request: Txt2ImgRequest
    model: LoadedModel
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    vae: Any = None            # the external VaeInfo in use, None = the checkpoint's own
    subseeds: list[int] = field(default_factory=list)
    denoising_strength: float | None = None
    extra_params: dict[str, Any] = field(default_factory=dict)   # infotext keys of the mode (img2img)
    detected_maps: list[Image.Image] = field(default_factory=list)  # ControlNet maps to show with the images

    def info(self) -> dict[str, Any]:
        """A1111's ``Processed.js()`` keys (served as a JSON string in ``info``)."""
        req, m = self.request, self.model
        return {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * len(self.images),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(self.images),
            "seed": self.seeds[0] if self.seeds else req.seed,
            "all_seeds": self.seeds,
            "subseed": self.subseeds[0] if self.subseeds else req.subseed,
            "all_subseeds": self.subseeds,
            "subseed_strength": req.subseed_strength,
            "width": req.width,
            "height": req.height,
            "sampler_name": req.sampler_name,
            "scheduler": req.scheduler,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": m.info.name_for_extra,
            "sd_model_hash": m.info.shorthash,
            "sd_vae_name": self.vae.filename if self.vae else None,
            "sd_vae_hash": self.vae.shorthash if self.vae else None,
            "seed_resize_from_w": req.seed_resize_from_w or -1,
            "seed_resize_from_h": req.seed_resize_from_h or -1,
            "denoising_strength": self.denoising_strength,
            "extra_generation_params": self.extra_params,
            "index_of_first_image": 0,
            "infotexts": self.infotexts,
            "styles": [],
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
            "clip_skip": req.clip_skip,
            "is_using_inpainting_conditioning": m.probe.variant == "inpaint",
            "version": f"studio-{__version__}",
            "notes": self.notes,
            "interrupted": self.interrupted,
        }


# img2img / inpainting infotext keys
MODE_PARAMS = ("Denoising strength", "Mask blur", "Mask mode", "Masked content", "Inpaint area",
               "Masked area padding")


@dataclass
class ModeHooks:
    """What img2img and inpainting add to the shared generation loop."""

    spec_extras: Any = None        # (batch_index, seeds) -> BatchSpec field overrides (init latents, mask…)
    postprocess: Any = None        # (image_index, decoded image) -> final image (compositing)
    decode: Any = None             # (batch_index, seeds) -> latents to decode instead of sampling
    params: dict[str, Any] = field(default_factory=dict)   # infotext keys, MODE_PARAMS order
    denoising_strength: float | None = None


def _fmt(x: float) -> str:
    return f"{x:g}"


def make_infotext(req: Txt2ImgRequest, model: LoadedModel, seed: int, schedule_label: str,
                  ti_hashes: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                  subseed: int | None = None) -> str:
    """A1111's parameter order: sampling, seed, size, model, VAE, networks, version."""
    extra = extra or {}
    params: dict[str, Any] = {
        "Steps": req.steps,
        "Sampler": req.sampler_name,
        "Schedule type": schedule_label,
        "CFG scale": _fmt(req.cfg_scale),
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": model.info.shorthash,
        "Model": model.info.name_for_extra,
        "VAE hash": extra.get("VAE hash"),
        "VAE": extra.get("VAE"),
        "Variation seed": subseed if req.subseed_strength > 0 else None,
        "Variation seed strength": _fmt(req.subseed_strength) if req.subseed_strength > 0 else None,
        "Seed resize from": (f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"
                             if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0 else None),
        "Denoising strength": extra.get("Denoising strength"),
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        "Token merging ratio": extra.get("Token merging ratio"),
        "Token merging ratio hr": extra.get("Token merging ratio hr"),
        "RNG": "CPU",
        "Eta": _fmt(req.eta) if req.eta is not None else None,
        "Tiling": True if req.tiling else None,
        **{k: v for k, v in extra.items() if k.startswith("Hires")},
        # the mode's extra_generation_params (mask settings), where A1111 appends them
        **{k: v for k, v in extra.items() if k in MODE_PARAMS and k != "Denoising strength"},
        **{k: v for k, v in extra.items() if k.startswith("ControlNet ")},
        "Lora hashes": extra.get("Lora hashes"),
        "TI hashes": ", ".join(f"{k}: {v}" for k, v in ti_hashes.items()) if ti_hashes else None,
        "Version": f"studio-{__version__}",
    }
    return build_infotext(req.prompt, req.negative_prompt, params)


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
    vae = model.vae
    images = []
    height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
    with torch.inference_mode(), vae_tiling(vae, width, height):
        for lat in latents:  # one at a time bounds VAE memory for big batches
            x = (lat[None] / vae.config.scaling_factor).to(model.policy.device, vae.dtype)
            px = vae.decode(x).sample
            if torch.isnan(px).any() and vae.dtype != torch.float32:
                log.warning("VAE produced NaNs in %s; retrying this decode in float32", vae.dtype)
                vae.to(torch.float32)
                px = vae.decode(x.float()).sample
            px = (px[0].float() / 2 + 0.5).clamp(0, 1)
            arr = (px.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            images.append(Image.fromarray(arr))
    return images


def run_txt2img(
    model: LoadedModel,
    req: Txt2ImgRequest,
    state: JobState,
    outdir: Path | None,
    preview_every: int = 0,
    networks: ExtraNetworks | None = None,
    vae: Any = None,
    hooks: ModeHooks | None = None,
    upscalers: Any = None,
    controls: Any = None,
    save_format: Any = None,
) -> GenerationResult:
    """``networks`` applies the prompt's LoRA/hypernetwork tags (None: tags are only noted);
    ``vae`` is the external VAE already swapped in, recorded in the infotext; ``hooks`` turn
    the loop into img2img / inpainting (see generation/img2img.py); ``controls`` is the
    prepared ControlNet units (studio.controlnet.runtime.ControlPlan)."""
    prompt, tags = extract_extra_networks(req.prompt)
    negative, neg_tags = extract_extra_networks(req.negative_prompt)
    notes = list(req.notes)
    if neg_tags:
        # A1111 activates networks from the positive prompt only
        notes.append("Extra networks in the negative prompt are ignored: "
                     + ", ".join(f"<{t.kind}:{t.name}>" for t in neg_tags))
    if networks is not None:
        activation = networks.activate(model, tags)
    else:
        activation = NetworkActivation()
        if tags:
            activation.notes.append("Extra networks were not applied: " + ", ".join(t.name for t in tags))
    notes += activation.notes
    try:
        return _run(model, req, state, outdir, preview_every, prompt, negative, notes, activation, vae,
                    hooks or ModeHooks(), upscalers, controls, save_format)
    finally:
        activation.close()


def _run(model: LoadedModel, req: Txt2ImgRequest, state: JobState, outdir: Path | None, preview_every: int,
         prompt: str, negative: str, notes: list[str], activation: NetworkActivation, vae: Any,
         hooks: ModeHooks, upscalers: Any = None, controls: Any = None, save_format: Any = None) -> GenerationResult:
    sampler, schedule = split_sampler_name(req.sampler_name, req.scheduler)
    schedule = effective_schedule(sampler, schedule)
    base_seed = resolve_seed(req.seed)
    base_subseed = resolve_seed(req.subseed) if req.subseed_strength > 0 else req.subseed
    req = req.with_changes(seed=base_seed, subseed=base_subseed)
    conditioner = model.conditioner
    plan = ConditioningPlan(conditioner, prompt, negative, req.steps, req.clip_skip)
    ti_hashes = {e.name: e.hash for text in plan.all_texts for e in conditioner.used_embeddings(text)}
    extra: dict[str, Any] = dict(activation.infotext_params())
    if vae is not None:
        extra |= {"VAE hash": vae.shorthash, "VAE": vae.filename}
    extra |= hooks.params
    if controls:
        extra |= controls.infotext_params()
    hires = hires_cond = None
    denoising = hooks.denoising_strength
    if req.enable_hr and hooks.spec_extras is None:  # hires fix is a txt2img feature
        hires = make_plan(req, upscalers)
        extra |= hires_params(req, hires)
        denoising = hires.strength
        hr_prompt, _ = extract_extra_networks(req.hr_prompt) if req.hr_prompt else (prompt, [])
        hr_negative, _ = extract_extra_networks(req.hr_negative_prompt) if req.hr_negative_prompt else (negative, [])
        hires_cond = ConditioningPlan(conditioner, hr_prompt, hr_negative, hires.steps, req.clip_skip)

    merge = req.token_merging_ratio or 0.0
    merge_hr = merge if req.token_merging_ratio_hr is None else req.token_merging_ratio_hr
    if merge:
        extra["Token merging ratio"] = merge
    if hires is not None and merge_hr:
        extra["Token merging ratio hr"] = merge_hr

    result = GenerationResult([], [], [], [], req, model, notes=notes, vae=vae,
                              denoising_strength=denoising,
                              extra_params={k: v for k, v in extra.items()
                                            if k in MODE_PARAMS or k.startswith(("Hires", "ControlNet "))})
    first_units = hires_units = None
    if controls:
        result.detected_maps = controls.detected_maps()
        first_units = controls.units_for(req.width, req.height, None if hires is None else False) or None
        if hires is not None:
            hires_units = controls.units_for(hires.width, hires.height, True) or None
    state.batches = req.n_iter
    for batch_index in range(req.n_iter):
        if state.interrupted:
            break
        state.batch = batch_index
        state.skipped = False
        seeds, subseeds = batch_seeds(base_seed, base_subseed, req.subseed_strength, batch_index, req.batch_size)
        state.textinfo = f"Batch {batch_index + 1} of {req.n_iter}"

        latents = hooks.decode(batch_index, seeds) if hooks.decode is not None else None
        if latents is None:
            spec = BatchSpec(plan=plan, sampler=sampler, schedule=schedule, steps=req.steps,
                             cfg_scale=req.cfg_scale, eta=req.eta, width=req.width, height=req.height, seeds=seeds,
                             preview_every=preview_every, subseeds=subseeds, subseed_strength=req.subseed_strength,
                             resize_from=(req.seed_resize_from_w, req.seed_resize_from_h), controlnets=first_units,
                             **(hooks.spec_extras(batch_index, seeds) if hooks.spec_extras else {}))
            with seamless(model.unet, model.vae, enabled=req.tiling):
                with token_merging(model.unet, merge, seeds[0]):
                    latents = sample(model, spec, state)
                if hires is not None and not (state.interrupted or state.skipped):
                    first = latents
                    with token_merging(model.unet, merge_hr, seeds[0]):
                        latents = second_pass(model, req, hires, first, lambda: decode_latents(model, first),
                                              hires_cond, seeds, subseeds, state, upscalers, preview_every,
                                              hires_units)

        with seamless(model.vae, enabled=req.tiling):
            images = decode_latents(model, latents)
        if hooks.postprocess is not None:
            first = batch_index * req.batch_size
            images = [hooks.postprocess(first + j, image) for j, image in enumerate(images)]
        for seed, subseed, image in zip(seeds, subseeds, images):
            infotext = make_infotext(req, model, seed, schedule.label, ti_hashes, extra, subseed)
            result.images.append(image)
            result.seeds.append(seed)
            result.subseeds.append(subseed)
            result.infotexts.append(infotext)
            if outdir is not None and req.save_images:
                result.paths.append(save_image(image, infotext, outdir, seed, save_format=save_format))
    result.interrupted = state.interrupted
    return result
