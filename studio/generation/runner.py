"""The generic generation runner: txt2img, and img2img / inpainting through :class:`ModeHooks`.

Owning the loop (rather than calling StableDiffusionPipeline) lets one place handle
interrupt/skip between steps, throttled previews, per-image seeds, prompt schedules, ControlNet,
hires fix and step callbacks, without re-wrapping a pipeline for each feature.

Per batch: seeds (A1111's batch rule: ``seed + index``), the sampling pass (generation/sampling.py),
the hires pass when asked, the VAE decode, the mode's post-processing, the infotext, and saving
through the caller's saver. Noise is drawn on the CPU from one generator per image, so a seed
gives the same image on any device and in any batch position; the same generators feed ancestral
samplers' per-step noise unless ENSD (``eta_noise_seed_delta``) gives them their own seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from studio import __version__
from studio.generation.denoise import denoise
from studio.generation.family_rules import uses_guidance
from studio.generation.hires import infotext_params as hires_params
from studio.generation.hires import make_plan, second_pass
from studio.generation.infotext import build_infotext
from studio.generation.noise import batch_seeds
from studio.generation.request import RequestError, Txt2ImgRequest, resolve_seed
from studio.generation.samplers import SamplerSpec, effective_schedule, split_sampler_name
from studio.generation.sampling import BatchSpec, RefinerSwitch, draws_step_noise
from studio.generation.step_callbacks import StepCallback
from studio.generation.tiling import seamless
from studio.generation.txt2img import decode_latents
from studio.jobs import JobState
from studio.models.loader import LoadedModel
from studio.networks.activation import ExtraNetworks, NetworkActivation
from studio.optimizations import TokenMerging
from studio.prompts.parser import DEFAULT_EMPHASIS, extract_extra_networks
from studio.prompts.schedule import ConditioningPlan
from studio.upscale import is_latent_mode


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
    grid_path: Path | None = None   # the saved grid of a multi-image run, when the saver makes one
    # per image, when images were made from different prompts (scripts); empty = the request's for all
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    face_restoration_model: str | None = None   # the restorer used on the images, None = none

    def info(self) -> dict[str, Any]:
        """A1111's ``Processed.js()`` keys (served as a JSON string in ``info``)."""
        req, m = self.request, self.model
        return {
            "prompt": req.prompt,
            "all_prompts": self.prompts or [req.prompt] * len(self.images),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": self.negative_prompts or [req.negative_prompt] * len(self.images),
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
            "restore_faces": self.face_restoration_model is not None,
            "face_restoration_model": self.face_restoration_model,
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


def _is_extra_generation_param(key: str) -> bool:
    """The infotext keys A1111 keeps in ``extra_generation_params`` (the mode's, hires, refiner,
    ControlNet, NGMS, ADetailer)."""
    return key in MODE_PARAMS or key == "NGMS" or key.startswith(("Hires", "ControlNet ", "Refiner", "ADetailer"))


def _check_same_latents(first: LoadedModel, other: LoadedModel, field_name: str) -> None:
    """A second checkpoint continues the first one's latents: it must read the same latent space."""
    if first.spec.latent != other.spec.latent or first.spec.is_flow != other.spec.is_flow:
        raise RequestError(f"{field_name}: {other.info.name} ({other.spec.label}) cannot continue the latents of "
                           f"{first.info.name} ({first.spec.label}); pick a checkpoint of the same family")


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
        "Distilled CFG Scale": extra.get("Distilled CFG Scale"),   # Forge's key and place (FLUX.1)
        "Seed": seed,
        "Face restoration": extra.get("Face restoration"),
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
        "ENSD": extra.get("ENSD"),
        "Token merging ratio": extra.get("Token merging ratio"),
        "Token merging ratio hr": extra.get("Token merging ratio hr"),
        "RNG": "CPU",
        "Eta": _fmt(req.eta) if req.eta is not None else None,
        "Tiling": True if req.tiling else None,
        **{k: v for k, v in extra.items() if k.startswith("Hires")},
        "Refiner": extra.get("Refiner"),
        "Refiner switch at": extra.get("Refiner switch at"),
        # the mode's extra_generation_params (mask settings), where A1111 appends them
        **{k: v for k, v in extra.items() if k in MODE_PARAMS and k != "Denoising strength"},
        **{k: v for k, v in extra.items() if k.startswith("ControlNet ")},
        "Lora hashes": extra.get("Lora hashes"),
        # A1111 adds NGMS while sampling and the text encoder's keys (TI hashes, Emphasis) after it
        "NGMS": extra.get("NGMS"),
        "TI hashes": ", ".join(f"{k}: {v}" for k, v in ti_hashes.items()) if ti_hashes else None,
        "Emphasis": extra.get("Emphasis"),
        # ADetailer writes its keys after processing, so they come last (before the version)
        **{k: v for k, v in extra.items() if k.startswith("ADetailer")},
        "Version": f"studio-{__version__}",
    }
    return build_infotext(req.prompt, req.negative_prompt, params)


