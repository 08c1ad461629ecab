"""From unit requests to units in the sampling loop: the loaded-ControlNet cache, preprocessing,
and the per-pass unit lists (hires fix's ``hr_option``).

Runs on the job worker: preprocessors may load detector networks and ControlNets are loaded onto
the generation device, both of which must not race a generation.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from studio.controlnet.guidance import ControlUnit
from studio.controlnet.models import (
    ControlNetInfo,
    ControlNetLibrary,
    LoadedControlNet,
    check_family,
    load_controlnet,
)
from studio.controlnet.preprocessors import PreprocessorError, PreprocessorRegistry
from studio.controlnet.units import (
    ControlNetUnitRequest,
    UnitError,
    check_unit,
    fit_control_map,
    lenient_params,
    map_to_tensor,
    pixel_perfect_resolution,
    unit_infotext,
)
from studio.models.state_dict import ModelFileError

log = logging.getLogger(__name__)


class ControlNetModels:
    """The ControlNet files (library) and the ones loaded, least recently used dropped first beyond
    ``capacity()`` (the extension's ``control_net_model_cache_size``, default 2)."""

    def __init__(self, library: ControlNetLibrary, config_cache: Path, capacity: Callable[[], int]):
        self.library = library
        self.config_cache = Path(config_cache)
        self._capacity = capacity
        self._loaded: OrderedDict[tuple, LoadedControlNet] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, query: str) -> ControlNetInfo | None:
        info = self.library.find(query)
        if info is None:
            self.library.refresh()  # a file dropped in since the last scan
            info = self.library.find(query)
        return info

    def names(self) -> list[str]:
        return [c.api_name for c in self.library.items()]

    def load(self, info: ControlNetInfo, dtype: Any, device: Any) -> LoadedControlNet:
        path = info.weights_path
        key = (str(info.path), path.stat().st_mtime_ns if path.exists() else 0, str(dtype), str(device))
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            loaded = load_controlnet(info, dtype, device, self.config_cache)
            self._loaded[key] = loaded
            while len(self._loaded) > max(1, self._capacity()):
                dropped = self._loaded.popitem(last=False)[1]
                log.info("ControlNet %s unloaded (cache size %d)", dropped.info.name, self._capacity())
            return loaded

    def loaded(self) -> list[LoadedControlNet]:
        with self._lock:
            return list(self._loaded.values())

    def unload(self) -> None:
        with self._lock:
            self._loaded.clear()


@dataclass
class PreparedControl:
    """One enabled unit after preprocessing: its model and the map at processor resolution."""

    index: int
    unit: ControlNetUnitRequest
    loaded: LoadedControlNet
    detected: Image.Image
    infotext: str


@dataclass
class ControlPlan:
    prepared: list[PreparedControl] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prepared)

    def infotext_params(self) -> dict[str, str]:
        return {f"ControlNet {p.index}": p.infotext for p in self.prepared}

    def detected_maps(self) -> list[Image.Image]:
        return [p.detected for p in self.prepared if p.unit.save_detected_map]

    def units_for(self, width: int, height: int, hires: bool | None) -> list[ControlUnit]:
        """The loop's units at one pass's size. ``hires`` is None without hires fix, else whether
        this is the second pass: ``hr_option`` picks the passes a unit takes part in."""
        units = []
        for p in self.prepared:
            option = p.unit.hr_option
            if hires is True and option == "Low res only" or hires is False and option == "High res only":
                continue
            fitted = fit_control_map(p.detected, width, height, p.unit.resize_mode)
            units.append(ControlUnit(p.loaded.model, map_to_tensor(fitted), p.unit.weight, p.unit.guidance_start,
                                     p.unit.guidance_end, p.unit.control_mode_index))
        return units

    def cropped(self, box: tuple[int, int, int, int], size: tuple[int, int]) -> ControlPlan:
        """Inpainting "Only masked" generates a crop of the image, so each map is cut to the same
        region (the extension's ``inpaint_crop_input_image``), scaled from the image's size."""
        out = []
        for p in self.prepared:
            sx, sy = p.detected.width / size[0], p.detected.height / size[1]
            region = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
            out.append(replace(p, detected=p.detected.crop(region)))
        return ControlPlan(out)


def enabled_units(units: tuple[ControlNetUnitRequest, ...]) -> list[tuple[int, ControlNetUnitRequest]]:
    return [(i, u) for i, u in enumerate(units) if u.enabled]


def check_units(units: tuple[ControlNetUnitRequest, ...], registry: PreprocessorRegistry, models: ControlNetModels,
                has_init_image: bool) -> None:
    """Everything about the units that can be checked before the job is queued."""
    for index, unit in enabled_units(units):
        check_unit(unit, index)
        if unit.module not in registry:
            raise UnitError(f"ControlNet unit {index}: unknown preprocessor {unit.module!r}; "
                            f"available: {', '.join(registry.names())}")
        if unit.model in ("", "None", None):
            raise UnitError(f"ControlNet unit {index}: choose a ControlNet model")
        if models.find(unit.model) is None:
            names = ", ".join(models.names()) or f"none (put files in {models.library.folders[0]})"
            raise UnitError(f"ControlNet unit {index}: model {unit.model!r} not found. Available: {names}")
        if unit.image is None and not has_init_image:
            raise UnitError(f"ControlNet unit {index}: no control image (txt2img needs one per unit)")


def prepare_controls(units: tuple[ControlNetUnitRequest, ...], registry: PreprocessorRegistry,
                     models: ControlNetModels, model_family: str, width: int, height: int, dtype: Any, device: Any,
                     init_image: Image.Image | None = None, seed: int = 0,
                     on_unit: Callable[[int], None] | None = None) -> ControlPlan:
    """Preprocess every enabled unit's image and load its ControlNet (checked against the
    checkpoint's family). Raises UnitError with the unit's number for anything the user must fix."""
    plan = ControlPlan()
    for index, unit in enabled_units(units):
        if on_unit is not None:
            on_unit(index)
        image = unit.image if unit.image is not None else init_image
        if image is None:
            raise UnitError(f"ControlNet unit {index}: no control image")
        # the extension's leniency: a value outside a slider's range becomes its default (and a warning)
        resolution, threshold_a, threshold_b = lenient_params(registry.get(unit.module), unit.processor_res,
                                                              unit.threshold_a, unit.threshold_b,
                                                              f"ControlNet unit {index}")
        if unit.pixel_perfect:
            resolution = pixel_perfect_resolution(image.size, width, height, unit.resize_mode)
        info = models.find(unit.model)
        if info is None:
            raise UnitError(f"ControlNet unit {index}: model {unit.model!r} not found")
        try:
            loaded = models.load(info, dtype, device)
            check_family(loaded, model_family)
        except ModelFileError as e:
            raise UnitError(f"ControlNet unit {index}: {e}") from e
        try:
            res, a, b = registry.resolve_params(unit.module, resolution, threshold_a, threshold_b)
            detected = registry.run(unit.module, image, resolution, threshold_a, threshold_b, seed=seed)
        except PreprocessorError as e:
            raise UnitError(f"ControlNet unit {index}: {e}") from e
        text = unit_infotext(unit, info.api_name, res, a, b)
        plan.prepared.append(PreparedControl(index, unit, loaded, detected, text))
    return plan
