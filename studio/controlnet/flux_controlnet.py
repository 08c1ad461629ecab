"""FLUX.1 ControlNets: diffusers' ``FluxControlNetModel`` files and folders, found by tensor names, and
the step callback that runs them in the flow loop.

What loads: the diffusers layout, as InstantX (``FLUX.1-dev-Controlnet-Canny``, ``-Union``),
Shakker-Labs (``FLUX.1-dev-ControlNet-Union-Pro``, ``-2.0``), jasperai and XLabs' ``*-diffusers``
repositories ship it: a single ``.safetensors`` (often downloaded without its ``config.json``; the
config is derived from the shapes) or a folder. XLabs' own layout (``double_blocks.*``,
``pos_embed_input``) has no converter in diffusers and is refused with the names of the files that
do load.

In the loop (:class:`FluxControlGuidance`): per model call, every unit whose window covers
``step / steps`` (the SD units' rule, :mod:`studio.controlnet.guidance`) hands its model, its
control latents (the map VAE-encoded with the checkpoint's own VAE and 2x2-packed, as diffusers'
``FluxControlNetPipeline`` does; XLabs-style models with an ``input_hint_block`` take the pixels) and
its weight to the FLUX denoiser, which runs it on the same tokens, timestep, guidance and text as
the transformer and adds the block samples (:class:`studio.generation.dit_denoisers.FluxControl`).

Union models (``controlnet_mode_embedder``: InstantX Union, Union-Pro) take a control mode per unit;
Union-Pro-2.0 has none and is an ordinary ControlNet that reads every kind of map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.controlnet.models import ControlNetProbe, place_model
from studio.controlnet.union import UNION
from studio.controlnet.units import in_guidance_window
from studio.errors import RequestError
from studio.generation.dit_denoisers import FluxControl, pack_latents
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback
from studio.models.dit_arch import flux_rope_axes
from studio.models.dit_modules import assign, on_meta
from studio.models.state_dict import ModelFileError, Shapes

FLUX_FAMILY = "flux1"       # studio.families.flux1's id: check_family compares a unit's probe with it
FLUX_LABEL = "FLUX.1"
CONTROLNET = "ControlNet"
# Tensors every diffusers FluxControlNetModel has and no other ControlNet does together.
_MARKERS = ("controlnet_x_embedder.weight", "x_embedder.weight", "context_embedder.weight",
            "time_text_embed.text_embedder.linear_1.weight")
# XLabs' own files: BFL block names plus their hint encoder.
_XLABS_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "controlnet_blocks.0.weight")
# InstantX's and Shakker-Labs' Union (Pro) slots, in the model's order.
FLUX_UNION_MODES: tuple[str, ...] = ("canny", "tile", "depth", "blur", "pose", "gray", "low quality")
# The extension's union_control_type names (and the mode names) -> slot.
_MODE_ALIASES: dict[str, int] = {
    **{name: i for i, name in enumerate(FLUX_UNION_MODES)},
    "hard edge": 0, "hardedge": 0, "lineart": 0, "mlsd": 0, "tile/blur": 1, "openpose": 4, "grayscale": 5,
    "recolor": 5, "lq": 6,
}
# Preprocessor name prefixes -> slot, when a unit names no control type.
_MODULE_PREFIXES: tuple[tuple[str, int], ...] = (
    ("canny", 0), ("lineart", 0), ("mlsd", 0), ("invert", 0),
    ("tile", 1), ("depth", 2), ("blur", 3),
    ("openpose", 4), ("dw_openpose", 4), ("animal_openpose", 4), ("densepose", 4),
    ("recolor", 5),
)


# --------------------------------------------------------------------------- files


def is_flux_controlnet(shapes: Shapes) -> bool:
    """A FLUX.1 ControlNet in diffusers' layout (tensor names only)."""
    return all(k in shapes for k in _MARKERS)


def is_xlabs_controlnet(shapes: Shapes) -> bool:
    """XLabs-AI's own FLUX ControlNet layout, which diffusers cannot convert."""
    return all(k in shapes for k in _XLABS_MARKERS)


