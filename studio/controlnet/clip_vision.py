"""CLIP vision image encoders for IP-Adapters: finding the files, reading their shape, loading them.

The files are the ones users already have: ComfyUI's ``clip_vision_h.safetensors`` /
``clip_vision_g.safetensors``, h94/IP-Adapter's ``image_encoder`` weights and the A1111
extension's ``clip_h.pth`` / ``clip_g.pth``. All use transformers' names (``vision_model.*``,
``visual_projection.weight``), so :class:`transformers.CLIPVisionModelWithProjection` loads them
once its config is known. No config ships with a single file and nothing may be downloaded, so
the config comes from tensor shapes (:func:`clip_vision_config`), as the checkpoint loader does
for UNets.

An IP-Adapter needs the encoder it was trained with: a "base" adapter projects the encoder's
``image_embeds`` (``projection_dim`` wide: ViT-H 1024, bigG 1280), the "plus" and face adapters its
penultimate hidden states (``hidden_size`` wide: ViT-H 1280, bigG 1664). :class:`ClipVisionEncoders`
picks the file whose width fits, preferring the one the unit's module names (``ip-adapter_clip_h``
wants ViT-H, ``ip-adapter_clip_g`` bigG).

The same folder holds SigLIP encoders (ComfyUI's ``sigclip_vision_patch14_384.safetensors``), which
FLUX.1 Redux reads: transformers' ``SiglipVisionModel`` names, told from CLIP by having no class
token (no ``class_embedding``, a square number of positions). Their config also comes from shapes
(:func:`siglip_vision_config`).
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import RequestError
from studio.models.state_dict import ModelFileError, load_state_dict, read_shapes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The A1111 extension's module (preprocessor) names -> the encoder each one asks for ("clip_h":
# OpenCLIP ViT-H/14, "clip_g": ViT-bigG/14; None: whichever fits the adapter, as
# ``ip-adapter-auto`` resolves through the model's preset). ``ip-adapter_clip_sd15`` is shown as
# ``ip-adapter_clip_h`` and ``ip-adapter_clip_sdxl`` as ``ip-adapter_clip_g``; both spellings are
# accepted. For all of them the control map is the reference image itself. (Here, beside the encoders,
# and not in ip_adapter.py with its torch code: the preprocessor list is built at start-up.)
IP_ADAPTER_MODULES: Mapping[str, str | None] = types.MappingProxyType({
    "ip-adapter-auto": None,
    "ip-adapter_clip_sd15": "clip_h",
    "ip-adapter_clip_h": "clip_h",
    "ip-adapter_clip_sdxl": "clip_g",
    "ip-adapter_clip_g": "clip_g",
    "ip-adapter_clip_sdxl_plus_vith": "clip_h",
})

CLIP_VISION_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
# Where the studio (and the A1111 extension, and ComfyUI) keep the encoders.
CLIP_VISION_FOLDER = "models/clip_vision"
# OpenAI's CLIP normalisation, which every CLIP vision model was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PATCH = "vision_model.embeddings.patch_embedding.weight"
_CLASS = "vision_model.embeddings.class_embedding"
CLIP, SIGLIP = "clip", "siglip"
_POSITIONS = "vision_model.embeddings.position_embedding.weight"
_PROJECTION = "visual_projection.weight"
# Real encoders all have 16 heads, whatever their width (OpenCLIP's ViT-H-14 has 80-wide heads,
# bigG 104-wide): a head count cannot be read from shapes, so the known widths are listed.
_KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16, 1280: 16, 1664: 16}   # 1152: SigLIP so400m
# OpenAI's ViT-L/14 (SD1's text encoder's twin) uses quick_gelu; the OpenCLIP ViT-H/bigG use gelu.
_QUICK_GELU_SHAPE = (1024, 24, 768)  # hidden size, layers, projection


def clip_vision_heads(hidden: int) -> int:
    """Attention heads of an encoder ``hidden`` wide: the real models' count for their widths,
    else 64-wide heads when the width divides, else 16-wide heads (small test encoders), else 1.
    :func:`studio.testing.ip_adapters.write_clip_vision` builds its encoders with this rule."""
    if hidden in _KNOWN_HEADS:
        return _KNOWN_HEADS[hidden]
    for head_dim in (64, 16):
        if hidden % head_dim == 0:
            return hidden // head_dim
    return 1


def normalise_keys(state: Mapping[str, Any], name: str = "CLIP vision model") -> dict[str, Any]:
    """transformers' names, a leading prefix (``clip_vision.``, ``image_encoder.``) stripped.
    Works on tensors or shapes. OpenCLIP's own layout (``visual.transformer.…``) is refused."""
    marker = next((k for k in state if k.endswith(_PATCH)), None)
    if marker is None:
        if any(k.startswith(("visual.", "visual.transformer.")) or ".visual.transformer." in k for k in state):
            raise ModelFileError(f"{name}: an OpenCLIP-layout image encoder (visual.transformer.*); this studio "
                                 "reads the transformers layout: use ComfyUI's clip_vision_h.safetensors / "
                                 "clip_vision_g.safetensors or h94/IP-Adapter's image_encoder weights")
        raise ModelFileError(f"{name}: not a CLIP vision model (no {_PATCH!r} tensor)")
    prefix = marker[: -len(_PATCH)]
    # a whole CLIP model (OpenAI's ViT-L pytorch_model.bin) also holds its text tower: keep the image side
    out = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):].startswith(("vision_model.", "visual_projection."))}
    # Older transformers saved this buffer; today's models compute it.
    out.pop("vision_model.embeddings.position_ids", None)
    return out


