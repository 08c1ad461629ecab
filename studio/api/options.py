"""Checking the values of POST /sdapi/v1/options and ``override_settings`` before they reach the
engine. A1111 stores any key; so do we, but a known key with a value of the wrong type or out of
range is refused with a 400 (A1111 would store it and fail later, on the next generation)."""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from studio.controlnet.units import DEFAULT_UNIT_COUNT
from studio.generation.request import RequestError
from studio.optimizations import COMPILE_BACKENDS, MAX_TOKEN_MERGING

SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")
PREVIEW_FORMATS = ("png", "jpeg", "webp")
PREVIEW_TYPES = ("Full", "Approx NN", "Approx cheap", "TAESD")
PREVIEW_CONTENT = ("Combined", "Prompt", "Negative prompt")

# Options the API layer knows beyond config.DEFAULT_SETTINGS, with A1111's defaults; GET /options
# shows them so clients see every option they may set.
API_DEFAULTS: dict[str, Any] = {
    "jpeg_quality": 80,
    "webp_lossless": False,
    "live_previews_image_format": "png",
    "live_preview_content": "Prompt",
    "live_preview_refresh_period": 1000,
    "show_progress_grid": True,
    # the ControlNet extension's options, with the values the studio uses when they are unset
    "control_net_unit_count": DEFAULT_UNIT_COUNT,
    "control_net_no_detectmap": False,
}


def _integer(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool):
            raise RequestError(f"{key} must be an integer (got {value!r})")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,9}", value.strip()):
            value = int(value)
        if not isinstance(value, int):
            raise RequestError(f"{key} must be an integer (got {value!r})")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise RequestError(f"{key} must be {bounds} (got {value})")
        return value

    return check


def _number(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RequestError(f"{key} must be a number (got {value!r})") from None
        value = float(value)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise RequestError(f"{key} must be between {lo:g} and {hi:g} (got {value!r})")
        return value

    return check


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RequestError(f"{key} must be true or false (got {value!r})")


def _choice(choices: tuple[str, ...], fold: bool = False) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if isinstance(value, str):
            for choice in choices:
                if value == choice or (fold and value.strip().lower() == choice.lower()):
                    return choice
        raise RequestError(f"{key} must be one of {', '.join(choices)} (got {value!r})")

    return check


def _text(optional: bool = False) -> Callable[[str, Any], str | None]:
    def check(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise RequestError(f"{key} must be a string (got {value!r})")
        return value

    return check


def _names(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{key} must be a list of names")
    return value


RULES: dict[str, Callable[[str, Any], Any]] = {
    "sd_model_checkpoint": _text(optional=True),
    "sd_checkpoint_hash": _text(optional=True),
    "sd_vae": _text(),
    "CLIP_stop_at_last_layers": _integer(1, 12),
    "samples_format": _choice(SAMPLES_FORMATS, fold=True),
    "jpeg_quality": _integer(1, 100),
    "webp_lossless": _boolean,
    "sd_checkpoints_limit": _integer(1, 10),
    "sd_checkpoint_cache_mb": _integer(0),
    "live_previews_enable": _boolean,
    "show_progress_every_n_steps": _integer(-1),
    "show_progress_type": _choice(PREVIEW_TYPES),
    "show_progress_grid": _boolean,
    "live_previews_image_format": _choice(PREVIEW_FORMATS, fold=True),
    "live_preview_content": _choice(PREVIEW_CONTENT),
    "live_preview_refresh_period": _number(0, 3_600_000),
    "eta_ddim": _number(0, 1),
    "eta_ancestral": _number(0, 1),
    "enable_pnginfo": _boolean,
    "save_txt": _boolean,
    "outdir_txt2img_samples": _text(),
    "control_net_unit_count": _integer(1, 10),
    "control_net_model_cache_size": _integer(1, 10),
    "control_net_no_detectmap": _boolean,
    "disabled_extensions": _names,
    "token_merging_ratio": _number(0, MAX_TOKEN_MERGING),
    "token_merging_ratio_img2img": _number(0, MAX_TOKEN_MERGING),
    "token_merging_ratio_hr": _number(0, MAX_TOKEN_MERGING),
    "sd_compile_unet": _boolean,
    "sd_compile_backend": _choice(COMPILE_BACKENDS),
}


def validate_options(changes: Any) -> dict[str, Any]:
    """``changes`` with known keys checked and normalised (e.g. "JPG" → "jpg", "3" → 3); unknown
    keys are kept as they are. Raises RequestError naming every bad key."""
    if not isinstance(changes, dict):
        raise RequestError("options must be a JSON object of option names to values")
    out: dict[str, Any] = {}
    errors = []
    for key, value in changes.items():
        rule = RULES.get(key)
        if rule is None:
            why = _unsafe(value)
            if why is not None:
                errors.append(f"{key}: the value is {why}")
            else:
                out[key] = value
            continue
        try:
            out[key] = rule(key, value)
        except RequestError as e:
            errors.append(str(e))
    if errors:
        raise RequestError("; ".join(errors))
    return out


# What the JSON encoder of the served app (orjson, under Gradio) can write: 64-bit integers, and
# nesting up to 254 levels; we stay well inside that.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
MAX_DEPTH = 32


def _unsafe(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` cannot be stored and served back as JSON, or None if it can."""
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, int):
        return None if _INT_MIN <= value <= _INT_MAX else "an integer outside the 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "not a finite number"
    if isinstance(value, list):
        return next((why for v in value if (why := _unsafe(v, depth + 1))), None)
    if isinstance(value, dict):
        return next((why for v in value.values() if (why := _unsafe(v, depth + 1))), None)
    return f"of type {type(value).__name__}"


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with whatever the JSON encoder cannot write (huge integers, NaN, very deep
    nesting) replaced by its text: for echoing a request back and for settings files edited by
    hand."""
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return str(value)
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            return str(value)
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, float)) and _unsafe(value) is None:
        return value
    return str(value)
