"""ControlNet units as requests: what a user sets per unit, read from the UI, the API and infotext.

Field names, defaults and enum texts are sd-webui-controlnet's (``ControlNetUnit`` in its
``internal_controlnet/args.py``) so that API clients written for A1111 + the extension work
unchanged. Also here, because they are pure functions of a unit and a size: fitting a control map
to the generation size (the three resize modes), "pixel perfect" preprocessor resolution, and the
unit's infotext.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Protocol

import numpy as np
from PIL import Image

from studio.errors import RequestError
from studio.options import DEFAULT_UNIT_COUNT

log = logging.getLogger(__name__)

CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# here, not in guidance.py (which applies them, with torch): the UI and the API list them at start-up
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
# the always-on script's title in ``alwayson_scripts`` (matched in any case)
SCRIPT_TITLE = "controlnet"
MAX_UNITS = 10
# older clients and the extension's earlier UI used these names for the fit modes
_RESIZE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize",
    "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill",
    "envelope (outer fit)": "Resize and Fill",
}
_LEGACY_FIELDS = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "mask_image": "mask"}
# The fields the extension writes to infotext, in its order (ControlNetUnit.infotext_fields()).
INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                   "guidance_start", "guidance_end", "pixel_perfect", "control_mode")


# A unit as positional values: the order of the extension's first API (version 1,
# ``external_code.ControlNetUnit.__init__``), which A1111 clients still send as script args.
POSITIONAL_FIELDS = ("enabled", "module", "model", "weight", "image", "invert_image", "resize_mode", "rgbbgr_mode",
                     "low_vram", "processor_res", "threshold_a", "threshold_b", "guidance_start", "guidance_end",
                     "guess_mode")


def unit_count(settings: Any) -> int:
    """How many unit tabs the UI shows: the extension's ``control_net_unit_count`` setting."""
    try:
        count = int(settings.get("control_net_unit_count", DEFAULT_UNIT_COUNT))
    except (TypeError, ValueError):
        count = DEFAULT_UNIT_COUNT
    return max(1, min(MAX_UNITS, count))


class UnitError(RequestError):
    """A unit the user must fix: said with the unit's number."""


@dataclass(frozen=True)
class ControlNetUnitRequest:
    enabled: bool = True
    module: str = "none"                 # preprocessor name
    model: str = "None"                  # ControlNet title/name; "None" = no model
    weight: float = 1.0
    image: Any = None                    # PIL image; None = the img2img init image
    mask: Any = None                     # PIL image, white = masked: the inpaint modules' area to generate;
                                         # for the other modules, the input to read (a scribble)
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1              # -1 = the preprocessor's default
    threshold_a: float = -1              # the preprocessor's slider 1; -1 = default
    threshold_b: float = -1              # slider 2
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"
    save_detected_map: bool = True
    union_control_type: str = "Unknown"  # a ControlNet Union model's control type (the extension's names)
    # where the unit acts (white = fully), stretched over the picture: ControlNet, T2I-Adapter and
    # IP-Adapter units (the extension's effective_region_mask)
    effective_region_mask: Any = None
    # the extension's advanced_weighting: one weight per ControlNet residual (13 on SD, 10 on SDXL; 4
    # T2I-Adapter features), replacing weight and control-mode scaling
    advanced_weighting: tuple[float, ...] | None = None

    @property
    def control_mode_index(self) -> int:
        return CONTROL_MODES.index(self.control_mode)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("image"), d.pop("mask"), d.pop("effective_region_mask")
        return d


def _enum_value(value: Any, choices: tuple[str, ...], field: str, aliases: dict[str, str] | None = None) -> str:
    """The extension accepts an enum by its text or by its index."""
    if isinstance(value, bool):
        raise UnitError(f"{field} must be one of {', '.join(choices)} (got {value!r})")
    if isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) < len(choices):
        return choices[int(value)]
    if isinstance(value, str):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
        if aliases and value.strip().lower() in aliases:
            return aliases[value.strip().lower()]
    raise UnitError(f"{field} must be one of {', '.join(choices)} (got {value!r})")


