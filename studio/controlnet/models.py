"""ControlNet files: the library under ``models/ControlNet``, probing and loading.

Files come in the original layout (lllyasviel's ``.pth``, the A1111 extension's
``.safetensors``, with or without the ``control_model.`` prefix) or as diffusers
folders. What a file is comes from tensor names and shapes only, as in the A1111
extension; the diffusers config is derived from those shapes with the UNet's rules
(:mod:`studio.models.arch`), so pruned and tiny files load like full-size ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.families.spec import family_label
from studio.models.arch import derive_unet_config
from studio.models.catalog import HashCache, ModelFileNames
from studio.models.config_dir import write_config_dir
from studio.models.probe import UNET, CheckpointProbe
from studio.models.state_dict import ModelFileError, Shapes, load_state_dict

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")   # .bin: h94's IP-Adapter files
ORIGINAL_PREFIX = "control_model."
HINT_KEY = "input_hint_block.0.weight"
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "flux1": "FLUX.1"}
# Real SDXL: 6 size/crop numbers Fourier-embedded at 256 each plus bigG's 1280-wide pooled text.
_SDXL_POOLED = 1280
# Config keys a ControlNet shares with the UNet whose encoder it copies.
_UNET_KEYS_KEPT = (
    "act_fn", "attention_head_dim", "block_out_channels", "cross_attention_dim", "down_block_types",
    "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
    "mid_block_scale_factor", "mid_block_type", "norm_eps", "norm_num_groups", "transformer_layers_per_block",
    "upcast_attention", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


# --------------------------------------------------------------------------- library


@dataclass(eq=False)
class ControlNetInfo(ModelFileNames):
    path: Path
    name: str  # relative to the scanned folder, "/" separated, with extension
    is_diffusers: bool = False
    hash_cache: HashCache | None = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)
    _legacy_hash: str | None = field(default=None, repr=False)

    @property
    def weights_path(self) -> Path:
        """The file whose hash names the model (a folder's weights file)."""
        if self.is_diffusers:
            return _folder_weights(self.path) or self.path
        return self.path

    @property
    def cache_key(self) -> str:
        return f"controlnet/{self.name}"

    @property
    def known_sha256(self) -> str | None:
        """The hash if already computed or cached; never reads the file."""
        if self._sha256 is None and self.hash_cache is not None:
            self._sha256 = self.hash_cache.get(self.cache_key, self.weights_path)
        return self._sha256

    @property
    def sha256(self) -> str | None:
        # Hashing a 1.4 GB ControlNet takes seconds, so it happens on first use only.
        if self.known_sha256 is None and self.hash_cache is not None and self.weights_path.is_file():
            self._sha256 = self.hash_cache.compute(self.cache_key, self.weights_path)
        return self._sha256

    @property
    def api_name(self) -> str:
        """How the A1111 extension names a model in its dropdown, ``/controlnet/model_list`` and the
        infotext: ``stem [hash]`` with A1111's old 8-digit ``model_hash``, which reads 64 KiB only."""
        if self._legacy_hash is None:
            self._legacy_hash = legacy_model_hash(self.weights_path)
        return f"{self.stem} [{self._legacy_hash}]"


def legacy_model_hash(path: Path) -> str:
    """A1111's pre-2023 ``sd_models.model_hash``: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits
    (files under 1 MiB hash the empty read). The ControlNet extension still names models with it, so
    ``control_v11p_sd15_canny [d14c016b]`` from a user's infotext or client matches."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except OSError:
        return "NOFILE"


def _folder_weights(folder: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def _is_controlnet_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and _folder_weights(path) is not None


def scan_controlnets(folders: list[Path] | tuple[Path, ...], hash_cache: HashCache | None) -> list[ControlNetInfo]:
    found: dict[Path, ControlNetInfo] = {}
    for root in folders:
        root = Path(root)
        if not root.is_dir():
            continue
        folders_seen: list[Path] = []
        for path in sorted(root.rglob("*")):
            rel_parts = path.relative_to(root).parts
            if any(part.startswith(".") for part in rel_parts):
                continue
            # Files inside a diffusers folder belong to it.
            if any(f in path.parents for f in folders_seen):
                continue
            rel = path.relative_to(root).as_posix()
            if path.is_dir() and _is_controlnet_folder(path):
                folders_seen.append(path)
                found.setdefault(path.resolve(), ControlNetInfo(path, rel, True, hash_cache))
            elif path.is_file() and path.suffix.lower() in CONTROLNET_SUFFIXES:
                found.setdefault(path.resolve(), ControlNetInfo(path, rel, False, hash_cache))
    return sorted(found.values(), key=lambda c: c.name.lower())


class ControlNetLibrary:
    def __init__(self, folders: list[Path] | tuple[Path, ...], hash_cache: HashCache | None):
        self.folders = [Path(f) for f in folders]
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._items: list[ControlNetInfo] = []

    def refresh(self) -> list[ControlNetInfo]:
        items = scan_controlnets(self.folders, self.hash_cache)
        with self._lock:
            self._items = items
        return self.items()

    def items(self) -> list[ControlNetInfo]:
        with self._lock:
            return list(self._items)

    def find(self, query: str | None) -> ControlNetInfo | None:
        """By name, stem, model name, then title or ``stem [hash8]`` (the extension's
        API name); a ``[hash]`` suffix that no longer matches still finds the stem."""
        q = (query or "").strip()
        if not q or q.lower() == "none":
            return None
        items = self.items()
        # The cheap names first: titles and API names may need the file hashed.
        for getter in (lambda c: c.name, lambda c: c.stem, lambda c: c.model_name):
            for c in items:
                if getter(c) == q:
                    return c
        bare = q.rsplit(" [", 1)[0] if q.endswith("]") else q
        if bare != q:
            candidates = [c for c in items if bare in (c.name, c.stem, c.model_name)]
            for c in candidates:
                if q in (c.title, c.api_name):
                    return c
            if candidates:
                return candidates[0]
        return None


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class ControlNetProbe:
    family: str  # "sd1" | "sd2" | "sdxl"
    context_dim: int
    hint_channels: int
    in_channels: int
    kind: str = "ControlNet"  # or "T2I-Adapter": both are control models of a unit

    @property
    def label(self) -> str:
        return FAMILY_LABELS[self.family]


def strip_prefix(shapes_or_sd: dict[str, Any]) -> dict[str, Any]:
    """Files cut from training checkpoints prefix every name with ``control_model.``."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in shapes_or_sd):
        return {k[len(ORIGINAL_PREFIX):]: v for k, v in shapes_or_sd.items() if k.startswith(ORIGINAL_PREFIX)}
    return dict(shapes_or_sd)


def _not_a_controlnet(shapes: Shapes, name: str) -> ModelFileError:
    keys = list(shapes)
    if any("lora_" in k or ".alpha" in k for k in keys):
        what = "a LoRA"
    elif any(k.startswith(UNET) for k in keys):
        what = "a Stable Diffusion checkpoint"
    elif any(k.startswith(("adapter.", "body.")) for k in keys):
        what = "a T2I-Adapter of a kind not supported (only full adapters are)"
    elif any(k.startswith("controlnet_cond_embedding.") for k in keys):
        what = "a diffusers-layout ControlNet weights file; put its folder (with config.json) in models/ControlNet"
    else:
        what = "an unknown kind of model file"
    return ModelFileError(f"{name}: {what}, not a ControlNet model (no {HINT_KEY!r} tensor)")


def _context_dim(shapes: Shapes) -> int:
    for k, shape in shapes.items():
        if re.fullmatch(r"(input_blocks|middle_block)\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight", k):
            return shape[1]
    raise ModelFileError("ControlNet has no cross-attention layers")


def probe_controlnet(shapes: Shapes, name: str = "ControlNet") -> ControlNetProbe:
    """What a ControlNet file is, from its tensor names and shapes."""
    shapes = strip_prefix(shapes)
    hint = shapes.get(HINT_KEY)
    if hint is None or "input_blocks.0.0.weight" not in shapes:
        raise _not_a_controlnet(shapes, name)
    context_dim = _context_dim(shapes)
    if "label_emb.0.0.weight" in shapes:
        family = "sdxl"
    elif context_dim == 1024:
        family = "sd2"
    elif context_dim == 768:
        family = "sd1"
    else:
        # Small files: SD2 uses linear proj_in, SD1 a 1x1 conv.
        proj = next((s for k, s in shapes.items() if k.endswith(".1.proj_in.weight")), None)
        family = "sd2" if proj is not None and len(proj) == 2 else "sd1"
    return ControlNetProbe(family, context_dim, hint[1], shapes["input_blocks.0.0.weight"][1])


def _sdxl_pooled_dim(adm_in: int, context_dim: int) -> int:
    """Pooled-text width, which a ControlNet file does not store: real SDXL's 1280 when
    it fits, else the second encoder's width (the context is CLIP-L + bigG side by side)."""
    for pooled in (_SDXL_POOLED, context_dim - 768, context_dim * 2 // 3, context_dim):
        if 0 < pooled < adm_in and (adm_in - pooled) % 6 == 0:
            return pooled
    raise ModelFileError(f"SDXL ControlNet with an unrecognised size embedding ({adm_in} inputs)")


def derive_controlnet_config(shapes: Shapes, probe: ControlNetProbe) -> dict[str, Any]:
    shapes = strip_prefix(shapes)
    # The encoder is a UNet encoder: reuse the UNet's rules (head conventions included).
    unet_shapes = {UNET + k: v for k, v in shapes.items()}
    unet_shapes[UNET + "out.2.weight"] = (probe.in_channels,)
    ckpt_probe = CheckpointProbe(probe.family, "base", probe.in_channels, "epsilon", False, False)
    if probe.family == "sdxl":
        pooled = _sdxl_pooled_dim(shapes["label_emb.0.0.weight"][1], probe.context_dim)
        unet_shapes["conditioner.embedders.1.model.text_projection"] = (pooled, pooled)
    unet_config = derive_unet_config(unet_shapes, ckpt_probe)
    config = {k: unet_config[k] for k in _UNET_KEYS_KEPT if k in unet_config}
    if not any(k.startswith("middle_block.1.") for k in shapes):
        config["mid_block_type"] = "UNetMidBlock2D"

    hint_ids = sorted(int(m[1]) for k in shapes if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    hint_out = [shapes[f"input_hint_block.{i}.weight"][0] for i in hint_ids[:-1]]
    config.update({
        "_class_name": "ControlNetModel",
        "conditioning_channels": probe.hint_channels,
        # conv_in, then (same-width conv, widening conv) pairs: every second output is a new width.
        "conditioning_embedding_out_channels": hint_out[0::2],
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    })
    return config


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedControlNet:
    info: ControlNetInfo
    probe: ControlNetProbe
    model: Any  # diffusers.ControlNetModel

    @property
    def family(self) -> str:
        return self.probe.family


def _convert(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(sd, config)
    # diffusers' converter has no mapping for SDXL's size/pooled-text MLP.
    for ldm, diffusers_name in (("label_emb.0.0", "add_embedding.linear_1"),
                                ("label_emb.0.2", "add_embedding.linear_2")):
        for param in ("weight", "bias"):
            if f"{ldm}.{param}" in sd:
                converted[f"{diffusers_name}.{param}"] = sd[f"{ldm}.{param}"]
    return {k: v for k, v in converted.items() if v is not None}


def _load_original(info: ControlNetInfo, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                   device: torch.device | str, config_cache: Path) -> LoadedControlNet:
    from diffusers import ControlNetModel

    sd = strip_prefix(sd)
    probe = probe_controlnet({k: tuple(v.shape) for k, v in sd.items()}, info.name)
    config = derive_controlnet_config({k: tuple(v.shape) for k, v in sd.items()}, probe)
    config_dir = write_config_dir({"controlnet": config}, Path(config_cache))
    try:
        # Built from the written config so that what is cached is what is used; weights go
        # through diffusers' own converter, checked for completeness before copying.
        model = ControlNetModel.from_config(
            ControlNetModel.load_config(config_dir, subfolder="controlnet", local_files_only=True))
        weights = _convert(sd, config)
        expected = set(model.state_dict())
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ModelFileError(f"{info.name}: weights do not fit the detected {probe.label} ControlNet layout "
                                 f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        model.load_state_dict(weights, strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{info.name}: weights do not fit the detected {probe.label} ControlNet: {e}") from e
    return LoadedControlNet(info, probe, place_model(model, dtype, device))


def _probe_config(config: dict[str, Any]) -> ControlNetProbe:
    context_dim = config["cross_attention_dim"]
    if config.get("addition_embed_type") == "text_time":
        family = "sdxl"
    elif context_dim == 1024 or (context_dim != 768 and config.get("use_linear_projection")):
        family = "sd2"
    else:
        family = "sd1"
    return ControlNetProbe(family, context_dim, config.get("conditioning_channels", 3), config["in_channels"])


def _load_folder(info: ControlNetInfo, dtype: torch.dtype, device: torch.device | str,
                 adapter: bool = False) -> LoadedControlNet:
    """A diffusers folder: a ControlNet, or (``adapter``) a T2I-Adapter, probed from its config."""
    from diffusers import ControlNetModel, T2IAdapter

    cls, what, probe = ((T2IAdapter, "T2I-Adapter", _adapter_probe) if adapter
                        else (ControlNetModel, "ControlNet", _probe_config))
    try:
        model = cls.from_pretrained(info.path, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFileError(f"{info.name}: incomplete or corrupt diffusers {what} folder: {e}") from e
    return LoadedControlNet(info, probe(dict(model.config)), place_model(model, dtype, device))


def place_model(model: Any, dtype: torch.dtype, device: torch.device | str) -> Any:
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_controlnet(info: ControlNetInfo, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", config_cache: Path | None = None) -> LoadedControlNet:
    """Load a ControlNet or T2I-Adapter file or folder, offline (``dtype`` None: float32; a None
    default, so torch is imported on the first load and not with this module)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if info.is_diffusers:
        if folder_class(info.path) == "T2IAdapter":
            loaded = _load_folder(info, dtype, device, adapter=True)
        else:
            loaded = _load_folder(info, dtype, device)
    else:
        sd = load_state_dict(info.path)
        if is_adapter_state_dict(sd):
            loaded = _load_adapter_file(info, sd, dtype, device)
        else:
            if config_cache is None:
                raise ValueError("config_cache is required for single-file ControlNets")
            loaded = _load_original(info, sd, dtype, device, config_cache)
    log.info("%s %s (%s) loaded", loaded.probe.kind, info.name, loaded.probe.label)
    return loaded


def check_family(loaded: LoadedControlNet, model_family: str) -> None:
    """Refuse a ControlNet made for another model family (``sdxl-refiner`` counts as SDXL,
    ``sd1-inpaint`` as SD1: only the base family matters)."""
    from studio.controlnet.ip_adapter import IP_ADAPTER, IPAdapterWeights
    base = "sdxl" if model_family.startswith("sdxl") else model_family.split("-", 1)[0]
    if loaded.probe.kind == IP_ADAPTER and isinstance(loaded.model, IPAdapterWeights):
        if loaded.model.family not in (None, base):
            raise ModelFileError(f"{IP_ADAPTER} {loaded.info.name} is for {loaded.probe.label}, the loaded "
                                 f"checkpoint is {FAMILY_LABELS.get(base) or family_label(model_family)}")
        return   # the exact fit (widths, layer count) is checked against the UNet when it is installed
    if base != loaded.probe.family:
        label = FAMILY_LABELS.get(base) or family_label(model_family)
        raise ModelFileError(f"{loaded.probe.kind} {loaded.info.name} is for {loaded.probe.label}, "
                             f"the loaded checkpoint is {label}")


# --------------------------------------------------------------------------- T2I-Adapters
#
# TencentARC's SD1.4/1.5 files use a flat layout (``conv_in.*``, ``body.N.block1.*``, level L's
# resnet J at ``body.{L * 2 + J}``); SDXL adapters and diffusers' own files use diffusers'
# names (``adapter.body.L.resnets.J.block1.*``). Both are full adapters: light and style
# adapters (``body.N.body.M.*``, ``style_embedding``) are not supported.

ADAPTER = "T2I-Adapter"
# FLUX.1 Redux files (studio.controlnet.redux): a unit model kind, named here with the others so the
# torch-free unit code can tell them apart
REDUX = "Redux"
_ADAPTER_FAMILIES = {"full_adapter": "sd1", "full_adapter_xl": "sdxl"}
# The original files always have two resnets per level (the T2I-Adapter paper's nums_rb).
_ORIGINAL_RES_BLOCKS = 2


def folder_class(folder: Path) -> str | None:
    """The ``_class_name`` of a diffusers folder's config (None when unreadable)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _is_original_adapter(keys: Any) -> bool:
    return "conv_in.weight" in keys and "body.0.block1.weight" in keys


def is_adapter_state_dict(sd: dict[str, Any]) -> bool:
    """Full T2I-Adapter weights, in either layout (shapes or tensors)."""
    return "adapter.conv_in.weight" in sd or _is_original_adapter(sd)


def original_adapter_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TencentARC's flat names -> diffusers' ``T2IAdapter`` names."""
    if any(k.startswith("body.") and (".skep." in k or ".down_opt." in k) for k in sd):
        raise ModelFileError("T2I-Adapter with skip/downsampling convs (sk=False or use_conv=True) "
                             "is not supported; use a full adapter (e.g. t2iadapter_*_sd14v1 / sd15v2)")
    out = {}
    for key, value in sd.items():
        name = key
        if m := re.fullmatch(r"body\.(\d+)\.in_conv\.(weight|bias)", key):
            name = f"body.{int(m[1]) // _ORIGINAL_RES_BLOCKS}.in_conv.{m[2]}"
        elif m := re.fullmatch(r"body\.(\d+)\.(block[12])\.(weight|bias)", key):
            level, resnet = divmod(int(m[1]), _ORIGINAL_RES_BLOCKS)
            name = f"body.{level}.resnets.{resnet}.{m[2]}.{m[3]}"
        elif not key.startswith("conv_in."):
            raise ModelFileError(f"unexpected T2I-Adapter tensor {key!r}")
        out["adapter." + name] = value
    return out


def derive_adapter_config(sd: dict[str, Any]) -> dict[str, Any]:
    """A ``T2IAdapter`` config from diffusers-named weights' shapes."""
    levels = sorted({int(m[1]) for k in sd if (m := re.match(r"adapter\.body\.(\d+)\.resnets\.", k))})
    if not levels or "adapter.conv_in.weight" not in sd or any(k.startswith("adapter.body.0.body.") for k in sd):
        raise ModelFileError("not a full T2I-Adapter (light and style adapters are not supported)")
    channels = [tuple(sd[f"adapter.body.{i}.resnets.0.block1.weight"].shape)[0] for i in levels]
    res_blocks = len({k.split(".")[4] for k in sd if k.startswith("adapter.body.0.resnets.")})
    conv_in = tuple(sd["adapter.conv_in.weight"].shape)[1]
    # The input is pixel-unshuffled: 8x8 (SD) or 16x16 (SDXL) pixels of each map channel per position.
    downscale = 16 if conv_in % 256 == 0 else 8
    if conv_in % (downscale * downscale):
        raise ModelFileError(f"T2I-Adapter input convolution with {conv_in} channels fits no known layout")
    return {"in_channels": conv_in // (downscale * downscale), "channels": channels, "num_res_blocks": res_blocks,
            "downscale_factor": downscale, "adapter_type": "full_adapter_xl" if downscale == 16 else "full_adapter"}


def _adapter_probe(config: Any) -> ControlNetProbe:
    family = _ADAPTER_FAMILIES.get(config["adapter_type"])
    if family is None:
        raise ModelFileError(f"T2I-Adapter type {config['adapter_type']!r} is not supported (only full adapters)")
    return ControlNetProbe(family, 0, config["in_channels"], config["in_channels"], ADAPTER)


def _load_adapter_file(info: ControlNetInfo, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                       device: torch.device | str) -> LoadedControlNet:
    from diffusers import T2IAdapter

    try:
        weights = original_adapter_to_diffusers(sd) if _is_original_adapter(sd) else sd
        config = derive_adapter_config(weights)
        probe = _adapter_probe(config)
        model = T2IAdapter(**config)
        model.load_state_dict(weights, strict=True)
    except ModelFileError as e:
        raise ModelFileError(f"{info.name}: {e}") from e
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{info.name}: weights do not fit a T2I-Adapter: {e}") from e
    return LoadedControlNet(info, probe, place_model(model, dtype, device))
