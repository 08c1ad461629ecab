"""IP-Adapter files (h94/IP-Adapter layout) and the step callback that applies them.

A file holds two parts: ``image_proj.*`` turns CLIP vision output into a few extra "image
tokens", and ``ip_adapter.N.to_k_ip/to_v_ip`` give every cross-attention layer its own keys and
values for those tokens (N counts all attention layers, so cross-attention ones are 1, 3, 5, …).
``.safetensors`` files keep the two parts as name prefixes; ``.bin`` files are a pickled
``{"image_proj": {...}, "ip_adapter": {...}}``. What a file is comes from its tensor names and
shapes, as for ControlNets:

- "base" (``ip-adapter_sd15``, ``_light``, ``ip-adapter_sdxl[_vit-h]``): ``proj`` + ``norm``,
  4 tokens from the encoder's ``image_embeds``;
- "plus" / "plus_face" (``ip-adapter-plus*``, ``plus_composition``): a Resampler (``latents``,
  ``layers.N``) over the encoder's penultimate hidden states; the two differ only in training, so
  the file name tells them apart;
- "full_face" (``ip-adapter-full-face_sd15``): an MLP over all 257 hidden-state tokens;
- FaceID files need insightface face embeddings and are refused.

The callback does not re-implement attention: it installs the adapters into the UNet with
diffusers' own converters (``UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers``
and ``_convert_ip_adapter_image_proj_to_diffusers``) at the start of a sampling pass, hands the
image embeddings to every UNet call as ``added_cond_kwargs["image_embeds"]`` (laid out like the
UNet batch), and puts the UNet back exactly as it was when the pass ends, because the cached model
serves the next job.
"""

from __future__ import annotations

import logging
import pickle
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from studio.controlnet.clip_vision import CLIP_MEAN, CLIP_STD, IP_ADAPTER_MODULES, ClipVisionEncoders
from studio.controlnet.units import in_guidance_window
from studio.errors import RequestError
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback
from studio.models.state_dict import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    ModelFileError,
    load_state_dict,
    read_shapes,
)

log = logging.getLogger(__name__)

IP_ADAPTER = "IP-Adapter"
IMAGE_PROJ = "image_proj"
ATTN = "ip_adapter"
KINDS = ("base", "plus", "plus_face", "full_face")
FAMILY_BY_WIDTH = types.MappingProxyType({768: "sd1", 1024: "sd2", 2048: "sdxl"})
FAMILY_LABELS = types.MappingProxyType({"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"})


_FACEID = ("ip-adapter_face_id, ip-adapter_face_id_plus: FaceID adapters need insightface face embeddings, "
           "which this studio does not compute; use a CLIP-based IP-Adapter (ip-adapter_sd15, ip-adapter-plus-"
           "face_sd15, ip-adapter-full-face_sd15, ip-adapter_sdxl_vit-h …)")


# --------------------------------------------------------------------------- files


def is_ip_adapter_state_dict(state: Iterable[str] | Mapping[str, Any]) -> bool:
    """IP-Adapter weights: flat ``image_proj.*`` + ``ip_adapter.*`` names (tensors, shapes or
    just the names) or the nested two-part dict a ``.bin`` holds."""
    if isinstance(state, Mapping) and isinstance(state.get(IMAGE_PROJ), Mapping) \
            and isinstance(state.get(ATTN), Mapping):
        return True
    keys = list(state)
    return (any(isinstance(k, str) and k.startswith(IMAGE_PROJ + ".") for k in keys)
            and any(isinstance(k, str) and k.startswith(ATTN + ".") for k in keys))