def _number(value: Any, field: str, kind: type = float) -> Any:
    if isinstance(value, bool) or value is None:
        raise UnitError(f"{field} must be a number (got {value!r})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UnitError(f"{field} must be a number (got {value!r})") from None
    if not np.isfinite(number):
        raise UnitError(f"{field} must be a finite number (got {value!r})")
    return int(round(number)) if kind is int else number


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def unit_from_api(values: dict[str, Any], decode_image: Callable[[Any], Any],
                  notes: list[str] | None = None) -> ControlNetUnitRequest:
    """One ``alwayson_scripts.controlnet.args`` entry. Unknown keys are ignored (the extension's
    model does the same); legacy aliases are mapped with a note. ``image`` may be base64 (raw or a
    data URI, decoded by ``decode_image``), ``{"image": b64, "mask": b64}`` or ``[image, mask]``.
    An entry without ``enabled`` counts as enabled: a client that sends a unit means it."""
    if not isinstance(values, dict):
        raise UnitError(f"a ControlNet unit must be a JSON object (got {type(values).__name__})")
    values = dict(values)
    for alias, name in _LEGACY_FIELDS.items():
        if alias in values:
            if name in values and values[name] is not None and alias != "mask_image":
                raise UnitError(f"give either {name!r} or its old name {alias!r}, not both")
            values[name] = values.pop(alias)
            if notes is not None and alias != "mask_image":
                notes.append(f"ControlNet: {alias!r} is deprecated, use {name!r}")
    image, mask = values.get("image"), values.get("mask")
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, (list, tuple)):
        if len(image) == 2 and not isinstance(image[0], dict):
            image, mask = image
        elif image and isinstance(image[0], dict):
            image, mask = image[0].get("image"), image[0].get("mask", mask)
        else:
            raise UnitError("ControlNet unit image must be base64, {image, mask} or [image, mask]")
    defaults = ControlNetUnitRequest()
    fields: dict[str, Any] = {
        "enabled": _flag(values.get("enabled", True)),
        "module": str(values.get("module") or "none"),
        "model": str(values.get("model") or "None"),
        "image": decode_image(image) if image else None,
        "mask": decode_image(mask) if mask else None,
    }
    for name in ("weight", "threshold_a", "threshold_b", "guidance_start", "guidance_end"):
        if values.get(name) is not None:
            fields[name] = _number(values[name], name)
    if values.get("processor_res") is not None:
        fields["processor_res"] = _number(values["processor_res"], "processor_res", int)
    for name in ("low_vram", "pixel_perfect", "save_detected_map"):
        if name in values:
            fields[name] = _flag(values[name])
    if values.get("resize_mode") is not None:
        fields["resize_mode"] = _enum_value(values["resize_mode"], CONTROL_RESIZE_MODES, "resize_mode",
                                            _RESIZE_ALIASES)
    if values.get("control_mode") is not None:
        fields["control_mode"] = _enum_value(values["control_mode"], CONTROL_MODES, "control_mode")
    if values.get("hr_option") is not None:
        fields["hr_option"] = _enum_value(values["hr_option"], HR_OPTIONS, "hr_option")
    if values.get("union_control_type") is not None:
        fields["union_control_type"] = str(values["union_control_type"])
    if values.get("effective_region_mask") not in (None, ""):
        fields["effective_region_mask"] = decode_image(values["effective_region_mask"])
    if values.get("advanced_weighting") not in (None, [], ""):
        fields["advanced_weighting"] = _weights(values["advanced_weighting"])
    return replace(defaults, **fields)


