"""The one typed settings object: every option the studio honours, with A1111's key, type,
default, range and a label. POST /sdapi/v1/options, ``override_settings``, the Settings tab and
config.json all go through :func:`validate_changes`, so a value is checked in one place and the
same way everywhere; an unknown key is refused with its name (A1111 stores anything, which lets
any caller grow config.json without bound)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from studio.errors import RequestError

SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")
PREVIEW_TYPES = ("Full", "Approx NN", "Approx cheap", "TAESD")
PREVIEW_FORMATS = ("png", "jpeg", "webp")
PREVIEW_CONTENT = ("Combined", "Prompt", "Negative prompt")
EMPHASIS_MODES = ("None", "Ignore", "Original", "No norm")
COMPILE_BACKENDS = ("inductor", "cudagraphs", "eager")
MAX_TOKEN_MERGING = 0.9   # above this, images fall apart (tomesd's own guidance is ≤ 0.75)
DEFAULT_UNIT_COUNT = 3


def opt(default: Any, section: str, label: str, **constraints: Any) -> Any:
    """A field with the Settings tab's section and label attached."""
    return Field(default, description=label, json_schema_extra={"section": section, "label": label},
                 **constraints)


SAVING, SD, UI, PREVIEWS, CONTROLNET, OPTIMIZATIONS, FACES = (
    "Saving images", "Stable Diffusion", "User interface", "Live previews", "ControlNet", "Optimizations",
    "Face restoration")


