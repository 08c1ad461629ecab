"""The one owner of loaded models, with an LRU cache of checkpoints.

All loads run on the job worker (callers go through the queue), so there is never more
than one model being built at a time. A failed load leaves the previous model loaded
and usable.

The cache follows A1111's ``sd_checkpoints_limit`` (how many built models to keep) and adds
a byte budget, because a limit in models means very different RAM for SD1 and SDXL. When a
new file has the same architecture as the model that would be evicted for it, its weights
are loaded into that model's modules instead of building new ones (A1111's "Reusing loaded
model"), so switching never holds two copies and RAM does not grow. On CUDA inactive
cached models wait in CPU RAM (A1111's ``sd_checkpoints_keep_in_cpu``).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from studio.devices import DeferredPolicy, DevicePolicy
from studio.models.catalog import Catalog, CheckpointInfo
from studio.models.memory_plan import plan_fp8_storage, plan_placement
from studio.models.state_dict import ModelFileError
from studio.offload import Offloader, OffloadMode, offload_mode

if TYPE_CHECKING:
    import torch

    from studio.models.loader import LoadedModel
    from studio.models.modules import ModuleFile

log = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    pass


@dataclass(frozen=True)
class OffloadFlags:
    medvram: bool = False
    lowvram: bool = False
    medvram_sdxl: bool = False


@dataclass(frozen=True)
class CacheLimits:
    models: int = 1           # A1111's sd_checkpoints_limit
    budget_bytes: int = 0     # 0 = no byte limit
    gpu_weights_bytes: int = 0  # Forge's "GPU Weights": VRAM the weights may take (0 = from the free VRAM)


def default_budget_bytes() -> int:
    """Half of the machine's RAM: room for the OS, the browser and one generation."""
    try:
        pages, page_size = _sysconf("SC_PHYS_PAGES"), _sysconf("SC_PAGE_SIZE")
        return pages * page_size // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _sysconf(name: str) -> int:
    import os

    return int(os.sysconf(name))


def _component_bytes(model: LoadedModel) -> dict[str, int]:
    parts = {"denoiser": model.unet, "vae": model.vae, **{f"text_encoder_{i}": te
                                                           for i, te in enumerate(model.text_encoders)}}
    return {name: sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
            for name, m in parts.items()}


def _storage_bits(module: torch.nn.Module) -> int:
    """Bits per element of the module's largest weight matrix (16 for bf16/fp16 files)."""
    weights = [p for p in module.parameters() if p.ndim >= 2 and not hasattr(p, "quant_type")]
    return max(weights, key=lambda p: p.numel()).element_size() * 8 if weights else 0


def _free_vram(policy: DevicePolicy) -> int | None:
    """Free memory on the policy's CUDA device now (after the previous model went back to RAM)."""
    import torch
    if policy.device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(policy.device)
    return int(free)