def _weights(value: Any) -> tuple[float, ...]:
    """advanced_weighting: a list of numbers (the API) or the same written with commas or spaces (the
    CLI's ``advanced_weighting=1,0.9,...``)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise UnitError(f"advanced_weighting must be a list of numbers (got {type(value).__name__})")
    weights = tuple(_number(v, "advanced_weighting") for v in items)
    if any(not 0 <= w <= 10 for w in weights):
        raise UnitError("advanced_weighting values must be between 0 and 10")
    return weights


def _positional_unit(values: list[Any] | tuple[Any, ...], notes: list[str] | None) -> dict[str, Any]:
    """A unit given as positional values in :data:`POSITIONAL_FIELDS` order, as a dict. The fields
    the extension dropped later are read too: ``invert_image`` on a unit without a preprocessor is
    the "invert" module; the colour-order and guess-mode switches have no effect any more."""
    if len(values) > len(POSITIONAL_FIELDS):
        raise UnitError(f"a positional ControlNet unit has at most {len(POSITIONAL_FIELDS)} values "
                        f"({', '.join(POSITIONAL_FIELDS)}); got {len(values)}")
    fields = dict(zip(POSITIONAL_FIELDS, values))
    if _flag(fields.pop("invert_image", False)):
        if str(fields.get("module") or "none") != "none":
            raise UnitError("invert_image works only with module 'none' (it is the 'invert' module); "
                            "invert the image before sending it")
        fields["module"] = "invert"
    for dropped in ("rgbbgr_mode", "guess_mode"):
        if _flag(fields.pop(dropped, False)) and notes is not None:
            notes.append(f"ControlNet: {dropped!r} was removed from the extension and is ignored")
    return fields


def _unit_values(args: list[Any], notes: list[str] | None) -> list[Any]:
    """The units of a script's ``args`` as the extension's first API read them: objects, and
    positional values flattened into the list, each unit starting at its ``enabled`` boolean
    (or a list of those values per unit). ``null`` entries are skipped, as the extension does."""
    units: list[Any] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if isinstance(arg, bool):
            units.append(_positional_unit(args[i:i + len(POSITIONAL_FIELDS)], notes))
            i += len(POSITIONAL_FIELDS)
            continue
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], bool):
            units.append(_positional_unit(arg, notes))
        elif arg is not None:
            units.append(arg)
        i += 1
    return units


def units_from_alwayson(scripts: dict[str, Any] | None, decode: Callable[[Any], Any],
                        notes: list[str] | None = None) -> tuple[ControlNetUnitRequest, ...]:
    """The units of ``alwayson_scripts["ControlNet"]["args"]`` (the title in any case): objects,
    or A1111's positional values (see :func:`_unit_values`)."""
    for title, entry in (scripts or {}).items():
        if str(title).strip().lower() != SCRIPT_TITLE:
            continue
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        if not isinstance(args, list):
            raise UnitError("alwayson_scripts.controlnet.args must be a list of units")
        return tuple(unit_from_api(arg, decode, notes) for arg in _unit_values(args, notes))
    return ()


def check_unit(unit: ControlNetUnitRequest, index: int) -> None:
    """The ranges the extension enforces (its pydantic model): weight 0-2, start <= end in 0-1.
    ``processor_res`` and the thresholds are not refused: see :func:`lenient_params`."""
    def bad(msg: str) -> UnitError:
        return UnitError(f"ControlNet unit {index}: {msg}")

    if not 0 <= unit.weight <= 2:
        raise bad(f"weight must be between 0 and 2 (got {unit.weight:g})")
    for name in ("guidance_start", "guidance_end"):
        value = getattr(unit, name)
        if not 0 <= value <= 1:
            raise bad(f"{name} must be between 0 and 1 (got {value:g})")
    if unit.guidance_start > unit.guidance_end:
        raise bad(f"guidance_start ({unit.guidance_start:g}) is after guidance_end ({unit.guidance_end:g})")
    for name, choices in (("resize_mode", CONTROL_RESIZE_MODES), ("control_mode", CONTROL_MODES),
                          ("hr_option", HR_OPTIONS)):
        if getattr(unit, name) not in choices:
            raise bad(f"{name} must be one of {', '.join(choices)} (got {getattr(unit, name)!r})")


class _Slider(Protocol):
    minimum: float
    maximum: float
    value: float


class _Sliders(Protocol):
    """What :func:`lenient_params` reads of a preprocessor (``preprocessors.Preprocessor``)."""

    name: str
    resolution: _Slider | None
    slider_1: _Slider | None
    slider_2: _Slider | None


