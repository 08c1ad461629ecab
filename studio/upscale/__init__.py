"""Upscalers for hires fix, the Extras tab and the API: PIL resamplers, latent modes and
ESRGAN-family model files read with spandrel."""

from studio.upscale.errors import UpscalerError
from studio.upscale.latent import (
    LATENT_MODES,
    is_latent_mode,
    latent_mode,
    latent_modes_api,
    latent_upscale,
)
from studio.upscale.registry import (
    UPSCALER_FOLDERS,
    UpscalerInfo,
    UpscalerLibrary,
    default_folders,
    scale_from_name,
)

__all__ = [
    "LATENT_MODES",
    "UPSCALER_FOLDERS",
    "UpscalerError",
    "UpscalerInfo",
    "UpscalerLibrary",
    "default_folders",
    "is_latent_mode",
    "latent_mode",
    "latent_modes_api",
    "latent_upscale",
    "scale_from_name",
]
