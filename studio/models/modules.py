"""Separate model parts of the SD3/FLUX era: text encoders, VAEs and transformer-only
diffusion models, as ComfyUI and Forge users keep them.

FLUX.1 and SD3 are mostly shared in pieces: the transformer in ``models/diffusion_models``
(or ``unet``), CLIP-L / OpenCLIP bigG / T5-XXL in ``models/text_encoder(s)`` (or ``clip``),
the 16-channel VAE (``ae.safetensors``) in ``models/VAE``. Forge lists the text encoders
and VAEs in its "VAE / Text Encoder" multi-select and keeps the choice in the option
``forge_additional_modules``. This module tells what each file is from its tensor names,
shapes and dtypes alone (a safetensors header, or a GGUF file's metadata and tensor
infos: nothing is dequantized or even read), and picks the files a model needs.

File names don't count: ``clip_l.safetensors`` and ``flux1-dev-Q8_0.gguf`` are named by
habit, and renamed files are common.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from studio.models.state_dict import SAFETENSORS_SUFFIXES, ModelFileError, read_safetensors_header

log = logging.getLogger(__name__)

ModuleKind = Literal["clip_l", "clip_g", "t5xxl", "qwen3", "vae16", "vae32", "vae4", "transformer", "unknown"]
MODULE_KINDS: tuple[str, ...] = get_args(ModuleKind)
TRANSFORMER_FAMILIES = ("sd3", "flux1", "flux2", "chroma", "zimage")
GGUF_SUFFIX = ".gguf"
MODULE_SUFFIXES = (*SAFETENSORS_SUFFIXES, GGUF_SUFFIX)

# name -> shape in PyTorch order (outermost dimension first)
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ModuleFile:
    path: Path
    name: str            # file name relative to its folder, "/"-separated (what forge_additional_modules holds)
    kind: str            # a ModuleKind
    family: str | None   # for "transformer": "sd3" | "flux1" | "flux2" | "chroma" | "zimage"; else None
    storage: str         # "bf16" | "fp16" | "fp32" | "fp8_e4m3fn" | "fp8_e5m2" | "gguf Q8_0" ...


class ModuleChoiceError(ModelFileError):
    """The text encoders / VAE / transformer a model needs cannot be picked unambiguously."""


# --------------------------------------------------------------------------- identification


@dataclass(frozen=True)
class _Part:
    """One model part found in a file: what it is and the prefix its tensor names share."""

    kind: str
    family: str | None
    prefix: str


def _prefixes(shapes: Shapes, marker: str) -> list[str]:
    """Prefixes under which ``marker`` occurs as a whole name tail ("a.b.c" has tails
    "c", "b.c", "a.b.c"). A marker ending in "." matches any name under it."""
    found: list[str] = []
    for key in shapes:
        if marker.endswith("."):
            start = key.find(marker)
            while start > 0 and key[start - 1] != ".":
                start = key.find(marker, start + 1)
        else:
            start = len(key) - len(marker) if key.endswith(marker) else -1
            if start > 0 and key[start - 1] != ".":
                start = -1
        if start >= 0 and key[:start] not in found:
            found.append(key[:start])
    return found


def _under(shapes: Shapes, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


# The markers of each transformer family, in the order they must be tried: FLUX.2 and
# Chroma are FLUX.1 descendants that keep its ``double_blocks`` (diffusers'
# ``infer_diffusers_model_type`` tests them first for the same reason).
_TRANSFORMER_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("flux2", ("single_stream_modulation.lin.weight",)),
    ("chroma", ("distilled_guidance_layer.in_proj.bias",)),
    ("flux1", ("double_blocks.0.img_attn.norm.key_norm.scale",)),
    ("sd3", ("joint_blocks.0.",)),
    # Lumina 2 has the same caption embedder, but its modulation is adaLN_modulation.1
    # (after a SiLU); Z-Image's is adaLN_modulation.0.
    ("zimage", ("layers.0.adaLN_modulation.0.weight",)),
)
# What city96's GGUF converter writes as general.architecture, for files whose names
# match no marker.
_GGUF_ARCHITECTURES = {"flux": "flux1", "sd3": "sd3", "flux2": "flux2", "chroma": "chroma"}


def _transformers(shapes: Shapes) -> list[_Part]:
    parts = []
    for family, markers in _TRANSFORMER_MARKERS:
        for marker in markers:
            for prefix in _prefixes(shapes, marker):
                if family == "zimage" and not _under(shapes, prefix + "cap_embedder."):
                    continue
                parts.append(_Part("transformer", family, prefix))
    return parts


def _unets(shapes: Shapes) -> list[_Part]:
    """SD1/SD2/SDXL UNets: in a file they make it a checkpoint, not a module."""
    return [_Part("unknown", None, p) for p in _prefixes(shapes, "input_blocks.0.0.weight")]


# The CLIP rule. Real files: CLIP-L is 768 wide (12 layers), OpenCLIP bigG 1280 wide
# (32 layers); the width alone decides, whatever else the file carries (FLUX/SD3 sets'
# clip_l.safetensors may hold a text_projection too). OpenCLIP-H (1024, SD2's encoder)
# and any other real width are no module of these models: "unknown". Widths below
# CLIP-L's are no real encoder; they are the test suite's tiny encoders (CLIP-L 32 wide,
# bigG 64 wide, both 2 layers), told apart the way their files differ: only bigG's
# carries text_projection.weight.
CLIP_L_WIDTH = 768
CLIP_G_WIDTH = 1280


def clip_kind(width: int, has_projection: bool) -> str:
    if width == CLIP_L_WIDTH:
        return "clip_l"
    if width == CLIP_G_WIDTH:
        return "clip_g"
    if width < CLIP_L_WIDTH:
        return "clip_g" if has_projection else "clip_l"
    return "unknown"


def _clips(shapes: Shapes) -> list[_Part]:
    parts = []
    # transformers names (ComfyUI's clip_l/clip_g files, SD3/FLUX all-in-ones).
    for prefix in _prefixes(shapes, "text_model.embeddings.token_embedding.weight"):
        width = shapes[prefix + "text_model.embeddings.token_embedding.weight"][-1]
        parts.append(_Part(clip_kind(width, prefix + "text_projection.weight" in shapes), None, prefix))
    # OpenCLIP names (bigG cut from an SDXL checkpoint: text_projection without ".weight").
    for prefix in _prefixes(shapes, "transformer.resblocks.0.attn.in_proj_weight"):
        embedding = shapes.get(prefix + "token_embedding.weight")
        if embedding is not None:
            parts.append(_Part(clip_kind(embedding[-1], prefix + "text_projection" in shapes), None, prefix))
    return parts


# T5-XXL has T5's 32,128-token vocabulary (UMT5 and mT5 have 256k/250k) and is 4096 wide;
# the smaller T5 v1.1 sizes share the vocabulary, so their widths are refused. Other
# widths are the test suite's tiny T5 (96 wide).
T5_VOCAB = 32128
_SMALLER_T5_WIDTHS = (512, 768, 1024, 2048)

# (query weight, embeddings) in transformers' names and in llama.cpp's (GGUF T5 files).
_T5_NAMES = (
    ("encoder.block.0.layer.0.SelfAttention.q.weight", ("shared.weight", "encoder.embed_tokens.weight")),
    ("enc.blk.0.attn_q.weight", ("token_embd.weight",)),
)


def _t5s(shapes: Shapes) -> list[_Part]:
    parts = []
    for query, embeddings in _T5_NAMES:
        for prefix in _prefixes(shapes, query):
            width = shapes[prefix + query][-1]
            vocab = next((shapes[prefix + e][0] for e in embeddings if prefix + e in shapes), T5_VOCAB)
            fits = vocab == T5_VOCAB and width not in _SMALLER_T5_WIDTHS
            parts.append(_Part("t5xxl" if fits else "unknown", None, prefix))
    return parts


# Qwen3 (Z-Image's and FLUX.2 Klein's text encoder): transformers' decoder names, with
# ComfyUI's "model." or bare; its per-head q/k norms tell it from Qwen2/2.5. llama.cpp's
# names (GGUF files) are recognised so that loading one says why it cannot be used.
_QWEN3_NAMES = (
    ("layers.0.self_attn.q_norm.weight", "embed_tokens.weight"),
    ("blk.0.attn_q_norm.weight", "token_embd.weight"),
)


def _qwen3s(shapes: Shapes) -> list[_Part]:
    parts = []
    for norm, embedding in _QWEN3_NAMES:
        for prefix in _prefixes(shapes, norm):
            if prefix + embedding in shapes:
                parts.append(_Part("qwen3", None, prefix))
    return parts


def _vaes(shapes: Shapes) -> list[_Part]:
    """SD's VAE in LDM or diffusers names (the same for these keys), with or without a
    "first_stage_model." / "vae." prefix; the latent channels decide 4, 16 or 32 (FLUX.2's,
    whose latent BatchNorm statistics are checked when it is loaded)."""
    parts = []
    for prefix in _prefixes(shapes, "encoder.conv_in.weight"):
        decoder_in = shapes.get(prefix + "decoder.conv_in.weight")
        if decoder_in is None:
            continue
        latent = decoder_in[1]
        kind = {16: "vae16", 4: "vae4", 32: "vae32"}.get(latent, "unknown")
        parts.append(_Part(kind, None, prefix))
    return parts


def _identify(shapes: Shapes, architecture: str | None = None) -> _Part:
    transformers = _transformers(shapes)
    if transformers:
        # An all-in-one checkpoint is chosen as a diffusion model, whatever else it holds.
        return transformers[0]
    parts = _unets(shapes) + _t5s(shapes) + _clips(shapes) + _qwen3s(shapes) + _vaes(shapes)
    if len(parts) == 1:
        return parts[0]
    if not parts and architecture in _GGUF_ARCHITECTURES:
        return _Part("transformer", _GGUF_ARCHITECTURES[architecture], "")
    # Nothing known, or several parts in one file (a UNet checkpoint, a text encoder
    # bundle): not one module that can be picked for one slot.
    return _Part("unknown", None, "")


def kind_from_shapes(shapes: Shapes, architecture: str | None = None) -> tuple[str, str | None]:
    """(kind, family) of a file with these tensor names and shapes (PyTorch order).
    ``architecture`` is a GGUF file's ``general.architecture``, used only when no name
    tells the transformer family."""
    part = _identify(shapes, architecture)
    return part.kind, part.family


# --------------------------------------------------------------------------- reading

# name -> (shape, storage label of its dtype)
_Tensors = dict[str, tuple[tuple[int, ...], str]]

_SAFETENSORS_STORAGE = {
    "BF16": "bf16",
    "F16": "fp16",
    "F32": "fp32",
    "F64": "fp64",
    "F8_E4M3": "fp8_e4m3fn",
    "F8_E5M2": "fp8_e5m2",
}
# bitsandbytes files (Forge's flux1-dev-bnb-nf4) store weights as packed uint8 next to
# a quant-state tensor named after the format.
_BNB_STATE = re.compile(r"\.quant_state\.bitsandbytes__(nf4|fp4)$")


def _read_safetensors(path: Path) -> _Tensors:
    header = read_safetensors_header(path)
    tensors: _Tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = (tuple(int(n) for n in info["shape"]), str(info["dtype"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{path.name}: corrupt safetensors header entry {name!r}") from e
    return {name: (shape, _SAFETENSORS_STORAGE.get(dtype, "")) for name, (shape, dtype) in tensors.items()}


def _gguf_string(field: object) -> str | None:
    # ReaderField: ``parts`` holds the raw arrays, ``data`` the indexes of the value parts.
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")  # type: ignore[attr-defined]
    except (AttributeError, IndexError, UnicodeDecodeError):
        return None


def _read_gguf(path: Path) -> tuple[_Tensors, str | None]:
    """Tensor infos and ``general.architecture``. GGUFReader memory-maps the file and
    parses the header; the tensor data is never touched."""
    import gguf  # imported here: numpy-heavy, and only GGUF files need it

    if not path.is_file():
        raise ModelFileError(f"{path}: file not found")
    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields.get("general.architecture")
        architecture = _gguf_string(field) if field is not None else None
        # GGUF lists dimensions innermost first; PyTorch outermost first.
        tensors = {t.name: (tuple(int(n) for n in reversed(t.shape)), f"gguf {t.tensor_type.name}")
                   for t in reader.tensors}
    except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path.name}: not a readable GGUF file ({e})") from e
    return tensors, architecture


def _storage(tensors: _Tensors, prefix: str) -> str:
    """The dtype holding most of the part's weights (matrices and convolutions; vectors
    stay in higher precision in fp8 and GGUF files, so they don't count)."""
    for name in tensors:
        if name.startswith(prefix) and (m := _BNB_STATE.search(name)):
            return m.group(1)
    totals: dict[str, int] = {}
    for name, (shape, label) in tensors.items():
        if label and len(shape) >= 2 and name.startswith(prefix):
            size = 1
            for n in shape:
                size *= n
            totals[label] = totals.get(label, 0) + size
    return max(totals, key=lambda label: totals[label]) if totals else "unknown"