def sampler_params(sampler: SamplerSpec, eta: float | None, eta_noise_seed_delta: int,
                   s_min_uncond: float) -> dict[str, Any]:
    """ENSD when it changes the image (a sampler that draws noise between steps), NGMS when on."""
    params: dict[str, Any] = {}
    if eta_noise_seed_delta and draws_step_noise(sampler, eta):
        params["ENSD"] = eta_noise_seed_delta
    if s_min_uncond > 0:
        params["NGMS"] = _fmt(s_min_uncond)
    return params


def run_generation(
    model: LoadedModel,
    req: Txt2ImgRequest,
    state: JobState,
    saver: Any = None,
    preview_every: int = 0,
    networks: ExtraNetworks | None = None,
    vae: Any = None,
    hooks: ModeHooks | None = None,
    upscalers: Any = None,
    controls: Any = None,
    callbacks: Sequence[StepCallback] = (),
    eta_noise_seed_delta: int = 0,
    s_min_uncond: float = 0.0,
    emphasis: str = DEFAULT_EMPHASIS,
    load_model: Callable[[str], LoadedModel] | None = None,
    aesthetic_scores: tuple[float, float] = (6.0, 2.5),
    refiner_pass: str = "second pass",
    postprocess: Callable[[Image.Image, int, Txt2ImgRequest], tuple[Image.Image, dict[str, Any]]] | None = None,
) -> GenerationResult:
    """Run ``req`` on ``model``. ``saver`` (``save(image, infotext, seed, request) -> Path``, optionally
    ``save_grid(images, infotext, request) -> Path | None``) saves when ``req.save_images``; None saves
    nothing. ``networks`` applies the prompt's LoRA/hypernetwork tags (None: tags are only noted);
    ``vae`` is the external VAE already swapped in, recorded in the infotext; ``hooks`` turn the loop
    into img2img / inpainting (see generation/img2img.py); ``controls`` is the prepared ControlNet
    units (studio.controlnet.runtime.ControlPlan); ``callbacks`` run in every sampling pass (see
    generation/step_callbacks.py). ``eta_noise_seed_delta`` and ``s_min_uncond`` are A1111's ENSD and
    NGMS options (0 = off); ``emphasis`` is A1111's emphasis mode for the prompts' (weights).
    ``load_model(name)`` switches to another checkpoint mid-job (hires checkpoint, refiner; the engine
    keeps both loaded); ``aesthetic_scores`` are the SDXL refiner's (positive, negative) scores and
    ``refiner_pass`` A1111's ``hires_fix_refiner_pass`` (which hires pass the refiner runs in);
    ``postprocess(image, seed, request)`` runs on every image before its infotext and saving (face
    restoration, the detailer) and returns the image and the infotext keys it adds."""
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
    options = _RunOptions(saver, preview_every, vae, hooks or ModeHooks(), upscalers, controls,
                          tuple(callbacks), eta_noise_seed_delta, s_min_uncond, emphasis, load_model,
                          aesthetic_scores, postprocess, refiner_pass)
    try:
        return _run(model, req, state, prompt, negative, notes, activation, options)
    finally:
        activation.close()


