"""XLabs-AI's FLUX.1 IP-Adapter (``ip_adapter.safetensors`` of XLabs-AI/flux-ip-adapter and -v2).

The file holds ``ip_adapter_proj_model.*`` (a linear projection + norm turning a CLIP ViT-L/14 image
embedding into 4 or 16 tokens as wide as the T5 prompt's) and, per double-stream block of the
transformer, ``double_blocks.N.processor.ip_adapter_double_stream_k_proj / _v_proj`` (keys and values
for those tokens). diffusers reads it (``FluxIPAdapterMixin.load_ip_adapter``) by renaming those to its
own IP-Adapter layout and converting with ``FluxTransformer2DLoadersMixin``; the studio renames the
same way and uses the same converters and diffusers' ``FluxIPAdapterAttnProcessor``, installed in the
transformer for one sampling pass and taken out when it ends (the cached model serves the next job).

As a unit: the model is the adapter file, the image the reference (read by the ViT-L encoder from
``models/clip_vision``, picked by its 768-wide image embeddings; any IP-Adapter module name works),
the weight the adapter's scale, guidance start/end its window. With CFG > 1 the negative prompt's
rows see a black image, as diffusers' ``FluxPipeline`` does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from studio.controlnet.clip_vision import ClipVisionEncoders
from studio.controlnet.ip_adapter import IP_ADAPTER, compute_placement, encode_reference
from studio.controlnet.models import ControlNetProbe
from studio.controlnet.units import in_guidance_window
from studio.errors import RequestError
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback
from studio.models.state_dict import ModelFileError, load_state_dict

log = logging.getLogger(__name__)

FLUX_FAMILY = "flux1"
_PROJ = "ip_adapter_proj_model."
_BLOCK = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")


def is_flux_ip_adapter(keys: Iterable[str] | Mapping[str, Any]) -> bool:
    """XLabs' layout: the projection model and per-block key/value projections (names only)."""
    names = list(keys)
    return any(k.startswith(_PROJ) for k in names) and any(_BLOCK.match(k) for k in names)


@dataclass(frozen=True, eq=False)
class FluxIPAdapterWeights:
    """The file's tensors in diffusers' nested IP-Adapter layout, and what they fit."""

    name: str
    state_dict: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    image_embed_dim: int      # the CLIP image embedding it projects (ViT-L/14: 768)
    width: int                # the prompt tokens' width (FLUX.1: 4096)
    blocks: int               # double-stream blocks it adapts

    @property
    def probe(self) -> ControlNetProbe:
        return ControlNetProbe(FLUX_FAMILY, self.width, 3, 0, kind=IP_ADAPTER)


def to_diffusers_layout(state: Mapping[str, torch.Tensor], name: str = IP_ADAPTER) -> dict[str, dict[str, Any]]:
    """XLabs' names -> ``{"image_proj": {"proj.weight"…}, "ip_adapter": {"N.to_k_ip.weight"…}}``, the
    renaming diffusers' loader applies to these files."""
    proj, attn = {}, {}
    for key, value in state.items():
        if key.startswith(_PROJ):
            proj[key[len(_PROJ):]] = value
        elif m := _BLOCK.match(key):
            attn[f"{m[1]}.to_{m[2]}_ip.{m[3]}"] = value
    if "proj.weight" not in proj or not attn:
        raise ModelFileError(f"{name}: not an XLabs FLUX IP-Adapter (no ip_adapter_proj_model.proj / "
                             f"double_blocks.N.processor.ip_adapter_double_stream_* tensors)")
    return {"image_proj": proj, "ip_adapter": attn}


def load_flux_ip_adapter(path: Path | str, name: str | None = None) -> FluxIPAdapterWeights:
    """The adapter's weights on the CPU (the callback places them with the transformer)."""
    path = Path(path)
    name = name or path.name
    parts = to_diffusers_layout(load_state_dict(path), name)
    proj = parts["image_proj"]["proj.weight"]
    blocks = len({k.split(".")[0] for k in parts["ip_adapter"]})
    width = parts["ip_adapter"]["0.to_k_ip.weight"].shape[1]
    return FluxIPAdapterWeights(name, parts, int(proj.shape[1]), int(width), blocks)


def check_fits(weights: FluxIPAdapterWeights, transformer: Any) -> None:
    """Refuse an adapter made for another transformer (block count or prompt width differ)."""
    if not hasattr(transformer, "_convert_ip_adapter_attn_to_diffusers"):
        raise RequestError(f"{IP_ADAPTER} {weights.name} is a FLUX.1 IP-Adapter; the loaded checkpoint is not "
                           f"FLUX.1")
    blocks = len(transformer.transformer_blocks)
    width = transformer.config.joint_attention_dim
    if (weights.blocks, weights.width) != (blocks, width):
        raise RequestError(f"{IP_ADAPTER} {weights.name} adapts {weights.blocks} double blocks with {weights.width}-"
                           f"wide tokens; the loaded transformer has {blocks} blocks, {width} wide")


