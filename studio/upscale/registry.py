"""The upscalers hires fix, the Extras tab and the API choose from, by A1111 name.

Three kinds, listed in A1111's order: "None" (no upscaler of its own), the PIL resamplers
"Lanczos" and "Nearest", then every model file under the ESRGAN-family folders, named by file
stem and sorted case-insensitively. Listing only looks at file names, so a broken file is listed
and fails when used, with an :class:`UpscalerError` naming it. Models are read lazily and the
last few are kept.

Hires fix's latent modes are not pixel upscalers; see :mod:`studio.upscale.latent`.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from PIL import Image

from studio.networks.files import Stamp, scan_files
from studio.upscale.errors import UpscalerError
from studio.upscale.latent import LATENT_MODES
from studio.upscale.models import (
    MODEL_SUFFIXES,
    image_to_tensor,
    load_model,
    place_model,
    run_model,
    tensor_to_image,
)

if TYPE_CHECKING:  # spandrel takes ~2 s to import: only when a model file is first used
    import spandrel
    import torch

    from studio.devices import DeferredPolicy

# A1111's folder names under models/ for the upscalers spandrel can read.
UPSCALER_FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT")
# A1111 runs a model at most this many times to reach a scale above its own.
MAX_PASSES = 3
# What A1111's API reports for an upscaler whose scale it does not know (all of its built-ins).
_API_DEFAULT_SCALE = 4.0
# "4x-UltraSharp", "4xNomos8k", "ESRGAN_4x", "RealESRGAN_x2plus", "DAT_x3" ...
_SCALE_IN_NAME = re.compile(r"(?<![a-z0-9])(?:([1-8])x(?![0-9])|x([1-8])(?![0-9]))", re.IGNORECASE)


def default_folders(models_dir: Path) -> list[Path]:
    """The upscaler folders of an A1111 ``models`` folder (missing ones are simply empty)."""
    return [Path(models_dir) / name for name in UPSCALER_FOLDERS]


def scale_from_name(name: str) -> int | None:
    """The scale a model's file name announces ("4x_foo", "foo_x2plus"), if any."""
    match = _SCALE_IN_NAME.search(name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


@dataclass(frozen=True)
class UpscalerInfo:
    """One entry of the upscaler list.

    ``kind`` is "none", "pil" or "model". ``scale`` is the model's own factor: announced by the
    file name until the model has been loaded, then the real one; None when unknown and for
    the non-model kinds, which work at any scale. ``family`` is the folder a model file was
    found in ("ESRGAN", "DAT", ...), reported as A1111's ``model_name``.
    """

    name: str
    kind: str
    path: Path | None = None
    scale: int | None = None
    family: str | None = None

    def api_dict(self) -> dict:
        """An item of A1111's ``GET /sdapi/v1/upscalers``."""
        return {
            "name": self.name,
            "model_name": self.family,
            "model_path": str(self.path) if self.path is not None else None,
            "model_url": None,
            "scale": float(self.scale) if self.scale is not None else _API_DEFAULT_SCALE,
        }


_BUILTINS = (
    UpscalerInfo("None", "none"),
    UpscalerInfo("Lanczos", "pil"),
    UpscalerInfo("Nearest", "pil"),
)
_PIL_FILTERS: Mapping[str, Image.Resampling] = MappingProxyType(
    {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
)
# A file may not take a name that already means something else in the upscaler dropdowns.
_RESERVED = frozenset(name.lower() for name in (*(info.name for info in _BUILTINS), *LATENT_MODES))


@dataclass
class _Cached:
    stamp: Stamp
    model: spandrel.ImageModelDescriptor


class UpscalerLibrary:
    """The upscaler list and the models behind it.

    ``folders`` are walked recursively for ``.pth``/``.pt``/``.safetensors`` files; when two
    files share a stem the first in folder order wins. Models run on ``device`` in ``dtype``
    (float32 where the model or the device cannot do it) over ``tile``-pixel input tiles
    overlapping by ``overlap`` pixels; ``tile`` 0 runs whole images. ``max_cached`` models stay
    loaded. Safe to use from several threads. With ``policy`` (and no ``device``/``dtype``) they are
    the device policy's, asked for when a model first runs: listing upscalers needs no torch.
    """

    def __init__(
        self,
        folders: list[Path],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tile: int = 192,
        overlap: int = 16,
        max_cached: int = 2,
        *,
        policy: DeferredPolicy | None = None,
    ) -> None:
        if (device is None or dtype is None) and policy is None:
            raise ValueError("UpscalerLibrary needs a device and a dtype, or a device policy")
        self.folders = [Path(folder) for folder in folders]
        self._device, self._dtype, self._policy = device, dtype, policy
        self.tile = tile
        self.overlap = overlap
        self.max_cached = max(1, max_cached)
        self._models: dict[str, UpscalerInfo] = {}
        self._cache: OrderedDict[Path, _Cached] = OrderedDict()
        # Real scales of models loaded before, kept across refreshes while the file is unchanged.
        self._known_scales: dict[Path, tuple[Stamp, int]] = {}
        self._lock = threading.Lock()  # the API, the UI and a generation may use it at once
        self.refresh()

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device(self._device if self._device is not None else self._policy.get().device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype if self._dtype is not None else self._policy.get().dtype

    # -- listing -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-scan the folders. Never raises and never opens a file."""
        try:
            found = list(self._scan())
        except OSError:  # a folder vanishing mid-scan must not break the UI or API
            found = []
        with self._lock:
            models: dict[str, UpscalerInfo] = {}
            for path, stamp, family in found:
                name = path.stem
                if name.lower() in _RESERVED or name in models:
                    continue
                known = self._known_scales.get(path)
                scale = known[1] if known is not None and known[0] == stamp else scale_from_name(name)
                models[name] = UpscalerInfo(name, "model", path, scale, family)
            listed = {info.path for info in models.values()}
            for path in [p for p in self._cache if p not in listed]:
                del self._cache[path]
            self._models = dict(sorted(models.items(), key=lambda item: item[0].lower()))

    def items(self) -> list[UpscalerInfo]:
        """None, Lanczos, Nearest, then the model files by name (case-insensitive)."""
        with self._lock:
            return [*_BUILTINS, *self._models.values()]

    def find(self, name: str) -> UpscalerInfo | None:
        """The upscaler called ``name``: exact name, else case-insensitive, else a file's name."""
        if not name:
            return None
        entries = self.items()
        for match in (
            lambda info: info.name == name,
            lambda info: info.name.lower() == name.lower(),
            lambda info: info.path is not None and info.path.name.lower() == name.lower(),
        ):
            hits = [info for info in entries if match(info)]
            if hits:
                return hits[0]
        return None

    def api_list(self) -> list[dict]:
        """A1111's ``GET /sdapi/v1/upscalers`` body."""
        return [info.api_dict() for info in self.items()]

    # -- models ------------------------------------------------------------------------------

    def probe(self, name: str) -> UpscalerInfo:
        """The entry for ``name`` with its real scale, loading the model if it is one."""
        info = self._require(name)
        if info.kind == "model":
            self._model(info)
            return self._require(info.name)
        return info

    def unload(self) -> None:
        """Drop every loaded model (to free memory); they are read again when next used."""
        with self._lock:
            self._cache.clear()

    def _require(self, name: str) -> UpscalerInfo:
        info = self.find(name)
        if info is None:
            raise UpscalerError(f"unknown upscaler {name!r}")
        return info

    def _model(self, info: UpscalerInfo) -> spandrel.ImageModelDescriptor:
        assert info.path is not None
        try:
            st = info.path.stat()
        except OSError as exc:
            raise UpscalerError(f"{info.path}: cannot read ({exc.strerror or exc})") from exc
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            entry = self._cache.get(info.path)
            if entry is not None and entry.stamp == stamp:
                self._cache.move_to_end(info.path)
                return entry.model
        # Read outside the lock: a large file must not stall listing.
        model = load_model(info.path)
        with self._lock:
            self._cache[info.path] = _Cached(stamp, model)
            self._cache.move_to_end(info.path)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            self._known_scales[info.path] = (stamp, model.scale)
            listed = self._models.get(info.name)
            if listed is not None and listed.path == info.path and listed.scale != model.scale:
                self._models[info.name] = dataclasses.replace(listed, scale=model.scale)
        return model

    # -- upscaling ---------------------------------------------------------------------------

    def upscale(
        self,
        image: Image.Image,
        name: str,
        scale: float | None = None,
        size: tuple[int, int] | None = None,
    ) -> Image.Image:
        """``image`` enlarged (or shrunk) by upscaler ``name`` to exactly the requested size.

        Give exactly one of ``scale`` (the size is the input's times ``scale``, rounded) or
        ``size`` as (width, height). The result is always RGB.

        A model runs as A1111 runs it: once, then again while the picture is still smaller than
        the target (at most :data:`MAX_PASSES` times), and the result is resized with Lanczos to
        the exact size. "None" has nothing of its own to add, so, as in A1111's hires fix, it
        only resizes with Lanczos; the image comes back unchanged when the size already matches.
        """
        info = self._require(name)
        source = image.convert("RGB")
        target = _target_size(source.size, scale, size)
        if info.kind == "none":
            return source.copy() if source.size == target else source.resize(target, Image.Resampling.LANCZOS)
        if info.kind == "pil":
            return source.resize(target, _PIL_FILTERS[info.name])
        model = self._model(info)
        result = self._run_passes(model, source, target)
        if result.size != target:
            result = result.resize(target, Image.Resampling.LANCZOS)
        return result

    def _run_passes(
        self, model: spandrel.ImageModelDescriptor, image: Image.Image, target: tuple[int, int]
    ) -> Image.Image:
        with self._lock:
            device, dtype, tile, overlap = self.device, self.dtype, self.tile, self.overlap
        placed = place_model(model, device, dtype)
        for attempt in range(MAX_PASSES):
            if attempt > 0 and (image.width >= target[0] and image.height >= target[1]):
                break
            before = image.size
            tensor = image_to_tensor(image, placed.input_channels, placed.device, placed.dtype)
            image = tensor_to_image(run_model(placed, tensor, tile, overlap))
            if image.size == before:  # a 1x model: running it again would only repeat itself
                break
        return image

    def _scan(self) -> Iterator[tuple[Path, Stamp, str]]:
        # One real folder is walked only once, even when several configured folders reach it.
        seen_dirs: set[str] = set()
        for folder in self.folders:
            for path, stamp in scan_files([folder], MODEL_SUFFIXES, seen_dirs=seen_dirs):
                yield path, stamp, folder.name


def _target_size(
    source: tuple[int, int], scale: float | None, size: tuple[int, int] | None
) -> tuple[int, int]:
    if (scale is None) == (size is None):
        raise UpscalerError("give exactly one of scale and size")
    if size is not None:
        width, height = (int(v) for v in size)
    else:
        assert scale is not None
        if not scale > 0:
            raise UpscalerError(f"scale must be positive, got {scale}")
        width, height = round(source[0] * scale), round(source[1] * scale)
    if width < 1 or height < 1:
        raise UpscalerError(f"target size {width}x{height} is empty")
    return width, height
