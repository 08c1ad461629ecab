"""Typed generation requests: what every front door (UI, API, CLI) builds and submits."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from studio.errors import RequestError
from studio.generation.samplers import UnknownSamplerError, split_sampler_name

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 150
MAX_CFG = 30.0
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
MAX_SEED = 4294967294  # A1111 draws random seeds with random.randrange(4294967294)


@dataclass(frozen=True)
class Txt2ImgRequest:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    clip_skip: int = 1
    eta: float | None = None
    subseed: int = -1                  # variation seed (-1 = random when strength > 0)
    subseed_strength: float = 0.0      # variation strength, 0 = off
    seed_resize_from_w: int = 0        # "Resize seed from width/height"; 0 = off
    seed_resize_from_h: int = 0
    tiling: bool = False               # seamless textures
    # Hires. fix (txt2img): a second pass at hr_scale× (or hr_resize_x × hr_resize_y)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0      # 0 = the same as steps
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_denoising_strength: float = 0.7
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    styles: tuple[str, ...] = ()       # names from styles.csv, applied before generation
    checkpoint: str | None = None      # title/name; None = the user's chosen checkpoint (settings)
    vae: str | None = None             # "Automatic" | "None" | file name; None = the sd_vae setting
    save_images: bool = True
    # ControlNet units (studio.controlnet.units.ControlNetUnitRequest), the extension's order
    controlnet_units: tuple[Any, ...] = ()
    # Token merging (lossy, opt-in): None = the settings' ratio; 0 = off
    token_merging_ratio: float | None = None
    token_merging_ratio_hr: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)  # adjustments made by validate()

    def with_changes(self, **changes: Any) -> Txt2ImgRequest:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return random.randrange(MAX_SEED)
    return int(seed)


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not (lo <= value <= hi):
        raise RequestError(f"{name} must be between {lo:g} and {hi:g} (got {value:g})")


def validate_txt2img(req: Txt2ImgRequest) -> Txt2ImgRequest:
    """Check ranges and names; returns the request with the adjustments it made listed in
    ``notes``. Sizes that are not a multiple of 8 are rounded down (the latent is 1/8 of
    the image), as A1111 does, and said so."""
    notes = list(req.notes)
    for name in ("steps", "width", "height", "batch_size", "n_iter", "seed", "clip_skip"):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name} must be an integer (got {value!r})")
    _check_range("steps", req.steps, 1, MAX_STEPS)
    _check_range("cfg_scale", req.cfg_scale, 0, MAX_CFG)
    _check_range("width", req.width, MIN_SIZE, MAX_SIZE)
    _check_range("height", req.height, MIN_SIZE, MAX_SIZE)
    _check_range("batch_size", req.batch_size, 1, MAX_BATCH_SIZE)
    _check_range("n_iter (batch count)", req.n_iter, 1, MAX_BATCH_COUNT)
    _check_range("clip_skip", req.clip_skip, 1, 12)
    if req.controlnet_units:
        from studio.controlnet.units import MAX_UNITS, check_unit

        if len(req.controlnet_units) > MAX_UNITS:
            raise RequestError(f"at most {MAX_UNITS} ControlNet units (got {len(req.controlnet_units)})")
        for index, unit in enumerate(req.controlnet_units):
            if unit.enabled:
                check_unit(unit, index)
    if req.eta is not None:
        _check_range("eta", req.eta, 0, 1)
    from studio.optimizations import MAX_TOKEN_MERGING

    for name in ("token_merging_ratio", "token_merging_ratio_hr"):
        if getattr(req, name) is not None:
            _check_range(name, getattr(req, name), 0, MAX_TOKEN_MERGING)
    if req.seed > MAX_SEED:
        raise RequestError(f"seed must be at most {MAX_SEED} (or -1 for random)")
    if req.subseed > MAX_SEED:
        raise RequestError(f"subseed (variation seed) must be at most {MAX_SEED} (or -1 for random)")
    _check_range("subseed_strength (variation strength)", req.subseed_strength, 0, 1)
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name} must be an integer (got {value!r})")
        if value > 0:
            _check_range(name, value, MIN_SIZE, MAX_SIZE)
    if req.enable_hr:
        _check_range("hr_scale", req.hr_scale, 1, 4)
        _check_range("hr_second_pass_steps", req.hr_second_pass_steps, 0, MAX_STEPS)
        _check_range("hr_denoising_strength (denoising_strength)", req.hr_denoising_strength, 0, 1)
        for name in ("hr_resize_x", "hr_resize_y"):
            value = getattr(req, name)
            if value:
                _check_range(name, value, MIN_SIZE, MAX_SIZE)
        if req.hr_sampler_name:
            try:
                split_sampler_name(req.hr_sampler_name, req.hr_scheduler)
            except UnknownSamplerError as e:
                raise RequestError(f"hr_sampler_name: {e}") from e
    width, height = req.width - req.width % 8, req.height - req.height % 8
    if (width, height) != (req.width, req.height):
        notes.append(f"Size {req.width}x{req.height} rounded down to {width}x{height} (multiple of 8).")
    try:
        sampler, schedule = split_sampler_name(req.sampler_name, req.scheduler)
    except UnknownSamplerError as e:
        raise RequestError(str(e)) from e
    return replace(
        req, width=width, height=height, sampler_name=sampler.name, scheduler=schedule.label,
        notes=tuple(notes),
    )


INPAINT_FILL = ("fill", "original", "latent noise", "latent nothing")
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MAX_MASK_BLUR = 64
MAX_PADDING = 256


@dataclass(frozen=True)
class Img2ImgRequest(Txt2ImgRequest):
    """img2img and inpainting: txt2img's fields plus the init image(s) and A1111's mask controls.
    ``width``/``height`` are the generation size; the init image is brought to it by ``resize_mode``."""

    init_images: tuple[Any, ...] = ()      # PIL images; one per batch item, cycled
    mask: Any = None                       # PIL image, white = repaint; None = plain img2img
    resize_mode: int = 0                   # index into RESIZE_MODES
    denoising_strength: float = 0.75
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 1               # index into INPAINT_FILL; A1111's UI default "original"
    inpaint_full_res: bool = False         # "Only masked"
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False   # "Inpaint not masked"


def validate_img2img(req: Img2ImgRequest) -> Img2ImgRequest:
    """txt2img's checks, the mask controls' ranges, and the images themselves: decoded, made RGB
    (grayscale, RGBA, 16-bit, CMYK...) and the mask checked, so a bad upload is refused before
    it reaches the queue."""
    from studio.generation.imageops import ImageInputError, normalize_image, normalize_mask

    if not req.init_images:
        raise RequestError("img2img needs an init image")
    try:
        images = tuple(normalize_image(image) for image in req.init_images)
        mask = req.mask
        if mask is not None:
            normalize_mask(mask, images[0].size)
    except ImageInputError as e:
        raise RequestError(str(e)) from e
    req = replace(req, init_images=images)
    _check_range("denoising_strength", req.denoising_strength, 0, 1)
    for name, limit in (("resize_mode", len(RESIZE_MODES) - 1), ("inpainting_fill", len(INPAINT_FILL) - 1),
                        ("mask_blur_x", MAX_MASK_BLUR), ("mask_blur_y", MAX_MASK_BLUR),
                        ("inpaint_full_res_padding", MAX_PADDING)):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name} must be an integer (got {value!r})")
        _check_range(name, value, 0, limit)
    return validate_txt2img(req)  # dataclasses.replace keeps the Img2ImgRequest type