def xlabs_refusal(name: str) -> ModelFileError:
    return ModelFileError(
        f"{name}: an XLabs-AI FLUX ControlNet in XLabs' own layout, which diffusers cannot load; use the "
        f"diffusers-layout version (XLabs-AI/flux-controlnet-*-diffusers, or InstantX / Shakker-Labs "
        f"FLUX.1 ControlNets) in models/ControlNet")


@dataclass(frozen=True)
class FluxControlNetProbe(ControlNetProbe):
    """A FLUX ControlNet's probe: ``label`` says FLUX.1 (the SD probes' labels come from their table)."""

    num_mode: int | None = None

    @property
    def label(self) -> str:
        return FLUX_LABEL


def _count(shapes: Shapes, blocks: str) -> int:
    return len({m[1] for k in shapes if (m := re.match(rf"{blocks}\.(\d+)\.", k))})


def flux_controlnet_config(shapes: Shapes, name: str = "ControlNet") -> dict[str, Any]:
    """The ``FluxControlNetModel`` config of a diffusers-layout file, from its shapes."""
    if not is_flux_controlnet(shapes):
        if is_xlabs_controlnet(shapes):
            raise xlabs_refusal(name)
        raise ModelFileError(f"{name}: not a FLUX.1 ControlNet (no {_MARKERS[0]!r} tensor)")
    inner, in_channels = shapes["x_embedder.weight"][:2]
    norm = next((shapes[k] for k in ("transformer_blocks.0.attn.norm_q.weight",
                                     "single_transformer_blocks.0.attn.norm_q.weight") if k in shapes), None)
    if norm is None:
        raise ModelFileError(f"{name}: FLUX.1 ControlNet without transformer blocks")
    head_dim = norm[0]
    mode = shapes.get("controlnet_mode_embedder.weight")
    hint = shapes.get("input_hint_block.conv_out.weight")
    # XLabs' hint encoder gives 16 channels per 8x8 pixels; 2x2 of them make a token (XLabs' configs say 2)
    patch = int(round((in_channels / hint[0]) ** 0.5)) if hint is not None else 1
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": _count(shapes, "transformer_blocks"),
        "num_single_layers": _count(shapes, "single_transformer_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        "axes_dims_rope": list(flux_rope_axes(head_dim)),
        "num_mode": mode[0] if mode is not None else None,
        "conditioning_embedding_channels": hint[0] if hint is not None else None,
    }


def _probe_of_config(config: dict[str, Any]) -> FluxControlNetProbe:
    num_mode = config.get("num_mode")
    return FluxControlNetProbe(FLUX_FAMILY, config["joint_attention_dim"], 3, config["in_channels"],
                               UNION if num_mode is not None else CONTROLNET, num_mode)


def probe_flux_controlnet(shapes: Shapes, name: str = "ControlNet") -> FluxControlNetProbe:
    """What a FLUX ControlNet file is: family ``flux1``, kind ControlNet or ControlNet Union."""
    return _probe_of_config(flux_controlnet_config(shapes, name))


def probe_flux_model(model: Any) -> FluxControlNetProbe:
    """The probe of a loaded ``FluxControlNetModel`` (folders are probed from their config)."""
    return _probe_of_config(dict(model.config))


