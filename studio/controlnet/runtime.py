"""From unit requests to units in the sampling loop: the loaded-ControlNet cache, preprocessing,
and the per-pass unit lists (hires fix's ``hr_option``).

Runs on the job worker: preprocessors may load detector networks and ControlNets are loaded onto
the generation device, both of which must not race a generation.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from studio.controlnet.clip_vision import ClipVisionEncoders
from studio.controlnet.latent_fixes import COLORFIX_MODULES, INPAINT_BLUR_SIGMA, INPAINT_ONLY_MODULES
from studio.controlnet.models import (
    FAMILY_LABELS,
    REDUX,
    ControlNetInfo,
    ControlNetLibrary,
    LoadedControlNet,
    check_family,
)
from studio.controlnet.preprocessors import (
    INPAINT_MODULES,
    REDUX_MODULE,
    REVISION_MODULES,
    PreprocessorError,
    PreprocessorRegistry,
)
from studio.controlnet.units import (
    ControlNetUnitRequest,
    UnitError,
    check_unit,
    fit_control_map,
    fit_control_mask,
    lenient_params,
    map_to_tensor,
    pixel_perfect_resolution,
    region_to_tensor,
    unit_infotext,
)
from studio.errors import RequestError
from studio.models.state_dict import ModelFileError

if TYPE_CHECKING:
    from studio.controlnet.guidance import ControlUnit
    from studio.generation.step_callbacks import StepCallback

log = logging.getLogger(__name__)


class ControlNetModels:
    """The ControlNet files (library) and the ones loaded, least recently used dropped first beyond
    ``capacity()`` (the extension's ``control_net_model_cache_size``, default 2)."""

    def __init__(self, library: ControlNetLibrary, config_cache: Path, capacity: Callable[[], int],
                 clip_vision: ClipVisionEncoders | None = None):
        self.library = library
        # IP-Adapters' image encoders (one kept loaded), owned here with the adapters that need them
        self.clip_vision = clip_vision if clip_vision is not None else ClipVisionEncoders(())
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

    def load(self, info: ControlNetInfo, dtype: Any, device: Any, base_unet: Any = None) -> LoadedControlNet:
        from studio.controlnet.loading import is_control_lora_file, load_control_model
        path = info.weights_path
        # a Control-LoRA is built on the checkpoint's UNet: one per UNet (a weak reference: equal only
        # while that UNet lives, so a later UNet at the same address is not taken for it)
        lora = is_control_lora_file(info)
        key = (str(info.path), path.stat().st_mtime_ns if path.exists() else 0, str(dtype), str(device),
               weakref.ref(base_unet) if lora and base_unet is not None else None)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            loaded = load_control_model(info, dtype, device, self.config_cache, base_unet)
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
        self.clip_vision.release()


@dataclass
class PreparedControl:
    """One enabled unit after preprocessing: its model (None for the model-free reference modules),
    the map at processor resolution and, for the inpaint modules, the mask (white = generate); for an
    IP-Adapter, its CLIP mask (white = hidden from the image encoder)."""

    index: int
    unit: ControlNetUnitRequest
    loaded: LoadedControlNet | None
    detected: Image.Image
    infotext: str
    mask: Image.Image | None = None
    threshold_a: float = -1    # the values used (defaults filled in), as the infotext says
    threshold_b: float = -1
    union_type: int = -1       # a ControlNet Union unit's control type (studio.controlnet.union.UNION_TYPES)

    @property
    def module(self) -> str:
        return self.unit.module

    def takes_part(self, hires: bool | None) -> bool:
        """``hires`` is None without hires fix, else whether this is the second pass: ``hr_option``
        picks the passes a unit takes part in."""
        option = self.unit.hr_option
        return not (hires is True and option == "Low res only" or hires is False and option == "High res only")


@dataclass
class ControlPlan:
    prepared: list[PreparedControl] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inpaint_blur_sigma: int = INPAINT_BLUR_SIGMA
    clip_vision: ClipVisionEncoders | None = None

    def __bool__(self) -> bool:
        return bool(self.prepared)

    def infotext_params(self) -> dict[str, str]:
        return {f"ControlNet {p.index}": p.infotext for p in self.prepared}

    def detected_maps(self, width: int | None = None, height: int | None = None,
                      hires_size: tuple[int, int] | None = None) -> list[Image.Image]:
        """The maps returned with the images, as the extension returns them: each fitted to the size
        it steered (resize mode applied); with hires fix the second pass's map first, then the first
        pass's, for the units taking part in each. Without a size: the maps as preprocessed."""
        out: list[Image.Image] = []
        for p in self.prepared:
            if not p.unit.save_detected_map:
                continue
            if width is None or height is None:
                out.append(p.detected)
                continue
            if hires_size is not None and p.takes_part(True):
                out.append(fit_control_map(p.detected, *hires_size, p.unit.resize_mode))
            if p.takes_part(False if hires_size is not None else None):
                out.append(fit_control_map(p.detected, width, height, p.unit.resize_mode))
        return out

    def units_for(self, width: int, height: int, hires: bool | None) -> list[ControlUnit]:
        """The ControlNet / T2I-Adapter units of one pass, their maps at the pass's size."""
        import torch

        from studio.controlnet.flux_controlnet import FLUX_FAMILY
        from studio.controlnet.guidance import ControlUnit
        from studio.controlnet.ip_adapter import IP_ADAPTER
        units = []
        for p in self.prepared:
            if p.loaded is None or p.loaded.probe.kind == IP_ADAPTER or p.loaded.probe.family == FLUX_FAMILY \
                    or not p.takes_part(hires):
                continue
            image = map_to_tensor(fit_control_map(p.detected, width, height, p.unit.resize_mode))
            if p.mask is not None:   # the inpaint ControlNets read masked pixels as -1
                mask = map_to_tensor(fit_control_mask(p.mask, width, height, p.unit.resize_mode))[:, :1]
                image = torch.cat([image, mask], dim=1)
            units.append(ControlUnit(p.loaded.model, image, p.unit.weight, p.unit.guidance_start,
                                     p.unit.guidance_end, p.unit.control_mode_index, union_type=p.union_type,
                                     region=region_to_tensor(p.unit.effective_region_mask, width, height),
                                     advanced_weighting=p.unit.advanced_weighting))
        return units

    def callbacks_for(self, width: int, height: int, hires: bool | None, seed: int = 0,
                      empty_prompts: bool = False) -> list[StepCallback]:
        """Everything the units do in one pass's sampling loop: ControlNet residuals, the reference
        modules' attention/AdaIN, the colour fix and inpaint_only's latent blending, Revision's pooled
        embedding (``empty_prompts``: no prompt and no negative prompt, where Revision zeroes the
        text as the extension does)."""
        from studio.controlnet.flux_controlnet import FLUX_FAMILY, FluxControlGuidance, FluxControlUnit
        from studio.controlnet.flux_ip_adapter import FluxIPAdapterGuidance, FluxIPAdapterUnit
        from studio.controlnet.guidance import ControlNetGuidance
        from studio.controlnet.ip_adapter import IP_ADAPTER, IPAdapterGuidance, IPAdapterUnit
        from studio.controlnet.latent_fixes import LatentFixes, LatentFixUnit
        from studio.controlnet.redux import ReduxGuidance, ReduxUnit
        from studio.controlnet.reference import ReferenceGuidance, ReferenceUnit, is_reference
        from studio.controlnet.revision import RevisionGuidance, RevisionUnit
        callbacks: list[StepCallback] = []
        encoders = self.clip_vision or ClipVisionEncoders(())   # the image encoders the adapter kinds read
        units = self.units_for(width, height, hires)
        if units:
            callbacks.append(ControlNetGuidance(units))
        second = hires is True
        references, fixes = [], []
        for p in self.prepared:
            if not p.takes_part(hires):
                continue
            u = p.unit
            if is_reference(p.module):
                image = map_to_tensor(fit_control_map(p.detected, width, height, u.resize_mode))
                references.append(ReferenceUnit(p.module, image, u.weight, u.guidance_start, u.guidance_end,
                                                p.threshold_a, u.control_mode_index, seed))
            elif p.module in COLORFIX_MODULES:
                image = map_to_tensor(fit_control_map(p.detected, width, height, u.resize_mode))
                fixes.append(LatentFixUnit(p.module, image, u.weight, p.threshold_a,
                                           p.threshold_b))
            elif p.module in INPAINT_ONLY_MODULES and p.mask is not None:
                image = map_to_tensor(fit_control_map(p.detected, width, height, u.resize_mode))
                mask = map_to_tensor(fit_control_mask(p.mask, width, height, u.resize_mode))[:, :1]
                fixes.append(LatentFixUnit(p.module, image, u.weight, mask=mask))
        adapters = [IPAdapterUnit(p.loaded.model, [p.detected], p.unit.weight, p.unit.guidance_start,
                                  p.unit.guidance_end, p.module,
                                  region=region_to_tensor(p.unit.effective_region_mask, width, height),
                                  advanced_weighting=p.unit.advanced_weighting, clip_mask=p.mask)
                    for p in self.prepared
                    if p.loaded is not None and p.loaded.probe.kind == IP_ADAPTER
                    and p.loaded.probe.family != FLUX_FAMILY and p.takes_part(hires)]
        flux_adapters = [FluxIPAdapterUnit(p.loaded.model, [p.detected], p.unit.weight, p.unit.guidance_start,
                                           p.unit.guidance_end, p.module, clip_mask=p.mask)
                         for p in self.prepared
                         if p.loaded is not None and p.loaded.probe.kind == IP_ADAPTER
                         and p.loaded.probe.family == FLUX_FAMILY and p.takes_part(hires)]
        flux = [FluxControlUnit(p.loaded.model, map_to_tensor(fit_control_map(p.detected, width, height,
                                                                              p.unit.resize_mode)),
                                p.unit.weight, p.unit.guidance_start, p.unit.guidance_end,
                                mode=p.union_type if p.union_type >= 0 else None,
                                control_mode=p.unit.control_mode_index)
                for p in self.prepared
                if p.loaded is not None and p.loaded.probe.family == FLUX_FAMILY
                and p.loaded.probe.kind not in (REDUX, IP_ADAPTER) and p.takes_part(hires)]
        if flux:   # the FLUX transformer's ControlNets (the UNet path above is SD's)
            callbacks.append(FluxControlGuidance(flux))
        redux = [ReduxUnit(p.loaded.model, [p.detected], p.unit.weight, p.unit.guidance_start, p.unit.guidance_end,
                           downsampling=max(1, round(p.threshold_a)) if p.module == REDUX_MODULE else 1,
                           name=p.loaded.info.name)
                 for p in self.prepared
                 if p.loaded is not None and p.loaded.probe.kind == REDUX and p.takes_part(hires)]
        revisions = [RevisionUnit(p.detected, p.unit.weight, p.unit.guidance_start, p.unit.guidance_end,
                                  max(p.threshold_a, 0.0), p.module == "revision_ignore_prompt")
                     for p in self.prepared if p.module in REVISION_MODULES and p.takes_part(hires)]
        if revisions:
            callbacks.append(RevisionGuidance(revisions, encoders, seed,
                                              empty_prompts))
        if redux:   # one callback for all: their tokens follow the prompt's in one list
            callbacks.append(ReduxGuidance(redux, encoders))
        if flux_adapters:   # installed in the FLUX transformer for the pass, as IPAdapterGuidance in the UNet
            callbacks.append(FluxIPAdapterGuidance(flux_adapters, encoders))
        if adapters:   # one callback for all: each sets the image embeddings of every UNet call
            callbacks.append(IPAdapterGuidance(adapters, encoders))
        if references:
            callbacks.append(ReferenceGuidance(references, hires=second))
        if fixes:
            callbacks.append(LatentFixes(fixes, hires=second))
        return callbacks

    def postprocess(self, image: Image.Image) -> Image.Image:
        """Pixels the units put back after decoding (the extension's post-processors): inpaint_only
        keeps the original outside the mask; Recolor keeps the control image's lightness."""
        from studio.controlnet.latent_fixes import paste_outside_mask
        for p in self.prepared:
            u = p.unit
            if p.module in INPAINT_ONLY_MODULES and p.mask is not None:
                original = fit_control_map(p.detected, image.width, image.height, u.resize_mode)
                mask = fit_control_mask(p.mask, image.width, image.height, u.resize_mode)
                image = paste_outside_mask(image, original, mask, self.inpaint_blur_sigma)
            elif p.module in ("recolor_luminance", "recolor_intensity"):
                gray = fit_control_map(p.detected, image.width, image.height, u.resize_mode)
                image = keep_lightness(image, gray, p.module)
        return image

    def cropped(self, box: tuple[int, int, int, int], size: tuple[int, int]) -> ControlPlan:
        """Inpainting "Only masked" generates a crop of the image, so each map is cut to the same
        region (the extension's ``inpaint_crop_input_image``), scaled from the image's size."""
        out = []
        for p in self.prepared:
            sx, sy = p.detected.width / size[0], p.detected.height / size[1]
            region = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
            mask = p.mask.resize(p.detected.size).crop(region) if p.mask is not None else None
            out.append(replace(p, detected=p.detected.crop(region), mask=mask))
        return ControlPlan(out, list(self.notes), self.inpaint_blur_sigma, self.clip_vision)


def is_drawn(mask: Image.Image) -> bool:
    """Whether a mask has anything painted: not (almost) all empty nor all full, the extension's test
    (alpha <= 5 everywhere or >= 250 everywhere means "no mask")."""
    arr = np.asarray(mask.convert("L"))
    return not ((arr <= 5).all() or (arr >= 250).all())


def keep_lightness(image: Image.Image, gray: Image.Image, module: str) -> Image.Image:
    """Recolor's post-processing: the result's colours with the control image's lightness (Lab L for
    recolor_luminance, HSV V for recolor_intensity), as the extension does after decoding."""
    import cv2

    arr = np.asarray(image.convert("RGB"))
    g = np.asarray(gray.convert("L"))
    if module == "recolor_luminance":
        lab = cv2.cvtColor(arr, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = g
        return Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))
    hsv = cv2.cvtColor(arr, cv2.COLOR_RGB2HSV)
    hsv[:, :, 2] = g
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


