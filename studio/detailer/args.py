"""ADetailer's API arguments as typed units, and the infotext ADetailer writes for them.

Clients written for A1111 + ADetailer (Bing-su/adetailer) send
``alwayson_scripts.ADetailer.args = [ad_enable?, skip_img2img?, {unit}, {unit}, ...]``: optional
leading bools, then one dict per unit ("tab") with ADetailer's field names. Names, defaults and the
infotext keys follow ADetailer :data:`ADETAILER_COMPAT_VERSION`; ranges are those of its UI sliders
(its pydantic model is looser in places, but the UI is what users learned the values from).

Two deliberate differences: ADetailer's model forbids unknown keys and then silently skips the
whole unit; here unknown keys are ignored (newer and older clients keep working) and a value out
of range is a RequestError naming the unit and field instead of a silently skipped unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from studio.errors import RequestError

# The ADetailer release whose arguments and infotext this module follows (24.11.1 and 25.3.0 share
# them): written as "ADetailer version" so images read back in A1111 + ADetailer as theirs.
ADETAILER_COMPAT_VERSION = "25.3.0"

# the always-on script's title in ``alwayson_scripts`` (matched in any case, as A1111 does)
SCRIPT_TITLE = "adetailer"
MASK_MERGE_INVERT = ("None", "Merge", "Merge and Invert")
SAME_CHECKPOINT = ("None", "Use same checkpoint")
SAME_VAE = ("None", "Use same VAE")
SAME_SAMPLER = "Use same sampler"
SAME_SCHEDULER = "Use same scheduler"

# (field, infotext key) in the order ADetailer writes them (its ``_all_args``).
INFOTEXT_KEYS: tuple[tuple[str, str], ...] = (
    ("ad_model", "ADetailer model"),
    ("ad_model_classes", "ADetailer model classes"),
    ("ad_tab_enable", "ADetailer tab enable"),
    ("ad_prompt", "ADetailer prompt"),
    ("ad_negative_prompt", "ADetailer negative prompt"),
    ("ad_confidence", "ADetailer confidence"),
    ("ad_mask_filter_method", "ADetailer method to decide top k masks"),
    ("ad_mask_k", "ADetailer mask only top k"),
    ("ad_mask_min_ratio", "ADetailer mask min ratio"),
    ("ad_mask_max_ratio", "ADetailer mask max ratio"),
    ("ad_x_offset", "ADetailer x offset"),
    ("ad_y_offset", "ADetailer y offset"),
    ("ad_dilate_erode", "ADetailer dilate erode"),
    ("ad_mask_merge_invert", "ADetailer mask merge invert"),
    ("ad_mask_blur", "ADetailer mask blur"),
    ("ad_denoising_strength", "ADetailer denoising strength"),
    ("ad_inpaint_only_masked", "ADetailer inpaint only masked"),
    ("ad_inpaint_only_masked_padding", "ADetailer inpaint padding"),
    ("ad_use_inpaint_width_height", "ADetailer use inpaint width height"),
    ("ad_inpaint_width", "ADetailer inpaint width"),
    ("ad_inpaint_height", "ADetailer inpaint height"),
    ("ad_use_steps", "ADetailer use separate steps"),
    ("ad_steps", "ADetailer steps"),
    ("ad_use_cfg_scale", "ADetailer use separate CFG scale"),
    ("ad_cfg_scale", "ADetailer CFG scale"),
    ("ad_use_checkpoint", "ADetailer use separate checkpoint"),
    ("ad_checkpoint", "ADetailer checkpoint"),
    ("ad_use_vae", "ADetailer use separate VAE"),
    ("ad_vae", "ADetailer VAE"),
    ("ad_use_sampler", "ADetailer use separate sampler"),
    ("ad_sampler", "ADetailer sampler"),
    ("ad_scheduler", "ADetailer scheduler"),
    ("ad_use_noise_multiplier", "ADetailer use separate noise multiplier"),
    ("ad_noise_multiplier", "ADetailer noise multiplier"),
    ("ad_use_clip_skip", "ADetailer use separate CLIP skip"),
    ("ad_clip_skip", "ADetailer CLIP skip"),
    ("ad_restore_face", "ADetailer restore face"),
    ("ad_controlnet_model", "ADetailer ControlNet model"),
    ("ad_controlnet_module", "ADetailer ControlNet module"),
    ("ad_controlnet_weight", "ADetailer ControlNet weight"),
    ("ad_controlnet_guidance_start", "ADetailer ControlNet guidance start"),
    ("ad_controlnet_guidance_end", "ADetailer ControlNet guidance end"),
)

# ADetailer leaves keys out of the infotext: when a key's value is falsy (or equals the given value),
# the listed keys go — the key itself unless the list says otherwise ("inpaint only masked" stays
# when off; only its padding goes), and a "use separate X" switch takes its X with it.
_FALSY = object()
_DROP_RULES: tuple[tuple[str, object, tuple[str, ...] | None], ...] = (
    ("ADetailer model classes", _FALSY, None),
    ("ADetailer prompt", _FALSY, None),
    ("ADetailer negative prompt", _FALSY, None),
    ("ADetailer mask only top k", 0, ("ADetailer mask only top k", "ADetailer method to decide top k masks")),
    ("ADetailer mask min ratio", 0.0, None),
    ("ADetailer mask max ratio", 1.0, None),
    ("ADetailer x offset", 0, None),
    ("ADetailer y offset", 0, None),
    ("ADetailer mask merge invert", "None", None),
    ("ADetailer inpaint only masked", _FALSY, ("ADetailer inpaint padding",)),
    ("ADetailer use inpaint width height", _FALSY, ("ADetailer use inpaint width height", "ADetailer inpaint width",
                                                    "ADetailer inpaint height")),
    ("ADetailer use separate steps", _FALSY, ("ADetailer use separate steps", "ADetailer steps")),
    ("ADetailer use separate CFG scale", _FALSY, ("ADetailer use separate CFG scale", "ADetailer CFG scale")),
    ("ADetailer use separate checkpoint", _FALSY, ("ADetailer use separate checkpoint", "ADetailer checkpoint")),
    ("ADetailer use separate VAE", _FALSY, ("ADetailer use separate VAE", "ADetailer VAE")),
    ("ADetailer use separate sampler", _FALSY, ("ADetailer use separate sampler", "ADetailer sampler",
                                                "ADetailer scheduler")),
    ("ADetailer scheduler", SAME_SCHEDULER, None),
    ("ADetailer use separate noise multiplier", _FALSY, ("ADetailer use separate noise multiplier",
                                                         "ADetailer noise multiplier")),
    ("ADetailer use separate CLIP skip", _FALSY, ("ADetailer use separate CLIP skip", "ADetailer CLIP skip")),
    ("ADetailer restore face", _FALSY, None),
    ("ADetailer ControlNet model", "None", ("ADetailer ControlNet model", "ADetailer ControlNet module",
                                            "ADetailer ControlNet weight", "ADetailer ControlNet guidance start",
                                            "ADetailer ControlNet guidance end")),
    ("ADetailer ControlNet module", "None", None),
    ("ADetailer ControlNet weight", 1.0, None),
    ("ADetailer ControlNet guidance start", 0.0, None),
    ("ADetailer ControlNet guidance end", 1.0, None),
)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st: ADetailer's unit labels."""
    if 11 <= n % 100 <= 13 or not 1 <= n % 10 <= 3:
        return f"{n}th"
    return f"{n}{('st', 'nd', 'rd')[n % 10 - 1]}"