def load_flux_controlnet(source: dict[str, torch.Tensor] | str | Path, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", name: str = "ControlNet") -> Any:
    """A ``FluxControlNetModel`` from a state dict (diffusers names, config from the shapes, built on the
    meta device and given the file's tensors) or a diffusers folder, offline."""
    from diffusers import FluxControlNetModel

    if isinstance(source, (str, Path)):
        try:
            model = FluxControlNetModel.from_pretrained(source, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelFileError(f"{name}: incomplete or corrupt FLUX ControlNet folder: {e}") from e
        return place_model(model, dtype, device)
    config = flux_controlnet_config({k: tuple(v.shape) for k, v in source.items()}, name)
    model = assign(on_meta(lambda: FluxControlNetModel.from_config(config)), dict(source), name)
    return place_model(model, dtype, device)


def is_flux_controlnet_model(model: Any) -> bool:
    return type(model).__name__ == "FluxControlNetModel"


# --------------------------------------------------------------------------- union modes


def flux_union_mode(control_type: str | None, module: str, num_mode: int) -> int:
    """The slot of a FLUX Union unit: its ``union_control_type`` (the extension's names, or the model's
    mode names, case-insensitive) when set, else its preprocessor's. A unit with neither is refused:
    a union model without a mode has nothing to go by."""
    name = (control_type or "").strip().lower()
    if name and name != "unknown":
        index = _MODE_ALIASES.get(name)
        if index is None:
            raise RequestError(f"union_control_type {control_type!r} has no FLUX Union mode; known: "
                               f"{', '.join(FLUX_UNION_MODES)} (or Hard Edge, Tile, Depth, OpenPose)")
    else:
        index = next((i for prefix, i in _MODULE_PREFIXES if module.startswith(prefix)), None)
        if index is None:
            raise RequestError(f"a FLUX ControlNet Union unit with preprocessor {module!r} needs a control type: "
                               f"set union_control_type to one of {', '.join(FLUX_UNION_MODES)}")
    if index >= num_mode:
        raise RequestError(f"FLUX Union mode {FLUX_UNION_MODES[index]} is outside the model's {num_mode} modes")
    return index


# --------------------------------------------------------------------------- the loop


@dataclass
class FluxControlUnit:
    """One FLUX ControlNet unit of a pass: the model and its map at the pass size."""

    model: Any                      # diffusers FluxControlNetModel on the device
    image: torch.Tensor             # [1, 3, H, W] in [0, 1], at the pass's pixel size
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    mode: int | None = None         # a Union model's control mode (FLUX_UNION_MODES index)
    # the extension's control mode; 2 ("ControlNet is more important") leaves the unconditional rows
    # without control. SD's "My prompt is more important" decays over a UNet's 13 residuals, which FLUX
    # blocks do not have, so 1 runs as Balanced.
    control_mode: int = 0
    _cond: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        num_mode = self.model.config.num_mode
        if num_mode is not None and (self.mode is None or not 0 <= self.mode < num_mode):
            raise RequestError(f"a FLUX ControlNet Union unit needs a control mode from 0 to {num_mode - 1} "
                               f"({', '.join(FLUX_UNION_MODES)}); got {self.mode}")
        if num_mode is None and self.mode is not None:
            raise RequestError("a control mode was given for a FLUX ControlNet that is not a Union model")

    def active(self, step: int, total: int) -> bool:
        return self.weight != 0 and in_guidance_window(step, total, self.guidance_start, self.guidance_end)


def control_input(model: Any, image: torch.Tensor, checkpoint: Any) -> torch.Tensor:
    """What a FLUX ControlNet reads of a map ([1, 3, H, W], 0-1): pixels in [-1, 1] for models with an
    ``input_hint_block`` (XLabs'), else the map VAE-encoded by ``checkpoint`` (a LoadedModel) and packed
    into tokens, [1, H/16 * W/16, 64] (diffusers' ``FluxControlNetPipeline``; the distribution's mean,
    as the studio's img2img encodes, so a seed does not change the control)."""
    from studio.generation.txt2img import encode_images

    pixels = image.float() * 2 - 1
    if model.input_hint_block is not None:
        return pixels
    return pack_latents(encode_images(checkpoint, pixels))


class FluxControlGuidance(StepCallback):
    """FLUX ControlNet units as a step callback: the active ones go to the FLUX denoiser as
    ``controlnets`` (a list of :class:`FluxControl`), which runs them beside the transformer."""

    def __init__(self, units: list[FluxControlUnit]):
        self.units = units

    def on_pass_start(self, run: PassInfo) -> None:
        # encoded once per pass: the map does not change between steps
        with torch.inference_mode():
            for unit in self.units:
                if unit.weight != 0:
                    unit._cond = control_input(unit.model, unit.image, run.model)

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        controls = [FluxControl(unit.model, unit._cond, unit.weight, unit.mode,
                                call.batch if unit.control_mode == 2 and call.has_uncond else 0)
                    for unit in self.units if unit._cond is not None and unit.active(call.step, call.steps)]
        return {"controlnets": controls} if controls else {}

    def on_pass_end(self, run: PassInfo) -> None:
        for unit in self.units:
            unit._cond = None