def _shape(value: Any) -> tuple[int, ...]:
    import torch
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _vit_geometry(shapes: Mapping[str, tuple[int, ...]], extra_tokens: int, name: str) -> dict[str, int]:
    """The config fields a ViT's shapes give, CLIP's and SigLIP's alike: widths, depth, heads (by
    :func:`clip_vision_heads`) and the image size from the patch grid (positions = grid² +
    ``extra_tokens``: CLIP's class token, none for SigLIP)."""
    hidden, channels, patch, _ = shapes[_PATCH]
    positions = shapes[_POSITIONS][0]
    grid = round((positions - extra_tokens) ** 0.5)
    if grid * grid + extra_tokens != positions:
        raise ModelFileError(f"{name}: {positions} position embeddings make no square patch grid")
    return dict(
        hidden_size=hidden,
        intermediate_size=shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len({m[1] for k in shapes
                               if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}),
        num_attention_heads=clip_vision_heads(hidden),
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
    )


def clip_vision_config(state: Mapping[str, Any], name: str = "CLIP vision model") -> Any:
    """A ``transformers.CLIPVisionConfig`` from the tensor shapes (or tensors) of an encoder file."""
    from transformers import CLIPVisionConfig

    shapes = {k: _shape(v) for k, v in normalise_keys(state, name).items()}
    if _PROJECTION not in shapes or _POSITIONS not in shapes:
        raise ModelFileError(f"{name}: a CLIP vision model without {_PROJECTION!r}; IP-Adapters need the "
                             "model with its projection (CLIPVisionModelWithProjection)")
    geometry = _vit_geometry(shapes, 1, name)
    projection = shapes[_PROJECTION][0]
    quick = (geometry["hidden_size"], geometry["num_hidden_layers"], projection) == _QUICK_GELU_SHAPE
    return CLIPVisionConfig(
        **geometry,
        projection_dim=projection,
        hidden_act="quick_gelu" if quick else "gelu",
        layer_norm_eps=1e-5,
    )


def encoder_kind(state: Mapping[str, Any], name: str = "image encoder") -> str:
    """CLIP or SigLIP, from the names: CLIP's ViTs have a class token, SigLIP's do not."""
    keys = normalise_keys(state, name)
    return CLIP if _CLASS in keys else SIGLIP


