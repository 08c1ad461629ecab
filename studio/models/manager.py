"""The one owner of loaded models.

All loads run on the job worker (callers go through the queue), so there is never more
than one model being built at a time. A failed load leaves the previous model loaded
and usable.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from studio.devices import DevicePolicy
from studio.models.catalog import Catalog, CheckpointInfo
from studio.models.state_dict import ModelFileError

if TYPE_CHECKING:
    from studio.models.loader import LoadedModel

log = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    pass


class ModelManager:
    def __init__(self, catalog: Catalog, policy: DevicePolicy, config_cache: Path,
                 demo_dir: Path | None = None):
        self.catalog = catalog
        self.policy = policy
        self.config_cache = config_cache
        self.demo_dir = demo_dir
        self.current: LoadedModel | None = None

    def refresh(self) -> list[CheckpointInfo]:
        items = self.catalog.refresh()
        if items:
            self.catalog.clear_extra()  # the demo is only offered while there is nothing else
        elif self.demo_dir is not None:
            from studio.models.demo import ensure_demo_checkpoint

            self.catalog.add_extra(ensure_demo_checkpoint(self.demo_dir))
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

    def load(self, query: str | None) -> LoadedModel:
        info = self.resolve(query)
        if self.current is not None and self.current.info.path == info.path:
            return self.current
        if not info.path.exists():
            raise ModelFileError(f"{info.name}: file not found (moved or deleted? press refresh)")
        try:
            self.catalog.ensure_hash(info)
        except OSError as e:
            raise ModelFileError(f"{info.name}: cannot read file: {e}") from e
        from studio.models.loader import load_checkpoint  # diffusers: imported on first load

        model = load_checkpoint(info, self.policy, self.config_cache)
        previous, self.current = self.current, model
        if previous is not None:
            del previous
            self._free()
        return model

    def unload(self) -> None:
        self.current = None
        self._free()

    def _free(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