@dataclass
class FluxIPAdapterUnit:
    """One enabled FLUX IP-Adapter unit."""

    weights: FluxIPAdapterWeights
    images: list[Image.Image]
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    module: str = "ip-adapter-auto"
    clip_mask: Image.Image | None = None   # white = the part of the reference the encoder does not see

    def active(self, step: int, total: int) -> bool:
        return self.weight != 0 and in_guidance_window(step, total, self.guidance_start, self.guidance_end)


def _black(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [Image.new("RGB", im.size) for im in images]


class FluxIPAdapterGuidance(StepCallback):
    """The units as a step callback: adapters installed in the transformer for the pass, the image
    embeddings handed to every call as ``ip_adapter_image_embeds`` (the transformer's own
    ``joint_attention_kwargs`` entry), each adapter's scale its unit's weight inside its window."""

    def __init__(self, units: Sequence[FluxIPAdapterUnit], encoders: ClipVisionEncoders):
        if not units:
            raise ValueError("FluxIPAdapterGuidance needs at least one unit")
        self.units = list(units)
        self.encoders = encoders
        self._embeds: list[tuple[torch.Tensor, torch.Tensor]] = []   # per unit: (cond, uncond) [1, dim]
        self._transformer: Any = None
        self._saved: tuple[dict[str, Any], bool, Any, bool] | None = None
        self._processors: list[Any] = []

    def on_pass_start(self, run: PassInfo) -> None:
        transformer = run.model.unet
        for unit in self.units:
            check_fits(unit.weights, transformer)
        device, dtype = compute_placement(run.model)
        self._embeds = []
        for unit in self.units:
            if not unit.images:
                raise RequestError(f"{IP_ADAPTER} unit ({unit.weights.name}) has no reference image")
            file = self.encoders.pick(unit.weights.image_embed_dim, False, "clip_l",
                                      adapter=f"{IP_ADAPTER} {unit.weights.name}")
            encoder = self.encoders.load(file, dtype, device)
            cond, _ = encode_reference(encoder, unit.images, False, unit.clip_mask)
            black, _ = encode_reference(encoder, _black(unit.images), False)
            # several images of one unit: their embeddings averaged (the A1111 extension's way)
            self._embeds.append((cond.mean(0, keepdim=True).float(), black.mean(0, keepdim=True).float()))
        self._install(transformer, device, dtype)

    def _install(self, transformer: Any, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers.models.embeddings import MultiIPAdapterImageProjection
        from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

        self._transformer = transformer
        # diffusers' FLUX transformer has no encoder_hid_proj until an adapter is loaded into it
        self._saved = (dict(transformer.attn_processors), hasattr(transformer, "encoder_hid_proj"),
                       getattr(transformer, "encoder_hid_proj", None), "encoder_hid_proj" in transformer._modules)
        try:
            state_dicts = [unit.weights.state_dict for unit in self.units]
            converted = transformer._convert_ip_adapter_attn_to_diffusers(state_dicts, low_cpu_mem_usage=False)
            adapted = {name: proc.to(device=device, dtype=dtype) for name, proc in converted.items()
                       if isinstance(proc, FluxIPAdapterAttnProcessor)}
            saved = self._saved[0]
            transformer.set_attn_processor({name: adapted.get(name, proc) for name, proc in saved.items()})
            self._processors = list(adapted.values())
            layers = [transformer._convert_ip_adapter_image_proj_to_diffusers(sd["image_proj"], low_cpu_mem_usage=False)
                      for sd in state_dicts]
            transformer.encoder_hid_proj = MultiIPAdapterImageProjection(layers).to(device=device, dtype=dtype).eval()
        except BaseException:
            self._restore()
            raise

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        scales = [unit.weight if unit.active(call.step, call.steps) else 0.0 for unit in self.units]
        for proc in self._processors:
            proc.scale = list(scales)
        rows = call.groups * call.batch
        uncond = call.batch if call.has_uncond else 0
        # [rows, 1 image, dim] per adapter, the layout diffusers' FluxPipeline hands the transformer
        embeds = [torch.cat([black.expand(uncond, -1), cond.expand(rows - uncond, -1)]).unsqueeze(1)
                  for cond, black in self._embeds]
        return {"ip_adapter_image_embeds": embeds}

    def _restore(self) -> None:
        if self._saved is None or self._transformer is None:
            return
        processors, had, hid_proj, was_module = self._saved
        transformer = self._transformer
        transformer._modules.pop("encoder_hid_proj", None)
        transformer.__dict__.pop("encoder_hid_proj", None)
        if was_module:
            transformer.encoder_hid_proj = hid_proj
        elif had:
            transformer.__dict__["encoder_hid_proj"] = hid_proj
        transformer.set_attn_processor(dict(processors))
        self._saved, self._transformer, self._processors = None, None, []

    def on_pass_end(self, run: PassInfo) -> None:
        self._restore()
        self._embeds = []