def lenient_params(p: _Sliders, processor_res: float, threshold_a: float, threshold_b: float,
                   where: str = "ControlNet") -> tuple[int, float, float]:
    """The extension's rule for a unit's preprocessor values (``bound_check_params``): a value
    outside its slider's range is replaced by the slider's default, with a warning unless it is
    -1 (the API's "default" sentinel), instead of failing the request. One rule for
    ``/controlnet/detect`` and for generation. A value for a slider the module does not have is
    kept: nothing reads it."""
    out: list[float] = []
    for field, given, slider in (("processor_res", processor_res, p.resolution),
                                 ("threshold_a", threshold_a, p.slider_1),
                                 ("threshold_b", threshold_b, p.slider_2)):
        if slider is not None and not slider.minimum <= given <= slider.maximum:
            if given != -1:
                log.warning("%s: %s.%s %g is outside %g-%g, using the default %g", where, p.name, field, given,
                            slider.minimum, slider.maximum, slider.value)
            given = slider.value
        out.append(given)
    return int(round(out[0])), float(out[1]), float(out[2])


# --------------------------------------------------------------------------- sizes and maps


def in_guidance_window(step: int, total: int, start: float, end: float) -> bool:
    """The extension's window rule for every kind of unit: a unit acts on a step when step / total
    lies in [Starting Control Step, Ending Control Step]."""
    fraction = step / max(total, 1)
    return start <= fraction <= end


def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution at which the map lands on the generation size without a second
    resize: the image's short side times the fit factor (the smaller factor for "Resize and Fill",
    the larger otherwise, as the extension's ``pixel_perfect_resolution``)."""
    raw_w, raw_h = image_size
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if resize_mode == "Resize and Fill" else max(k_h, k_w)
    return int(round(k * min(raw_w, raw_h)))