def enabled_units(units: tuple[ControlNetUnitRequest, ...]) -> list[tuple[int, ControlNetUnitRequest]]:
    return [(i, u) for i, u in enumerate(units) if u.enabled]


def _needs_model(registry: PreprocessorRegistry, module: str) -> bool:
    return not registry.get(module).model_free


def check_units(units: tuple[ControlNetUnitRequest, ...], registry: PreprocessorRegistry, models: ControlNetModels,
                has_init_image: bool, has_init_mask: bool = False) -> None:
    """Everything about the units that can be checked before the job is queued."""
    for index, unit in enabled_units(units):
        check_unit(unit, index)
        if unit.module in registry:   # the extension's internal names are aliases of the studio's
            unit = replace(unit, module=registry.canonical(unit.module))
        if unit.module not in registry:
            raise UnitError(f"ControlNet unit {index}: unknown preprocessor {unit.module!r}; "
                            f"available: {', '.join(registry.names())}")
        if _needs_model(registry, unit.module):
            if unit.model in ("", "None", None):
                raise UnitError(f"ControlNet unit {index}: choose a ControlNet model")
            if models.find(unit.model) is None:
                names = ", ".join(models.names()) or f"none (put files in {models.library.folders[0]})"
                raise UnitError(f"ControlNet unit {index}: model {unit.model!r} not found. Available: {names}")
        if unit.image is None and not has_init_image:
            raise UnitError(f"ControlNet unit {index}: no control image (txt2img needs one per unit)")
        if (unit.module in INPAINT_MODULES and unit.mask is None and unit.resize_mode != "Resize and Fill"
                and not (unit.image is None and has_init_mask)):
            raise UnitError(f"ControlNet unit {index}: {unit.module} needs a mask: send the unit's \"mask\" "
                            f"(white = the area to generate), or use the unit in img2img inpaint without its "
                            f"own image (or outpaint: \"Resize and Fill\" generates the border it adds)")