@dataclass(frozen=True)
class _RunOptions:
    saver: Any
    preview_every: int
    vae: Any
    hooks: ModeHooks
    upscalers: Any
    controls: Any
    callbacks: tuple[StepCallback, ...]
    eta_noise_seed_delta: int
    s_min_uncond: float
    emphasis: str
    load_model: Callable[[str], LoadedModel] | None = None
    aesthetic_scores: tuple[float, float] = (6.0, 2.5)
    postprocess: Any = None
    refiner_pass: str = "second pass"


def _pass_callbacks(units: list[StepCallback], merge_ratio: float,
                    callbacks: tuple[StepCallback, ...]) -> list[StepCallback]:
    """One sampling pass's callbacks: its ControlNet units' (see ControlPlan.callbacks_for), token
    merging, then the caller's."""
    own: list[StepCallback] = list(units)
    if merge_ratio:
        own.append(TokenMerging(merge_ratio))
    return [*own, *callbacks]


def _run(model: LoadedModel, req: Txt2ImgRequest, state: JobState, prompt: str, negative: str,
         notes: list[str], activation: NetworkActivation, o: _RunOptions) -> GenerationResult:
    hooks, controls = o.hooks, o.controls
    sampler, schedule = split_sampler_name(req.sampler_name, req.scheduler)
    if not model.spec.is_flow:  # flow models' "Automatic" is their pipeline's own schedule
        schedule = effective_schedule(sampler, schedule)
    base_seed = resolve_seed(req.seed)
    base_subseed = resolve_seed(req.subseed) if req.subseed_strength > 0 else req.subseed
    req = req.with_changes(seed=base_seed, subseed=base_subseed)
    conditioner = model.conditioner
    plan = ConditioningPlan(conditioner, prompt, negative, req.steps, req.clip_skip, o.emphasis)
    ti_hashes = {e.name: e.hash for text in plan.all_texts for e in conditioner.used_embeddings(text)}
    extra: dict[str, Any] = dict(activation.infotext_params()) | plan.infotext_params()
    if o.vae is not None:
        extra |= {"VAE hash": o.vae.shorthash, "VAE": o.vae.filename}
    extra |= hooks.params
    if controls:
        extra |= controls.infotext_params()
    extra |= sampler_params(sampler, req.eta, o.eta_noise_seed_delta, o.s_min_uncond)
    if req.distilled_cfg_scale is not None and uses_guidance(model):
        extra["Distilled CFG Scale"] = _fmt(req.distilled_cfg_scale)
    hires = hires_cond = None
    hr_prompt, hr_negative = prompt, negative
    denoising = hooks.denoising_strength
    if req.enable_hr and hooks.spec_extras is None:  # hires fix is a txt2img feature
        hires = make_plan(req, o.upscalers, model.spec)
        extra |= hires_params(req, hires)
        denoising = hires.strength
        hr_prompt, _ = extract_extra_networks(req.hr_prompt) if req.hr_prompt else (prompt, [])
        hr_negative, _ = extract_extra_networks(req.hr_negative_prompt) if req.hr_negative_prompt else (negative, [])
        hires_cond = ConditioningPlan(conditioner, hr_prompt, hr_negative, hires.steps, req.clip_skip,
                                      o.emphasis)

    merge = req.token_merging_ratio or 0.0
    merge_hr = merge if req.token_merging_ratio_hr is None else req.token_merging_ratio_hr
    if merge:
        extra["Token merging ratio"] = merge
    if hires is not None and merge_hr:
        extra["Token merging ratio hr"] = merge_hr

    result = GenerationResult([], [], [], [], req, model, notes=notes, vae=o.vae, denoising_strength=denoising,
                              extra_params={k: v for k, v in extra.items() if _is_extra_generation_param(k)})
    first_units: list[StepCallback] = []
    hires_units: list[StepCallback] = []
    if controls:
        result.detected_maps = controls.detected_maps(req.width, req.height,
                                                      (hires.width, hires.height) if hires is not None else None)
        notes.extend(controls.notes)
        empty = not req.prompt.strip() and not req.negative_prompt.strip()
        first_units = controls.callbacks_for(req.width, req.height, None if hires is None else False, base_seed,
                                             empty)
        if hires is not None:
            hires_units = controls.callbacks_for(hires.width, hires.height, True, base_seed, empty)
    first_callbacks = _pass_callbacks(first_units, merge, o.callbacks)
    hires_callbacks = _pass_callbacks(hires_units, merge_hr, o.callbacks)
    saving = o.saver is not None and req.save_images
    if (req.hr_checkpoint_name and hires is not None or req.refiner_checkpoint) and o.load_model is None:
        raise RequestError("this caller cannot switch checkpoints mid-job (hr_checkpoint_name, refiner_checkpoint)")
    if req.refiner_checkpoint and model.spec.is_flow:
        raise RequestError(f"refiner_checkpoint: the refiner switch works with SD1/SD2/SDXL checkpoints, not "
                           f"{model.spec.label}")
    # A1111's hires_fix_refiner_pass: with hires fix the refiner runs in the second pass by default
    refine_first = req.refiner_checkpoint is not None and (hires is None or o.refiner_pass != "second pass")
    refine_hires = req.refiner_checkpoint is not None and hires is not None and o.refiner_pass != "first pass"
    first_title = model.info.title
    second_model = req.refiner_checkpoint or (req.hr_checkpoint_name and hires is not None)
    if second_model and extract_extra_networks(req.prompt)[1]:
        notes.append("LoRA / hypernetwork tags apply to the first checkpoint only, not to the refiner or the "
                     "hires checkpoint")
    switches = False   # whether a batch switched checkpoints (the next one starts on the first again)
    state.batches = req.n_iter
    for batch_index in range(req.n_iter):
        if state.interrupted:
            break
        state.batch = batch_index
        state.skipped = False
        seeds, subseeds = batch_seeds(base_seed, base_subseed, req.subseed_strength, batch_index, req.batch_size)
        state.textinfo = f"Batch {batch_index + 1} of {req.n_iter}"

        latents = hooks.decode(batch_index, seeds) if hooks.decode is not None else None
        final = model          # the model whose latents come out of the batch (decodes them)
        refined: list[LoadedModel] = []   # the refiner, once a pass switched to it

        def refiner_switch(pass_prompt: str, pass_negative: str, pass_steps: int) -> RefinerSwitch:
            def load() -> tuple[LoadedModel, ConditioningPlan]:
                refiner = o.load_model(req.refiner_checkpoint)
                _check_same_latents(model, refiner, "refiner_checkpoint")
                refined.append(refiner)
                extra.update({"Refiner": refiner.info.short_title, "Refiner switch at": _fmt(req.refiner_switch_at)})
                return refiner, ConditioningPlan(refiner.conditioner, pass_prompt, pass_negative, pass_steps,
                                                 req.clip_skip, o.emphasis)
            return RefinerSwitch(req.refiner_switch_at, load)

        if latents is None:
            if switches:       # a previous batch ended on another checkpoint: back to the first one
                model = o.load_model(first_title)
            spec = BatchSpec(plan=plan, sampler=sampler, schedule=schedule, steps=req.steps,
                             cfg_scale=req.cfg_scale, eta=req.eta, width=req.width, height=req.height, seeds=seeds,
                             preview_every=o.preview_every, subseeds=subseeds, subseed_strength=req.subseed_strength,
                             resize_from=(req.seed_resize_from_w, req.seed_resize_from_h),
                             callbacks=first_callbacks, eta_noise_seed_delta=o.eta_noise_seed_delta,
                             s_min_uncond=o.s_min_uncond, guidance=req.distilled_cfg_scale,
                             aesthetic_scores=o.aesthetic_scores,
                             refiner=refiner_switch(prompt, negative, req.steps) if refine_first else None,
                             **(hooks.spec_extras(batch_index, seeds) if hooks.spec_extras else {}))
            with seamless(model.unet, model.vae, enabled=req.tiling):
                latents = denoise(model, spec, state)
            final = refined[-1] if refined else model
            switches = switches or bool(refined)
            if hires is not None and not (state.interrupted or state.skipped):
                first_latents, first_model = latents, final
                # pixel upscalers need the first pass decoded, before another checkpoint takes the device
                first_images = None if is_latent_mode(hires.upscaler) else decode_latents(first_model, first_latents)
                hr_model, hr_plan = final, hires_cond
                if final is not model:   # the refiner took over in the first pass: it runs the second too
                    hr_plan = ConditioningPlan(final.conditioner, hr_prompt, hr_negative, hires.steps,
                                               req.clip_skip, o.emphasis)
                if req.hr_checkpoint_name:
                    hr_model = o.load_model(req.hr_checkpoint_name)
                    _check_same_latents(first_model, hr_model, "hr_checkpoint_name")
                    extra["Hires checkpoint"] = hr_model.info.short_title
                    hr_plan = ConditioningPlan(hr_model.conditioner, hr_prompt, hr_negative, hires.steps,
                                               req.clip_skip, o.emphasis)
                    switches = True
                hires_spec = replace(spec, plan=hr_plan, callbacks=hires_callbacks, refiner=None)
                if refine_hires and not refined and not req.hr_checkpoint_name:
                    hires_spec = replace(hires_spec, refiner=refiner_switch(hr_prompt, hr_negative, hires.steps))
                with seamless(hr_model.unet, hr_model.vae, enabled=req.tiling):
                    latents = second_pass(hr_model, hires, hires_spec, latents,
                                          lambda: first_images, state, o.upscalers)
                final = refined[-1] if refined else hr_model
                switches = switches or bool(refined)

        with seamless(final.vae, enabled=req.tiling):
            images = decode_latents(final, latents)
        if controls:
            images = [controls.postprocess(image) for image in images]
        if hooks.postprocess is not None:
            first = batch_index * req.batch_size
            images = [hooks.postprocess(first + j, image) for j, image in enumerate(images)]
        for seed, subseed, image in zip(seeds, subseeds, images):
            own = extra
            if o.postprocess is not None:
                image, added = o.postprocess(image, seed, req)
                own = {**extra, **added}
                result.extra_params.update({k: v for k, v in added.items() if _is_extra_generation_param(k)})
            infotext = make_infotext(req, model, seed, schedule.label, ti_hashes, own, subseed)
            result.images.append(image)
            result.seeds.append(seed)
            result.subseeds.append(subseed)
            result.infotexts.append(infotext)
            if saving:
                result.paths.append(o.saver.save(image, infotext, seed, req))
    if saving and len(result.images) > 1 and hasattr(o.saver, "save_grid"):
        result.grid_path = o.saver.save_grid(result.images, result.infotexts[0], req)
    result.interrupted = state.interrupted
    return result


def postprocess_only(model: LoadedModel, req: Txt2ImgRequest, images: Sequence[Image.Image],
                     postprocess: Callable[[Image.Image, int, Txt2ImgRequest], tuple[Image.Image, dict[str, Any]]],
                     saver: Any = None) -> GenerationResult:
    """The post-processing of a generation on given images, without sampling: ADetailer's "Skip
    img2img" details the init images themselves. Image ``i`` gets seed ``seed + i``."""
    sampler, schedule = split_sampler_name(req.sampler_name, req.scheduler)
    base_seed = resolve_seed(req.seed)
    result = GenerationResult([], [], [], [], req, model, notes=list(req.notes))
    for index, image in enumerate(images):
        seed = base_seed + index
        out, params = postprocess(image.convert("RGB"), seed, req)
        infotext = make_infotext(req, model, seed, schedule.label, None, params, req.subseed)
        result.images.append(out)
        result.seeds.append(seed)
        result.subseeds.append(req.subseed)
        result.infotexts.append(infotext)
        result.extra_params.update({k: v for k, v in params.items() if _is_extra_generation_param(k)})
        if saver is not None and req.save_images:
            result.paths.append(saver.save(out, infotext, seed, req))
    return result