def key_suffix(index: int) -> str:
    """The suffix of unit ``index``'s (0-based) infotext keys: none for the first, " 2nd" and on after."""
    return "" if index == 0 else f" {ordinal(index + 1)}"


class DetailerUnit(BaseModel):
    """One ADetailer unit ("tab"): ADetailer's field names and defaults."""

    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    ad_model: str = "None"
    ad_model_classes: str = ""
    ad_tab_enable: bool = True
    ad_prompt: str = ""
    ad_negative_prompt: str = ""
    ad_confidence: float = Field(0.3, ge=0, le=1)
    ad_mask_filter_method: Literal["Area", "Confidence"] = "Area"
    ad_mask_k: int = Field(0, ge=0, le=10)
    ad_mask_min_ratio: float = Field(0.0, ge=0, le=1)
    ad_mask_max_ratio: float = Field(1.0, ge=0, le=1)
    ad_dilate_erode: int = Field(4, ge=-128, le=128)
    ad_x_offset: int = Field(0, ge=-200, le=200)
    ad_y_offset: int = Field(0, ge=-200, le=200)
    ad_mask_merge_invert: Literal["None", "Merge", "Merge and Invert"] = "None"
    ad_mask_blur: int = Field(4, ge=0, le=64)
    ad_denoising_strength: float = Field(0.4, ge=0, le=1)
    ad_inpaint_only_masked: bool = True
    ad_inpaint_only_masked_padding: int = Field(32, ge=0, le=256)
    ad_use_inpaint_width_height: bool = False
    ad_inpaint_width: int = Field(512, ge=64, le=2048)
    ad_inpaint_height: int = Field(512, ge=64, le=2048)
    ad_use_steps: bool = False
    ad_steps: int = Field(28, ge=1, le=150)
    ad_use_cfg_scale: bool = False
    ad_cfg_scale: float = Field(7.0, ge=0, le=30)
    ad_use_checkpoint: bool = False
    ad_checkpoint: str | None = None
    ad_use_vae: bool = False
    ad_vae: str | None = None
    ad_use_sampler: bool = False
    ad_sampler: str = "DPM++ 2M Karras"
    ad_scheduler: str = SAME_SCHEDULER
    ad_use_noise_multiplier: bool = False
    ad_noise_multiplier: float = Field(1.0, ge=0.5, le=1.5)
    ad_use_clip_skip: bool = False
    ad_clip_skip: int = Field(1, ge=1, le=12)
    ad_restore_face: bool = False
    ad_controlnet_model: str = "None"
    ad_controlnet_module: str = "None"
    ad_controlnet_weight: float = Field(1.0, ge=0, le=1)
    ad_controlnet_guidance_start: float = Field(0.0, ge=0, le=1)
    ad_controlnet_guidance_end: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, data: Any) -> Any:
        # ADetailer before 24.11 called the top-k field ad_mask_k_largest (always by area)
        if isinstance(data, dict) and "ad_mask_k" not in data and "ad_mask_k_largest" in data:
            data = {**data, "ad_mask_k": data["ad_mask_k_largest"]}
        return data

    def need_skip(self) -> bool:
        """ADetailer's rule: a unit with no model, or with its tab switched off, does nothing."""
        return self.ad_model == "None" or not self.ad_tab_enable

    def infotext_params(self, suffix: str = "") -> dict[str, Any]:
        """The keys ADetailer writes for this unit, non-default ones only, values unformatted
        (the infotext writer quotes them). Prompts are written as typed, [SEP] and [PROMPT] included."""
        if self.need_skip():
            return {}
        params = {key: getattr(self, attr) for attr, key in INFOTEXT_KEYS}
        params.pop("ADetailer tab enable")
        for key, default, drops in _DROP_RULES:
            if key not in params:
                continue
            value = params[key]
            if (not value) if default is _FALSY else value == default:
                for k in drops or (key,):
                    params.pop(k, None)
        return {k + suffix: v for k, v in params.items()}


