"""The engine's side of the script contract (studio/scripts/base.py): the lookups a script parses
its arguments against, and what a running script may do inside its job. Both hold the studio's
libraries and the engine's callables, not the engine itself, so scripts never see (or import) it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import RequestError
from studio.generation.samplers import SAMPLER_NAMES, SCHEDULE_LABELS
from studio.generation.saving import OutputSaver
from studio.prompts.styles import StyleError

if TYPE_CHECKING:
    from PIL import Image

    from studio.generation.request import Txt2ImgRequest
    from studio.generation.runner import GenerationResult
    from studio.jobs import JobState
    from studio.models.manager import ModelManager
    from studio.models.vae import VaeCatalog
    from studio.options import StudioOptions
    from studio.prompts.styles import StyleDatabase
    from studio.upscale import UpscalerLibrary


@dataclass(frozen=True)
class LibraryEnv:
    """:class:`~studio.scripts.base.ScriptEnv` over the studio's model, VAE and upscaler libraries and
    the options the request runs with."""

    models: ModelManager
    vaes: VaeCatalog
    upscalers: UpscalerLibrary
    options: StudioOptions
    styles: StyleDatabase | None = None

    def style_names(self) -> list[str]:
        return self.styles.names() if self.styles is not None else []

    def apply_styles(self, names: Sequence[str], prompt: str, negative: str) -> tuple[str, str]:
        """The prompts with the named styles applied (the script's generations don't apply styles again)."""
        if self.styles is None:
            return prompt, negative
        try:
            return self.styles.apply(list(names), prompt, negative)
        except StyleError as e:
            raise RequestError(str(e)) from e

    def sampler_names(self) -> list[str]:
        return list(SAMPLER_NAMES)

    def schedule_names(self) -> list[str]:
        return list(SCHEDULE_LABELS)

    def upscaler_names(self) -> list[str]:
        return [u.name for u in self.upscalers.items()]

    def checkpoint_titles(self) -> list[str]:
        return [c.title for c in self.models.checkpoints()]

    def find_checkpoint(self, name: str) -> str | None:
        info = self.models.catalog.find(name)
        return info.title if info is not None else None

    def vae_names(self) -> list[str]:
        return self.vaes.names()

    def option(self, key: str) -> Any:
        return getattr(self.options, key, None)


@dataclass
class EngineRun:
    """:class:`~studio.scripts.base.ScriptRun`: generations go through the engine's own prepare + run."""

    state: JobState
    env: LibraryEnv
    data_dir: Path
    generate_fn: Callable[[Txt2ImgRequest], GenerationResult]
    upscale_fn: Callable[[Image.Image, str, tuple[int, int]], Image.Image]
    make_saver: Callable[..., Any] = OutputSaver.from_options   # the engine's (a worker records saves)

    def generate(self, req: Txt2ImgRequest) -> GenerationResult:
        return self.generate_fn(req.model_copy(update={"script_name": None, "script_args": []}))

    def upscale(self, image: Image.Image, upscaler: str, size: tuple[int, int]) -> Image.Image:
        return self.upscale_fn(image, upscaler, size)

    def _saver(self, req: Txt2ImgRequest) -> OutputSaver:
        return self.make_saver(self.env.options.model_dump(), self.data_dir, req.kind)

    def save_grid(self, image: Image.Image, infotext: str, req: Txt2ImgRequest, basename: str) -> Path | None:
        return self._saver(req).save_finished_grid(image, infotext, req, basename)

    def save_image(self, image: Image.Image, infotext: str, seed: int, req: Txt2ImgRequest) -> Path | None:
        if not req.save_images:
            return None
        return self._saver(req).save(image, infotext, seed, req)
