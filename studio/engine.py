"""The engine: everything between a typed request and its result, under every front door.

``prepare`` resolves a request against the settings before it is queued (styles, names, images,
ControlNet units, clip skip, token merging, the per-request ``override_settings``, the seed), so
bad input never occupies the worker and a queued job holds a complete, reproducible request.
``run`` is the job itself: load the model, patch it (embeddings, VAE, compile), prepare the
ControlNet units, then the generic runner; outputs are saved where the settings say. Upscaling,
ControlNet detection and img2img's batch-folder loop live here too, so the Studio stays a facade.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.config import Paths, Settings
from studio.controlnet.preprocessors import INPAINT_MODULES, PreprocessorError, PreprocessorRegistry
from studio.controlnet.runtime import ControlNetModels, check_units, prepare_controls
from studio.controlnet.units import lenient_params
from studio.detailer import DetailerConfig, DetectorRegistry, detailer_from_alwayson, run_detailer
from studio.errors import RequestError
from studio.generation.family_rules import adapt_to_family, unset_preset_fields
from studio.generation.fast import FastLora, FastPreset, file_texts, with_lora
from studio.generation.fast import choose as choose_fast
from studio.generation.imageops import ImageInputError, normalize_image, normalize_mask
from studio.generation.outputs import ImageReadError, SaveFormat, open_image, save_image
from studio.generation.request import (
    ExtrasRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
    build_request,
    resolve_seed,
    validate_img2img,
    validate_txt2img,
)
from studio.generation.saving import OutputSaver
from studio.jobs import Job, JobQueue, JobState
from studio.models.manager import ModelManager, ModelNotFoundError
from studio.models.state_dict import ModelFileError, safetensors_metadata
from studio.models.vae import VaeCatalog, VaeNotFoundError, VaeSwapper
from studio.networks.activation import ExtraNetworks
from studio.networks.cards import Card, hypernet_tag, lora_tag
from studio.networks.embeddings import EmbeddingLibrary
from studio.optimizations import CompileOptions, compile_cache_dir, set_compiled, token_merging_ratios
from studio.options import StudioOptions, validate_changes
from studio.prompts.styles import StyleDatabase, StyleError
from studio.restore.library import FaceRestorers
from studio.scripts.base import Script
from studio.scripts.registry import ScriptRegistry, builtin_scripts
from studio.scripts.runtime import EngineRun, LibraryEnv
from studio.upscale import UpscalerError, UpscalerLibrary

if TYPE_CHECKING:  # diffusers/transformers load on first use, not at start-up
    from studio.generation.runner import GenerationResult
    from studio.models.loader import LoadedModel

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# what a detailer's inpaint does not take over from the request it details (engine fields, the image's own
# generation: hires, scripts, ControlNet, the init images and mask of an img2img job)
_NOT_INHERITED = ("kind", "notes", "controlnet_units", "preset_fields", "hr_denoising_strength", "infotext",
                  "script_name", "script_args", "init_images", "mask", "refiner_checkpoint", "refiner_switch_at",
                  "restore_faces", "checkpoint")


@dataclass(frozen=True)
class Prepared:
    """A request ready for the worker: the resolved request and the options it runs with (the
    settings with its ``override_settings`` applied)."""

    request: Txt2ImgRequest
    options: StudioOptions
    script: Script | None = None      # the request's script_name, found
    script_params: Any = None         # its script_args, parsed
    detailer: DetailerConfig | None = None   # alwayson_scripts.ADetailer, parsed


@dataclass
class Engine:
    paths: Paths
    settings: Settings
    models: ModelManager
    queue: JobQueue
    embeddings: EmbeddingLibrary
    styles: StyleDatabase
    vaes: VaeCatalog
    networks: ExtraNetworks
    upscalers: UpscalerLibrary
    preprocessors: PreprocessorRegistry
    controlnets: ControlNetModels
    face_restorers: FaceRestorers
    detectors: DetectorRegistry
    # extensions' step callbacks, read per job (an extension enabled later takes part from then on)
    step_callbacks: Callable[[], list[Any]] = field(default=list)
    scripts: ScriptRegistry = field(default_factory=lambda: ScriptRegistry(builtin_scripts()))
    # how a job's saver is made: OutputSaver.from_options' signature (a generation worker records instead)
    make_saver: Callable[..., Any] = OutputSaver.from_options
    # with --workers: runs generation jobs on the cluster (studio.cluster.front.Cluster: run(prepared, state))
    remote: Any = None

    # -- model state --------------------------------------------------------------------
    def initial_checkpoint(self) -> str | None:
        preferred = self.settings.options.sd_model_checkpoint
        if preferred and self.models.catalog.find(preferred) is None:
            preferred = None
        return preferred

    def sync_embeddings(self) -> None:
        """Rescan the embedding folders (only changed files are re-read) and hand the
        embeddings that fit the loaded model to its prompt encoder."""
        self.embeddings.refresh()
        model = self.models.current
        if model is None:
            return
        loaded, _skipped = self.embeddings.resolve(model.text_widths)
        current = model.conditioner.embeddings
        if {k: id(v) for k, v in loaded.items()} != {k: id(v) for k, v in current.items()}:
            model.conditioner.set_embeddings(loaded)

    def load(self, query: str | None, modules: Sequence[str] | None = None, pin: bool = False) -> LoadedModel:
        """On the worker: load a checkpoint and give it the embeddings that fit it. ``modules``: the
        text-encoder / VAE files for checkpoints that lack them (None = the forge_additional_modules setting);
        ``pin``: keep it loaded while the job's ``models.pinned`` block lasts (a mid-job switch)."""
        if modules is None:
            modules = self.settings.options.forge_additional_modules
        model = self.models.load(query, modules, pin=pin)
        self.sync_embeddings()
        return model

    def apply_vae(self, model: LoadedModel, setting: str | None) -> Any:
        """On the worker: put the wanted VAE into ``model`` (request value, else the ``sd_vae``
        setting) and return its VaeInfo, or None for the checkpoint's own."""
        if setting is None:
            setting = self.settings.options.sd_vae
        try:
            info = self.vaes.resolve(setting, model.info.path)
        except VaeNotFoundError as e:
            raise RequestError(str(e)) from e
        if model.vae_swapper is None:
            if info is None:
                return None  # nothing was ever swapped into this model
            model.vae_swapper = VaeSwapper(model.vae)
        model.vae_swapper.apply(info)
        return info

    # -- generation ---------------------------------------------------------------------
    def script_env(self, options: StudioOptions | None = None) -> LibraryEnv:
        """What scripts parse their arguments against (and the UI draws their choices from)."""
        return LibraryEnv(self.models, self.vaes, self.upscalers, options or self.settings.options, self.styles)

    def prepare(self, req: Txt2ImgRequest, styles_applied: bool = False) -> Prepared:
        """Everything that can be checked or decided before queueing. Raises RequestError.
        ``styles_applied``: the prompts already hold the styles' text (a script's generations)."""
        options = self.settings.options
        tab = "img2img" if isinstance(req, Img2ImgRequest) else "txt2img"
        script = self.scripts.find(tab, req.script_name)
        if req.preset_fields is None:  # what the caller left unset, before anything below sets it
            req = req.model_copy(update={"preset_fields": unset_preset_fields(req)})
        if req.override_settings:
            options = options.model_copy(update=validate_changes(req.override_settings, options))
        if req.fast:
            req = self.apply_fast(req, options)
        if req.styles and not styles_applied:
            try:
                prompt, negative = self.styles.apply(req.styles, req.prompt, req.negative_prompt)
            except StyleError as e:
                raise RequestError(str(e)) from e
            # the styles stay listed (the [styles] filename tag, the infotext); their text is now in the prompts
            req = req.model_copy(update={"prompt": prompt, "negative_prompt": negative})
        img2img = isinstance(req, Img2ImgRequest)
        req = validate_img2img(req) if img2img else validate_txt2img(req)
        if req.controlnet_units:
            check_units(req.controlnet_units, self.preprocessors, self.controlnets,
                        has_init_image=bool(getattr(req, "init_images", ())),
                        has_init_mask=getattr(req, "mask", None) is not None)
        merge, merge_hr = token_merging_ratios(options.model_dump(), img2img=img2img)
        overrides = req.override_settings
        req = req.model_copy(update={
            # None means "the setting": an explicit 1 is kept even when the setting says 2
            "clip_skip": req.clip_skip if req.clip_skip is not None else options.CLIP_stop_at_last_layers,
            "token_merging_ratio": merge if req.token_merging_ratio is None else req.token_merging_ratio,
            "token_merging_ratio_hr": merge_hr if req.token_merging_ratio_hr is None else req.token_merging_ratio_hr,
            "checkpoint": req.checkpoint or overrides.get("sd_model_checkpoint"),
            "vae": req.vae if req.vae is not None else overrides.get("sd_vae"),
            # resolved now, so everything seeded from it (ControlNet's preprocessors too) is reproducible
            # from the image's infotext, and the queued job shows the seed it will use
            # a script fixes seeds itself, as A1111's do (prompts from file: a new random seed per line)
            "seed": resolve_seed(req.seed) if script is None else req.seed,
        })
        for name in ("hr_checkpoint_name", "refiner_checkpoint"):
            wanted = getattr(req, name)
            if wanted and self.models.catalog.find(wanted) is None:
                raise RequestError(f"{name}: checkpoint {wanted!r} not found (GET /sdapi/v1/sd-models lists them)")
        params = script.parse(req.script_args, req, self.script_env(options)) if script is not None else None
        detailer = detailer_from_alwayson(req.alwayson_scripts)
        if detailer is not None:
            for name in detailer.model_names():
                self.detectors.check(name)
        if req.restore_faces and options.face_restoration_model:
            self.face_restorers.check_name(options.face_restoration_model)
        return Prepared(req, options, script, params, detailer)

    def fast_preset(self, wanted: str, prompt: str, checkpoint: str | None = None,
                    options: StudioOptions | None = None) -> FastPreset | None:
        """The few-step preset for ``checkpoint`` (None: the user's) and ``prompt`` (generation/fast.py),
        or None for a DiT family, whose own presets already know their few-step variants."""
        options = options or self.settings.options
        try:
            info = self.models.resolve(checkpoint or options.sd_model_checkpoint or None)
        except ModelNotFoundError as e:
            raise RequestError(f"fast: {e}") from e
        current = self.models.current
        family = None
        if current is not None and current.info.path == info.path:
            if current.spec.is_flow:
                return None
            family = current.probe.family
        metadata: dict[str, str] = {}
        if info.path.suffix.lower() == ".safetensors":
            try:
                metadata = safetensors_metadata(info.path)
            except ModelFileError:
                metadata = {}   # a broken file's load says so; its name may still tell its kind
        def choose(items: Sequence[Any]) -> FastPreset:
            loras = [FastLora(i.name, (*file_texts(i.name, i.metadata), i.alias), i.family) for i in items]
            return choose_fast(wanted, info.name, file_texts(info.name, metadata), prompt, loras, family)

        try:
            return choose(self.networks.loras.items())
        except RequestError:
            if wanted.lower() != "auto":
                raise
            return choose(self.networks.loras.refresh())   # a LoRA copied in since the last scan

    def apply_fast(self, req: Txt2ImgRequest, options: StudioOptions) -> Txt2ImgRequest:
        """``fast``: the preset fills the sampler, schedule, steps and CFG the caller left unset and adds its
        LoRA to the prompt; what it did is the job's note (so the UI and the API reply say it)."""
        preset = self.fast_preset(req.fast or "auto", req.prompt,
                                  req.checkpoint or req.override_settings.get("sd_model_checkpoint"), options)
        if preset is None:
            return req.model_copy(update={"notes": (*req.notes, "Fast: this model family's own presets apply "
                                                                "(its few-step variants are known by name).")})
        unset = req.preset_fields or ()
        changes: dict[str, Any] = {k: v for k, v in preset.fields().items() if k in unset}
        return req.model_copy(update={
            **changes, "prompt": with_lora(req.prompt, preset.lora),
            "preset_fields": tuple(f for f in unset if f not in changes), "notes": (*req.notes, preset.note())})

    def submit(self, req: Txt2ImgRequest) -> Job:
        prepared = self.prepare(req)
        if self.remote is not None:   # a generation worker runs it; it waits in this queue all the same
            remote = self.remote
            return self.queue.submit(lambda state: remote.run(prepared, state), prepared.request.kind,
                                     request=prepared.request, lane="cluster")
        return self.queue.submit(lambda state: self.run(prepared, state), prepared.request.kind,
                                 request=prepared.request)

    def run(self, prepared: Prepared, state: JobState) -> GenerationResult:
        """The job: load, patch, prepare the units, sample, save."""
        from studio.generation.img2img import run_img2img
        from studio.generation.runner import postprocess_only, run_generation

        req, options = prepared.request, prepared.options
        if prepared.script is not None:
            return prepared.script.run(self._script_run(prepared, state), req, prepared.script_params)
        model = self.load(req.checkpoint or self.initial_checkpoint(), options.forge_additional_modules)
        req = adapt_to_family(req, model)
        vae = self.apply_vae(model, req.vae)
        set_compiled(model.unet, CompileOptions.from_settings(options.model_dump()),
                     compile_cache_dir(self.paths.data))
        controls = self.control_plan(req, model, state, options)
        every = options.show_progress_every_n_steps if options.live_previews_enable else 0
        saver = self.make_saver(options.model_dump(), self.paths.data, req.kind,
                                         model_name=model.info.name_for_extra, model_hash=model.info.shorthash or "",
                                         vae_filename=vae.filename if vae else "")
        common = dict(preview_every=every, networks=self.networks, vae=vae, controls=controls, saver=saver,
                      eta_noise_seed_delta=options.eta_noise_seed_delta, s_min_uncond=options.s_min_uncond,
                      emphasis=options.emphasis, callbacks=self.step_callbacks(),
                      load_model=lambda name: self.load(name, options.forge_additional_modules, pin=True),
                      aesthetic_scores=(options.sdxl_refiner_high_aesthetic_score,
                                        options.sdxl_refiner_low_aesthetic_score),
                      refiner_pass=options.hires_fix_refiner_pass,
                      postprocess=self._postprocess(prepared, model, state))
        with self.models.pinned(model):
            if isinstance(req, Img2ImgRequest) and prepared.detailer is not None and prepared.detailer.skip_img2img:
                # ADetailer's "Skip img2img": the init images are detailed as they are
                return postprocess_only(model, req, req.init_images, common["postprocess"], saver)
            if isinstance(req, Img2ImgRequest):
                return run_img2img(model, req, state, color_correction=options.img2img_color_correction,
                                   upscale=self._img2img_upscaler(options.upscaler_for_img2img), **common)
            return run_generation(model, req, state, upscalers=self.upscalers, **common)

    def _postprocess(self, prepared: Prepared, model: LoadedModel, state: JobState) -> Any:
        """What runs on each finished image before its infotext and saving: face restoration, then the
        detailer (A1111's order: restore faces in processing, ADetailer in the script's postprocess)."""
        req, options, detailer = prepared.request, prepared.options, prepared.detailer
        if not req.restore_faces and detailer is None:
            return None
        policy = self.models.policy

        def inpaint(image: Any, mask: Any, overrides: dict[str, Any]) -> Any:
            settings = {**req.override_settings, **overrides.pop("override_settings", {})}
            fields = {k: v for k, v in req.as_dict().items() if k in Img2ImgRequest.model_fields
                      and k not in _NOT_INHERITED}
            sub = Img2ImgRequest.model_validate({
                **fields, "init_images": [image], "mask": mask, "batch_size": 1, "n_iter": 1,
                "enable_hr": False, "save_images": False, "alwayson_scripts": {}, "override_settings": settings,
                "checkpoint": settings.get("sd_model_checkpoint", model.info.title), **overrides})
            try:
                return self.run(self.prepare(sub, styles_applied=True), state).images[0]
            finally:
                if self.models.current is not model:   # a unit used its own checkpoint: back to the job's
                    self.load(model.info.title, options.forge_additional_modules, pin=True)

        def post(image: Any, seed: int, _req: Any) -> tuple[Any, dict[str, Any]]:
            params: dict[str, Any] = {}
            if req.restore_faces:
                state.textinfo = "Restoring faces"
                image, count = self.face_restorers.restore(
                    image, options.face_restoration_model, options.code_former_weight,
                    device=policy.device, dtype=policy.dtype)
                if count:
                    params["Face restoration"] = self.face_restorers.resolve(options.face_restoration_model)
                if options.face_restoration_unload:
                    self.face_restorers.offload()
            if detailer is not None:
                state.textinfo = "ADetailer"
                image, added = run_detailer(image, detailer, self.detectors, inpaint, req.prompt, req.negative_prompt,
                                            seed=seed, should_stop=lambda: state.interrupted)
                params |= added
            return image, params

        return post

    def _script_run(self, prepared: Prepared, state: JobState) -> EngineRun:
        """A running script's view of the engine: its generations are prepared and run as requests are."""

        def generate(req: Txt2ImgRequest) -> GenerationResult:
            return self.run(self.prepare(req, styles_applied=True), state)

        def upscale(image: Any, upscaler: str, size: tuple[int, int]) -> Any:
            try:
                return self.upscalers.upscale(image, upscaler, size=size)
            except UpscalerError as e:
                raise RequestError(str(e)) from e

        return EngineRun(state, self.script_env(prepared.options), self.paths.data, generate, upscale,
                         make_saver=self.make_saver)

    def _img2img_upscaler(self, name: str | None) -> Any:
        """A1111's ``upscaler_for_img2img``: the upscaler that enlarges an init image (None = Lanczos)."""
        if not name or name in ("None", "Lanczos"):
            return None

        def upscale(image: Any, width: int, height: int) -> Any:
            try:
                return self.upscalers.upscale(image, name, size=(width, height))
            except UpscalerError as e:
                raise RequestError(f"upscaler_for_img2img: {e}") from e

        return upscale

    def control_plan(self, req: Txt2ImgRequest, model: LoadedModel, state: JobState,
                     options: StudioOptions | None = None) -> Any:
        """On the worker: preprocess the enabled ControlNet units and load their models. The seed is the
        request's resolved seed, so a seeded preprocessor (shuffle) gives the map the infotext promises."""
        if not any(u.enabled for u in req.controlnet_units):
            return None
        init = getattr(req, "init_images", ())

        def progress(index: int) -> None:
            state.textinfo = f"ControlNet unit {index}: preprocessing"

        options = options or self.settings.options
        mask = getattr(req, "mask", None)
        if mask is not None and init:   # A1111's image_mask: white = repaint, after "Inpaint not masked"
            mask = normalize_mask(mask, init[0].size, round_alpha=req.mask_round)[0].convert("L")
            if req.inpainting_mask_invert:
                mask = mask.point(lambda v: 255 - v)
        return prepare_controls(req.controlnet_units, self.preprocessors, self.controlnets, model.family,
                                req.width, req.height, model.policy.dtype, model.policy.device, base_unet=model.unet,
                                init_image=init[0] if init else None, seed=req.seed, on_unit=progress,
                                init_mask=mask, ignore_noninpaint_mask=options.control_net_ignore_noninpaint_mask,
                                inpaint_blur_sigma=options.control_net_inpaint_blur_sigma)

    def img2img_folder(self, fields: dict[str, Any], folder_in: Path, folder_out: Path | None) -> list[Path]:
        """A1111's img2img Batch: every image in ``folder_in`` (not recursive) with the same
        settings, written to ``folder_out`` (default: the img2img output folder) with infotext.
        Unreadable files are skipped and reported in the log; nothing is overwritten."""
        if not folder_in.is_dir():
            raise RequestError(f"input directory {str(folder_in)!r} does not exist")
        files = sorted(p for p in folder_in.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RequestError(f"no images in {folder_in}")
        saved: list[Path] = []
        for path in files:
            try:
                image = open_image(path.read_bytes())
            except (ImageReadError, OSError) as e:
                log.warning("img2img batch: skipping %s: %s", path, e)
                continue
            req = Img2ImgRequest.model_validate({**fields, "init_images": [image],
                                                 "save_images": folder_out is None})
            result = self.submit(req).wait()
            if folder_out is not None:
                save_format = SaveFormat.from_settings(self.settings)
                for image_out, text, seed in zip(result.images, result.infotexts, result.seeds):
                    saved.append(save_image(image_out, text, folder_out, seed, dated=False, save_format=save_format))
            else:
                saved.extend(result.paths)
        return saved

    # -- extras and ControlNet detection ------------------------------------------------
    def upscale_image(self, image: Any, upscaler: str, scale: float | None = None,
                      size: tuple[int, int] | None = None, upscaler_2: str | None = None,
                      visibility_2: float = 0.0, save: bool = True) -> tuple[Any, str, Path | None]:
        """One image through an upscaler by a factor or to a size: :meth:`extras` with those fields."""
        if (scale is None) == (size is None):
            raise RequestError("give either an upscale factor or a target size")
        fields: dict[str, Any] = {"upscaler_1": upscaler or "None", "upscaler_2": upscaler_2 or "None",
                                  "extras_upscaler_2_visibility": visibility_2}
        if scale is not None:
            fields.update(resize_mode=0, upscaling_resize=scale)
        else:
            fields.update(resize_mode=1, upscaling_resize_w=size[0], upscaling_resize_h=size[1])
        return self.extras(build_request(ExtrasRequest, fields), image, save=save)

    def extras(self, req: ExtrasRequest, image: Any, save: bool = True) -> tuple[Any, str, Path | None]:
        """The Extras tab, POST /extra-single-image and ``studio upscale``: one image through an upscaler
        (and, blended in at ``extras_upscaler_2_visibility``, a second one), on the worker. Resizing *to* a
        size works as A1111's: upscale until the image covers the target, then (``upscaling_crop``) crop
        the middle. Returns (image, info text, saved path)."""
        from PIL import Image

        for name in (req.upscaler_1, req.upscaler_2):
            if name and name != "None" and self.upscalers.find(name) is None:
                self.upscalers.refresh()
                if self.upscalers.find(name) is None:
                    names = ", ".join(u.name for u in self.upscalers.items())
                    raise RequestError(f"upscaler {name!r} not found. Available: {names}")
        try:
            image = normalize_image(image)
        except ImageInputError as e:
            raise RequestError(str(e)) from e
        target = (req.upscaling_resize_w, req.upscaling_resize_h) if req.resize_mode == 1 else None
        scale = max(target[0] / image.width, target[1] / image.height) if target else req.upscaling_resize
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        second = req.upscaler_2 if req.upscaler_2 != "None" and req.extras_upscaler_2_visibility > 0 else None

        restorers = [(kind, visibility) for kind, visibility in
                     (("GFPGAN", req.gfpgan_visibility), ("CodeFormer", req.codeformer_visibility)) if visibility > 0]
        for kind, _ in restorers:   # a restorer that is not installed is refused before queueing
            self.face_restorers.resolve(kind)
        policy = self.models.policy

        def upscale(image: Any) -> Any:
            try:
                out = self.upscalers.upscale(image, req.upscaler_1 or "None", size=size)
                if second:
                    out = Image.blend(out, self.upscalers.upscale(image, second, size=out.size),
                                      float(req.extras_upscaler_2_visibility))
            except UpscalerError as e:
                raise RequestError(str(e)) from e
            if target and req.upscaling_crop and out.size != target:
                left, top = (out.width - target[0]) // 2, (out.height - target[1]) // 2
                out = out.crop((left, top, left + target[0], top + target[1]))
            return out

        def restore(image: Any, state: JobState) -> Any:
            for kind, visibility in restorers:   # A1111's order: GFPGAN, then CodeFormer
                state.textinfo = f"Restoring faces with {kind}"
                image, _count = self.face_restorers.restore(image, kind, req.codeformer_weight, visibility=visibility,
                                                            device=policy.device, dtype=policy.dtype)
            return image

        def job(state: JobState) -> Any:
            state.textinfo = f"Upscaling with {req.upscaler_1}"
            if req.upscale_first:
                return restore(upscale(image), state)
            return upscale(restore(image, state))

        out = self.queue.run(job, "upscale")
        parts = [f"Postprocess upscale to: {target[0]}x{target[1]}" if target
                 else f"Postprocess upscale by: {scale:g}"]
        if target and req.upscaling_crop:
            parts.append(f"Postprocess crop to: {target[0]}x{target[1]}")
        parts.append(f"Postprocess upscaler: {req.upscaler_1}")
        if second:
            parts += [f"Postprocess upscaler 2: {second}",
                      f"Postprocess upscaler 2 visibility: {req.extras_upscaler_2_visibility:g}"]
        for kind, visibility in restorers:
            parts.append(f"{kind} visibility: {visibility:g}")
            if kind == "CodeFormer":
                parts.append(f"CodeFormer weight: {req.codeformer_weight:g}")
        info = ", ".join(parts)
        path = None
        if save:
            options = self.settings.options
            folder = options.outdir_samples or options.outdir_extras_samples
            path = save_image(out, info, self.paths.data / folder, 0,
                              save_format=SaveFormat.from_settings(self.settings))
        return out, info, path

    def detect(self, module: str, images: list[Any], resolution: int = -1, threshold_a: float = -1,
               threshold_b: float = -1, masks: Sequence[Any] = (), poses: list[dict] | None = None) -> list[Any]:
        """Run a preprocessor on images (the ControlNet tab, POST /controlnet/detect), on the worker
        because detectors may load networks. ``masks`` (one per image, or one for all) are what the
        inpaint modules need; a mask-needing module without one is refused. ``poses``, when given,
        receives the OpenPose JSON of each image for the openpose modules (the extension's answer)."""
        if module not in self.preprocessors:
            raise RequestError(f"unknown preprocessor {module!r}; available: {', '.join(self.preprocessors.names())}")
        module = self.preprocessors.canonical(module)
        if not images:
            raise RequestError("no input images")
        try:
            images = [normalize_image(image) for image in images]
            masks = [normalize_image(mask).convert("L") for mask in masks]
        except ImageInputError as e:
            raise RequestError(str(e)) from e
        if module in INPAINT_MODULES and not masks:
            raise RequestError(f"{module} needs a mask per image (white = the area to generate)")
        if masks and len(masks) not in (1, len(images)):
            raise RequestError(f"give one mask per image or one for all ({len(images)} images, {len(masks)} masks)")

        # the extension's leniency: a value outside a slider's range is its default (and a warning)
        resolution, threshold_a, threshold_b = lenient_params(self.preprocessors.get(module), resolution,
                                                              threshold_a, threshold_b, "ControlNet detect")

        def job(state: JobState) -> list[Any]:
            state.textinfo = f"Preprocessor {module}"
            try:
                return [self.preprocessors.run(module, image, resolution, threshold_a, threshold_b,
                                               mask=masks[i % len(masks)].resize(image.size) if masks else None,
                                               pose_sink=poses)
                        for i, image in enumerate(images)]
            except PreprocessorError as e:
                raise RequestError(str(e)) from e

        return self.queue.run(job, f"detect {module}")

    # -- what the UI's helpers ask of the loaded model ----------------------------------
    def network_cards(self, kind: str) -> list[Card]:
        """The extra-networks browser's cards of one kind (see studio.networks.cards)."""
        if kind == "checkpoints":
            families = {m.info.path: m.family.split("-")[0] for m in self.models.cached()}
            return [Card(kind, c.model_name, c.path, c.title, families.get(c.path)) for c in self.models.checkpoints()]
        if kind == "lora":
            return [Card(kind, i.name, i.path, lora_tag(i.name), i.family) for i in self.networks.loras.items()]
        if kind == "hypernetworks":
            return [Card(kind, i.name, i.path, hypernet_tag(i.name)) for i in self.networks.hypernetworks.items()]
        if kind == "textual_inversion":
            model = self.models.current
            skipped = self.embeddings.resolve(model.text_widths)[1] if model is not None else {}
            return [Card(kind, name, emb.path, name, _embedding_family(emb.widths),
                         "does not fit the loaded model" if name in skipped else "")
                    for name, emb in self.embeddings.embeddings.items()]
        raise ValueError(f"unknown extra network kind {kind!r}")

    def token_counts(self, text: str, steps: int = 20) -> dict[str, tuple[int, int]]:
        """Each text encoder's (tokens, limit) for the longest text any step sees: {"clip": (n, 75)} for
        SD models, plus "t5" for SD3/FLUX (whose CLIP part is cut at 75 tokens while T5 reads on)."""
        from studio.prompts.parser import extract_extra_networks, split_and
        from studio.prompts.schedule import cached_schedule

        model = self.models.current
        if model is None or not model.spec.is_flow:
            count, limit = self.token_count(text, steps)
            return {"clip": (count, limit)}
        self.token_count(text, steps)  # the request limits
        text, _ = extract_extra_networks(text or "")
        texts = [t for sub, _ in split_and(text) for _, t in cached_schedule(sub, steps)] or [""]
        counts = [model.conditioner.token_counts(t) for t in texts]
        return {key: (max(c[key][0] for c in counts), counts[0][key][1]) for key in counts[0]}

    def token_count(self, text: str, steps: int = 20) -> tuple[int, int]:
        """A1111's counter: the longest text any step will see, extra-network tags removed.
        Returns (tokens, limit) where the limit grows in steps of 75. A prompt over the request limits
        raises RequestError without being parsed (the parse itself is what the limits bound)."""
        from studio.prompts.encode import tokenize_prompt
        from studio.prompts.limits import check_prompt_limits

        check_prompt_limits(text, steps)
        from studio.prompts.parser import extract_extra_networks, split_and
        from studio.prompts.schedule import cached_schedule

        text, _ = extract_extra_networks(text or "")
        model = self.models.current
        texts = [t for sub, _ in split_and(text) for _, t in cached_schedule(sub, steps)] or [""]
        if model is not None and model.spec.is_flow:
            # T5 reads the whole prompt up to its sequence length: that is the limit that matters
            counts = [model.conditioner.token_counts(t) for t in texts]
            key = "t5" if "t5" in counts[0] else next(iter(counts[0]))   # the encoder that reads on
            return max(c[key][0] for c in counts), counts[0][key][1]
        if model is not None:
            tokenizer, index = model.tokenizers[0], model.conditioner.index
        else:
            from studio.models.tokenizer import make_clip_tokenizer
            tokenizer, index = make_clip_tokenizer(), None
        count = max(tokenize_prompt(tokenizer, t, index)[1] for t in texts)
        return count, max(75, -(-count // 75) * 75)


def _embedding_family(widths: dict[str, int]) -> str | None:
    if "clip_g" in widths:
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(widths.get("default", 0))