def nest(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The two parts as diffusers' loaders take them, from flat names or an already nested dict."""
    if isinstance(state.get(IMAGE_PROJ), Mapping) and isinstance(state.get(ATTN), Mapping):
        return {IMAGE_PROJ: dict(state[IMAGE_PROJ]), ATTN: dict(state[ATTN])}
    out: dict[str, dict[str, Any]] = {IMAGE_PROJ: {}, ATTN: {}}
    for key, value in state.items():
        part, _, name = key.partition(".")
        if part in out and name:
            out[part][name] = value
    return out


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


@dataclass(frozen=True)
class IPAdapterProbe:
    """What an IP-Adapter file is, from its tensor names and shapes."""

    kind: str                   # one of KINDS
    family: str | None          # "sd1" | "sd2" | "sdxl"; None for a width no real model has (test files)
    image_embed_dim: int        # width of the encoder output it projects
    uses_hidden_states: bool    # penultimate hidden states (plus, face) or image_embeds (base)
    cross_attention_dim: int
    layers: int                 # cross-attention layers it adapts (SD1.5: 16, SDXL: 70)

    @property
    def label(self) -> str:
        return FAMILY_LABELS.get(self.family or "", f"{self.cross_attention_dim}-wide text context")


def probe_ip_adapter(state: Mapping[str, Any], name: str = IP_ADAPTER) -> IPAdapterProbe:
    """Kind, family and the encoder width an adapter needs; ``state`` may hold shapes or tensors,
    flat or nested. FaceID files are refused with a :class:`RequestError`."""
    if not is_ip_adapter_state_dict(state):
        raise ModelFileError(f"{name}: not an IP-Adapter (no image_proj.* and ip_adapter.* tensors)")
    parts = nest(state)
    proj = {k: _shape(v) for k, v in parts[IMAGE_PROJ].items()}
    attn = {k: _shape(v) for k, v in parts[ATTN].items()}
    if "perceiver_resampler.proj_in.weight" in proj or any("lora" in k for k in attn) or (
            "norm.weight" in proj and "proj.0.weight" in proj and "proj.3.weight" not in proj):
        raise RequestError(f"{name} is a FaceID IP-Adapter ({_FACEID})")
    stem = Path(name).stem.lower()
    if "proj.weight" in proj:
        kind, embed_dim, hidden_states = "base", proj["proj.weight"][1], False
    elif "proj.3.weight" in proj:
        kind, embed_dim, hidden_states = "full_face", proj["proj.0.weight"][1], True
    elif "latents" in proj and "proj_in.weight" in proj:
        kind = "plus_face" if "face" in stem else "plus"
        embed_dim, hidden_states = proj["proj_in.weight"][1], True
    else:
        raise ModelFileError(f"{name}: an IP-Adapter image projection of an unknown kind "
                             f"({', '.join(sorted(proj)[:6])})")
    keys = [k for k in attn if re.fullmatch(r"\d+\.to_k_ip\.weight", k)]
    if not keys:
        raise ModelFileError(f"{name}: an IP-Adapter without to_k_ip weights")
    width = attn[min(keys, key=lambda k: int(k.split(".")[0]))][1]
    return IPAdapterProbe(kind, FAMILY_BY_WIDTH.get(width), embed_dim, hidden_states, width, len(keys))


@dataclass(frozen=True, eq=False)
class IPAdapterWeights:
    """A loaded IP-Adapter file: the nested state dict diffusers' converters take, and its probe."""

    name: str
    state_dict: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    probe: IPAdapterProbe

    @property
    def kind(self) -> str:
        return self.probe.kind

    @property
    def family(self) -> str | None:
        return self.probe.family

    @property
    def image_embed_dim(self) -> int:
        return self.probe.image_embed_dim

    @property
    def uses_hidden_states(self) -> bool:
        return self.probe.uses_hidden_states


def read_ip_adapter_file(path: Path) -> dict[str, Any]:
    """The file's tensors, flat or nested as stored. Pickles are opened with ``weights_only``:
    the nested ``.bin`` dicts are plain containers, anything else is refused unexecuted."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES or path.suffix.lower() not in PICKLE_SUFFIXES:
        return load_state_dict(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(f"{path.name}: refused to load: the pickle contains objects other than tensors "
                             f"({str(e).splitlines()[0][:200]})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelFileError(f"{path.name}: corrupt or truncated file ({e})") from e
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path.name}: does not contain a state dict")
    return obj


def is_ip_adapter_file(path: Path) -> bool:
    """Cheap check for the library: a ``.safetensors`` header, or the (small) pickle itself."""
    path = Path(path)
    try:
        state = read_shapes(path) if path.suffix.lower() in SAFETENSORS_SUFFIXES else read_ip_adapter_file(path)
    except ModelFileError:
        return False
    return is_ip_adapter_state_dict(state)


def load_ip_adapter(path: Path | str, name: str | None = None) -> IPAdapterWeights:
    """An IP-Adapter file's weights on the CPU (the callback places them with the UNet)."""
    path = Path(path)
    name = name or path.name
    parts = nest(read_ip_adapter_file(path))
    if not all(isinstance(v, torch.Tensor) for part in parts.values() for v in part.values()):
        raise ModelFileError(f"{name}: IP-Adapter parts hold something other than tensors")
    probe = probe_ip_adapter(parts, name)
    log.info("IP-Adapter %s: %s, %s, needs %d-wide %s", name, probe.kind, probe.label, probe.image_embed_dim,
             "hidden states" if probe.uses_hidden_states else "image embeddings")
    return IPAdapterWeights(name, parts, probe)


def _unet_family(width: int) -> str:
    family = FAMILY_BY_WIDTH.get(width)
    return FAMILY_LABELS[family] if family else f"{width}-wide text context"


def check_fits(weights: IPAdapterWeights, unet: Any) -> None:
    """Refuse an adapter made for another model (its cross-attention width or layer count differ)."""
    if not hasattr(unet, "_convert_ip_adapter_attn_to_diffusers"):
        raise RequestError(f"{IP_ADAPTER} {weights.name}: IP-Adapters work with SD1.x and SDXL checkpoints")
    width = unet.config.cross_attention_dim
    layers = sum(1 for n in unet.attn_processors if n.endswith("attn2.processor"))
    if weights.probe.cross_attention_dim != width or weights.probe.layers != layers:
        raise RequestError(f"{IP_ADAPTER} {weights.name} is for {weights.probe.label} ({weights.probe.layers} "
                           f"cross-attention layers); the loaded checkpoint is {_unet_family(width)} "
                           f"({layers} layers)")


# --------------------------------------------------------------------------- reference images


def clip_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """CLIPImageProcessor's preprocessing, as diffusers' pipelines feed the encoder: shortest edge
    to ``size`` (bicubic), centre crop, CLIP mean/std. [N, 3, size, size] float32."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=Image.Resampling.BICUBIC,
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    return processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values.float()


def clip_mask_multiplier(mask: Image.Image, size: int) -> torch.Tensor:
    """The extension's CLIP mask as a pixel multiplier: the mask through the same resize and crop as
    the image, inverted (white = hidden becomes 0, the normalised mean colour). [1, 1, size, size]."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=Image.Resampling.BICUBIC,
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True, do_normalize=False,
        do_convert_rgb=True,
    )
    hidden = processor([mask.convert("RGB")], return_tensors="pt").pixel_values.float()[:, :1]
    return 1.0 - hidden.clamp(0, 1)