@dataclass(frozen=True)
class DetailerConfig:
    """Every unit the client sent, in order (skipped ones too: the infotext numbers units by their
    position, so the 2nd unit is " 2nd" even when the 1st is off)."""

    units: tuple[DetailerUnit, ...]
    skip_img2img: bool = False

    def enabled_units(self) -> list[tuple[int, DetailerUnit]]:
        """(0-based position, unit) of the units that run."""
        return [(n, unit) for n, unit in enumerate(self.units) if not unit.need_skip()]

    def infotext_params(self) -> dict[str, Any]:
        """What ADetailer adds to an image's generation parameters."""
        params: dict[str, Any] = {}
        for n, unit in enumerate(self.units):
            params.update(unit.infotext_params(key_suffix(n)))
        params["ADetailer version"] = ADETAILER_COMPAT_VERSION
        return params

    def model_names(self) -> list[str]:
        """The detectors the enabled units ask for (to check before queueing)."""
        return list(dict.fromkeys(unit.ad_model for _, unit in self.enabled_units()))


def _unit(arg: dict[str, Any], n: int) -> DetailerUnit:
    try:
        return DetailerUnit.model_validate(arg)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'unit'}: {err['msg']}"
                             for err in e.errors())
        raise RequestError(f"ADetailer {ordinal(n)} unit: {problems}") from None


def _refuse_unsupported(unit: DetailerUnit, n: int) -> None:
    """Settings the studio's inpaint can't honour: refused, never silently dropped."""
    where = f"(the {ordinal(n)} unit)"
    if unit.ad_controlnet_model != "None":
        raise RequestError(f"ADetailer: ad_controlnet_model is not supported in this studio {where}: got "
                           f"{unit.ad_controlnet_model!r}; set it to 'None'")
    # a multiplier of 1 changes nothing, so only a real change is refused
    if unit.ad_use_noise_multiplier and unit.ad_noise_multiplier != 1.0:
        raise RequestError(f"ADetailer: ad_use_noise_multiplier is not supported in this studio {where} "
                           "(img2img has no initial noise multiplier); turn it off")


def parse_adetailer(args: Any) -> DetailerConfig | None:
    """``alwayson_scripts.ADetailer.args`` → a config, or None when ADetailer is off: the leading
    ``ad_enable`` bool is false, or no unit has a model (ADetailer's ``is_ad_enabled``).
    The second leading bool is ``skip_img2img`` (img2img only: detail the init image, no img2img pass)."""
    if isinstance(args, tuple):
        args = list(args)
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.ADetailer.args must be a list: [ad_enable, skip_img2img, "
                           "{unit}, ...] with the two bools optional")
    unit_args = [a for a in args if isinstance(a, dict)]
    enabled = args[0] if args and isinstance(args[0], bool) else True
    skip_img2img = len(args) >= 2 and isinstance(args[1], bool) and args[1]
    if not enabled or not unit_args:
        return None
    units = tuple(_unit(arg, n) for n, arg in enumerate(unit_args, 1))
    config = DetailerConfig(units=units, skip_img2img=bool(skip_img2img))
    if not config.enabled_units():
        return None
    for n, unit in config.enabled_units():
        _refuse_unsupported(unit, n + 1)
    return config


def detailer_from_alwayson(scripts: dict[str, Any] | None) -> DetailerConfig | None:
    """The config in ``alwayson_scripts`` (the title "ADetailer" in any case), or None."""
    for title, entry in (scripts or {}).items():
        if str(title).strip().lower() != SCRIPT_TITLE:
            continue
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        return parse_adetailer(args)
    return None
