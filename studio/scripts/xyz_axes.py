"""The X/Y/Z plot's axis types: A1111 1.10's list (``scripts/xyz_grid.py`` ``axis_options``) with
sd-webui-controlnet's axes after it, in their order, and how each one changes a request.

API clients send an axis as its index in the list *of the request's tab* (A1111's dropdowns are
``type="index"``; some axes exist on one tab only, so txt2img and img2img number them differently)
or, here, as its label. Every axis A1111 has is listed, so the indices match A1111's; the ones the
studio cannot honour are refused by name when a request picks them, never ignored.

An axis applies a value by returning a changed copy of the request: request fields through
``with_changes`` (validated again, so an out-of-range value is the same error a plain request
gives), engine-only fields (``checkpoint``, ``vae``, ``controlnet_units``) through ``model_copy``,
settings through ``override_settings``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from studio.errors import RequestError
from studio.scripts import ranges
from studio.scripts.base import TABS, ScriptEnv

if TYPE_CHECKING:
    from studio.generation.request import Txt2ImgRequest

NOTHING, SEED, VAR_SEED = "Nothing", "Seed", "Var. seed"
SEED_AXES = (SEED, VAR_SEED)
TXT2IMG, IMG2IMG = ("txt2img",), ("img2img",)
TRUE_WORDS = ("true", "yes", "y", "1")


@dataclass(frozen=True)
class AxisContext:
    """What applying one value may look at: all the axis's values (Prompt S/R searches for the
    first) and the studio's names."""

    values: tuple[Any, ...]
    env: ScriptEnv


Apply = Callable[["Txt2ImgRequest", Any, AxisContext], "Txt2ImgRequest"]
Check = Callable[[list[Any], "Txt2ImgRequest", ScriptEnv], None]


@dataclass(frozen=True)
class Axis:
    """One entry of A1111's axis list.

    ``kind``: how the values text is read (``int`` / ``float`` take ranges, ``permutations`` gives
    every order of the values, ``nothing`` has the one value 0). ``label_format``: A1111's
    ``format_value`` for the legend (``label``: "Steps: 20"; ``value``: the value alone; ``join``:
    a permutation joined with ", "; ``basename``: a file name without its folder; ``nothing``: no
    text). ``cost``: how slow changing it is; the plot loops the costliest axis outermost.
    ``refusal`` says why the studio does not do it (then ``apply`` is None)."""

    label: str
    kind: str = "str"
    apply: Apply | None = None
    tabs: tuple[str, ...] = TABS
    cost: float = 0.0
    choices: Callable[[ScriptEnv], list[str]] | None = None
    label_format: str = "label"
    check: Check | None = None
    refusal: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def supported(self) -> bool:
        return self.apply is not None and not self.refusal

    @property
    def is_nothing(self) -> bool:
        return self.kind == "nothing"

    def values_from(self, items: Sequence[str]) -> list[Any]:
        """The typed values of the axis's text items (ranges expanded). ValueError when one is bad."""
        if self.kind == "int":
            return ranges.expand_ints(items)
        if self.kind == "float":
            return ranges.expand_floats(items)
        if self.kind == "permutations":
            return ranges.permutations_of(items)
        return [str(item) for item in items]

    def format(self, value: Any) -> str:
        """The legend text of one value, as A1111 writes it."""
        if self.label_format == "nothing":
            return ""
        if self.label_format == "join":
            return ", ".join(value)
        if self.label_format == "basename":
            return re.split(r"[\\/]", str(value))[-1]
        if self.label_format == "value":
            return ranges.format_number(value)
        return f"{self.label}: {ranges.format_number(value)}"


# --------------------------------------------------------------------------- request changes


def _validated(req: Txt2ImgRequest, changes: dict[str, Any]) -> Txt2ImgRequest:
    """``req`` with request fields changed and checked as a request from a door is. The fields an
    axis sets are no longer the caller's "left to default", so a model family's presets (FLUX's
    steps and CFG) never overwrite a plotted value."""
    from studio.generation.request import describe_validation_error

    try:
        changed = req.with_changes(**changes)
    except ValidationError as e:
        raise RequestError(describe_validation_error(e)) from None
    if req.preset_fields:
        changed = changed.model_copy(update={"preset_fields": tuple(f for f in req.preset_fields
                                                                    if f not in changes)})
    return changed


