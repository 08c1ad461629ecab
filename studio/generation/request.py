"""The one typed schema per request kind. The REST body *is* this model (A1111's field names and
API defaults); the CLI's flags and the UI's controls are derived from its fields; a queued job
holds it. Ranges, choices and descriptions live on the fields, so every door gives the same
error text for the same mistake, and a new field is a change here and in the engine only.

Two steps check a request:
- pydantic validation (types and ranges, the same for every door: a 422 in the API);
- :func:`validate_txt2img` / :func:`validate_img2img` (names that need a table — samplers,
  schedules —, images decoded, prompt limits, sizes rounded to multiples of 8): a 400.
Settings-dependent resolution (clip skip, token merging, styles, the checkpoint) happens in the
engine's ``prepare`` step, before the job is queued.
"""

from __future__ import annotations

import base64
import binascii
import random
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from studio.controlnet.units import MAX_UNITS, check_unit, units_from_alwayson
from studio.errors import RequestError, UnknownScriptError
from studio.generation.imageops import ImageInputError, normalize_image, normalize_mask
from studio.generation.infotext import infotext_to_fields, parse_infotext
from studio.generation.outputs import ImageReadError, open_image
from studio.generation.samplers import UnknownSamplerError, split_sampler_name
from studio.options import MAX_TOKEN_MERGING
from studio.prompts.limits import check_prompt_limits

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 150
MAX_CFG = 30.0
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
MAX_SEED = 4294967294  # A1111 draws random seeds with random.randrange(4294967294)
MAX_CLIP_SKIP = 12

INPAINT_FILL = ("fill", "original", "latent noise", "latent nothing")
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MAX_MASK_BLUR = 64
MAX_PADDING = 256

# An image in a request: base64 (raw or a data URI) from JSON clients, a PIL image from the UI and
# the CLI. Decoded by validate_img2img, so a bad or oversized image is a 400 before queueing.
ImageInput = Annotated[Any, WithJsonSchema({"type": "string", "description": "base64 image (raw or data URI)"})]


# Request fields a model family's presets may fill when the caller left them to their defaults
# (FLUX.1: CFG 1 and Euler; schnell: 4 steps); see generation/family_rules.py.
PRESET_FIELDS = ("steps", "cfg_scale", "sampler_name", "scheduler")


def door(*, group: str = "", cli: tuple[str, ...] = (), ui: bool = True, label: str = "") -> dict[str, Any]:
    """Per-field hints for the doors that are derived from the schema: the CLI group and extra
    flag names (the studio's older short flags), whether the UI draws a control for the field
    when no tab binds it, and its label."""
    return {"studio": {"group": group, "cli": list(cli), "ui": ui, "label": label}}


