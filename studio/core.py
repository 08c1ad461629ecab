"""The Studio: a thin facade that app.py builds once. It wires flags, settings, the model manager,
the job queue and the engine together; the UI, the API and the CLI all call it, so every front door
runs the same code. The work itself is in studio.engine (requests) and the libraries it holds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.config import REPO_ROOT, Flags, Paths, Settings, force_offline
from studio.controlnet.clip_vision import ClipVisionEncoders
from studio.controlnet.models import ControlNetLibrary
from studio.controlnet.preprocessors import PreprocessorRegistry
from studio.controlnet.runtime import ControlNetModels
from studio.detailer import DetectorRegistry
from studio.devices import DeferredPolicy, DevicePolicy, resolve_policy
from studio.engine import Engine
from studio.errors import RequestError
from studio.extensions import ExtensionManager
from studio.generation.request import Img2ImgRequest, RequestSchemas, Txt2ImgRequest
from studio.jobs import Job, JobQueue, JobState
from studio.merge import MergeRequest, MergeResult
from studio.merge.job import output_folder, submit_merge
from studio.models.catalog import Catalog, CheckpointInfo, HashCache
from studio.models.manager import CacheLimits, ModelManager, OffloadFlags, default_budget_bytes
from studio.models.module_source import checkpoint_folders, module_scanner
from studio.models.vae import VaeCatalog, VaeNotFoundError
from studio.models.watch import FolderWatcher, watch_targets
from studio.networks.activation import ExtraNetworks
from studio.networks.embeddings import EmbeddingLibrary
from studio.networks.hypernetworks import HypernetworkLibrary
from studio.networks.lora_files import LoraLibrary
from studio.options import validate_changes
from studio.prompts.styles import StyleDatabase
from studio.restore.library import FaceRestorers
from studio.training import runner as training
from studio.upscale import UpscalerLibrary, default_folders

if TYPE_CHECKING:
    from studio.generation.runner import GenerationResult
    from studio.models.loader import LoadedModel

log = logging.getLogger(__name__)


def cache_limits(settings: Settings) -> CacheLimits:
    options, budget_mb = settings.options, settings.options.sd_checkpoint_cache_mb
    return CacheLimits(models=options.sd_checkpoints_limit, gpu_weights_bytes=options.forge_gpu_weights_mb << 20,
                       budget_bytes=budget_mb << 20 if budget_mb > 0 else default_budget_bytes())


@dataclass
class Studio:
    flags: Flags
    paths: Paths
    settings: Settings
    # resolved (torch imported, the device probed, the choice logged) when first asked for: see `policy`
    deferred_policy: DeferredPolicy
    engine: Engine
    extensions: ExtensionManager
    schemas: RequestSchemas = RequestSchemas()
    # started by the server (not by create(): tests get no threads): new model files appear by themselves
    watcher: FolderWatcher | None = None
    # with --workers / --ray-address: the generation workers (studio.cluster.front.Cluster, set by the server)
    cluster: Any = None

    @property
    def policy(self) -> DevicePolicy:
        """The device policy, resolved on first use (a model load, a generation, the footer), so the
        server answers before torch is imported."""
        return self.deferred_policy.get()

    def watch_model_folders(self, interval: float = 1.0) -> FolderWatcher:
        """Start watching the model folders: a copied LoRA, checkpoint, VAE… is listed without ↻."""
        if self.watcher is None:
            self.watcher = FolderWatcher(watch_targets(self), interval=interval)
        return self.watcher.start()

    def shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.queue.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()

    def use_cluster(self, cluster: Any) -> None:
        """Generation jobs run on ``cluster``'s workers from now on (they still wait in this queue)."""
        self.cluster = cluster
        self.engine.remote = cluster

    def workers_status(self) -> dict[str, Any]:
        """GET /studio/v1/workers and the Workers panel: the cluster's workers, or this process as the
        one worker when there is no cluster."""
        if self.cluster is not None:
            return self.cluster.status()
        import os
        import socket

        running = self.queue.running()
        local = [job for job in running if job.lane == "local"]
        recent = [r for r in self.queue.recent() if r.outcome != "cancelled"]
        worker = {"id": "local", "node": socket.gethostname(), "pid": os.getpid(), "device": self.policy.label,
                  "checkpoints": [m.info.title for m in self.models.cached()],
                  "state": "busy" if local else "idle", "job": local[0].state.job_id if local else None,
                  "jobs_done": len(recent), "failures": sum(1 for r in recent if r.outcome == "failed"),
                  "error": None}
        return {"enabled": False, "mode": "local", "address": None, "ready": True, "error": None,
                "dashboard_url": None, "planned_workers": 1, "device": str(self.policy.device), "workers": [worker]}

    @classmethod
    def create(cls, flags: Flags, schemas: RequestSchemas | None = None) -> Studio:
        force_offline()
        paths = Paths.from_flags(flags)
        paths.ensure()
        settings = Settings.load(paths.settings_file)
        policy = DeferredPolicy(lambda: resolve_policy(
            flags.device, flags.no_half, flags.no_half_vae, flags.precision, flags.xformers,
            split_attention=flags.opt_split_attention, force_channels_last=flags.opt_channelslast))
        # one HashCache for every kind of file: it owns cache.json and its lock
        hashes = HashCache(paths.hash_cache_file)
        catalog = Catalog(checkpoint_folders(paths), hashes, hashing=not flags.no_hashing)
        demo_dir = None if flags.no_demo else paths.cache_dir / "demo"
        models = ModelManager(catalog, policy, paths.cache_dir / "configs", demo_dir,
                              limits=lambda: cache_limits(settings),
                              offload=OffloadFlags(flags.medvram, flags.lowvram, flags.medvram_sdxl),
                              modules=module_scanner(paths))
        models.refresh()
        vaes = VaeCatalog(paths.vae, paths.ckpt_dirs, hashes)
        vaes.refresh()
        networks = ExtraNetworks(LoraLibrary(list(paths.lora_dirs), hashes),
                                 HypernetworkLibrary(list(paths.hypernetwork_dirs)))
        networks.refresh()
        preprocessors = PreprocessorRegistry.with_builtins(paths.models / "annotators")
        # the extensions shipped next to the code, then the data dir's own (A1111: extensions/)
        folders = list(dict.fromkeys([REPO_ROOT / "extensions", paths.data / "extensions"]))
        detectors = DetectorRegistry(paths.models / "adetailer", device=lambda: str(policy.get().device))
        extensions = ExtensionManager(folders, preprocessors, lambda: settings.options.disabled_extensions,
                                      save_disabled=lambda names: settings.update({"disabled_extensions": names}),
                                      detectors=detectors)
        extensions.load_all()
        controlnets = ControlNetModels(ControlNetLibrary(paths.controlnet_dirs, hashes), paths.cache_dir / "configs",
                                       lambda: settings.options.control_net_model_cache_size,
                                       ClipVisionEncoders(paths.clip_vision_dirs))
        controlnets.library.refresh()
        engine = Engine(paths, settings, models, JobQueue(), EmbeddingLibrary(list(paths.embedding_dirs)),
                        StyleDatabase(paths.styles_file), vaes, networks,
                        UpscalerLibrary(default_folders(paths.models), policy=policy),
                        preprocessors, controlnets, face_restorers=FaceRestorers(paths.models),
                        detectors=detectors, step_callbacks=extensions.step_callbacks)
        return cls(flags, paths, settings, policy, engine, extensions, schemas or RequestSchemas())

    # The libraries the doors list and refresh (owned by the engine, named here for the doors).
    models = property(lambda self: self.engine.models)
    queue = property(lambda self: self.engine.queue)
    embeddings = property(lambda self: self.engine.embeddings)
    styles = property(lambda self: self.engine.styles)
    vaes = property(lambda self: self.engine.vaes)
    networks = property(lambda self: self.engine.networks)
    upscalers = property(lambda self: self.engine.upscalers)
    preprocessors = property(lambda self: self.engine.preprocessors)
    controlnets = property(lambda self: self.engine.controlnets)

    # -- models -------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        return self.models.checkpoints()

    def refresh_checkpoints(self) -> list[CheckpointInfo]:
        return self.queue.run(lambda state: self.models.refresh(), "refresh checkpoints")

    def select_checkpoint(self, query: str | None) -> LoadedModel | None:
        """Load a checkpoint on the worker and remember it as the user's choice. With generation workers
        it is only remembered (checked against the list): each worker loads it when a job needs it."""
        if self.cluster is not None:
            info = self.models.catalog.find(query or "")
            if info is None:
                raise RequestError(f"checkpoint {query!r} not found (GET /sdapi/v1/sd-models lists them)")
            self.settings.update({"sd_model_checkpoint": info.title, "sd_checkpoint_hash": info.sha256})
            return None

        def job(state: JobState) -> LoadedModel:
            state.textinfo = f"Loading {query}"
            return self.engine.load(query)

        model = self.queue.run(job, f"load {query}")
        self.settings.update({"sd_model_checkpoint": model.info.title, "sd_checkpoint_hash": model.info.sha256})
        return model

    def apply_options(self, changes: dict[str, Any]) -> dict[str, Any]:
        """POST /sdapi/v1/options and the Settings tab: validate everything first (a bad value or an
        unknown key raises RequestError and changes nothing), load what must be loaded, persist.
        Returns the validated changes."""
        checked = validate_changes(changes, self.settings.options)
        title = checked.pop("sd_model_checkpoint", None)
        if title is not None:
            self.select_checkpoint(str(title))
        vae = checked.pop("sd_vae", None)
        if vae is not None:
            self.select_vae(str(vae))
        if checked:
            self.settings.update(checked)
        if {"sd_checkpoints_limit", "sd_checkpoint_cache_mb"} & set(checked):
            self.queue.run(lambda state: self.models.trim(), "apply cache limits")
        return checked

    def initial_checkpoint(self) -> str | None:
        return self.engine.initial_checkpoint()

    def load_initial_model(self) -> LoadedModel | None:
        return self.select_checkpoint(self.initial_checkpoint()) if self.checkpoints() else None

    def start_initial_load(self) -> Job | None:
        """Queue the first model load without waiting: the server answers while it loads,
        and the first generation simply waits behind it in the queue."""
        if not self.checkpoints():
            return None
        query = self.initial_checkpoint()
        if self.cluster is not None:   # workers load their own; the choice is remembered, as a load would
            if not query:
                first = self.checkpoints()[0]
                self.settings.update({"sd_model_checkpoint": first.title, "sd_checkpoint_hash": first.sha256})
            return None

        def job(state: JobState) -> None:
            state.textinfo = "Loading model"
            try:
                model = self.engine.load(query)
            except Exception as e:  # noqa: BLE001 - reported, the studio keeps serving
                log.error("Could not load the initial model: %s", e)
                return
            self.settings.update({"sd_model_checkpoint": model.info.title, "sd_checkpoint_hash": model.info.sha256})

        return self.queue.submit(job, "initial model load")

    @property
    def current_title(self) -> str | None:
        """The loaded checkpoint; with generation workers, the chosen one (the front loads none)."""
        if self.cluster is not None:
            info = self.models.catalog.find(self.settings.options.sd_model_checkpoint or "")
            return info.title if info is not None else None
        current = self.models.current
        return current.info.title if current else None

    # -- VAE, networks, embeddings ------------------------------------------------------
    def vae_choices(self) -> list[str]:
        return self.vaes.choices()

    def refresh_vaes(self) -> None:
        self.vaes.refresh()

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
                self.engine.apply_vae(self.models.current, name)

        self.queue.run(job, f"VAE {name}")
        self.settings.update({"sd_vae": name})

    def refresh_networks(self) -> None:
        self.networks.refresh()
        self.vaes.refresh()
        self.refresh_embeddings()

    def network_cards(self, kind: str) -> list[Any]:
        return self.engine.network_cards(kind)

    def refresh_embeddings(self) -> None:
        self.queue.run(lambda state: self.engine.sync_embeddings(), "refresh embeddings")

    def embeddings_api(self) -> dict:
        model = self.models.current
        return self.embeddings.api_dict(model.text_widths) if model is not None else {"loaded": {}, "skipped": {}}

    def token_count(self, text: str, steps: int = 20) -> tuple[int, int]:
        return self.engine.token_count(text, steps)

    # -- generation ---------------------------------------------------------------------
    def submit_txt2img(self, req: Txt2ImgRequest) -> Job:
        return self.engine.submit(req)

    def submit_img2img(self, req: Img2ImgRequest) -> Job:
        return self.engine.submit(req)

    def txt2img(self, req: Txt2ImgRequest, timeout: float | None = None) -> GenerationResult:
        return self.engine.submit(req).wait(timeout)

    def img2img(self, req: Img2ImgRequest, timeout: float | None = None) -> GenerationResult:
        return self.engine.submit(req).wait(timeout)

    def upscale_image(self, image: Any, upscaler: str, **options: Any) -> tuple[Any, str, Path | None]:
        return self.engine.upscale_image(image, upscaler, **options)

    def img2img_folder(self, fields: dict[str, Any], folder_in: Path, folder_out: Path | None) -> list[Path]:
        return self.engine.img2img_folder(fields, folder_in, folder_out)

    def detect(self, module: str, images: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        return self.engine.detect(module, images, *args, **kwargs)

    def merge_checkpoints(self, req: MergeRequest, timeout: float | None = None) -> MergeResult:
        """A1111's Checkpoint Merger, as a queued job; the new file is listed when it returns."""
        return submit_merge(self.engine, req, output_folder(self.engine, self.flags.ckpt_dir)).wait(timeout)

    # -- training (studio.training.runner) ----------------------------------------------
    def submit_training(self, req: Any) -> Job:
        """A LoRA / embedding / hypernetwork training run (studio.training.runner.TrainingRequest) as a
        job on the one queue: never at the same time as a generation. Checked before queueing."""
        prepared = training.prepare(self.engine, req)
        return self.queue.submit(lambda state: training.execute(self.engine, prepared, state),
                                 f"train {req.kind} {prepared.request.settings.output_name}", request=req)

    def create_embedding(self, name: str, *args: Any, **kwargs: Any) -> Path:
        return training.create_embedding_job(self.engine, name, *args, **kwargs)

    def create_hypernetwork(self, name: str, **options: Any) -> Path:
        return training.create_hypernetwork_file(self.engine, name, **options)


__all__ = ["RequestError", "Studio"]