def _field(name: str) -> Apply:
    def apply(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
        return _validated(req, {name: value})
    return apply


def _setting(key: str) -> Apply:
    """A value given to one option for the cells (A1111's ``apply_override``)."""
    def apply(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
        from studio.options import validate_changes

        checked = validate_changes({key: value})
        return _validated(req, {"override_settings": {**req.override_settings, **checked}})
    return apply


def _pick(value: str, names: Sequence[str], what: str) -> str:
    """The listed name ``value`` means (exact, then any case)."""
    text = str(value).strip()
    if text in names:
        return text
    for name in names:
        if name.lower() == text.lower():
            return name
    shown = ", ".join(names[:30]) + (", …" if len(names) > 30 else "")
    raise RequestError(f"unknown {what} {value!r}; known: {shown or 'none'}")


def _names_check(names: Callable[[ScriptEnv], list[str]], what: str) -> Check:
    def check(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
        known = names(env)
        for value in values:
            _pick(value, known, what)
    return check


def _picked_field(field: str, names: Callable[[ScriptEnv], list[str]], what: str) -> Apply:
    def apply(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
        return _validated(req, {field: _pick(value, names(ctx.env), what)})
    return apply


def _samplers(env: ScriptEnv) -> list[str]:
    return list(env.sampler_names())


def _schedules(env: ScriptEnv) -> list[str]:
    return list(env.schedule_names())


def _checkpoints(env: ScriptEnv) -> list[str]:
    return sorted(env.checkpoint_titles(), key=str.casefold)


def _hires_upscalers(env: ScriptEnv) -> list[str]:
    from studio.upscale.latent import LATENT_MODES  # torch is imported on first use, not at start-up

    return [*LATENT_MODES, *env.upscaler_names()]


def _vaes(env: ScriptEnv) -> list[str]:
    return ["Automatic", "None", *env.vae_names()]


def _resolve_checkpoint(value: str, env: ScriptEnv, what: str = "checkpoint") -> str:
    title = env.find_checkpoint(str(value).strip())
    if title is None:
        titles = env.checkpoint_titles()
        shown = ", ".join(titles[:10]) + (f" and {len(titles) - 10} more" if len(titles) > 10 else "")
        raise RequestError(f"unknown {what} {value!r}: put the file in models/Stable-diffusion, or use a name "
                           f"GET /sdapi/v1/sd-models lists ({shown or 'none found'})")
    return title


def _check_checkpoints(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
    for value in values:
        _resolve_checkpoint(value, env)


def _apply_checkpoint(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    return req.model_copy(update={"checkpoint": _resolve_checkpoint(value, ctx.env)})


def _vae_value(value: str, env: ScriptEnv) -> str:
    """A1111's ``find_vae``: "auto"/"automatic" and "none" in any case, else a listed VAE (A1111 falls
    back to Automatic for an unknown name; the studio refuses it)."""
    text = str(value).strip()
    if text.lower() in ("auto", "automatic"):
        return "Automatic"
    return _pick(text, _vaes(env), "VAE (put VAE files in models/VAE)")


def _check_vaes(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
    for value in values:
        _vae_value(value, env)


def _apply_vae(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    return req.model_copy(update={"vae": _vae_value(value, ctx.env)})


def _apply_prompt_sr(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    search = ctx.values[0]
    if search not in req.prompt and search not in req.negative_prompt:
        raise RequestError(f"Prompt S/R did not find {search} in prompt or negative prompt.")
    return _validated(req, {"prompt": req.prompt.replace(search, value),
                            "negative_prompt": req.negative_prompt.replace(search, value)})


def _check_prompt_order(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
    # A1111 cuts the prompt at str.find(), which is -1 for a missing token: refused instead
    for token in values[0] if values else ():
        if token not in req.prompt:
            raise RequestError(f"Prompt order: {token!r} is not in the prompt")


def _apply_prompt_order(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    """The tokens, where they first appear in the prompt, put in the order ``value`` gives."""
    rest = req.prompt
    parts = []
    for _, token in sorted((rest.find(token), token) for token in value):
        at = rest.find(token)
        parts.append(rest[:at])
        rest = rest[at + len(token):]
    prompt = "".join(part + value[i] for i, part in enumerate(parts)) + rest
    return _validated(req, {"prompt": prompt})


def _apply_denoising(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    changed = _validated(req, {"denoising_strength": value})
    if req.kind == "txt2img":
        # txt2img's strength is the hires pass's, which a prepared request already holds resolved
        changed = changed.model_copy(update={"hr_denoising_strength": None})
    return changed


def _apply_size(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    try:
        width, height = ranges.parse_size(str(value))
    except ValueError as e:
        raise RequestError(str(e)) from None
    return _validated(req, {"width": width, "height": height})


def _check_sizes(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
    for value in values:
        try:
            ranges.parse_size(str(value))
        except ValueError as e:
            raise RequestError(str(e)) from None


def _styles(env: ScriptEnv) -> list[str]:
    names = getattr(env, "style_names", None)
    return list(names()) if names is not None else []


def _style_names(value: str) -> list[str]:
    return [name.strip() for name in str(value).split(",") if name.strip()]


def _check_styles(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
    if not (hasattr(env, "style_names") and hasattr(env, "apply_styles")):
        raise RequestError("the Styles axis needs the studio's style list, which scripts cannot reach yet")
    known = _styles(env)
    for value in values:
        for name in _style_names(value):
            if name not in known:
                raise RequestError(f"unknown style {name!r}; styles.csv has {', '.join(known) or 'none'}")


def _apply_styles(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    """The value's styles (comma-separated) added to the request's. The request's own styles are in
    its prompts already (the engine applied them), so only these are applied here, after them, as
    A1111 applies its style list in order."""
    names = _style_names(value)
    prompt, negative = ctx.env.apply_styles(names, req.prompt, req.negative_prompt)  # type: ignore[attr-defined]
    return _validated(req, {"prompt": prompt, "negative_prompt": negative, "styles": [*req.styles, *names]})


def _check_face_restore(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
    from studio.options import OPTION_KEYS

    if any(str(v).strip().lower() in ("codeformer", "gfpgan") for v in values) \
            and "face_restoration_model" not in OPTION_KEYS:
        raise RequestError("Face restore: choosing the restorer per cell needs the face_restoration_model "
                           "option, which this studio does not have; use True or False")


def _apply_face_restore(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    choice = str(value).strip().lower()
    models = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}
    if choice in models:
        req = _setting("face_restoration_model")(req, models[choice], ctx)
        return _validated(req, {"restore_faces": True})
    return _validated(req, {"restore_faces": choice in TRUE_WORDS})


def _check_refiner(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
    if "refiner_checkpoint" not in type(req).model_fields:
        raise RequestError("this studio's requests have no refiner")
    for value in values:
        if str(value).strip().lower() not in ("", "none"):
            _resolve_checkpoint(value, env, "refiner checkpoint")


def _apply_refiner(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
    text = str(value).strip()
    title = None if text.lower() in ("", "none") else _resolve_checkpoint(text, ctx.env, "refiner checkpoint")
    return _validated(req, {"refiner_checkpoint": title})


def _check_refiner_switch(values: list[Any], req: Txt2ImgRequest, env: ScriptEnv) -> None:
    if "refiner_switch_at" not in type(req).model_fields:
        raise RequestError("this studio's requests have no refiner")


def _controlnet(field: str) -> Apply:
    """sd-webui-controlnet's axes: the value goes to every enabled unit (the extension hands a plain
    value to all units)."""
    def apply(req: Txt2ImgRequest, value: Any, ctx: AxisContext) -> Txt2ImgRequest:
        from studio.controlnet.units import check_unit, units_from_alwayson
        from studio.generation.request import decode_image_input

        units = tuple(req.controlnet_units) or units_from_alwayson(req.alwayson_scripts, decode_image_input, [])
        if not any(getattr(u, "enabled", False) for u in units):
            raise RequestError("no ControlNet unit is enabled in this request: enable one "
                               "(alwayson_scripts.controlnet) to plot its settings")
        changed = tuple(_replace_unit(u, **{field: value}) if u.enabled else u for u in units)
        for index, unit in enumerate(changed):
            if unit.enabled:
                check_unit(unit, index)
        return req.model_copy(update={"controlnet_units": changed})
    return apply


def _replace_unit(unit: Any, **changes: Any) -> Any:
    if dataclasses.is_dataclass(unit):
        return dataclasses.replace(unit, **changes)
    return unit.model_copy(update=changes)


def _refused(label: str, why: str, kind: str = "str", **kw: Any) -> Axis:
    return Axis(label, kind, refusal=why, **kw)


_NO_SAMPLER_KNOB = "the studio's samplers have no such setting"
_NO_SCHEDULE_KNOB = "the studio's noise schedules have no such setting"
_CN = "[ControlNet] "

# A1111 1.10's axis_options in order (txt2img-only and img2img-only entries marked), then
# sd-webui-controlnet's, which it appends to the same list.
AXES: tuple[Axis, ...] = (
    Axis(NOTHING, "nothing", lambda req, value, ctx: req, label_format="nothing"),
    Axis(SEED, "int", _field("seed")),
    Axis(VAR_SEED, "int", _field("subseed")),
    Axis("Var. strength", "float", _field("subseed_strength")),
    Axis("Steps", "int", _field("steps")),
    Axis("Hires steps", "int", _field("hr_second_pass_steps"), tabs=TXT2IMG),
    Axis("CFG Scale", "float", _field("cfg_scale")),
    _refused("Image CFG Scale", "image CFG scale (instruct-pix2pix models) is not used by this studio", "float",
             tabs=IMG2IMG),
    Axis("Prompt S/R", "str", _apply_prompt_sr, label_format="value"),
    Axis("Prompt order", "permutations", _apply_prompt_order, label_format="join", check=_check_prompt_order),
    Axis("Sampler", "str", _picked_field("sampler_name", _samplers, "sampler"), tabs=TXT2IMG, choices=_samplers,
         label_format="value", check=_names_check(_samplers, "sampler")),
    Axis("Hires sampler", "str", _picked_field("hr_sampler_name", _samplers, "sampler"), tabs=TXT2IMG,
         choices=_samplers, check=_names_check(_samplers, "sampler")),
    Axis("Sampler", "str", _picked_field("sampler_name", _samplers, "sampler"), tabs=IMG2IMG, choices=_samplers,
         label_format="value", check=_names_check(_samplers, "sampler")),
    Axis("Checkpoint name", "str", _apply_checkpoint, cost=1.0, choices=_checkpoints, label_format="basename",
         check=_check_checkpoints),
    Axis("Negative Guidance minimum sigma", "float", _setting("s_min_uncond")),
    _refused("Sigma Churn", _NO_SAMPLER_KNOB, "float"),
    _refused("Sigma min", _NO_SAMPLER_KNOB, "float"),
    _refused("Sigma max", _NO_SAMPLER_KNOB, "float"),
    _refused("Sigma noise", _NO_SAMPLER_KNOB, "float"),
    Axis("Schedule type", "str", _picked_field("scheduler", _schedules, "schedule type"), choices=_schedules,
         check=_names_check(_schedules, "schedule type")),
    _refused("Schedule min sigma", _NO_SCHEDULE_KNOB, "float"),
    _refused("Schedule max sigma", _NO_SCHEDULE_KNOB, "float"),
    _refused("Schedule rho", _NO_SCHEDULE_KNOB, "float"),
    _refused("Skip Early CFG", "skipping CFG on early steps is not available in this studio", "float"),
    _refused("Beta schedule alpha", _NO_SCHEDULE_KNOB, "float"),
    _refused("Beta schedule beta", _NO_SCHEDULE_KNOB, "float"),
    Axis("Eta", "float", _field("eta")),
    Axis("Clip skip", "int", _field("clip_skip")),
    Axis("Denoising", "float", _apply_denoising),
    _refused("Initial noise multiplier", "the initial noise multiplier is not used by this studio", "float"),
    _refused("Extra noise", "img2img extra noise is not available in this studio", "float"),
    Axis("Hires upscaler", "str", _picked_field("hr_upscaler", _hires_upscalers, "upscaler"), tabs=TXT2IMG,
         choices=_hires_upscalers, check=_names_check(_hires_upscalers, "upscaler")),
    _refused("Cond. Image Mask Weight", "the conditioning mask weight is not available in this studio", "float",
             tabs=IMG2IMG),
    Axis("VAE", "str", _apply_vae, cost=0.7, choices=_vaes, check=_check_vaes),
    Axis("Styles", "str", _apply_styles, choices=_styles, check=_check_styles),
    _refused("UniPC Order", "the studio's UniPC has no order setting", "int"),
    Axis("Face restore", "str", _apply_face_restore, label_format="value", check=_check_face_restore),
    Axis("Token merging ratio", "float", _field("token_merging_ratio")),
    Axis("Token merging ratio high-res", "float", _field("token_merging_ratio_hr")),
    _refused("Always discard next-to-last sigma", _NO_SCHEDULE_KNOB, choices=lambda env: ["False", "True"]),
    _refused("SGM noise multiplier", _NO_SAMPLER_KNOB, choices=lambda env: ["False", "True"]),
    Axis("Refiner checkpoint", "str", _apply_refiner, cost=1.0,
         choices=lambda env: ["None", *_checkpoints(env)], label_format="basename", check=_check_refiner),
    Axis("Refiner switch at", "float", _field("refiner_switch_at"), check=_check_refiner_switch),
    _refused("RNG source", "the studio always draws noise on the CPU", choices=lambda env: ["GPU", "CPU", "NV"]),
    _refused("FP8 mode", "fp8 weight storage is chosen by the studio, not per image",
             choices=lambda env: ["Disable", "Enable for SDXL", "Enable"]),
    Axis("Size", "str", _apply_size, check=_check_sizes),
    _refused(_CN + "Enabled", "plot a unit's weight instead (0 turns it off)"),
    _refused(_CN + "Model", "the ControlNet model cannot be plotted yet"),
    Axis(_CN + "Weight", "float", _controlnet("weight")),
    Axis(_CN + "Guidance Start", "float", _controlnet("guidance_start"), aliases=(_CN + "Guidance Start (T)",)),
    Axis(_CN + "Guidance End", "float", _controlnet("guidance_end"), aliases=(_CN + "Guidance End (T)",)),
    _refused(_CN + "Control Mode", "the control mode cannot be plotted yet"),
    _refused(_CN + "Resize Mode", "the resize mode cannot be plotted yet"),
    _refused(_CN + "Preprocessor", "the preprocessor cannot be plotted yet"),
    _refused(_CN + "Pre Resolution", "the preprocessor resolution cannot be plotted yet", "int"),
    _refused(_CN + "Pre Threshold A", "the preprocessor thresholds cannot be plotted yet", "float"),
    _refused(_CN + "Pre Threshold B", "the preprocessor thresholds cannot be plotted yet", "float"),
)


def axes_for(tab: str) -> tuple[Axis, ...]:
    """The axis list of a tab, indexed as A1111's dropdown is."""
    return tuple(axis for axis in AXES if tab in axis.tabs)


def axis_labels(tab: str) -> tuple[str, ...]:
    return tuple(axis.label for axis in axes_for(tab))


def axis_choices(axis: Axis, env: ScriptEnv) -> list[str] | None:
    """The values a choice axis offers (its dropdown), None for a free-text axis."""
    return list(axis.choices(env)) if axis.choices is not None else None


def resolve_axis(value: Any, tab: str, what: str) -> Axis:
    """The axis an ``x_type``-like argument names on ``tab``: an index into the tab's list (None is 0,
    "Nothing", as in A1111) or a label in any case. RequestError for an unknown one, and for one the
    studio does not do (named, with the reason)."""
    axes = axes_for(tab)
    if value is None or (isinstance(value, str) and not value.strip()):
        value = 0
    if isinstance(value, bool):
        raise RequestError(f"{what}: expected an axis index or name, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if not 0 <= value < len(axes):
            raise RequestError(f"{what}: axis index {value} is out of range; the {tab} X/Y/Z axis list has "
                               f"{len(axes)} entries (0-{len(axes) - 1}, GET /sdapi/v1/script-info lists them)")
        axis = axes[value]
    elif isinstance(value, str):
        wanted = value.strip().casefold()
        found = [a for a in axes if wanted in (a.label.casefold(), *(x.casefold() for x in a.aliases))]
        if not found:
            elsewhere = [a for a in AXES if a.label.casefold() == wanted]
            if elsewhere:
                raise RequestError(f"{what}: {elsewhere[0].label!r} is an axis of the "
                                   f"{' and '.join(elsewhere[0].tabs)} tab, not {tab}")
            supported = ", ".join(a.label for a in axes if a.supported)
            raise RequestError(f"{what}: unknown axis {value!r}; the {tab} axes are: {supported}")
        axis = found[0]
    else:
        raise RequestError(f"{what}: expected an axis index or name, got {value!r}")
    if not axis.supported:
        where = f" (index {axes.index(axis)})" if isinstance(value, int) else ""
        raise RequestError(f"{what}: the X/Y/Z axis '{axis.label}'{where} is not available in this studio: "
                           f"{axis.refusal}")
    return axis
