"""JSON safety for what the API echoes back: a request's fields and option values may hold what the
served app's JSON encoder cannot write. Options themselves are validated by studio.options."""

from __future__ import annotations

import math
from typing import Any

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