class ModelManager:
    def __init__(self, catalog: Catalog, policy: DevicePolicy | DeferredPolicy, config_cache: Path,
                 demo_dir: Path | None = None, limits: Callable[[], CacheLimits] = CacheLimits,
                 offload: OffloadFlags | None = None,
                 modules: Callable[[], Sequence[ModuleFile]] | None = None):
        self.catalog = catalog
        self._policy = policy
        self.config_cache = config_cache
        self.demo_dir = demo_dir
        self.limits = limits
        self.current: LoadedModel | None = None
        # path -> model, least recently used first; includes the current model
        self._cache: OrderedDict[Path, LoadedModel] = OrderedDict()
        self.last_switch_seconds = 0.0
        self.offload = offload or OffloadFlags()
        self._offloader: Offloader | None = None
        # the separate text-encoder / VAE files, for checkpoints that lack them (scanned when asked)
        self.modules = modules or (lambda: ())
        # models a running job switches between (hires checkpoint, refiner): never evicted or reused
        self._pinned: frozenset[Path] = frozenset()
        self.disk_loads = 0   # checkpoints read from disk (not switched to from the cache), for tests and logs

    @property
    def policy(self) -> DevicePolicy:
        """The device policy; a deferred one is resolved here, on the first load (listing needs none)."""
        return self._policy.get() if isinstance(self._policy, DeferredPolicy) else self._policy

    @policy.setter
    def policy(self, policy: DevicePolicy | DeferredPolicy) -> None:
        self._policy = policy

    # -- catalog --------------------------------------------------------------------------
    def refresh(self) -> list[CheckpointInfo]:
        items = self.catalog.refresh()
        if items:
            self.catalog.clear_extra()  # the demo is only offered while there is nothing else
        elif self.demo_dir is not None:
            from studio.models.demo import demo_checkpoint_info

            # listed now, written on its first load (making it imports torch, which start-up does not)
            self.catalog.add_extra(demo_checkpoint_info(self.demo_dir))
        return self.catalog.items()

    def checkpoints(self) -> list[CheckpointInfo]:
        return self.catalog.items()

    @property
    def using_demo(self) -> bool:
        return self.current is not None and self.current.info.is_demo

    def resolve(self, query: str | None) -> CheckpointInfo:
        if query:
            info = self.catalog.find(query)
            if info is None:
                names = ", ".join(c.title for c in self.catalog.items()) or "none"
                raise ModelNotFoundError(f"Checkpoint {query!r} not found. Available: {names}")
            return info
        if self.current is not None:
            return self.current.info
        items = self.catalog.items()
        if not items:
            raise ModelNotFoundError(
                "No checkpoint found. Put .safetensors or .ckpt files in models/Stable-diffusion "
                "and press refresh."
            )
        return items[0]

    # -- cache ----------------------------------------------------------------------------
    def cached(self) -> list[LoadedModel]:
        return list(self._cache.values())

    def cached_bytes(self) -> int:
        return sum(m.nbytes for m in self._cache.values())

    @contextmanager
    def pinned(self, *models: LoadedModel) -> Iterator[None]:
        """Within the block, ``models`` and every model loaded with ``pin=True`` stay loaded and are
        never rebuilt in place for another file: a job that switches models mid-way (hires checkpoint,
        refiner) holds references to both. The cache limits apply again at the next load after."""
        before = self._pinned
        self._pinned = before | {m.info.path.resolve() for m in models}
        try:
            yield
        finally:
            self._pinned = before

    def _is_pinned(self, model: LoadedModel) -> bool:
        return model.info.path.resolve() in self._pinned

    def load(self, query: str | None, chosen_modules: Sequence[str] = (), pin: bool = False) -> LoadedModel:
        """Load (or switch to) a checkpoint. ``chosen_modules`` are the text-encoder / VAE file names the
        user picked (Forge's ``forge_additional_modules``) for checkpoints that lack them. ``pin``: keep
        it loaded until the enclosing :meth:`pinned` block ends."""
        info = self.resolve(query)
        if pin:
            self._pinned = self._pinned | {info.path.resolve()}
        started = time.perf_counter()
        key = info.path.resolve()
        self._drop_if_modules_changed(key, chosen_modules)
        if self.current is not None and self.current.info.path.resolve() == key:
            return self.current
        hit = self._cache.get(key)
        if hit is not None:
            self._activate(hit)
            self.last_switch_seconds = time.perf_counter() - started
            log.info("Switched to cached model %s in %.2fs", info.title, self.last_switch_seconds)
            return hit
        if info.is_demo:
            from studio.models.demo import ensure_demo_checkpoint

            ensure_demo_checkpoint(info.path.parent)
        if not info.path.exists():
            raise ModelFileError(f"{info.name}: file not found (moved or deleted? press refresh)")
        try:
            self.catalog.ensure_hash(info)
        except OSError as e:
            raise ModelFileError(f"{info.name}: cannot read file: {e}") from e
        from studio.models import (
            dit_loader,
            loader,  # diffusers: imported on first load
        )

        if info.is_diffusers and (info.path / "transformer").is_dir():
            model = dit_loader.load_dit_folder(info, self.policy)
        elif info.is_diffusers:
            model = loader.load_diffusers_folder(info, self.policy)
        elif dit_loader.is_dit_file(info.path):
            if not self._fits(info.path.stat().st_size):
                self._make_room(incoming=1)
            model = dit_loader.load_dit(info, self.policy, self.config_cache, self.modules(), chosen_modules)
        else:
            ckpt = loader.read_checkpoint(info, self.config_cache)
            victim = self._reusable(ckpt.arch_key(self.policy))
            if victim is not None:
                log.info("Reusing loaded model %s to load %s", victim.info.title, info.title)
                self._forget(victim)
                if self.current is victim:
                    self.current = None
                try:
                    model = loader.reuse_model(victim, ckpt, self.policy)
                except ModelFileError:
                    # The modules may hold a mix of both files now: they can't be trusted.
                    self._free()
                    raise
            else:
                # Building before evicting keeps the previous model if the build fails; when
                # the budget can't hold both, memory wins and the old one goes first.
                if not self._fits(ckpt.nbytes):
                    self._make_room(incoming=1)
                model = loader.build_model(ckpt, self.policy)
        self.disk_loads += 1
        self._cache[key] = model
        self._activate(model)
        self._evict_over_limits()
        self.last_switch_seconds = time.perf_counter() - started
        return model

    def _drop_if_modules_changed(self, key: Path, chosen: Sequence[str]) -> None:
        """A cached DiT model was completed with separate text-encoder / VAE files; when the user's choice
        (``forge_additional_modules``) or the files now pick others, it must be built again."""
        cached = self._cache.get(key)
        if cached is None or not cached.modules_used:
            return
        from studio.models import dit_loader

        try:
            wanted = dit_loader.planned_modules(cached.info.path, self.modules(), chosen)
        except ModelFileError:
            wanted = None  # the load will report it
        if wanted != cached.modules_used:
            log.info("%s: text encoder / VAE choice changed; reloading", cached.info.title)
            self._evict(cached)
            self._free()

    def _reusable(self, arch_key: tuple) -> LoadedModel | None:
        """The least recently used model that must go to make room for one more, if it has
        the same architecture as the incoming file."""
        limits = self.limits()
        if not self._cache or len(self._cache) < max(1, limits.models):
            return None
        victim = next(iter(self._cache.values()))
        return victim if victim.arch_key == arch_key and not self._is_pinned(victim) else None

    def _fits(self, incoming_bytes: int) -> bool:
        budget = self.limits().budget_bytes
        return budget <= 0 or self.cached_bytes() + incoming_bytes <= budget

    def _make_room(self, incoming: int) -> None:
        limits = self.limits()
        while True:
            unpinned = [m for m in self._cache.values() if not self._is_pinned(m)]
            if not unpinned or len(self._cache) + incoming <= max(1, limits.models):
                break
            self._evict(unpinned[0])
        self._free()

    def trim(self) -> None:
        """Apply lowered limits now rather than at the next load."""
        self._evict_over_limits()

    def _evict_over_limits(self) -> None:
        """Drop least recently used models until the count and byte budget fit; the current
        model always stays, even when it alone is over the budget."""
        limits = self.limits()
        evicted = False
        while len(self._cache) > 1:
            over_count = len(self._cache) > max(1, limits.models)
            over_bytes = limits.budget_bytes > 0 and self.cached_bytes() > limits.budget_bytes
            if not (over_count or over_bytes):
                break
            victim = next((m for m in self._cache.values() if m is not self.current and not self._is_pinned(m)),
                          None)
            if victim is None:
                break
            self._evict(victim)
            evicted = True
        if evicted:
            self._free()

    def _activate(self, model: LoadedModel) -> None:
        import torch

        from studio.models.storage import to_fp8_storage
        previous = self.current
        if self._offloader is not None:
            self._offloader.detach()  # leaves every component in RAM
            self._offloader = None
        if previous is not None and previous is not model and self.policy.device.type != "cpu":
            previous.move_to(torch.device("cpu"))
        flag_mode = offload_mode(self.offload.medvram, self.offload.lowvram, self.offload.medvram_sdxl,
                                 model.is_sdxl)
        parts, free = _component_bytes(model), _free_vram(self.policy)
        gpu_weights = self.limits().gpu_weights_bytes
        if flag_mode is OffloadMode.NONE and model.spec.is_flow and plan_fp8_storage(
                self.policy.device.type, parts, "denoiser", _storage_bits(model.unet), free, gpu_weights):
            count = to_fp8_storage(model.unet, self.policy.dtype)
            log.info("%s: transformer kept in fp8 (%d matrices) to fit the GPU", model.info.title, count)
            parts = _component_bytes(model)
        plan = plan_placement(flag_mode, self.policy.device.type, parts, free, gpu_weights)
        model.memory_plan = plan.describe()
        mode = plan.mode
        if mode is OffloadMode.NONE or self.policy.device.type == "cpu":
            model.move_to(self.policy.device)
        else:
            self._offloader = Offloader(self.policy.device)
            self._offloader.attach(mode, model.unet, model.vae, list(model.text_encoders))
            log.info("%s: %s (%d units)", model.info.title, plan.describe(), len(self._offloader.units()))
        self.current = model
        self._cache.move_to_end(model.info.path.resolve())

    def _forget(self, model: LoadedModel) -> None:
        if self.current is model and self._offloader is not None:
            self._offloader.detach()
            self._offloader = None
        for key, cached in list(self._cache.items()):
            if cached is model:
                del self._cache[key]

    def _evict(self, model: LoadedModel) -> None:
        log.info("Unloading cached model %s (%.0f MB)", model.info.title, model.nbytes / 2**20)
        self._forget(model)
        if self.current is model:
            self.current = None

    def unload(self) -> None:
        for model in list(self._cache.values()):
            self._forget(model)
        self.current = None
        self._free()

    def _free(self) -> None:
        import torch
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
