"""Declarations of the model families the studio knows, as Forge's ``diffusion_engine`` and
ComfyUI's ``supported_models`` separate them. Pure data: no torch, no diffusers.

A family's declaration is what the rest of the engine asks instead of testing names: which text
encoders it needs, its prediction type (eps / v / flow), its latent format (channels, scale,
shift, the VAE's downscale and the transformer's patch size), its sampling presets, its size rule,
and whether this version can run it at all (``supported`` and the reason when not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LatentFormat:
    channels: int
    scaling_factor: float
    shift_factor: float = 0.0
    downscale: int = 8        # pixels per latent cell (the VAE)
    patch: int = 1            # latent cells per transformer token side (SD3 and FLUX use 2x2)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this many pixels."""
        return self.downscale * self.patch


@dataclass(frozen=True)
class FlowShiftSpec:
    """How the flow-matching schedule is shifted towards high noise (diffusers' scheduler config)."""

    shift: float = 3.0
    dynamic: bool = False          # resolution-dependent shift (FLUX.1 dev)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    flux_sigmas: bool | None = None  # start from linspace(1, 1/steps) as FluxPipeline (None: when dynamic)
    empirical_mu: bool = False     # FLUX.2: BFL's fit of the dynamic shift over image size and step count


@dataclass(frozen=True)
class Presets:
    """Sampling settings applied when a request leaves them unset (API) or a model is chosen (UI)."""

    steps: int | None = None
    cfg_scale: float | None = None
    sampler_name: str | None = None
    scheduler: str | None = None
    distilled_cfg_scale: float | None = None   # FLUX's guidance embedding (Forge's "Distilled CFG Scale")

    def values(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class FamilySpec:
    id: str
    label: str
    prediction: str                        # "epsilon" | "v_prediction" (decided per file) | "flow"
    latent: LatentFormat
    text_encoders: tuple[str, ...]         # module kinds, in the order the conditioner uses them
    optional_encoders: tuple[str, ...] = ()  # kinds the family can run without (SD3 without T5)
    presets: Presets = field(default_factory=Presets)
    variant_presets: tuple[tuple[str, Presets], ...] = ()  # variant -> presets over the family's
    flow_shift: FlowShiftSpec | None = None
    t5_max_tokens: int = 0                 # T5 sequence length the family was trained with
    vae_kind: str = "vae16"                # the module kind of its VAE (studio/models/modules.py)
    loras: bool = True                     # whether <lora:...> tags can be applied (networks/dit_lora.py maps it)
    supported: bool = True
    unsupported_reason: str = ""

    @property
    def is_flow(self) -> bool:
        return self.prediction == "flow"

    @property
    def size_multiple(self) -> int:
        return self.latent.size_multiple

    def presets_for(self, variant: str) -> dict[str, Any]:
        values = self.presets.values()
        for name, extra in self.variant_presets:
            if name == variant:
                values |= extra.values()
        return values


SD_LATENT = LatentFormat(4, 0.18215)
SDXL_LATENT = LatentFormat(4, 0.13025)
SD3_LATENT = LatentFormat(16, 1.5305, 0.0609, patch=2)
FLUX_LATENT = LatentFormat(16, 0.3611, 0.1159, patch=2)
# FLUX.2 samples its VAE's 32-channel latents patchified 2 x 2 (128 channels, 1/16 of the image, one token
# per cell) and normalised by the VAE's own BatchNorm statistics (families/flux2.py's latent codec)
FLUX2_LATENT = LatentFormat(128, 1.0, downscale=16, patch=1)

_NOT_YET = ("recognised, but this version of the studio cannot run it yet "
            "(diffusers {pipeline} exists; the studio's {label} engine is not written)")

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("sd1", "SD1.x", "epsilon", SD_LATENT, ("clip_l",)),
    FamilySpec("sd2", "SD2.x", "epsilon", SD_LATENT, ("open_clip_h",)),
    FamilySpec("sdxl", "SDXL", "epsilon", SDXL_LATENT, ("clip_l", "clip_g")),
    FamilySpec("sdxl-refiner", "SDXL refiner", "epsilon", SDXL_LATENT, ("clip_g",)),
    FamilySpec(
        "sd3", "SD3", "flow", SD3_LATENT, ("clip_l", "clip_g", "t5xxl"), optional_encoders=("t5xxl",),
        presets=Presets(cfg_scale=5.0, sampler_name="Euler", scheduler="simple"),
        variant_presets=(("turbo", Presets(steps=4, cfg_scale=1.0)),),
        flow_shift=FlowShiftSpec(shift=3.0), t5_max_tokens=256),
    FamilySpec(
        "flux1", "FLUX.1", "flow", FLUX_LATENT, ("clip_l", "t5xxl"),
        presets=Presets(cfg_scale=1.0, sampler_name="Euler", scheduler="simple", distilled_cfg_scale=3.5),
        # Fill was distilled at a much higher guidance (diffusers' FluxFillPipeline defaults to 30)
        variant_presets=(("schnell", Presets(steps=4)), ("fill", Presets(distilled_cfg_scale=30.0)),
                         ("kontext", Presets(distilled_cfg_scale=2.5))),
        flow_shift=FlowShiftSpec(shift=1.0, dynamic=True), t5_max_tokens=512),
    FamilySpec(
        # Klein: the distilled models run 4 steps at CFG 1, the base models Flux2KleinPipeline's 50 at CFG 4;
        # linspace(1, 1/steps) shifted by BFL's empirical exponent (image size and step count)
        "flux2", "FLUX.2", "flow", FLUX2_LATENT, ("qwen3",), vae_kind="vae32", loras=False,
        presets=Presets(steps=4, cfg_scale=1.0, sampler_name="Euler", scheduler="simple"),
        variant_presets=(("base", Presets(steps=50, cfg_scale=4.0)),),
        flow_shift=FlowShiftSpec(dynamic=True, empirical_mu=True, flux_sigmas=True)),
    FamilySpec(
        # ChromaPipeline's defaults: real CFG 5 with the negative prompt, 35 steps; FluxPipeline's schedule
        # (linspace(1, 1/steps) shifted by the image's token count), T5 read to 512 tokens
        "chroma", "Chroma", "flow", FLUX_LATENT, ("t5xxl",), loras=False,
        presets=Presets(steps=35, cfg_scale=5.0, sampler_name="Euler", scheduler="simple"),
        flow_shift=FlowShiftSpec(shift=1.0, dynamic=True), t5_max_tokens=512),
    FamilySpec(
        "zimage", "Z-Image", "flow", FLUX_LATENT, ("qwen3",), loras=False,
        # base: ZImagePipeline's guidance 4 (its g is A1111's CFG - 1); Turbo is distilled for 9 steps at CFG 1
        presets=Presets(cfg_scale=5.0, sampler_name="Euler", scheduler="simple"),
        variant_presets=(("turbo", Presets(steps=9, cfg_scale=1.0)),),
        flow_shift=FlowShiftSpec(shift=3.0, flux_sigmas=True)),
)

# FLUX.1 schnell was distilled for 4 steps at a fixed schedule (no shift, no guidance input).
SCHNELL_SHIFT = FlowShiftSpec(shift=1.0, dynamic=False, flux_sigmas=True)


def family_spec(family_id: str) -> FamilySpec:
    for spec in FAMILIES:
        if spec.id == family_id:
            return spec
    raise KeyError(f"unknown model family {family_id!r}")


def family_label(family_id: str) -> str:
    try:
        return family_spec(family_id).label
    except KeyError:
        return family_id