@torch.no_grad()
def encode_reference(encoder: Any, images: Sequence[Image.Image], uses_hidden_states: bool,
                     clip_mask: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) embeddings of the images, [N, dim] or [N, tokens, dim], as diffusers'
    ``encode_image``: the negative of image_embeds is zeros, of hidden states the encoder's
    output for an all-zero (normalised) input. ``clip_mask`` (white = hidden) blanks that part of
    the images before the encoder sees them, as the A1111 extension's CLIP mask does."""
    param = next(encoder.parameters())
    pixels = clip_pixels(images, encoder.config.image_size)
    if clip_mask is not None:
        pixels = pixels * clip_mask_multiplier(clip_mask, encoder.config.image_size)
    pixels = pixels.to(param.device, param.dtype)
    if uses_hidden_states:
        cond = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return cond, uncond
    cond = encoder(pixels).image_embeds
    return cond, torch.zeros_like(cond)


# --------------------------------------------------------------------------- the callback


@dataclass
class IPAdapterUnit:
    """One enabled IP-Adapter unit: its weights, the reference images and the unit's settings."""

    weights: IPAdapterWeights
    images: list[Image.Image]
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    module: str = "ip-adapter-auto"
    # several reference images: "average" their image tokens (the A1111 extension) or "concat"
    # them, each image adding its own tokens (diffusers' pipelines)
    multi_image: str = "average"
    # [1, 1, H, W] in [0, 1]: where the adapter acts (the extension's effective region mask), handed to
    # diffusers' IP-Adapter processors as their ip_adapter_masks
    region: torch.Tensor | None = None
    clip_mask: Image.Image | None = None   # white = the part of the reference the encoder does not see
    # the extension's advanced weighting for IP-Adapters: one weight per cross-attention transformer
    # block in call order (16 on SD1.x, 11 on SDXL), replacing the unit's weight
    advanced_weighting: tuple[float, ...] | None = None

    def active(self, step: int, total: int) -> bool:
        return self.weight != 0 and in_guidance_window(step, total, self.guidance_start, self.guidance_end)


