"""A1111 "parameters" infotext: build it exactly as A1111 writes it, and read it back.

Layout (A1111 ``processing.create_infotext``)::

    <prompt, may span lines>
    Negative prompt: <negative>            (omitted when empty)
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values containing ``,``, ``:`` or a newline are JSON-quoted. The parser mirrors
``infotext_utils.parse_generation_parameters``: the last line counts as parameters only if it
holds at least three ``key: value`` pairs, otherwise it is part of the prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """``params`` keeps insertion order; entries whose value is None are left out."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        parts.append(key if key == value else f"{key}: {quote(value)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


# Filled in when an infotext lacks them, as A1111 does, so old images read the same.
PARSE_DEFAULTS = {
    "Clip skip": "1",
    "Schedule type": "Automatic",
    "RNG": "GPU",
    "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
}


def parse_infotext(text: str) -> dict[str, str]:
    """Parse infotext into A1111's dict: "Prompt", "Negative prompt", then every key, with
    ``Size: WxH`` split into ``Size-1`` / ``Size-2``. Values stay strings, as in A1111."""
    result: dict[str, str] = {}
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False

    *lines, last = (text or "").strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result["Prompt"] = "\n".join(prompt_lines)
    result["Negative prompt"] = "\n".join(negative_lines)

    for key, value in RE_PARAM.findall(last):
        value = unquote(value.strip())
        size = RE_IMAGESIZE.match(value)
        if size:
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)
        else:
            result[key] = value

    for key, value in PARSE_DEFAULTS.items():
        result.setdefault(key, value)
    return result


# infotext key -> (request field, converter); used to paste parameters and for the API's
# ``infotext`` field, which fills whatever the request did not set explicitly.
INFOTEXT_FIELDS = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Distilled CFG Scale": ("distilled_cfg_scale", float),   # Forge's key (FLUX.1's guidance input)
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Clip skip": ("clip_skip", int),
    "Eta": ("eta", float),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Seed resize from-1": ("seed_resize_from_w", int),
    "Seed resize from-2": ("seed_resize_from_h", int),
    "Denoising strength": ("denoising_strength", float),
    "Tiling": ("tiling", lambda v: str(v).strip().lower() == "true"),
    "Token merging ratio": ("token_merging_ratio", float),
    "Token merging ratio hr": ("token_merging_ratio_hr", float),
    "Hires upscale": ("hr_scale", float),
    "Hires resize-1": ("hr_resize_x", int),
    "Hires resize-2": ("hr_resize_y", int),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires checkpoint": ("hr_checkpoint_name", str),
    "Hires sampler": ("hr_sampler_name", str),
    "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
    "Refiner": ("refiner_checkpoint", str),
    "Refiner switch at": ("refiner_switch_at", float),
}


# infotext key -> (setting, converter): keys A1111 restores as ``override_settings`` when an infotext
# is pasted, because they are settings rather than request fields.
INFOTEXT_SETTINGS = {
    "ENSD": ("eta_noise_seed_delta", int),
    "NGMS": ("s_min_uncond", float),
}


def infotext_to_settings(parsed: dict[str, str]) -> dict[str, Any]:
    """Override settings from a parsed infotext; values that do not convert are skipped."""
    settings: dict[str, Any] = {}
    for key, (name, convert) in INFOTEXT_SETTINGS.items():
        try:
            settings[name] = convert(parsed[key])
        except (KeyError, TypeError, ValueError):
            continue
    return settings


def infotext_to_fields(parsed: dict[str, str]) -> dict[str, Any]:
    """Request fields from a parsed infotext; values that do not convert are skipped."""
    fields: dict[str, Any] = {}
    for key, (name, convert) in INFOTEXT_FIELDS.items():
        if key not in parsed:
            continue
        try:
            fields[name] = convert(float(parsed[key])) if convert is int else convert(parsed[key])
        except (TypeError, ValueError):
            continue
    # A1111's paste rule for the hires checkbox: a denoising strength with any hires key
    if "Denoising strength" in parsed and any(k in parsed for k in ("Hires upscale", "Hires upscaler",
                                                                     "Hires resize-1")):
        fields["enable_hr"] = True
    if "Model" in parsed or "Model hash" in parsed:
        fields["checkpoint_hint"] = (parsed.get("Model"), parsed.get("Model hash"))
    return fields