def _resample_for(arr: np.ndarray, shrinking: bool) -> Image.Resampling:
    """Maps with a handful of flat colours (segmentation, binary edges) keep them crisp with
    nearest-neighbour; others get area averaging to shrink and bicubic to grow."""
    flat = arr.reshape(-1, arr.shape[-1]) if arr.ndim == 3 else arr.reshape(-1, 1)
    sample = flat[:: max(1, flat.shape[0] // 65536)]
    packed = sample.astype(np.uint32) @ (np.array([1, 256, 65536], np.uint32)[: sample.shape[1]])
    colours = len(np.unique(packed))
    if 3 <= colours < 200:
        return Image.Resampling.NEAREST
    return Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC


def _is_binary(arr: np.ndarray) -> bool:
    """Two colours, one near black and one near white: an edge or scribble map (the extension's test)."""
    flat = arr.reshape(-1, arr.shape[-1]) if arr.ndim == 3 else arr.reshape(-1, 1)
    return len(np.unique(flat, axis=0)) == 2 and int(arr.min()) < 16 and int(arr.max()) > 240


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A map at another size. Binary maps stay binary: resized smoothly, then thresholded at Otsu's
    level (the extension's ``high_quality_resize``), so thin edges survive a shrink as lines, not as
    faint grey."""
    if image.size == size:
        return image
    shrinking = size[0] * size[1] < image.width * image.height
    arr = np.asarray(image)
    if _is_binary(arr):
        import cv2

        grey = np.asarray(image.convert("L").resize(size, Image.Resampling.BOX if shrinking
                                                    else Image.Resampling.BICUBIC))
        _, binary = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        return Image.fromarray(binary).convert(image.mode)
    return image.resize(size, _resample_for(arr, shrinking))


def fit_control_map(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """Bring a control map to the generation size (the extension's ``detectmap_proc``):

    - "Just Resize": stretch to the size;
    - "Crop and Resize": scale until it covers the size, centre-crop the overflow;
    - "Resize and Fill": scale until it fits inside, centre it on the median colour of its border.
    """
    image = image.convert("RGB")
    if resize_mode == "Just Resize":
        return _resize(image, (width, height))
    k_w, k_h = width / image.width, height / image.height
    if resize_mode == "Resize and Fill":
        k = min(k_w, k_h)
        scaled = _resize(image, (max(1, round(image.width * k)), max(1, round(image.height * k))))
        arr = np.asarray(scaled)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        fill = tuple(int(v) for v in np.median(border, axis=0))
        canvas = Image.new("RGB", (width, height), fill)
        canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
        return canvas
    k = max(k_w, k_h)
    scaled = _resize(image, (max(width, round(image.width * k)), max(height, round(image.height * k))))
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def fit_control_mask(mask: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """An inpaint unit's mask brought to the generation size the way :func:`fit_control_map` brings its
    image (same scale, crop and placement), nearest-neighbour, then binarised at half (the
    extension's ``> 127``); the border "Resize and Fill" adds is masked, so it is generated: that is
    outpainting with an inpaint ControlNet. Returned as RGB so it goes through :func:`map_to_tensor`
    like a map."""
    mask = mask.convert("L")
    if resize_mode == "Just Resize":
        fitted = mask.resize((width, height), Image.NEAREST)
    else:
        k_w, k_h = width / mask.width, height / mask.height
        if resize_mode == "Resize and Fill":
            k = min(k_w, k_h)
            scaled = mask.resize((max(1, round(mask.width * k)), max(1, round(mask.height * k))), Image.NEAREST)
            fitted = Image.new("L", (width, height), 255)
            fitted.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
        else:
            k = max(k_w, k_h)
            scaled = mask.resize((max(width, round(mask.width * k)), max(height, round(mask.height * k))),
                                 Image.NEAREST)
            left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
            fitted = scaled.crop((left, top, left + width, top + height))
    return fitted.point(lambda v: 255 if v > 127 else 0).convert("RGB")


def map_to_tensor(image: Image.Image) -> Any:
    """RGB map -> [1, 3, H, W] float in [0, 1], the ControlNet's conditioning input."""
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]


def region_to_tensor(mask: Image.Image | None, width: int, height: int) -> Any:
    """An effective region mask -> [1, 1, H, W] in [0, 1] at the pass's pixel size (stretched, as the
    extension interpolates its mask straight to each layer's size; white = the unit acts fully)."""
    if mask is None:
        return None
    import torch

    arr = np.asarray(mask.convert("L").resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None, None]


# --------------------------------------------------------------------------- infotext


def _text(value: Any) -> str:
    return str(value)


def unit_infotext(unit: ControlNetUnitRequest, model_title: str, processor_res: int, threshold_a: float,
                  threshold_b: float) -> str:
    """``Module: canny, Model: name [hash], Weight: 1.0, …`` with the values actually used (the
    preprocessor's defaults filled in), in the extension's field order."""
    values = {
        "module": unit.module, "model": model_title, "weight": float(unit.weight),
        "resize_mode": unit.resize_mode, "processor_res": int(processor_res),
        "threshold_a": float(threshold_a), "threshold_b": float(threshold_b),
        "guidance_start": float(unit.guidance_start), "guidance_end": float(unit.guidance_end),
        "pixel_perfect": bool(unit.pixel_perfect), "control_mode": unit.control_mode,
    }
    return ", ".join(f"{' '.join(w.capitalize() for w in k.split('_'))}: {_text(v)}" for k, v in values.items())


def _parse_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_unit_infotext(text: str) -> ControlNetUnitRequest:
    """The inverse of :func:`unit_infotext` (PNG Info → the unit's controls). Unknown keys are
    skipped, so infotext from newer extension versions still pastes."""
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition(": ")
        if not sep:
            continue
        field = "_".join(w.lower() for w in key.split(" "))
        if field in INFOTEXT_FIELDS:
            values[field] = _parse_value(value.strip())
    unit = unit_from_api(values, decode_image=lambda _: None)
    return replace(unit, enabled=True)


def units_from_infotext(params: dict[str, Any]) -> dict[int, ControlNetUnitRequest]:
    """``ControlNet 0``, ``ControlNet 1``… entries of a parsed infotext."""
    units = {}
    for key, value in params.items():
        if key.startswith("ControlNet ") and key[len("ControlNet "):].isdigit():
            try:
                units[int(key[len("ControlNet "):])] = parse_unit_infotext(str(value))
            except UnitError as e:
                log.warning("Ignoring %s in infotext: %s", key, e)
    return units