def classify_module(path: Path) -> ModuleFile:
    """What the .safetensors/.sft/.gguf file ``path`` holds. Raises ModelFileError if it
    cannot be read; a readable file of no known kind is ``kind="unknown"``."""
    path = Path(path)
    suffix = path.suffix.lower()
    architecture = None
    if suffix == GGUF_SUFFIX:
        tensors, architecture = _read_gguf(path)
    elif suffix in SAFETENSORS_SUFFIXES:
        tensors = _read_safetensors(path)
    else:
        raise ModelFileError(f"{path.name}: unsupported file type {suffix!r} (expected one of {MODULE_SUFFIXES})")
    part = _identify({name: shape for name, (shape, _) in tensors.items()}, architecture)
    return ModuleFile(path=path, name=path.name, kind=part.kind, family=part.family,
                      storage=_storage(tensors, part.prefix))


# --------------------------------------------------------------------------- scanning


def _skipped(relative: Path) -> bool:
    """Hidden files and folders (atomic_write's ".name.tmp" among them) and editors' or
    downloaders' "~" leftovers."""
    return any(part.startswith((".", "~")) for part in relative.parts)


def _identity(path: Path) -> tuple[int, int] | Path:
    """The same file reached through two folder spellings (models/VAE and models/vae on a
    case-insensitive disk, a symlink) counts once."""
    try:
        stat = path.stat()
    except OSError:
        return path.resolve()
    return (stat.st_dev, stat.st_ino) if stat.st_ino else path.resolve()