class StudioOptions(BaseModel):
    """A1111's option keys (and a few of the studio's own, marked), validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_assignment=True)

    # -- saving images (A1111 "Saving images/grids" and "Paths for saving")
    samples_save: bool = opt(True, SAVING, "Always save all generated images")
    samples_format: Literal["png", "jpg", "jpeg", "webp"] = opt("png", SAVING, "File format for images")
    samples_filename_pattern: str = opt("", SAVING, "Images filename pattern (empty = [seed])", max_length=500)
    save_images_add_number: bool = opt(True, SAVING, "Add number to filename when saving")
    grid_save: bool = opt(True, SAVING, "Always save all generated image grids")
    grid_format: Literal["png", "jpg", "jpeg", "webp"] = opt("png", SAVING, "File format for grids")
    n_rows: int = opt(-1, SAVING, "Grid row count; -1 for autodetect", ge=-1, le=16)
    jpeg_quality: int = opt(80, SAVING, "Quality for saved jpeg and webp images", ge=1, le=100)
    webp_lossless: bool = opt(False, SAVING, "Use lossless compression for webp images")
    enable_pnginfo: bool = opt(True, SAVING, "Save text information about generation parameters as chunks "
                               "to png files")
    save_txt: bool = opt(False, SAVING, "Create a text file with the generation parameters next to every image")
    save_to_dirs: bool = opt(True, SAVING, "Save images to a subdirectory")
    grid_save_to_dirs: bool = opt(True, SAVING, "Save grids to a subdirectory")
    directories_filename_pattern: str = opt("[date]", SAVING, "Directory name pattern", max_length=500)
    directories_max_prompt_words: int = opt(8, SAVING, "Max prompt words for [prompt_words] pattern", ge=1, le=20)
    grid_extended_filename: bool = opt(False, SAVING, "Add extended info (seed, prompt) to filename when "
                                       "saving grid")
    grid_only_if_multiple: bool = opt(True, SAVING, "Do not save grids consisting of one picture")
    grid_prevent_empty_spots: bool = opt(False, SAVING, "Prevent empty spots in grid (when set to autodetect)")
    grid_background_color: str = opt("#ffffff", SAVING, "Background color for image grids",
                                     pattern=r"^#[0-9a-fA-F]{6}$")
    outdir_samples: str = opt("", SAVING, "Output directory for images; if empty, defaults to the three below")
    outdir_txt2img_samples: str = opt("outputs/txt2img-images", SAVING, "Output directory for txt2img images")
    outdir_img2img_samples: str = opt("outputs/img2img-images", SAVING, "Output directory for img2img images")
    outdir_extras_samples: str = opt("outputs/extras-images", SAVING, "Output directory for images from extras")
    outdir_grids: str = opt("", SAVING, "Output directory for grids; if empty, defaults to the two below")
    outdir_txt2img_grids: str = opt("outputs/txt2img-grids", SAVING, "Output directory for txt2img grids")
    outdir_img2img_grids: str = opt("outputs/img2img-grids", SAVING, "Output directory for img2img grids")

    # -- Stable Diffusion
    sd_model_checkpoint: str | None = opt(None, SD, "Stable Diffusion checkpoint")
    sd_checkpoint_hash: str | None = opt(None, SD, "SHA256 hash of the current checkpoint")
    sd_checkpoints_limit: int = opt(1, SD, "Maximum number of checkpoints loaded at the same time", ge=1, le=10)
    sd_checkpoint_cache_mb: int = opt(0, SD, "RAM for cached checkpoints, MB (0 = half the RAM; studio)", ge=0)
    sd_vae: str = opt("Automatic", SD, "SD VAE")
    forge_gpu_weights_mb: int = opt(0, SD, "GPU Weights (MB): VRAM the model weights may take; the rest is "
                                    "offloaded (0 = decide from the free VRAM; studio)", ge=0, le=1 << 20)
    forge_additional_modules: list[str] = opt([], SD, "VAE / Text Encoder files for SD3 and FLUX checkpoints that "
                                              "lack them (Forge's option; empty = automatic when one of a kind)")
    CLIP_stop_at_last_layers: int = opt(1, SD, "Clip skip", ge=1, le=12)
    emphasis: Literal["None", "Ignore", "Original", "No norm"] = opt("Original", SD, "Emphasis mode")
    eta_ddim: float = opt(0.0, SD, "Eta for DDIM", ge=0, le=1)
    eta_ancestral: float = opt(1.0, SD, "Eta for k-diffusion (ancestral) samplers", ge=0, le=1)
    eta_noise_seed_delta: int = opt(0, SD, "Eta noise seed delta (ENSD)", ge=0, le=2**32 - 1)
    s_min_uncond: float = opt(0.0, SD, "Negative Guidance minimum sigma (NGMS)", ge=0, le=15)
    img2img_color_correction: bool = opt(False, SD, "Apply color correction to img2img results to match "
                                         "original colors")
    upscaler_for_img2img: str | None = opt(None, SD, "Upscaler for img2img (null = Lanczos)")
    sdxl_refiner_low_aesthetic_score: float = opt(2.5, SD, "SDXL refiner: low aesthetic score (the negative "
                                                  "prompt's)", ge=0, le=10)
    sdxl_refiner_high_aesthetic_score: float = opt(6.0, SD, "SDXL refiner: high aesthetic score (the prompt's)",
                                                   ge=0, le=10)
    hires_fix_refiner_pass: Literal["first pass", "second pass", "both passes"] = opt(
        "second pass", SD, "Hires fix: which pass the refiner runs in")

    # -- face restoration (A1111 "Face restoration")
    face_restoration_model: str | None = opt(None, FACES, "Face restoration model (CodeFormer, GFPGAN, "
                                             "RestoreFormer; null = CodeFormer if present, else the first found)")
    code_former_weight: float = opt(0.5, FACES, "CodeFormer weight (0 = maximum effect, 1 = minimum effect)",
                                    ge=0, le=1)
    face_restoration_unload: bool = opt(False, FACES, "Move the face restoration model from VRAM into RAM after "
                                        "processing")

    # -- user interface
    send_seed: bool = opt(True, UI, "Send seed when sending prompt or image to other interface")
    send_size: bool = opt(True, UI, "Send size when sending prompt or image to another interface")
    quicksettings_list: list[str] = opt(["sd_model_checkpoint"], UI, "Quicksettings list (options shown at "
                                        "the top of the page)", max_length=20)
    disabled_extensions: list[str] = opt([], UI, "Disabled extensions")

    # -- live previews
    live_previews_enable: bool = opt(True, PREVIEWS, "Show live previews of the created image")
    show_progress_every_n_steps: int = opt(1, PREVIEWS, "Live preview display period (steps); -1 = only at "
                                           "the end, 0 = off", ge=-1, le=1000)
    show_progress_type: Literal["Full", "Approx NN", "Approx cheap", "TAESD"] = opt(
        "Approx cheap", PREVIEWS, "Live preview method")
    show_progress_grid: bool = opt(True, PREVIEWS, "Show previews of all images generated in a batch as a grid")
    live_previews_image_format: Literal["png", "jpeg", "webp"] = opt("png", PREVIEWS, "Live preview file format")
    live_preview_content: Literal["Combined", "Prompt", "Negative prompt"] = opt(
        "Prompt", PREVIEWS, "Live preview subject")
    live_preview_refresh_period: float = opt(1000, PREVIEWS, "Progressbar and preview update period (ms)",
                                             ge=0, le=3_600_000)

    # -- ControlNet (the extension's keys)
    control_net_unit_count: int = opt(DEFAULT_UNIT_COUNT, CONTROLNET, "Multi-ControlNet: max models amount",
                                      ge=1, le=10)
    control_net_model_cache_size: int = opt(2, CONTROLNET, "Model cache size", ge=1, le=10)
    control_net_no_detectmap: bool = opt(False, CONTROLNET, "Do not append detectmap to output")
    control_net_inpaint_blur_sigma: int = opt(7, CONTROLNET, "ControlNet inpainting Gaussian blur sigma",
                                              ge=0, le=64)
    control_net_ignore_noninpaint_mask: bool = opt(
        False, CONTROLNET, "Ignore mask on ControlNet input image if control type is not inpaint (a unit's "
        "mask is otherwise its scribble)")

    # -- opt-in fast modes
    token_merging_ratio: float = opt(0.0, OPTIMIZATIONS, "Token merging ratio (lossy)", ge=0,
                                     le=MAX_TOKEN_MERGING)
    token_merging_ratio_img2img: float = opt(0.0, OPTIMIZATIONS, "Token merging ratio for img2img "
                                             "(0 = the above)", ge=0, le=MAX_TOKEN_MERGING)
    token_merging_ratio_hr: float = opt(0.0, OPTIMIZATIONS, "Token merging ratio for hires pass "
                                        "(0 = the above)", ge=0, le=MAX_TOKEN_MERGING)
    sd_compile_unet: bool = opt(False, OPTIMIZATIONS, "Compile the UNet's transformer blocks (torch.compile)")
    sd_compile_backend: Literal["inductor", "cudagraphs", "eager"] = opt("inductor", OPTIMIZATIONS,
                                                                         "torch.compile backend")

    @field_validator("samples_format", "grid_format", "live_previews_image_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        # A1111 stores what it is given; clients send "PNG" or "JPG"
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("quicksettings_list")
    @classmethod
    def _known_quicksettings(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in cls.model_fields]
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}")
        return names

    @property
    def samples_suffix(self) -> str:
        return "jpg" if self.samples_format == "jpeg" else self.samples_format


OPTION_KEYS = frozenset(StudioOptions.model_fields)
DEFAULTS: dict[str, Any] = StudioOptions().model_dump()


def _message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item.get("loc", ())) or "options"
        parts.append(f"{key}: {item.get('msg')} (got {item.get('input')!r})")
    return "; ".join(parts)


def _finite(changes: dict[str, Any]) -> None:
    # JSON allows NaN in Python's parser; a setting must be a real number
    bad = [k for k, v in changes.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RequestError("; ".join(f"{k}: must be a finite number" for k in bad))


def validate_changes(changes: Any, base: StudioOptions | None = None) -> dict[str, Any]:
    """``changes`` checked against the schema and normalised ("JPG" → "jpg", "3" → 3 where lossless);
    returns only the changed keys, with their validated values. Raises RequestError naming every
    unknown key and every bad value; nothing is applied then."""
    if not isinstance(changes, dict):
        raise RequestError("options must be a JSON object of option names to values")
    unknown = sorted(k for k in changes if k not in OPTION_KEYS)
    if unknown:
        raise RequestError(f"unknown option(s): {', '.join(map(str, unknown))}. GET /sdapi/v1/options lists "
                           "every option this studio has")
    _finite(changes)
    current = (base or StudioOptions()).model_dump()
    try:
        merged = StudioOptions.model_validate({**current, **changes})
    except ValidationError as e:
        raise RequestError(_message(e)) from None
    return {k: getattr(merged, k) for k in changes}


def options_from_stored(stored: dict[str, Any]) -> tuple[StudioOptions, list[str]]:
    """Options from a config.json (which may come from A1111, or be edited by hand): known keys with
    valid values are used; a bad value falls back to its default and is reported; unknown keys are
    left for the file (kept on save, so A1111's config survives a round trip) but not used."""
    known = {k: v for k, v in stored.items() if k in OPTION_KEYS}
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in known.items():
        try:
            values.update(validate_changes({key: value}))
        except RequestError as e:
            problems.append(str(e))
    return StudioOptions.model_validate({**DEFAULTS, **values}), problems


def sections() -> dict[str, list[str]]:
    """Option keys by Settings-tab section, in declaration order."""
    out: dict[str, list[str]] = {}
    for key, info in StudioOptions.model_fields.items():
        section = (info.json_schema_extra or {}).get("section", "Other")  # type: ignore[union-attr]
        out.setdefault(section, []).append(key)
    return out