def transformer_blocks(processor_names: Sequence[str]) -> dict[str, int]:
    """Each cross-attention processor's transformer block, numbered in the UNet's call order (down
    blocks, the middle block, up blocks): the A1111 extension's ``transformer_index``. Layers of one
    block (SDXL's 2 or 10 transformer layers) share its number."""
    def order(name: str) -> tuple[int, int, int]:
        m = re.match(r"(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.attentions\.(\d+)\.", name)
        if m is None:
            raise ValueError(f"not a UNet cross-attention processor: {name}")
        part = ("down_blocks", "mid_block", "up_blocks").index(m[1])
        return part, int(m[2] or 0), int(m[3])

    keys = sorted({order(name) for name in processor_names})
    return {name: keys.index(order(name)) for name in processor_names}


def compute_placement(model: Any, unet: Any = None) -> tuple[torch.device, torch.dtype]:
    """Where a pass's model computes: its device policy's when it has one (offloaded UNets keep their
    weights elsewhere), else ``unet``'s parameters', else the CPU in float32. The adapter kinds run
    their encoders there, beside it."""
    policy = getattr(model, "policy", None)
    if policy is not None:
        return torch.device(policy.device), policy.dtype
    if unet is None:
        return torch.device("cpu"), torch.float32
    param = next(unet.parameters())
    return param.device, param.dtype


class _AveragedImages(torch.nn.Module):
    """diffusers' ``MultiIPAdapterImageProjection`` with, for the adapters in ``averaged``, the
    projected tokens of several reference images averaged into one image's worth, as the A1111
    extension combines them (diffusers would give every image its own tokens)."""

    def __init__(self, projection: torch.nn.Module, averaged: Sequence[bool]):
        super().__init__()
        self.projection = projection
        self.averaged = tuple(averaged)

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        projected = self.projection(image_embeds)   # per adapter [batch, images, tokens, dim]
        return [p.mean(dim=1, keepdim=True) if avg and p.shape[1] > 1 else p
                for p, avg in zip(projected, self.averaged)]


@dataclass
class _Saved:
    processors: dict[str, Any]
    hid_proj: Any
    hid_proj_is_module: bool
    hid_dim_type: Any


