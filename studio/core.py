"""The Studio: the one object that wires flags, settings, the model manager, the job
queue and the engine together. app.py builds exactly one; the UI, the API and the CLI
all call it, so every front door runs the same code."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.config import REPO_ROOT, Flags, Paths, Settings, force_offline
from studio.controlnet.models import ControlNetLibrary
from studio.controlnet.preprocessors import PreprocessorRegistry
from studio.controlnet.runtime import ControlNetModels, check_units, prepare_controls
from studio.devices import DevicePolicy, resolve_policy
from studio.extensions import ExtensionManager
from studio.generation.outputs import SaveFormat
from studio.generation.request import Img2ImgRequest, RequestError, Txt2ImgRequest
from studio.jobs import Job, JobQueue, JobState
from studio.models.catalog import Catalog, CheckpointInfo, HashCache
from studio.models.manager import CacheLimits, ModelManager, OffloadFlags, default_budget_bytes
from studio.models.vae import VaeCatalog, VaeNotFoundError, VaeSwapper
from studio.networks.activation import ExtraNetworks
from studio.networks.cards import Card, hypernet_tag, lora_tag
from studio.networks.embeddings import EmbeddingLibrary
from studio.networks.hypernetworks import HypernetworkLibrary
from studio.networks.lora import LoraLibrary
from studio.optimizations import CompileOptions, compile_cache_dir, set_compiled, token_merging_ratios
from studio.prompts.styles import StyleDatabase, StyleError
from studio.upscale import UpscalerLibrary, default_folders

if TYPE_CHECKING:  # diffusers/transformers load on first use, not at start-up
    from studio.generation.txt2img import GenerationResult
    from studio.models.loader import LoadedModel

log = logging.getLogger(__name__)


def _embedding_family(widths: dict[str, int]) -> str | None:
    if "clip_g" in widths:
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(widths.get("default", 0))


def _int_setting(settings: Settings, key: str, default: int) -> int:
    try:
        return int(settings.get(key, default) or default)
    except (TypeError, ValueError):
        return default


def cache_limits(settings: Settings) -> CacheLimits:
    budget_mb = _int_setting(settings, "sd_checkpoint_cache_mb", 0)
    return CacheLimits(models=max(1, _int_setting(settings, "sd_checkpoints_limit", 1)),
                       budget_bytes=budget_mb << 20 if budget_mb > 0 else default_budget_bytes())


@dataclass
class Studio:
    flags: Flags
    paths: Paths
    settings: Settings
    policy: DevicePolicy
    models: ModelManager
    queue: JobQueue
    embeddings: EmbeddingLibrary
    styles: StyleDatabase
    vaes: VaeCatalog
    networks: ExtraNetworks
    upscalers: UpscalerLibrary
    preprocessors: PreprocessorRegistry
    extensions: ExtensionManager
    controlnets: ControlNetModels

    @classmethod
    def create(cls, flags: Flags) -> Studio:
        force_offline()
        paths = Paths.from_flags(flags)
        paths.ensure()
        settings = Settings.load(paths.settings_file)
        policy = resolve_policy(flags.device, flags.no_half, flags.no_half_vae, flags.precision, flags.xformers,
                                split_attention=flags.opt_split_attention, force_channels_last=flags.opt_channelslast)
        # one HashCache for every kind of file: it owns cache.json and its lock
        hashes = HashCache(paths.hash_cache_file)
        catalog = Catalog(paths.ckpt_dirs, hashes, hashing=not flags.no_hashing)
        demo_dir = None if flags.no_demo else paths.cache_dir / "demo"
        models = ModelManager(catalog, policy, paths.cache_dir / "configs", demo_dir,
                              limits=lambda: cache_limits(settings),
                              offload=OffloadFlags(flags.medvram, flags.lowvram, flags.medvram_sdxl))
        models.refresh()
        embeddings = EmbeddingLibrary(list(paths.embedding_dirs))
        vaes = VaeCatalog(paths.vae, paths.ckpt_dirs, hashes)
        vaes.refresh()
        networks = ExtraNetworks(LoraLibrary(list(paths.lora_dirs), hashes),
                                 HypernetworkLibrary(list(paths.hypernetwork_dirs)))
        networks.refresh()
        upscalers = UpscalerLibrary(default_folders(paths.models), policy.device, policy.dtype)
        preprocessors = PreprocessorRegistry.with_builtins(paths.models / "annotators")
        # the extensions shipped next to the code, then the data dir's own (A1111: extensions/)
        folders = list(dict.fromkeys([REPO_ROOT / "extensions", paths.data / "extensions"]))
        extensions = ExtensionManager(folders, preprocessors, lambda: settings.get("disabled_extensions", []),
                                      save_disabled=lambda names: settings.update({"disabled_extensions": names}))
        extensions.load_all()
        controlnets = ControlNetModels(ControlNetLibrary(paths.controlnet_dirs, hashes), paths.cache_dir / "configs",
                                       lambda: _int_setting(settings, "control_net_model_cache_size", 2))
        controlnets.library.refresh()
        studio = cls(flags, paths, settings, policy, models, JobQueue(), embeddings,
                     StyleDatabase(paths.styles_file), vaes, networks, upscalers, preprocessors, extensions,
                     controlnets)
        log.info("Device policy: %s", policy.label)
        return studio

    # -- models -------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        return self.models.checkpoints()

    def refresh_checkpoints(self) -> list[CheckpointInfo]:
        return self.queue.run(lambda state: self.models.refresh(), "refresh checkpoints")

    def select_checkpoint(self, query: str | None) -> LoadedModel:
        """Load a checkpoint on the worker and remember it as the user's choice."""
        def job(state: JobState) -> LoadedModel:
            state.textinfo = f"Loading {query}"
            model = self.models.load(query)
            self._sync_embeddings()
            return model

        model = self.queue.run(job, f"load {query}")
        self.settings.update({"sd_model_checkpoint": model.info.title, "sd_checkpoint_hash": model.info.sha256})
        return model

    def apply_options(self, changes: dict[str, Any]) -> None:
        """POST /sdapi/v1/options and the UI's settings: validate, load what must be loaded,
        then persist. A bad value raises RequestError and changes nothing."""
        changes = dict(changes)
        if "CLIP_stop_at_last_layers" in changes:
            try:
                skip = int(changes["CLIP_stop_at_last_layers"])
            except (TypeError, ValueError):
                skip = 0
            if not 1 <= skip <= 12:
                raise RequestError("CLIP_stop_at_last_layers must be an integer 1-12")
            changes["CLIP_stop_at_last_layers"] = skip
        for key in ("sd_checkpoints_limit", "sd_checkpoint_cache_mb"):
            if key in changes:
                try:
                    changes[key] = int(changes[key])
                except (TypeError, ValueError) as e:
                    raise RequestError(f"{key} must be an integer") from e
                if changes[key] < (1 if key == "sd_checkpoints_limit" else 0):
                    raise RequestError(f"{key} is out of range")
        title = changes.pop("sd_model_checkpoint", None)
        if title is not None:
            self.select_checkpoint(str(title))
        vae = changes.pop("sd_vae", None)
        if vae is not None:
            self.select_vae(str(vae))
        if changes:
            self.settings.update(changes)
        if {"sd_checkpoints_limit", "sd_checkpoint_cache_mb"} & set(changes):
            self.queue.run(lambda state: self.models.trim(), "apply cache limits")

    def initial_checkpoint(self) -> str | None:
        preferred = self.settings.get("sd_model_checkpoint")
        if preferred and self.models.catalog.find(preferred) is None:
            preferred = None
        return preferred

    def load_initial_model(self) -> LoadedModel | None:
        return self.select_checkpoint(self.initial_checkpoint()) if self.checkpoints() else None

    def start_initial_load(self) -> Job | None:
        """Queue the first model load without waiting: the server answers while it loads,
        and the first generation simply waits behind it in the queue."""
        if not self.checkpoints():
            return None
        query = self.initial_checkpoint()

        def job(state: JobState) -> None:
            state.textinfo = "Loading model"
            try:
                model = self.models.load(query)
                self._sync_embeddings()
            except Exception as e:  # noqa: BLE001 - reported, the studio keeps serving
                log.error("Could not load the initial model: %s", e)
                return
            self.settings.update({"sd_model_checkpoint": model.info.title, "sd_checkpoint_hash": model.info.sha256})

        return self.queue.submit(job, "initial model load")

    @property
    def current_title(self) -> str | None:
        current = self.models.current
        return current.info.title if current else None

    # -- VAE ----------------------------------------------------------------------------
    def vae_choices(self) -> list[str]:
        return self.vaes.choices()

    def refresh_vaes(self) -> None:
        self.vaes.refresh()

    def _apply_vae(self, model: LoadedModel, setting: str | None) -> Any:
        """Runs on the worker: put the wanted VAE into ``model`` (request value, else the
        ``sd_vae`` setting) and return its VaeInfo, or None for the checkpoint's own."""
        if setting is None:
            setting = self.settings.get("sd_vae", "Automatic")
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

    def select_vae(self, name: str) -> None:
        """The UI's VAE dropdown and POST /options ``sd_vae``: check it, apply it to the loaded
        model now, and remember it."""
        if name not in ("Automatic", "None") and self.vaes.find(name) is None:
            self.vaes.refresh()
        try:
            self.vaes.resolve(name, None)
        except VaeNotFoundError as e:
            raise RequestError(str(e)) from e

        def job(state: JobState) -> None:
            if self.models.current is not None:
                self._apply_vae(self.models.current, name)

        self.queue.run(job, f"VAE {name}")
        self.settings.update({"sd_vae": name})

    # -- extra networks -----------------------------------------------------------------
    def refresh_networks(self) -> None:
        self.networks.refresh()
        self.vaes.refresh()
        self.refresh_embeddings()

    def network_cards(self, kind: str) -> list[Card]:
        """The extra-networks browser's cards of one kind (see studio.networks.cards)."""
        if kind == "checkpoints":
            families = {m.info.path: m.family.split("-")[0] for m in self.models.cached()}
            return [Card(kind, c.model_name, c.path, c.title, families.get(c.path)) for c in self.checkpoints()]
        if kind == "lora":
            return [Card(kind, i.name, i.path, lora_tag(i.name), i.family)
                    for i in self.networks.loras.items()]
        if kind == "hypernetworks":
            return [Card(kind, i.name, i.path, hypernet_tag(i.name)) for i in self.networks.hypernetworks.items()]
        if kind == "textual_inversion":
            model = self.models.current
            skipped = self.embeddings.resolve(model.text_widths)[1] if model is not None else {}
            return [Card(kind, name, emb.path, name, _embedding_family(emb.widths),
                         "does not fit the loaded model" if name in skipped else "")
                    for name, emb in self.embeddings.embeddings.items()]
        raise ValueError(f"unknown extra network kind {kind!r}")

    # -- embeddings and styles ----------------------------------------------------------
    def refresh_embeddings(self) -> None:
        self.queue.run(lambda state: self._sync_embeddings(), "refresh embeddings")

    def _sync_embeddings(self) -> None:
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

    def embeddings_api(self) -> dict:
        model = self.models.current
        if model is None:
            return {"loaded": {}, "skipped": {}}
        return self.embeddings.api_dict(model.text_widths)

    def token_count(self, text: str, steps: int = 20) -> tuple[int, int]:
        """A1111's counter: the longest text any step will see, extra-network tags removed.
        Returns (tokens, limit) where the limit grows in steps of 75."""
        from studio.prompts.encode import tokenize_prompt
        from studio.prompts.parser import extract_extra_networks, split_and
        from studio.prompts.schedule import cached_schedule

        text, _ = extract_extra_networks(text or "")
        model = self.models.current
        if model is not None:
            tokenizer, index = model.tokenizers[0], model.conditioner.index
        else:
            from studio.models.tokenizer import make_clip_tokenizer
            tokenizer, index = make_clip_tokenizer(), None
        texts = [t for sub, _ in split_and(text) for _, t in cached_schedule(sub, steps)] or [""]
        count = max(tokenize_prompt(tokenizer, t, index)[1] for t in texts)
        return count, max(75, -(-count // 75) * 75)

    # -- generation ---------------------------------------------------------------------
    def submit_txt2img(self, req: Txt2ImgRequest) -> Job:
        from studio.generation.request import validate_txt2img

        return self._submit(req, validate_txt2img, "txt2img", "txt2img-images")

    def submit_img2img(self, req: Img2ImgRequest) -> Job:
        from studio.generation.request import validate_img2img

        return self._submit(req, validate_img2img, "img2img", "img2img-images")

    def img2img(self, req: Img2ImgRequest, timeout: float | None = None) -> GenerationResult:
        return self.submit_img2img(req).wait(timeout)

    def upscale_image(self, image: Any, upscaler: str, scale: float | None = None, size: tuple[int, int] | None = None,
                      upscaler_2: str | None = None, visibility_2: float = 0.0, save: bool = True) -> tuple[Any, str, Path | None]:
        """The Extras tab / POST /extra-single-image: one image through an upscaler (and, blended
        in at ``visibility_2``, a second one), on the worker. Returns (image, info text, saved path)."""
        from PIL import Image

        from studio.generation.imageops import ImageInputError, normalize_image
        from studio.generation.outputs import save_image
        from studio.upscale import UpscalerError

        for name in (upscaler, upscaler_2):
            if name and name != "None" and self.upscalers.find(name) is None:
                self.upscalers.refresh()
                if self.upscalers.find(name) is None:
                    names = ", ".join(u.name for u in self.upscalers.items())
                    raise RequestError(f"upscaler {name!r} not found. Available: {names}")
        if (scale is None) == (size is None):
            raise RequestError("give either an upscale factor or a target size")
        if scale is not None and not 0.05 <= scale <= 8:
            raise RequestError(f"upscaling_resize must be between 0.05 and 8 (got {scale:g})")
        if size is not None and not all(8 <= v <= 8192 for v in size):
            raise RequestError(f"target size must be between 8 and 8192 (got {size[0]}x{size[1]})")
        try:
            image = normalize_image(image)
        except ImageInputError as e:
            raise RequestError(str(e)) from e

        def job(state: JobState) -> Any:
            state.textinfo = f"Upscaling with {upscaler}"
            try:
                out = self.upscalers.upscale(image, upscaler or "None", scale=scale, size=size)
                if upscaler_2 and upscaler_2 != "None" and visibility_2 > 0:
                    second = self.upscalers.upscale(image, upscaler_2, size=out.size)
                    out = Image.blend(out, second, float(visibility_2))
            except UpscalerError as e:
                raise RequestError(str(e)) from e
            return out

        out = self.queue.run(job, "upscale")
        parts = [f"Postprocess upscale {'by' if scale is not None else 'to'}: "
                 + (f"{scale:g}" if scale is not None else f"{size[0]}x{size[1]}"),
                 f"Postprocess upscaler: {upscaler}"]
        if upscaler_2 and upscaler_2 != "None" and visibility_2 > 0:
            parts += [f"Postprocess upscaler 2: {upscaler_2}", f"Postprocess upscaler 2 visibility: {visibility_2:g}"]
        info = ", ".join(parts)
        path = save_image(out, info, self.paths.outputs / "extras-images", 0,
                          save_format=SaveFormat.from_settings(self.settings)) if save else None
        return out, info, path

    def img2img_folder(self, fields: dict[str, Any], folder_in: Path, folder_out: Path | None) -> list[Path]:
        """A1111's img2img Batch: every image in ``folder_in`` (not recursive) with the same
        settings, written to ``folder_out`` (default outputs/img2img-images) with infotext.
        Unreadable files are skipped and reported in the log; nothing is overwritten."""
        from studio.generation.outputs import ImageReadError, open_image, save_image

        if not folder_in.is_dir():
            raise RequestError(f"input directory {str(folder_in)!r} does not exist")
        files = sorted(p for p in folder_in.iterdir()
                       if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise RequestError(f"no images in {folder_in}")
        target = folder_out or self.paths.outputs / "img2img-images"
        saved: list[Path] = []
        for path in files:
            try:
                image = open_image(path.read_bytes())
            except (ImageReadError, OSError) as e:
                log.warning("img2img batch: skipping %s: %s", path, e)
                continue
            req = Img2ImgRequest(init_images=(image,), save_images=False, **fields)
            result = self.img2img(req)
            for image_out, text, seed in zip(result.images, result.infotexts, result.seeds):
                saved.append(save_image(image_out, text, target, seed, dated=folder_out is None,
                                        save_format=SaveFormat.from_settings(self.settings)))
        return saved

    def _submit(self, req: Txt2ImgRequest, validate: Any, kind: str, outdir_name: str) -> Job:
        """Styles, validation and settings happen here, before queueing, so bad input never
        occupies the worker; the job loads the model and runs the mode's loop."""
        if req.styles:
            try:
                prompt, negative = self.styles.apply(req.styles, req.prompt, req.negative_prompt)
            except StyleError as e:
                raise RequestError(str(e)) from e
            req = req.with_changes(prompt=prompt, negative_prompt=negative, styles=())
        req = validate(req)
        if req.controlnet_units:
            check_units(req.controlnet_units, self.preprocessors, self.controlnets,
                        has_init_image=bool(getattr(req, "init_images", ())))
        skip = _int_setting(self.settings, "CLIP_stop_at_last_layers", 1)
        if req.clip_skip == 1 and 1 < skip <= 12:
            req = req.with_changes(clip_skip=skip)
        merge, merge_hr = token_merging_ratios(self.settings, img2img=kind == "img2img")
        req = req.with_changes(
            token_merging_ratio=merge if req.token_merging_ratio is None else req.token_merging_ratio,
            token_merging_ratio_hr=merge_hr if req.token_merging_ratio_hr is None else req.token_merging_ratio_hr)
        compile_options = CompileOptions.from_settings(self.settings)
        every = _int_setting(self.settings, "show_progress_every_n_steps", 1)
        if not self.settings.get("live_previews_enable", True):
            every = 0
        save_format = SaveFormat.from_settings(self.settings)

        def job(state: JobState) -> GenerationResult:
            if kind == "img2img":
                from studio.generation.img2img import run_img2img as run
            else:
                from studio.generation.txt2img import run_txt2img as run

            model = self.models.load(req.checkpoint or self.initial_checkpoint())
            self._sync_embeddings()
            vae = self._apply_vae(model, req.vae)
            set_compiled(model.unet, compile_options, compile_cache_dir(self.paths.data))
            extra = {"upscalers": self.upscalers} if kind == "txt2img" else {}
            controls = self._prepare_controls(req, model, state)
            return run(model, req, state, self.paths.outputs / outdir_name, preview_every=every,
                       networks=self.networks, vae=vae, controls=controls, save_format=save_format, **extra)

        return self.queue.submit(job, kind)

    def _prepare_controls(self, req: Txt2ImgRequest, model: LoadedModel, state: JobState) -> Any:
        """On the worker: preprocess the enabled ControlNet units and load their models."""
        if not any(u.enabled for u in req.controlnet_units):
            return None
        init = getattr(req, "init_images", ())

        def progress(index: int) -> None:
            state.textinfo = f"ControlNet unit {index}: preprocessing"

        return prepare_controls(req.controlnet_units, self.preprocessors, self.controlnets, model.family,
                                req.width, req.height, model.policy.dtype, model.policy.device,
                                init_image=init[0] if init else None, seed=max(req.seed, 0), on_unit=progress)

    def detect(self, module: str, images: list[Any], resolution: int = -1, threshold_a: float = -1,
               threshold_b: float = -1) -> list[Any]:
        """Run a preprocessor on images (the ControlNet tab, POST /controlnet/detect), on the worker
        because detectors may load networks."""
        from studio.controlnet.preprocessors import PreprocessorError
        from studio.generation.imageops import ImageInputError, normalize_image

        if module not in self.preprocessors:
            raise RequestError(f"unknown preprocessor {module!r}; available: {', '.join(self.preprocessors.names())}")
        if not images:
            raise RequestError("no input images")
        try:
            images = [normalize_image(image) for image in images]
        except ImageInputError as e:
            raise RequestError(str(e)) from e

        def job(state: JobState) -> list[Any]:
            state.textinfo = f"Preprocessor {module}"
            try:
                return [self.preprocessors.run(module, image, resolution, threshold_a, threshold_b)
                        for image in images]
            except PreprocessorError as e:
                raise RequestError(str(e)) from e

        return self.queue.run(job, f"detect {module}")

    # -- training -----------------------------------------------------------------------
    def submit_training(self, req: Any) -> Job:
        """A LoRA / embedding / hypernetwork training run (studio.training.runner.TrainingRequest) as a
        job on the one queue: never at the same time as a generation. Checked before queueing."""
        from studio.training.runner import execute, prepare

        prepared = prepare(self, req)
        return self.queue.submit(lambda state: execute(self, prepared, state),
                                 f"train {req.kind} {prepared.request.settings.output_name}")

    def create_embedding(self, name: str, init_text: str = "*", vectors_per_token: int = 1,
                         overwrite: bool = False) -> Path:
        """A1111's "Create embedding": a new embedding file in the embeddings folder, initialised from
        the loaded model's token embeddings of ``init_text``."""
        from studio.training.embedding import create_embedding

        folder = Path(self.paths.embedding_dirs[0]) if self.paths.embedding_dirs else self.paths.data / "embeddings"

        def job(state: JobState) -> Path:
            model = self.models.load(self.initial_checkpoint())
            path = create_embedding(model, name, init_text, vectors_per_token, overwrite, folder=folder)
            self._sync_embeddings()
            return path

        return self.queue.run(job, f"create embedding {name}")

    def create_hypernetwork(self, name: str, **options: Any) -> Path:
        """A1111's "Create hypernetwork" into the hypernetworks folder (options: sizes, layer_structure,
        activation, weight_init, add_layer_norm, use_dropout, dropout_structure, overwrite)."""
        from studio.training.hypernetwork import create_hypernetwork

        folder = Path(self.paths.hypernetwork_dirs[0])
        path = create_hypernetwork(name, folder=folder, **options)
        self.networks.hypernetworks.refresh()
        return path

    def txt2img(self, req: Txt2ImgRequest, timeout: float | None = None) -> GenerationResult:
        return self.submit_txt2img(req).wait(timeout)


__all__ = ["Studio", "RequestError"]