def siglip_vision_config(state: Mapping[str, Any], name: str = "SigLIP vision model") -> Any:
    """A ``transformers.SiglipVisionConfig`` from the tensor shapes (or tensors) of a SigLIP encoder
    file (ComfyUI's sigclip_vision_patch14_384: 1152 wide, 27 layers, 27x27 patches of 14 px)."""
    from transformers import SiglipVisionConfig

    shapes = {k: _shape(v) for k, v in normalise_keys(state, name).items()}
    if _POSITIONS not in shapes:
        raise ModelFileError(f"{name}: no {_POSITIONS!r} tensor")
    return SiglipVisionConfig(
        **_vit_geometry(shapes, 0, name),
        vision_use_head=any(k.startswith("vision_model.head.") for k in shapes),
    )


def scan_clip_vision(folders: Iterable[Path | str]) -> list[Path]:
    """Encoder files in ``folders`` (and their subfolders), sorted by name, duplicates once."""
    found: dict[Path, None] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in CLIP_VISION_SUFFIXES:
                found.setdefault(path.resolve(), None)
    return sorted(found, key=lambda p: (p.name.lower(), str(p)))


def load_clip_vision(path: Path | str, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu") -> Any:
    """A ``CLIPVisionModelWithProjection`` from one file, offline; weights read safely. ``dtype``
    None: float32 (a None default: torch is imported on the first load, not with the module)."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    dtype = torch.float32 if dtype is None else dtype

    path = Path(path)
    state = normalise_keys(load_state_dict(path), path.name)
    config = clip_vision_config(state, path.name)
    model = CLIPVisionModelWithProjection(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path.name}: weights do not fit a CLIP vision model: {str(e)[:300]}") from e
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_siglip_vision(path: Path | str, dtype: torch.dtype | None = None,
                       device: torch.device | str = "cpu") -> Any:
    """A ``SiglipVisionModel`` from one file, offline; weights read safely."""
    import torch
    from transformers import SiglipVisionModel

    dtype = torch.float32 if dtype is None else dtype
    path = Path(path)
    state = normalise_keys(load_state_dict(path), path.name)
    model = SiglipVisionModel(siglip_vision_config(state, path.name))
    # the files keep transformers' ``vision_model.`` names; a model class without that level (as
    # transformers 5 builds it) takes them stripped
    wanted = model.state_dict().keys()
    if not any(k.startswith("vision_model.") for k in wanted):
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path.name}: weights do not fit a SigLIP vision model: {str(e)[:300]}") from e
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@dataclass(frozen=True)
class EncoderFile:
    """An encoder file and the widths an adapter can use."""

    path: Path
    hidden_size: int      # penultimate hidden states ("plus", face adapters); SigLIP: its output
    projection_dim: int   # image_embeds ("base" adapters); 0 for SigLIP (no projection)
    image_size: int
    kind: str = CLIP

    def width(self, uses_hidden_states: bool) -> int:
        return self.hidden_size if uses_hidden_states else self.projection_dim


# Name fragments that say which encoder a file is; the module's hint picks among those that fit.
ENCODER_NAME_HINTS = {
    "clip_h": ("clip_h", "clip_vision_h", "vit-h", "vit_h", "vith", "h14", "h-14"),
    "clip_g": ("clip_g", "clip_vision_g", "bigg", "vit-g", "vit_g"),
    "clip_l": ("clip_l", "clip_vision_l", "vit-l", "vit_l", "large-patch14"),   # XLabs' FLUX IP-Adapter
}


class ClipVisionEncoders:
    """The encoder files of the folders (``models/clip_vision``, ``models/annotators/clip_vision``),
    their widths read once per file, and one loaded encoder kept for the next job (a ViT-H is
    2.5 GB in fp32: one at a time)."""

    def __init__(self, folders: Iterable[Path | str]):
        self.folders = [Path(f) for f in folders]
        self._files: dict[Path, EncoderFile] = {}
        self._loaded: tuple[tuple[Path, torch.dtype, str], Any] | None = None

    def files(self) -> list[EncoderFile]:
        """Every readable encoder file; unreadable or foreign files are skipped with a log line."""
        out = []
        for path in scan_clip_vision(self.folders):
            info = self._files.get(path)
            if info is None:
                try:
                    shapes = read_shapes(path)
                    if encoder_kind(shapes, path.name) == SIGLIP:
                        config = siglip_vision_config(shapes, path.name)
                        info = EncoderFile(path, config.hidden_size, 0, config.image_size, SIGLIP)
                    else:
                        config = clip_vision_config(shapes, path.name)
                        info = EncoderFile(path, config.hidden_size, config.projection_dim, config.image_size)
                except ModelFileError as e:
                    log.warning("skipping %s: %s", path, e)
                    continue
                self._files[path] = info
            out.append(info)
        return out

    def pick(self, width: int, uses_hidden_states: bool, hint: str | None = None,
             adapter: str = "IP-Adapter") -> EncoderFile:
        """The encoder whose output is ``width`` wide (hidden states or image_embeds); among
        several, the one named like ``hint`` ("clip_h" / "clip_g"), then the first by name."""
        files = [f for f in self.files() if f.kind == CLIP]
        fits = [f for f in files if f.width(uses_hidden_states) == width]
        if not fits:
            what = "hidden states" if uses_hidden_states else "image embeddings (projection)"
            wanted = {"clip_h": "ViT-H (clip_vision_h / clip_h)", "clip_g": "ViT-bigG (clip_vision_g / clip_g)"}
            name = f" such as {wanted[hint]}" if hint in wanted else ""
            have = "; ".join(f"{f.path.name}: hidden {f.hidden_size}, projection {f.projection_dim}" for f in files)
            raise RequestError(f"{adapter} needs a CLIP vision image encoder with {width}-wide {what}{name}; "
                               f"{'none of the encoders fits (' + have + ')' if files else 'none found'}: "
                               f"put the encoder file in {CLIP_VISION_FOLDER} "
                               f"(also read: models/annotators/clip_vision)")
        fragments = ENCODER_NAME_HINTS.get(hint or "", ())
        named = [f for f in fits if any(s in f.path.stem.lower() for s in fragments)]
        return (named or fits)[0]

    def pick_siglip(self, width: int, adapter: str = "FLUX.1 Redux") -> EncoderFile:
        """The SigLIP encoder whose output is ``width`` wide (Redux's input width), first by name."""
        files = self.files()
        fits = [f for f in files if f.kind == SIGLIP and f.hidden_size == width]
        if not fits:
            have = "; ".join(f"{f.path.name}: {f.kind} {f.hidden_size} wide" for f in files)
            raise RequestError(f"{adapter} needs a SigLIP image encoder with {width}-wide outputs (ComfyUI's "
                               f"sigclip_vision_patch14_384.safetensors); "
                               f"{'none of the encoders fits (' + have + ')' if files else 'none found'}: "
                               f"put the encoder file in {CLIP_VISION_FOLDER}")
        return fits[0]

    def load(self, file: EncoderFile | Path, dtype: torch.dtype, device: torch.device | str) -> Any:
        """The loaded encoder, reusing the kept one when it is the same file, dtype and device."""
        import torch
        siglip = isinstance(file, EncoderFile) and file.kind == SIGLIP
        path = file.path if isinstance(file, EncoderFile) else Path(file).resolve()
        key = (path, dtype, str(torch.device(device)))
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self._loaded = None  # drop the old one before the new one takes memory
        model = (load_siglip_vision if siglip else load_clip_vision)(path, dtype, device)
        log.info("%s vision encoder %s loaded", "SigLIP" if siglip else "CLIP", path.name)
        self._loaded = (key, model)
        return model

    def release(self) -> None:
        """Forget the kept encoder (to free its memory)."""
        self._loaded = None
