"""FLUX.1 Redux: a reference image as more prompt tokens.

BFL's ``flux1-redux-dev.safetensors`` is two linear layers (``redux_up``, ``redux_down``) that turn a
SigLIP encoder's patch features (27x27 of them, 1152 wide) into tokens as wide as the T5 prompt's.
The FLUX transformer reads them after the prompt's own tokens: diffusers' ``FluxPriorReduxPipeline``
concatenates them to the prompt embeddings and ComfyUI's StyleModelApply does the same. Here a
Redux file is the model of a unit (in ``models/ControlNet`` or ComfyUI's ``models/style_models``)
with the module ``flux_redux``:

- the unit's image is the reference (several units: their tokens follow one another);
- its weight multiplies the tokens (ComfyUI's "multiply" strength); weight 0 adds none;
- its guidance start/end say in which steps the tokens are present;
- its slider "Downsampling factor" averages the token grid down (ReduxAdvanced's "area" mode: 3
  leaves 9x9 tokens), the usual way to let the prompt speak louder than the image;
- only the prompt's rows get them: a negative prompt (CFG > 1) is computed without (as a positive
  conditioning in ComfyUI), so the guidance pushes towards the reference.

The encoder is diffusers' ``ReduxImageEncoder``, the image features transformers'
``SiglipVisionModel`` with ``SiglipImageProcessor``'s preprocessing, so the tokens are the ones
diffusers' pipeline makes (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from studio.controlnet.clip_vision import ClipVisionEncoders
from studio.controlnet.ip_adapter import compute_placement
from studio.controlnet.models import REDUX, ControlNetProbe
from studio.controlnet.units import in_guidance_window
from studio.errors import RequestError
from studio.generation.dit_denoisers import ExtraPromptTokens
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback
from studio.models.state_dict import ModelFileError, load_state_dict

log = logging.getLogger(__name__)

FLUX_FAMILY = "flux1"
_UP, _DOWN = "redux_up.weight", "redux_down.weight"


def is_redux_state_dict(keys: Iterable[str] | Mapping[str, Any]) -> bool:
    """BFL's Redux file: exactly the two projections (names only)."""
    names = set(keys)
    return _UP in names and _DOWN in names


def load_redux(path: Path | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               name: str | None = None) -> Any:
    """diffusers' ``ReduxImageEncoder`` sized from the file's shapes (the image features' width in,
    the prompt tokens' width out), weights read safely."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    path = Path(path)
    name = name or path.name
    state = load_state_dict(path)
    if not is_redux_state_dict(state):
        raise ModelFileError(f"{name}: not a FLUX.1 Redux file (no {_UP!r} / {_DOWN!r})")
    up, down = tuple(state[_UP].shape), tuple(state[_DOWN].shape)
    if up[0] != down[1]:
        raise ModelFileError(f"{name}: redux_up gives {up[0]} features, redux_down takes {down[1]}")
    if up[0] != 3 * down[0]:   # the class fixes the hidden width at 3x the output
        raise ModelFileError(f"{name}: a Redux projection {up[1]} -> {up[0]} -> {down[0]} is not BFL's shape "
                             f"(hidden = 3 x output)")
    model = ReduxImageEncoder(redux_dim=up[1], txt_in_features=down[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{name}: weights do not fit FLUX.1 Redux: {str(e)[:300]}") from e
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def redux_probe(model: Any) -> ControlNetProbe:
    """What the unit machinery reads of a loaded control model: FLUX.1, T5-wide tokens."""
    return ControlNetProbe(FLUX_FAMILY, int(model.config.txt_in_features), 3, 0, kind=REDUX)


def siglip_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """SiglipImageProcessor's preprocessing, as diffusers' Redux pipeline feeds the encoder: the
    whole image squashed to ``size`` x ``size`` (bicubic), mean/std 0.5. [N, 3, size, size]."""
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": size, "width": size})
    return processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values.float()


def downsample_tokens(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, T, C] tokens of a square grid, area-averaged ``factor`` times smaller per side."""
    if factor <= 1:
        return tokens
    n, count, width = tokens.shape
    side = round(count ** 0.5)
    if side * side != count:
        raise ValueError(f"{count} Redux tokens are not a square grid")
    grid = tokens.transpose(1, 2).reshape(n, width, side, side)
    small = torch.nn.functional.interpolate(grid, size=(max(1, side // factor),) * 2, mode="area")
    return small.flatten(2).transpose(1, 2)


@torch.no_grad()
def redux_tokens(redux: Any, encoder: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """[N, 729, 4096] tokens of the images: SigLIP's last hidden state through the Redux layers."""
    param = next(encoder.parameters())
    pixels = siglip_pixels(images, encoder.config.image_size).to(param.device, param.dtype)
    features = encoder(pixel_values=pixels).last_hidden_state
    out = next(redux.parameters())
    return redux(features.to(out.device, out.dtype)).image_embeds


@dataclass
class ReduxUnit:
    """One enabled Redux unit: its encoder, the reference images and the unit's settings."""

    model: Any                      # ReduxImageEncoder
    images: list[Image.Image]
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    downsampling: int = 1
    name: str = REDUX

    def active(self, step: int, total: int) -> bool:
        return self.weight != 0 and in_guidance_window(step, total, self.guidance_start, self.guidance_end)


class ReduxGuidance(StepCallback):
    """The Redux units as a step callback: each reference encoded once per pass, the active units'
    tokens (scaled by their weights) handed to the FLUX denoiser as :class:`ExtraPromptTokens`."""

    def __init__(self, units: Sequence[ReduxUnit], encoders: ClipVisionEncoders):
        if not units:
            raise ValueError("ReduxGuidance needs at least one unit")
        self.units = list(units)
        self.encoders = encoders
        self._tokens: list[torch.Tensor | None] = []

    def on_pass_start(self, run: PassInfo) -> None:
        device, dtype = compute_placement(run.model)
        self._tokens = []
        for unit in self.units:
            if unit.weight == 0:
                self._tokens.append(None)
                continue
            if not unit.images:
                raise RequestError(f"{REDUX} unit ({unit.name}) has no reference image")
            width = int(unit.model.config.redux_dim)
            encoder = self.encoders.load(self.encoders.pick_siglip(width, f"{REDUX} {unit.name}"), dtype, device)
            tokens = downsample_tokens(redux_tokens(unit.model, encoder, unit.images), unit.downsampling)
            # several images of one unit follow one another, as several units do
            self._tokens.append(tokens.reshape(-1, tokens.shape[-1]).float() * unit.weight)

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        active = [tokens for unit, tokens in zip(self.units, self._tokens)
                  if tokens is not None and unit.active(call.step, call.steps)]
        if not active:
            return {}
        rows = call.batch if call.has_uncond else 0
        return {"prompt_tokens": ExtraPromptTokens(torch.cat(active), uncond_rows=rows)}

    def on_pass_end(self, run: PassInfo) -> None:
        self._tokens = []