def _check_unit_extras(index: int, unit: ControlNetUnitRequest, loaded: LoadedControlNet | None) -> None:
    """The extension's ``supports_effective_region_mask`` (ControlNets of every kind, T2I-Adapters,
    IP-Adapters) and advanced weighting (the same units), refused elsewhere."""
    sd_unit = loaded is not None and loaded.probe.family in _UNET_FAMILIES and loaded.probe.kind != REDUX
    what = loaded.probe.kind if loaded is not None else unit.module
    if unit.effective_region_mask is not None and not sd_unit:
        raise UnitError(f"ControlNet unit {index}: effective_region_mask works with ControlNet, T2I-Adapter and "
                        f"IP-Adapter units on SD1/SD2/SDXL checkpoints, not with {what}")
    if unit.advanced_weighting is not None and not sd_unit:
        raise UnitError(f"ControlNet unit {index}: advanced_weighting (one weight per ControlNet residual or "
                        f"IP-Adapter block) works with ControlNet, T2I-Adapter and IP-Adapter units on "
                        f"SD1/SD2/SDXL checkpoints, not with {what}")


# modules that change the UNet's prediction or patch the UNet, beside any ControlNet they use
_LATENT_MODULES = (*COLORFIX_MODULES, *INPAINT_ONLY_MODULES)
# what the UNet-patching modules work with: the UNet families (not the DiT ones)
_UNET_FAMILIES = ("sd1", "sd2", "sdxl")