def scan_modules(folders: Iterable[Path]) -> list[ModuleFile]:
    """Every module file under ``folders`` (recursively), sorted by name. A file that
    cannot be read is left out with a warning: one broken download must not hide the
    others or stop a model from loading."""
    found: dict[object, ModuleFile] = {}
    for root in folders:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if path.suffix.lower() not in MODULE_SUFFIXES or _skipped(relative) or not path.is_file():
                continue
            key = _identity(path)
            if key in found:
                continue
            try:
                module = classify_module(path)
            except Exception as e:  # noqa: BLE001 - any reader failure means "skip this file"
                log.warning("skipping %s: %s", path, e)
                continue
            found[key] = replace(module, name=relative.as_posix())
    return sorted(found.values(), key=lambda m: (m.name.lower(), str(m.path)))


# --------------------------------------------------------------------------- picking

# kind -> (article, what it is, example files)
_DESCRIPTIONS = {
    "clip_l": ("a", "CLIP-L text encoder", "clip_l.safetensors"),
    "clip_g": ("an", "OpenCLIP bigG text encoder", "clip_g.safetensors"),
    "t5xxl": ("a", "T5-XXL text encoder", "t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors or a GGUF"),
    "qwen3": ("a", "Qwen3 text encoder",
              "qwen_3_4b.safetensors for Z-Image and FLUX.2 Klein 4B, qwen_3_8b.safetensors for Klein 9B"),
    "vae16": ("a", "16-channel VAE", "ae.safetensors for FLUX.1 and Z-Image, the SD3 VAE for SD3"),
    "vae32": ("a", "FLUX.2 VAE", "flux2-vae.safetensors"),
    "vae4": ("an", "SD VAE", "a 4-channel VAE such as vae-ft-mse-840000-ema-pruned.safetensors"),
    "transformer": ("a", "diffusion model", "flux1-dev.safetensors, a GGUF or an fp8 file"),
}
# The module_folders() key of each kind, and the folder named when no folders are given.
_FOLDER_KEYS = {
    "clip_l": "text_encoders", "clip_g": "text_encoders", "t5xxl": "text_encoders", "qwen3": "text_encoders",
    "vae16": "vae", "vae32": "vae", "vae4": "vae", "transformer": "diffusion_models",
}
_DEFAULT_FOLDERS = {
    "text_encoders": "models/text_encoder",
    "vae": "models/VAE",
    "diffusion_models": "models/diffusion_models",
}
SELECTOR_HINT = 'choose one in the "VAE / Text Encoder" selector or with the forge_additional_modules option'