class Txt2ImgRequest(BaseModel):
    """A1111's ``StableDiffusionTxt2ImgProcessingAPI``: field names and API defaults as in A1111.
    Unknown fields are ignored, as A1111's own API does (clients such as webuiapi send every field
    A1111 knows)."""

    model_config = ConfigDict(extra="ignore", frozen=True, arbitrary_types_allowed=True,
                              protected_namespaces=(), validate_default=False)
    # A1111's UI starts from other values than its API; the interactive doors (UI, CLI) use these.
    interactive_defaults: ClassVar[dict[str, Any]] = {
        "steps": 20, "sampler_name": "DPM++ 2M", "scheduler": "Automatic", "save_images": True,
        "inpainting_fill": 1, "inpaint_full_res": False, "inpaint_full_res_padding": 32,
    }

    prompt: str = Field("", description="the prompt, in A1111 syntax",
                        json_schema_extra=door(cli=("-p",), ui=False))
    negative_prompt: str = Field("", description="what not to draw", json_schema_extra=door(cli=("-n",), ui=False))
    styles: list[str] = Field(default_factory=list, description="names from styles.csv, applied before generation",
                              json_schema_extra=door(cli=("--style",), ui=False))
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 = random; the used seed is reported",
                      json_schema_extra=door(ui=False))
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="variation seed; -1 = random",
                         json_schema_extra=door(group="seed", cli=("--variation-seed",), ui=False))
    subseed_strength: float = Field(0.0, ge=0, le=1, description="variation strength, 0 = off",
                                    json_schema_extra=door(group="seed", cli=("--variation-strength",), ui=False))
    seed_resize_from_h: int = Field(-1, ge=-1, le=MAX_SIZE, description="resize seed from height; 0 or -1 = off",
                                    json_schema_extra=door(group="seed", ui=False))
    seed_resize_from_w: int = Field(-1, ge=-1, le=MAX_SIZE, description="resize seed from width; 0 or -1 = off",
                                    json_schema_extra=door(group="seed", ui=False))
    sampler_name: str | None = Field(None, description="A1111 sampler name, e.g. 'DPM++ 2M' or 'Euler a'",
                                     json_schema_extra=door(cli=("--sampler",), ui=False))
    sampler_index: str | None = Field("Euler", description="the old name of sampler_name",
                                      json_schema_extra=door(ui=False))
    scheduler: str | None = Field(None, description="schedule type: Automatic, Karras, Exponential, ...",
                                  json_schema_extra=door(ui=False))
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE, description="images per batch",
                            json_schema_extra=door(ui=False))
    n_iter: int = Field(1, ge=1, le=MAX_BATCH_COUNT, description="batch count",
                        json_schema_extra=door(cli=("--batch-count",), ui=False))
    steps: int = Field(50, ge=1, le=MAX_STEPS, description="sampling steps", json_schema_extra=door(ui=False))
    cfg_scale: float = Field(7.0, ge=0, le=MAX_CFG, description="classifier-free guidance scale",
                             json_schema_extra=door(ui=False))
    distilled_cfg_scale: float | None = Field(
        None, ge=0, le=MAX_CFG, description="FLUX.1's distilled guidance (Forge's 'Distilled CFG Scale'); "
        "null = the model's preset (3.5); used by guidance-distilled models only",
        json_schema_extra=door(label="Distilled CFG Scale"))
    width: int = Field(512, ge=MIN_SIZE, le=MAX_SIZE, description="image width (rounded down to a multiple of 8)",
                       json_schema_extra=door(cli=("-W",), ui=False))
    height: int = Field(512, ge=MIN_SIZE, le=MAX_SIZE, description="image height (rounded down to a multiple of 8)",
                        json_schema_extra=door(cli=("-H",), ui=False))
    restore_faces: bool | None = Field(None, description="restore faces after generation (GFPGAN / CodeFormer / "
                                       "RestoreFormer from models/GFPGAN, models/Codeformer; the "
                                       "face_restoration_model option picks one)", json_schema_extra=door(ui=False))
    tiling: bool | None = Field(None, description="seamless textures", json_schema_extra=door(ui=False))
    do_not_save_samples: bool = Field(False, description="do not save the images even when save_images is on",
                                      json_schema_extra=door(ui=False))
    do_not_save_grid: bool = Field(False, description="do not save the grid of a batch",
                                   json_schema_extra=door(ui=False))
    eta: float | None = Field(None, ge=0, le=1, description="noise multiplier of DDIM/ancestral samplers; "
                              "null = the setting", json_schema_extra=door(group="sampling", ui=False))
    denoising_strength: float | None = Field(
        None, ge=0, le=1, description="img2img: how much to change the image; txt2img: the hires pass's "
        "strength (default 0.7)", json_schema_extra=door(ui=False))
    clip_skip: int | None = Field(None, ge=1, le=MAX_CLIP_SKIP, description="stop at the n-th last layer of "
                                  "CLIP; null = the CLIP_stop_at_last_layers setting", json_schema_extra=door(ui=False))
    override_settings: dict[str, Any] = Field(default_factory=dict, description="options for this request only",
                                              json_schema_extra=door(ui=False))
    override_settings_restore_afterwards: bool = Field(True, json_schema_extra=door(ui=False))
    disable_extra_networks: bool = Field(False, description="ignore <lora:...> and <hypernet:...> tags",
                                         json_schema_extra=door(ui=False))
    enable_hr: bool = Field(False, description="hires fix: a second pass at a larger size",
                            json_schema_extra=door(group="hires fix (txt2img)", cli=("--hires",), ui=False))
    hr_scale: float = Field(2.0, ge=1, le=4, description="hires: upscale by",
                            json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    hr_upscaler: str | None = Field(None, description="hires upscaler; null = Latent",
                                    json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    hr_second_pass_steps: int = Field(0, ge=0, le=MAX_STEPS, description="hires steps; 0 = the same as steps",
                                      json_schema_extra=door(group="hires fix (txt2img)", cli=("--hr-steps",),
                                                             ui=False))
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIZE, description="hires: resize width to (0 = use hr_scale)",
                             json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIZE, description="hires: resize height to (0 = use hr_scale)",
                             json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    hr_checkpoint_name: str | None = Field(None, description="hires pass checkpoint; null or 'Use same checkpoint' "
                                           "= the same",
                                           json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    hr_sampler_name: str | None = Field(None, description="hires sampler; null = the same",
                                        json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    hr_scheduler: str | None = Field(None, description="hires schedule type; null = the same",
                                     json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    hr_prompt: str = Field("", description="hires prompt; empty = the same",
                           json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    hr_negative_prompt: str = Field("", description="hires negative prompt; empty = the same",
                                    json_schema_extra=door(group="hires fix (txt2img)", ui=False))
    refiner_checkpoint: str | None = Field(None, description="switch to this checkpoint part-way through sampling "
                                           "(SDXL refiner or any checkpoint of the same latent space)",
                                           json_schema_extra=door(group="refiner", cli=("--refiner",), ui=False))
    refiner_switch_at: float | None = Field(None, ge=0, le=1, description="fraction of the denoising done on the "
                                            "first model before the refiner takes over (A1111: by timestep)",
                                            json_schema_extra=door(group="refiner", ui=False))
    token_merging_ratio: float | None = Field(
        None, ge=0, le=MAX_TOKEN_MERGING, description="token merging (lossy, faster); null = the setting",
        json_schema_extra=door(group="opt-in fast modes", cli=("--token-merging",), ui=False))
    token_merging_ratio_hr: float | None = Field(
        None, ge=0, le=MAX_TOKEN_MERGING, description="token merging in the hires pass; null = the setting",
        json_schema_extra=door(group="opt-in fast modes", ui=False))
    send_images: bool = Field(True, description="return the images in the reply", json_schema_extra=door(ui=False))
    save_images: bool = Field(False, description="save the images to the outputs folder",
                              json_schema_extra=door(ui=False))
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="always-on scripts' arguments "
                                             "(ControlNet: {'controlnet': {'args': [unit, ...]}})",
                                             json_schema_extra=door(ui=False))
    fast: str | None = Field(None, description="few-step preset: 'auto' (a Turbo/Lightning/LCM checkpoint by its name "
                             "or metadata, else a few-step LoRA from models/Lora, added to the prompt) or the kind "
                             "by hand: lcm, tcd, hyper, lightning, dmd2, turbo; fills the sampler, schedule, steps "
                             "and CFG the request leaves unset", json_schema_extra=door(ui=False))
    infotext: str | None = Field(None, description="fill unset fields from these generation parameters",
                                 json_schema_extra=door(ui=False))
    script_name: str | None = Field(None, description="an A1111 script by title (GET /sdapi/v1/scripts), e.g. "
                                    "'x/y/z plot'; its arguments in script_args", json_schema_extra=door(ui=False))
    script_args: list[Any] = Field(default_factory=list, json_schema_extra=door(ui=False))

    # What the engine works with, set by the engine's prepare step or by in-process callers; never
    # part of the REST body (hidden from the schema and the doors, left out of the echo).
    checkpoint: SkipJsonSchema[str | None] = Field(None, exclude=True)  # None = the user's checkpoint
    vae: SkipJsonSchema[str | None] = Field(None, exclude=True)         # None = the sd_vae setting
    controlnet_units: SkipJsonSchema[tuple[Any, ...]] = Field((), exclude=True)
    hr_denoising_strength: SkipJsonSchema[float | None] = Field(None, exclude=True)
    notes: SkipJsonSchema[tuple[str, ...]] = Field((), exclude=True)    # adjustments made by validation
    # fields the caller left to their defaults, which a model family's presets may set (FLUX: CFG 1)
    preset_fields: SkipJsonSchema[tuple[str, ...] | None] = Field(None, exclude=True)

    kind: SkipJsonSchema[str] = Field("txt2img", exclude=True)

    def with_changes(self, **changes: Any) -> Txt2ImgRequest:
        """A copy with ``changes``, validated again (a frozen request is never edited in place)."""
        return type(self).model_validate({**self._fields(), **changes})

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def as_dict(self) -> dict[str, Any]:
        return self._fields()

    @property
    def hires_denoising(self) -> float:
        for value in (self.hr_denoising_strength, self.denoising_strength):
            if value is not None:
                return float(value)
        return 0.7


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's ``StableDiffusionImg2ImgProcessingAPI``: txt2img's fields plus these (API defaults).
    ``width``/``height`` are the generation size; the init image is brought to it by ``resize_mode``."""

    init_images: list[ImageInput] = Field(default_factory=list, description="init images, one per batch item",
                                          json_schema_extra=door(group="img2img / inpainting",
                                                                 cli=("--init-image",), ui=False))
    resize_mode: int = Field(0, ge=0, le=len(RESIZE_MODES) - 1,
                             description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale",
                             json_schema_extra=door(group="img2img / inpainting", ui=False))
    image_cfg_scale: float | None = Field(None, json_schema_extra=door(ui=False))
    mask: ImageInput | None = Field(None, description="inpaint where this mask is white",
                                    json_schema_extra=door(group="img2img / inpainting", ui=False))
    mask_blur_x: int = Field(4, ge=0, le=MAX_MASK_BLUR, json_schema_extra=door(group="img2img / inpainting",
                                                                              ui=False))
    mask_blur_y: int = Field(4, ge=0, le=MAX_MASK_BLUR, json_schema_extra=door(group="img2img / inpainting",
                                                                              ui=False))
    mask_blur: int | None = Field(None, ge=0, le=MAX_MASK_BLUR, description="sets both mask_blur_x and _y",
                                  json_schema_extra=door(group="img2img / inpainting", ui=False))
    mask_round: bool = Field(True, json_schema_extra=door(ui=False))
    inpainting_fill: int = Field(0, ge=0, le=len(INPAINT_FILL) - 1,
                                 description="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing",
                                 json_schema_extra=door(group="img2img / inpainting", ui=False))
    inpaint_full_res: bool = Field(True, description="inpaint area: only masked",
                                   json_schema_extra=door(group="img2img / inpainting", cli=("--only-masked",),
                                                          ui=False))
    inpaint_full_res_padding: int = Field(0, ge=0, le=MAX_PADDING, description="only-masked padding, pixels",
                                          json_schema_extra=door(group="img2img / inpainting", cli=("--padding",),
                                                                 ui=False))
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1 = inpaint not masked",
                                        json_schema_extra=door(group="img2img / inpainting",
                                                               cli=("--invert-mask",), ui=False))
    initial_noise_multiplier: float | None = Field(None, json_schema_extra=door(ui=False))
    include_init_images: bool = Field(False, description="echo the init images in the reply",
                                      json_schema_extra=door(ui=False))

    kind: SkipJsonSchema[str] = Field("img2img", exclude=True)


class ExtrasRequest(BaseModel):
    """A1111's ``ExtrasBaseRequest`` (the Extras tab, POST /extra-single-image and /extra-batch-images,
    ``studio upscale``): field names, defaults and ranges as A1111's API."""

    model_config = ConfigDict(extra="ignore", frozen=True, arbitrary_types_allowed=True)
    interactive_defaults: ClassVar[dict[str, Any]] = {"upscaler_1": "Lanczos"}

    resize_mode: int = Field(0, ge=0, le=1, description="0 = upscale by upscaling_resize, 1 = upscale to "
                             "upscaling_resize_w x _h", json_schema_extra=door(ui=False))
    show_extras_results: bool = Field(True, description="return the images", json_schema_extra=door(ui=False))
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="GFPGAN face restoration mixed in (models/GFPGAN)",
                                     json_schema_extra=door(ui=False))
    codeformer_visibility: float = Field(0, ge=0, le=1, description="CodeFormer face restoration mixed in "
                                         "(models/Codeformer)",
                                         json_schema_extra=door(ui=False))
    codeformer_weight: float = Field(0, ge=0, le=1, description="CodeFormer weight: 0 = maximum effect, "
                                     "1 = minimum", json_schema_extra=door(ui=False))
    upscaling_resize: float = Field(2, ge=0.05, le=8, description="upscale by this factor (resize_mode 0)",
                                    json_schema_extra=door(cli=("--scale",), ui=False))
    upscaling_resize_w: int = Field(512, ge=8, le=8192, description="target width (resize_mode 1)",
                                    json_schema_extra=door(ui=False))
    upscaling_resize_h: int = Field(512, ge=8, le=8192, description="target height (resize_mode 1)",
                                    json_schema_extra=door(ui=False))
    upscaling_crop: bool = Field(True, description="resize_mode 1: upscale to cover the target, then crop "
                                 "the middle to it", json_schema_extra=door(ui=False))
    upscaler_1: str = Field("None", description="upscaler name (GET /sdapi/v1/upscalers)",
                            json_schema_extra=door(cli=("--upscaler",), ui=False))
    upscaler_2: str = Field("None", description="a second upscaler blended in", json_schema_extra=door(ui=False))
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, description="how much of upscaler 2",
                                                json_schema_extra=door(ui=False))
    upscale_first: bool = Field(False, description="upscale before face restoration",
                                json_schema_extra=door(ui=False))


class ExtrasSingleRequest(ExtrasRequest):
    image: ImageInput = Field("", description="base64 image", json_schema_extra=door(ui=False))


class ExtrasBatchImage(BaseModel):
    data: ImageInput
    name: str = ""


class ExtrasBatchRequest(ExtrasRequest):
    imageList: list[ExtrasBatchImage] = Field(default_factory=list)


@dataclass(frozen=True)
class RequestSchemas:
    """The request model of each kind that the doors derive from. A test (or a later feature) can
    hand the studio a subclass with more fields and see them in the UI, the CLI and /docs."""

    txt2img: type[Txt2ImgRequest] = Txt2ImgRequest
    img2img: type[Img2ImgRequest] = Img2ImgRequest
    extras: type[ExtrasRequest] = ExtrasRequest
    # studio.training.schemas.TrainingSchemas; None = the studio's own (typed Any: the training schemas
    # import this module, so naming their class here would be an import cycle)
    training: Any = None


def interactive_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The values the UI and the CLI start from where they differ from the schema's (API) defaults: the
    model's ``interactive_defaults`` (A1111's UI defaults for generation), for the fields it has."""
    return {k: v for k, v in getattr(model, "interactive_defaults", {}).items() if k in model.model_fields}


def studio_hints(info: Any) -> dict[str, Any]:
    """The door hints of a field (see :func:`door`), with defaults for fields that have none."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return {"group": "", "cli": [], "ui": True, "label": "", **extra.get("studio", {})}


def field_type(annotation: Any) -> tuple[Any, bool]:
    """A field's type for a door: (the type inside Optional/Annotated, whether it is a list of it)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return field_type(args[0]) if len(args) == 1 else (Any, False)
    if origin is list:
        inner = typing.get_args(annotation)
        return (inner[0] if inner else Any), True
    if origin is typing.Annotated:
        return field_type(typing.get_args(annotation)[0])
    return annotation, False


def field_bounds(info: Any) -> tuple[Any, Any]:
    """A field's ``ge`` and ``le`` (None where it has none)."""
    lo = hi = None
    for item in info.metadata:
        lo = getattr(item, "ge", lo)
        hi = getattr(item, "le", hi)
    return lo, hi


def public_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The fields a client may send (the hidden engine fields left out)."""
    return {name: info for name, info in model.model_fields.items() if not info.exclude}


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, ``field: message`` — pydantic's own message, the same text the API's
    422 ``detail`` holds, so the UI and the CLI say what the API says."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {item.get('msg', 'invalid')} (got {item.get('input')!r})"
                     if item.get("type") not in ("missing",) else f"{where}: {item.get('msg')}")
    return "; ".join(parts)


def build_request(model: type[Txt2ImgRequest], values: dict[str, Any]) -> Txt2ImgRequest:
    """A request from a door's values: a ValidationError becomes a RequestError with the same text."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise RequestError(describe_validation_error(e)) from None


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return random.randrange(MAX_SEED)
    return int(seed)


def decode_image_input(value: Any, what: str = "image") -> Any:
    """A PIL image from a request's image value (base64 text, a data URI or a PIL image)."""
    if value is None or hasattr(value, "size") and hasattr(value, "mode"):
        return value
    if not isinstance(value, str) or not value:
        raise RequestError(f"{what} must be a base64 string")
    data = value.split(",", 1)[-1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"Invalid base64 image data in {what}: {e}") from e
    try:
        return open_image(raw)
    except ImageReadError as e:
        raise RequestError(f"{what}: {e}") from e


# A1111's UI sends these words for "the same as the first pass"
SAME_CHECKPOINT, SAME_SAMPLER = "Use same checkpoint", "Use same sampler"
DEFAULT_REFINER_SWITCH_AT = 0.8   # A1111's UI default, used when a client names a refiner but no switch point
ALWAYSON_SCRIPTS = ("controlnet", "adetailer")   # the always-on scripts the studio has (lower case, as A1111 matches)


def _unsupported(req: Txt2ImgRequest) -> None:
    """Always-on scripts the studio does not have: A1111's 422, never silently ignored. (A
    ``script_name`` is looked up by the engine, which holds the script registry.)"""
    for name in req.alwayson_scripts or {}:
        if str(name).strip().lower() not in ALWAYSON_SCRIPTS:
            raise UnknownScriptError(f"always on script {name} not found")


def validate_txt2img(req: Txt2ImgRequest) -> Txt2ImgRequest:
    """Names, prompts and sizes: returns the request with its sampler resolved, the ControlNet units
    parsed from ``alwayson_scripts`` and the adjustments it made listed in ``notes``. Sizes that are
    not a multiple of 8 are rounded down (the latent is 1/8 of the image), as A1111 does, and said so."""
    _unsupported(req)
    notes = list(req.notes)
    steps = max(req.steps, req.hr_second_pass_steps)
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        check_prompt_limits(getattr(req, name), steps, field=name)
    changes: dict[str, Any] = {}
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        value = getattr(req, name)
        if 0 < value < MIN_SIZE:
            raise RequestError(f"{name} must be between {MIN_SIZE} and {MAX_SIZE}, or 0/-1 for off (got {value})")
        if value < 0:
            changes[name] = 0
    units = req.controlnet_units or units_from_alwayson(req.alwayson_scripts, decode_image_input, notes)
    if len(units) > MAX_UNITS:
        raise RequestError(f"at most {MAX_UNITS} ControlNet units (got {len(units)})")
    for index, unit in enumerate(units):
        if unit.enabled:
            check_unit(unit, index)
    if (req.hr_checkpoint_name or "").strip() in ("", SAME_CHECKPOINT):
        changes["hr_checkpoint_name"] = None
    if (req.refiner_checkpoint or "").strip().lower() in ("", "none"):
        changes.update(refiner_checkpoint=None, refiner_switch_at=None)
    elif req.refiner_switch_at is None:
        changes["refiner_switch_at"] = DEFAULT_REFINER_SWITCH_AT
    if req.hr_sampler_name == SAME_SAMPLER:
        changes["hr_sampler_name"] = None
    elif req.enable_hr and req.hr_sampler_name:
        try:
            split_sampler_name(req.hr_sampler_name, req.hr_scheduler)
        except UnknownSamplerError as e:
            raise RequestError(f"hr_sampler_name: {e}") from e
    width, height = req.width - req.width % 8, req.height - req.height % 8
    if (width, height) != (req.width, req.height):
        notes.append(f"Size {req.width}x{req.height} rounded down to {width}x{height} (multiple of 8).")
    try:
        sampler, schedule = split_sampler_name(req.sampler_name or req.sampler_index or "Euler", req.scheduler)
    except UnknownSamplerError as e:
        raise RequestError(str(e)) from e
    hr_strength = req.hires_denoising if req.kind == "txt2img" else req.hr_denoising_strength
    return req.model_copy(update={
        **changes, "width": width, "height": height, "sampler_name": sampler.name, "scheduler": schedule.label,
        "controlnet_units": tuple(units), "notes": tuple(notes), "styles": list(req.styles),
        "hr_upscaler": req.hr_upscaler or "Latent", "hr_denoising_strength": hr_strength,
        "tiling": bool(req.tiling),
    })


def validate_img2img(req: Img2ImgRequest) -> Img2ImgRequest:
    """txt2img's checks, and the images themselves: decoded, made RGB (grayscale, RGBA, 16-bit,
    CMYK...) and the mask checked, so a bad upload is refused before it reaches the queue."""
    if not req.init_images:
        raise RequestError("init_images: img2img needs at least one init image")
    try:
        images = [normalize_image(decode_image_input(image, "init_images")) for image in req.init_images]
        mask = decode_image_input(req.mask, "mask") if req.mask is not None else None
        if mask is not None:
            normalize_mask(mask, images[0].size)
    except ImageInputError as e:
        raise RequestError(str(e)) from e
    changes: dict[str, Any] = {"init_images": images, "mask": mask}
    if req.mask_blur is not None:
        changes.update(mask_blur_x=req.mask_blur, mask_blur_y=req.mask_blur, mask_blur=None)
    if req.denoising_strength is None:
        changes["denoising_strength"] = 0.75
    return validate_txt2img(req.model_copy(update=changes))


def fill_from_infotext(req: Txt2ImgRequest) -> Txt2ImgRequest:
    """A1111's ``infotext`` field: the generation parameters it holds fill every field the request
    did not set itself."""
    if not req.infotext:
        return req
    explicit = req.model_fields_set
    fields = {name: value for name, value in infotext_to_fields(parse_infotext(req.infotext)).items()
              if name in type(req).model_fields and name not in explicit}
    return req.with_changes(**fields) if fields else req