def prepare_controls(units: tuple[ControlNetUnitRequest, ...], registry: PreprocessorRegistry,
                     models: ControlNetModels, model_family: str, width: int, height: int, dtype: Any, device: Any,
                     init_image: Image.Image | None = None, seed: int = 0, base_unet: Any = None,
                     on_unit: Callable[[int], None] | None = None,
                     init_mask: Image.Image | None = None, ignore_noninpaint_mask: bool = False,
                     inpaint_blur_sigma: int = INPAINT_BLUR_SIGMA) -> ControlPlan:
    """Preprocess every enabled unit's image and load its ControlNet (checked against the
    checkpoint's family). ``init_mask`` is img2img inpainting's mask (white = repaint), used by inpaint
    units that read the init image; a non-inpaint unit's own mask is what it reads (a scribble) unless
    ``ignore_noninpaint_mask`` (the extension's options). Raises UnitError with the unit's number for anything the user
    must fix."""
    from studio.controlnet.flux_controlnet import FLUX_FAMILY, flux_union_mode
    from studio.controlnet.ip_adapter import IP_ADAPTER
    from studio.controlnet.union import UNION, is_union_model, union_type_index
    plan = ControlPlan(inpaint_blur_sigma=inpaint_blur_sigma, clip_vision=models.clip_vision)
    for index, unit in enabled_units(units):
        if on_unit is not None:
            on_unit(index)
        unit = replace(unit, module=registry.canonical(unit.module))
        image = unit.image if unit.image is not None else init_image
        if image is None:
            raise UnitError(f"ControlNet unit {index}: no control image")
        if unit.module == "inpaint_only" and init_mask is not None:
            # the extension: A1111 already keeps the unmasked area, so the ControlNet just guides
            plan.notes.append(f"ControlNet unit {index}: img2img inpaint already keeps the unmasked area; "
                              f"inpaint_only ran as inpaint_global_harmonious")
            unit = replace(unit, module="inpaint")
        # the extension's leniency: a value outside a slider's range becomes its default (and a warning)
        resolution, threshold_a, threshold_b = lenient_params(registry.get(unit.module), unit.processor_res,
                                                              unit.threshold_a, unit.threshold_b,
                                                              f"ControlNet unit {index}")
        if unit.pixel_perfect:
            resolution = pixel_perfect_resolution(image.size, width, height, unit.resize_mode)
        if unit.module in REVISION_MODULES and not model_family.startswith("sdxl"):
            raise UnitError(f"ControlNet unit {index}: {unit.module} works with SDXL checkpoints only (Revision "
                            f"replaces SDXL's pooled text embedding), not "
                            f"{FAMILY_LABELS.get(model_family, model_family)}")
        if not _needs_model(registry, unit.module) or (unit.module in _LATENT_MODULES):
            if model_family not in _UNET_FAMILIES:
                raise UnitError(f"ControlNet unit {index}: {unit.module} works with SD1, SD2 and SDXL "
                                f"checkpoints, not {FAMILY_LABELS.get(model_family, model_family)}")
        loaded, title = None, "None"
        if _needs_model(registry, unit.module):
            info = models.find(unit.model)
            if info is None:
                raise UnitError(f"ControlNet unit {index}: model {unit.model!r} not found")
            try:
                loaded = models.load(info, dtype, device, base_unet)
                check_family(loaded, model_family)
            except ModelFileError as e:
                raise UnitError(f"ControlNet unit {index}: {e}") from e
            title = info.api_name
        if unit.module == REDUX_MODULE and (loaded is None or loaded.probe.kind != REDUX):
            raise UnitError(f"ControlNet unit {index}: the {REDUX_MODULE} module needs a FLUX.1 Redux model "
                            f"(flux1-redux-dev.safetensors in models/ControlNet or models/style_models), "
                            f"not {unit.model!r}")
        _check_unit_extras(index, unit, loaded)
        union_type = -1
        if loaded is not None and loaded.probe.family == FLUX_FAMILY and loaded.probe.kind == UNION:
            try:
                union_type = flux_union_mode(unit.union_control_type, unit.module, loaded.probe.num_mode)
            except RequestError as e:
                raise UnitError(f"ControlNet unit {index}: {e}") from e
        elif loaded is not None and is_union_model(loaded.model):
            try:
                union_type = union_type_index(unit.union_control_type, unit.module,
                                              loaded.model.config.num_control_type)
            except RequestError as e:
                raise UnitError(f"ControlNet unit {index}: {e}") from e
        mask = None
        if unit.module in INPAINT_MODULES:
            mask = unit.mask if unit.mask is not None else (init_mask if unit.image is None else None)
            if mask is None and unit.resize_mode != "Resize and Fill":
                raise UnitError(f"ControlNet unit {index}: {unit.module} needs a mask (white = the area to generate)")
            mask = Image.new("L", image.size, 0) if mask is None else mask.convert("L").resize(image.size,
                                                                                               Image.NEAREST)
            if unit.module == "inpaint_only+lama" and unit.resize_mode == "Resize and Fill":
                # the extension's outpaint fix: the border is added first, so LaMa paints it too
                image = fit_control_map(image, width, height, unit.resize_mode)
                mask = fit_control_mask(mask, width, height, unit.resize_mode).convert("L")
        elif loaded is not None and loaded.probe.kind == IP_ADAPTER:
            # the extension's CLIP mask: the painted part of the reference is hidden from the image encoder
            # (never img2img's inpaint mask); kept at the reference's size, read by IPAdapterUnit
            if unit.mask is not None and is_drawn(unit.mask):
                mask = unit.mask.convert("L").resize(image.size, Image.NEAREST)
        elif unit.mask is not None and not ignore_noninpaint_mask and is_drawn(unit.mask):
            # the extension's "canvas scribble mode": a unit's painted mask is what it reads
            image = unit.mask.convert("RGB")
        try:
            res, a, b = registry.resolve_params(unit.module, resolution, threshold_a, threshold_b)
            detected = registry.run(unit.module, image, resolution, threshold_a, threshold_b, seed=seed, mask=mask)
        except PreprocessorError as e:
            raise UnitError(f"ControlNet unit {index}: {e}") from e
        if mask is not None and mask.size != detected.size:
            mask = mask.resize(detected.size, Image.NEAREST)
        text = unit_infotext(unit, title, res, a, b)
        plan.prepared.append(PreparedControl(index, unit, loaded, detected, text, mask, a, b, union_type))
    return plan