def _aliases(module: ModuleFile) -> set[str]:
    """What Forge users put in forge_additional_modules: the full path (what Forge itself
    saves), the file name shown in its selector, or the name without extension."""
    base = module.name.rsplit("/", 1)[-1]
    return {str(module.path), module.name, base, module.name.rsplit(".", 1)[0], base.rsplit(".", 1)[0]}


def _listing(modules: Iterable[ModuleFile]) -> str:
    return ", ".join(m.name for m in modules) or "none"


def _chosen_modules(chosen: Sequence[str], available: Sequence[ModuleFile]) -> list[ModuleFile]:
    picked: list[ModuleFile] = []
    for name in chosen:
        name = str(name).strip()
        if not name:
            continue
        matches = [m for m in available if name in _aliases(m)]
        if not matches:
            raise ModuleChoiceError(f"the chosen module {name!r} was not found; available: {_listing(available)}")
        picked += [m for m in matches if m not in picked]
    return picked


def _folders_text(kind: str, folders: Mapping[str, Sequence[Path]] | None) -> str:
    key = _FOLDER_KEYS[kind]
    listed = [str(f) for f in (folders or {}).get(key, ())]
    return " or ".join(listed) if listed else _DEFAULT_FOLDERS[key]


def _pick(kind: str, available: Sequence[ModuleFile], chosen: Sequence[ModuleFile],
          folders: Mapping[str, Sequence[Path]] | None) -> ModuleFile:
    article, noun, examples = _DESCRIPTIONS[kind]
    description = f"{article} {noun}"
    selected = [m for m in chosen if m.kind == kind]
    if len(selected) > 1:
        raise ModuleChoiceError(f"more than one {noun} is chosen: {_listing(selected)}; keep one")
    if selected:
        return selected[0]
    candidates = [m for m in available if m.kind == kind]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModuleChoiceError(f"this model needs {description} and none was found: "
                                f"put {description} ({examples}) in {_folders_text(kind, folders)}")
    raise ModuleChoiceError(f"several files could be {description}: {_listing(candidates)}; {SELECTOR_HINT}")


def pick_modules(
    needed: Iterable[str],
    available: Sequence[ModuleFile],
    chosen: Sequence[str] = (),
    *,
    folders: Mapping[str, Sequence[Path]] | None = None,
) -> dict[str, ModuleFile]:
    """The file for each needed kind (e.g. ``("clip_l", "t5xxl", "vae16")``).

    A file named in ``chosen`` (forge_additional_modules: paths, names or stems) wins for
    its kind; otherwise the only file of that kind is taken. Anything else (a chosen name
    that matches nothing, two chosen files of one kind, no file or several of a kind) is
    a ModuleChoiceError that says what to do. ``folders`` (from
    :func:`studio.models.extra_paths.module_folders`) names the folders to put a missing
    file in. Chosen files of kinds not needed are ignored: the choice is kept across
    models of different families, as in Forge.
    """
    kinds = list(dict.fromkeys(needed))
    for kind in kinds:
        if kind not in _DESCRIPTIONS:
            raise ValueError(f"unknown module kind {kind!r}; expected one of {tuple(_DESCRIPTIONS)}")
    selected = _chosen_modules(chosen, available)
    return {kind: _pick(kind, available, selected, folders) for kind in kinds}