class IPAdapterGuidance(StepCallback):
    """The units as a step callback: adapters installed for the pass, their image tokens in every
    UNet call, each adapter's scale its unit's weight inside its window and 0 outside."""

    def __init__(self, units: Sequence[IPAdapterUnit], encoders: ClipVisionEncoders):
        if not units:
            raise ValueError("IPAdapterGuidance needs at least one unit")
        for unit in units:
            if unit.multi_image not in ("average", "concat"):
                raise ValueError(f"multi_image must be 'average' or 'concat', not {unit.multi_image!r}")
        self.units = list(units)
        self.encoders = encoders
        self._embeds: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # per unit: [1, N, ...] each
        self._placed: tuple[torch.device, torch.dtype] | None = None
        self._saved: _Saved | None = None
        self._unet: Any = None
        self._processors: list[Any] = []
        self._blocks: list[int] = []   # each processor's transformer block (advanced weighting's index)
        self._layout: tuple[tuple[int, int, bool], list[torch.Tensor]] | None = None

    # ---- pass start: encode once, install

    def _encode(self, device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for unit in self.units:
            if not unit.images:
                raise RequestError(f"{IP_ADAPTER} unit ({unit.weights.name}) has no reference image")
            probe = unit.weights.probe
            file = self.encoders.pick(probe.image_embed_dim, probe.uses_hidden_states,
                                      IP_ADAPTER_MODULES.get(unit.module), adapter=f"{IP_ADAPTER} {unit.weights.name}")
            encoder = self.encoders.load(file, dtype, device)
            cond, uncond = encode_reference(encoder, unit.images, probe.uses_hidden_states, unit.clip_mask)
            out.append((cond.unsqueeze(0).to(device, dtype), uncond.unsqueeze(0).to(device, dtype)))
        return out

    def on_pass_start(self, run: PassInfo) -> None:
        unet = run.model.unet
        for unit in self.units:
            check_fits(unit.weights, unet)
        device, dtype = compute_placement(run.model, unet)
        if self._embeds is None or self._placed != (device, dtype):
            self._embeds = self._encode(device, dtype)
            self._placed = (device, dtype)
        self._layout = None
        self._install(unet, device, dtype)

    def _install(self, unet: Any, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        saved = _Saved(dict(unet.attn_processors), unet.encoder_hid_proj,
                       "encoder_hid_proj" in unet._modules, unet.config.encoder_hid_dim_type)
        self._saved, self._unet = saved, unet
        try:
            state_dicts = [unit.weights.state_dict for unit in self.units]
            # diffusers re-creates every processor by calling its class without arguments, which
            # sliced/custom processors do not allow: convert from plain ones, then keep the UNet's
            # own processors on all layers but the adapted cross-attention ones.
            unet.set_attn_processor(AttnProcessor2_0())
            converted = unet._convert_ip_adapter_attn_to_diffusers(state_dicts, low_cpu_mem_usage=False)
            adapted = {name: proc.to(device=device, dtype=dtype) for name, proc in converted.items()
                       if hasattr(proc, "to_k_ip")}
            unet.set_attn_processor({name: adapted.get(name, proc) for name, proc in saved.processors.items()})
            self._processors = list(adapted.values())
            blocks = transformer_blocks(list(adapted))
            self._blocks = [blocks[name] for name in adapted]
            count = len(set(self._blocks))
            for unit in self.units:
                if unit.advanced_weighting is not None and len(unit.advanced_weighting) != count:
                    raise RequestError(f"{IP_ADAPTER} {unit.weights.name}: advanced_weighting needs one weight per "
                                       f"cross-attention block of this UNet ({count}; 16 on SD1.x, 11 on SDXL), "
                                       f"got {len(unit.advanced_weighting)}")
            layers = [unet._convert_ip_adapter_image_proj_to_diffusers(sd[IMAGE_PROJ], low_cpu_mem_usage=False)
                      for sd in state_dicts]
            projection = MultiIPAdapterImageProjection(layers)
            averaged = [unit.multi_image == "average" and len(unit.images) > 1 for unit in self.units]
            if any(averaged):
                projection = _AveragedImages(projection, averaged)
            unet.encoder_hid_proj = projection.to(device=device, dtype=dtype).eval()
            # as diffusers' _load_ip_adapter_weights does: an attribute of the config object
            unet.config.encoder_hid_dim_type = "ip_image_proj"
        except BaseException:
            self._restore()
            raise

    # ---- every UNet call

    def _rows(self, groups: int, batch: int, has_uncond: bool) -> list[torch.Tensor]:
        """Per adapter [groups * batch, N, ...]: the unconditional block first when there is one."""
        key = (groups, batch, has_uncond)
        if self._layout is None or self._layout[0] != key:
            assert self._embeds is not None
            rows = []
            for cond, uncond in self._embeds:
                blocks = [uncond.repeat_interleave(batch, dim=0)] if has_uncond else []
                blocks.append(cond.repeat_interleave((groups - len(blocks)) * batch, dim=0))
                rows.append(torch.cat(blocks))
            self._layout = (key, rows)
        return self._layout[1]

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        active = [unit.active(call.step, call.steps) for unit in self.units]
        for proc, block in zip(self._processors, self._blocks):
            proc.scale = [0.0 if not on else unit.weight if unit.advanced_weighting is None
                          else unit.advanced_weighting[block] for unit, on in zip(self.units, active)]
        out: dict[str, Any] = {
            "added_cond_kwargs": {"image_embeds": list(self._rows(call.groups, call.batch, call.has_uncond))}}
        if any(unit.region is not None for unit in self.units):
            device = call.x.device
            out["cross_attention_kwargs"] = {"ip_adapter_masks": [
                None if unit.region is None else unit.region.to(device) for unit in self.units]}
        return out

    # ---- pass end: the UNet as it was

    def _restore(self) -> None:
        saved, unet = self._saved, self._unet
        if saved is None or unet is None:
            return
        # the projection first: a "plus" Resampler has attention layers of its own, which would
        # count among the UNet's processors
        if saved.hid_proj_is_module:
            unet.encoder_hid_proj = saved.hid_proj
        else:
            # it was a plain attribute (None): leave no module slot behind
            unet._modules.pop("encoder_hid_proj", None)
            unet.__dict__["encoder_hid_proj"] = saved.hid_proj
        unet.set_attn_processor(dict(saved.processors))
        unet.config.encoder_hid_dim_type = saved.hid_dim_type
        self._saved, self._unet, self._processors, self._layout = None, None, [], None

    def on_pass_end(self, run: PassInfo) -> None:
        self._restore()
