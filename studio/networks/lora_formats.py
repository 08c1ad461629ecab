"""LoRA-family state dicts -> per-module weight updates (formats.md §2).

Understood layouts, each grouped by the module name the file uses (mapping that name to a layer
of the loaded model is :mod:`studio.networks.lora_keys`' job):

- kohya LoRA / LoCon: ``<m>.lora_down.weight``, ``<m>.lora_up.weight``, optional
  ``<m>.lora_mid.weight`` (tucker conv) and ``<m>.alpha``; scale = alpha / rank, alpha = rank
  when it is missing or 0 (kohya's rule).
- LyCORIS LoHa: ``hada_w1_a/b``, ``hada_w2_a/b``, optional tucker ``hada_t1/t2``;
  ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / r with r = ``hada_w1_b.shape[0]``.
- LyCORIS LoKr: ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``, optional
  ``lokr_t2``; ΔW = kron(w1, w2) · scale, scale = alpha / r only when a factor is decomposed
  (r = the inner dimension, ``*_b.shape[0]``), else 1, as A1111 computes it.
- full difference: ``diff`` (and ``diff_b`` for the bias), scale 1.
- diffusers / PEFT: ``<m>.lora_A.weight`` / ``<m>.lora_B.weight``; alpha and rank come from the
  ``lora_adapter_metadata`` JSON (``lora_alpha``, ``alpha_pattern``, ``r``, ``rank_pattern``,
  keys prefixed ``unet.`` / ``text_encoder.`` when diffusers packed several components), else
  from a ``<m>.alpha`` key, else the scale is 1.
- older diffusers: ``….processor.to_q_lora.down.weight`` (module ``….to_q``; ``to_out_lora`` is
  ``to_out.0``), ``….lora_linear_layer.down.weight`` and ``….lora.down.weight``; scale 1 unless
  an alpha key is present.
- XLabs FLUX.1: ``double_blocks.N.processor.qkv_lora1.down.weight`` (module
  ``double_blocks.N.processor.qkv_lora1``, which :mod:`studio.networks.dit_lora` maps); scale 1.

A ``<m>.scale`` tensor overrides the computed scale, as in A1111. DoRA files (``dora_scale`` /
``lora_magnitude_vector``) are refused: their update depends on the weight's norm, which a plain
merge cannot reproduce. ``bundle_emb.*`` (bundled textual inversions) are ignored with a note.

Every ΔW is float32 and carries the module's own scale but never the user's multiplier.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor


class LoraFileError(ValueError):
    """A LoRA file that cannot be used (corrupt, unreadable, or of an unsupported kind)."""


# (pattern, how the captured name becomes the module name, which part the tensor is)
_OLD_ATTENTION = re.compile(r"(?P<m>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<p>down|up)\.weight")
_OLD_LINEAR = re.compile(r"(?P<m>.+)\.(?:lora_linear_layer|lora)\.(?P<p>down|up)\.weight")
_XLABS = re.compile(r"(?P<m>.+\.processor\.(?:qkv|proj)_lora\d?)\.(?P<p>down|up)\.weight")
_PEFT = re.compile(r"(?P<m>.+)\.lora_(?P<p>A|B)\.weight")
_KOHYA = re.compile(r"(?P<m>.+)\.lora_(?P<p>up|down|mid)\.weight")
_PLAIN_PARTS = (
    "alpha", "scale", "dora_scale", "lora_magnitude_vector",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b",
)
_PLAIN = re.compile(r"(?P<m>.+)\.(?P<p>" + "|".join(_PLAIN_PARTS) + r")(?:\.weight)?")
# Other LyCORIS / A1111 types (IA3, norm, GLoRA, OFT, BOFT): known, not merged here.
_OTHER_TYPES = re.compile(
    r"(?P<m>.+)\.(?P<p>on_input|w_norm|b_norm|oft_blocks|oft_diag|oft_R|[ab][12]\.weight|weight|bias)"
)
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux1": "FLUX.1", "sd3": "SD3"}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """key -> (module name, part, style) or None for keys of no known layout."""
    if m := _OLD_ATTENTION.fullmatch(key):
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['m']}.{proj}", m["p"], "old"
    if m := _OLD_LINEAR.fullmatch(key):
        return m["m"], m["p"], "old"
    if m := _XLABS.fullmatch(key):
        return m["m"], m["p"], "old"
    if m := _PEFT.fullmatch(key):
        return m["m"], "down" if m["p"] == "A" else "up", "peft"
    if m := _KOHYA.fullmatch(key):
        return m["m"], m["p"], "kohya"
    if m := _PLAIN.fullmatch(key):
        return m["m"], m["p"], "kohya"
    return None


# --------------------------------------------------------------------------- modules


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _f32(t: Tensor, device: torch.device | str | None) -> Tensor:
    import torch
    return t.to(device=device, dtype=torch.float32)


def _rebuild_tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS' tucker form: ``core [r1, r2, kh, kw]``, ``wa [r1, out]``, ``wb [r2, in]``."""
    import torch
    return torch.einsum("ijkl,ip,jq->pqkl", core, wa, wb)


@dataclass
class NetworkModule:
    """The update of one layer. Subclasses hold the file's tensors as stored (CPU, file dtype)."""

    name: str
    alpha: float | None = None
    scale_override: float | None = None

    kind = "base"

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        if self.scale_override is not None:
            return self.scale_override
        rank = self.rank
        if rank is None:
            return 1.0
        alpha = self.alpha if self.alpha else float(rank)
        return alpha / rank

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The shape the factors give ΔW (conv kernels may come flattened); None: bias only."""
        raise NotImplementedError

    @property
    def bias(self) -> Tensor | None:
        return None

    def fits(self, target: tuple[int, ...]) -> bool:
        """Whether ΔW reshapes to ``target``: same output rows and element count covers
        flattened conv kernels and linear layers stored as 1x1 convs (and the reverse)."""
        shape = self.shape
        return shape is not None and shape[0] == target[0] and _numel(shape) == _numel(tuple(target))

    def low_rank(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor] | None:
        """``(A [out, r], B [r, in·kh·kw])`` with ΔW = scale · A @ B, when the update has that
        form; the caller can then fold its multiplier in and skip building ΔW."""
        return None

    def _dense(self, device: torch.device | str | None) -> Tensor:
        raise NotImplementedError

    def delta(self, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
        """Float32 ΔW · scale, reshaped to ``shape``."""
        import torch
        factors = self.low_rank(device)
        if factors is not None:
            dense = torch.mm(factors[0], factors[1])
        else:
            dense = self._dense(device)
        return dense.mul_(self.scale).reshape(shape)

    def bias_delta(self, device: torch.device | str | None = None) -> Tensor | None:
        bias = self.bias
        return None if bias is None else _f32(bias, device) * self.scale


@dataclass
class LoraModule(NetworkModule):
    """kohya LoRA / LoCon (with optional tucker ``mid``), PEFT and older diffusers LoRA."""

    down: Tensor = field(default=None)  # type: ignore[assignment]
    up: Tensor = field(default=None)  # type: ignore[assignment]
    mid: Tensor | None = None
    _cpu_factors: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        out = int(self.up.shape[0])
        if self.mid is not None:
            return (out, int(self.down.shape[1]), *self.mid.shape[2:])
        return (out, *self.down.shape[1:])

    def low_rank(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        import torch
        on_cpu = device is None or torch.device(device).type == "cpu"
        if on_cpu and self._cpu_factors is not None:
            return self._cpu_factors
        up = _f32(self.up, device).reshape(self.up.shape[0], -1)
        down = _f32(self.down, device).reshape(self.down.shape[0], -1)
        if self.mid is not None:
            # ΔW[o,i,k,l] = Σ up[o,n]·mid[n,m,k,l]·down[m,i]: folding mid into down keeps the
            # update a single [out, r] @ [r, in·k·k] product.
            folded = torch.einsum("nmkl,mi->nikl", _f32(self.mid, device), down)
            down = folded.reshape(folded.shape[0], -1)
        if on_cpu:
            # The float32 factors are small next to the weights they update; keeping them
            # saves converting every factor again on each set change.
            self._cpu_factors = (up, down)
        return up, down


@dataclass
class LohaModule(NetworkModule):
    w1a: Tensor = field(default=None)  # type: ignore[assignment]
    w1b: Tensor = field(default=None)  # type: ignore[assignment]
    w2a: Tensor = field(default=None)  # type: ignore[assignment]
    w2b: Tensor = field(default=None)  # type: ignore[assignment]
    t1: Tensor | None = None
    t2: Tensor | None = None

    kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *self.t1.shape[2:])
        return (int(self.w1a.shape[0]), *self.w1b.shape[1:])

    def _half(self, wa: Tensor, wb: Tensor, t: Tensor | None, device) -> Tensor:
        import torch
        wa, wb = _f32(wa, device), _f32(wb, device)
        if t is not None:
            return _rebuild_tucker(_f32(t, device), wa, wb)
        return torch.mm(wa, wb.reshape(wb.shape[0], -1))

    def _dense(self, device) -> Tensor:
        first = self._half(self.w1a, self.w1b, self.t1, device)
        second = self._half(self.w2a, self.w2b, self.t2, device)
        return first.mul_(second)


@dataclass
class LokrModule(NetworkModule):
    w1: Tensor | None = None
    w1a: Tensor | None = None
    w1b: Tensor | None = None
    w2: Tensor | None = None
    w2a: Tensor | None = None
    w2b: Tensor | None = None
    t2: Tensor | None = None

    kind = "lokr"

    @property
    def rank(self) -> int | None:
        # A1111 takes the inner dimension of whichever factor is decomposed (w2 wins).
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        return None

    def _w1_shape(self) -> tuple[int, ...]:
        if self.w1 is not None:
            return tuple(self.w1.shape)
        return (int(self.w1a.shape[0]), int(self.w1b.shape[1]))

    def _w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (int(self.w2a.shape[1]), int(self.w2b.shape[1]), *self.t2.shape[2:])
        return (int(self.w2a.shape[0]), int(self.w2b.shape[1]))

    @property
    def shape(self) -> tuple[int, ...]:
        a, b = self._w1_shape()[:2]
        w2 = self._w2_shape()
        return (a * w2[0], b * w2[1], *w2[2:])

    def _dense(self, device) -> Tensor:
        import torch
        if self.w1 is not None:
            w1 = _f32(self.w1, device)
        else:
            w1 = torch.mm(_f32(self.w1a, device), _f32(self.w1b, device))
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is not None:
            w2 = _rebuild_tucker(_f32(self.t2, device), _f32(self.w2a, device), _f32(self.w2b, device))
        else:
            w2 = torch.mm(_f32(self.w2a, device), _f32(self.w2b, device))
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # A 2-D kron of a conv's flattened w2 lays elements out exactly like the 4-D one.
        return torch.kron(w1, w2.contiguous())


@dataclass
class FullModule(NetworkModule):
    diff: Tensor | None = None
    diff_b: Tensor | None = None

    kind = "full"

    @property
    def shape(self) -> tuple[int, ...] | None:
        return None if self.diff is None else tuple(self.diff.shape)

    @property
    def bias(self) -> Tensor | None:
        return self.diff_b

    def _dense(self, device) -> Tensor:
        return _f32(self.diff, device).clone()


# --------------------------------------------------------------------------- whole file


@dataclass
class ParsedNetwork:
    """A file's modules by the name the file uses, plus what was left out and why."""

    modules: dict[str, NetworkModule]
    unsupported: dict[str, str] = field(default_factory=dict)   # module name -> reason
    unknown_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}


def _scalar(parts: Mapping[str, Tensor], name: str) -> float | None:
    value = parts.get(name)
    if value is None or value.numel() == 0:
        return None
    return float(value.float().reshape(-1)[0])


def _check(module: NetworkModule) -> str | None:
    """Why the module's tensors cannot combine, found by running its formula on the meta
    device (shapes only, no arithmetic), or None when they do."""
    try:
        if module.shape is not None:
            module.delta(module.shape, "meta")
        module.bias_delta("meta")
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        return f"tensor shapes do not combine ({str(e).splitlines()[0][:120]})"
    return None


def _build(name: str, parts: dict[str, Tensor]) -> NetworkModule | str:
    """The module for one group of tensors, or the reason it cannot be used."""
    common = {"name": name, "alpha": _scalar(parts, "alpha"), "scale_override": _scalar(parts, "scale")}
    if "down" in parts or "up" in parts:
        if "down" not in parts or "up" not in parts:
            return "LoRA module without both up and down weights"
        return LoraModule(**common, down=parts["down"], up=parts["up"], mid=parts.get("mid"))
    if any(p.startswith("hada_") for p in parts):
        if not all(f"hada_w{i}_{ab}" in parts for i in (1, 2) for ab in "ab"):
            return "LoHa module with missing hada_w* tensors"
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            return "LoHa module with only one tucker tensor"
        return LohaModule(**common, w1a=parts["hada_w1_a"], w1b=parts["hada_w1_b"], w2a=parts["hada_w2_a"],
                          w2b=parts["hada_w2_b"], t1=parts.get("hada_t1"), t2=parts.get("hada_t2"))
    if any(p.startswith("lokr_") for p in parts):
        has_1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
        has_2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
        if not (has_1 and has_2):
            return "LoKr module with missing lokr_w* tensors"
        return LokrModule(**common, **{k.removeprefix("lokr_").replace("_", ""): v
                                       for k, v in parts.items() if k.startswith("lokr_")})
    if "diff" in parts or "diff_b" in parts:
        return FullModule(**common, diff=parts.get("diff"), diff_b=parts.get("diff_b"))
    return "no weights (only " + ", ".join(sorted(parts)) + ")"


def adapter_config(metadata: Mapping[str, str] | None) -> dict:
    raw = (metadata or {}).get(_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def _pattern_value(patterns: object, module: str) -> float | None:
    """PEFT's rule: a pattern matches a module name it ends (at a dot boundary)."""
    if not isinstance(patterns, dict):
        return None
    for pattern, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", module)
        except re.error:
            matched = module == pattern or module.endswith("." + pattern)
        if matched:
            return float(value)
    return None


def _peft_scale(module: str, rank: int, config: Mapping[str, object]) -> float | None:
    component, _, inner = module.partition(".")

    def get(key: str) -> object:
        return config.get(f"{component}.{key}", config.get(key))

    alpha = _pattern_value(get("alpha_pattern"), inner)
    if alpha is None:
        alpha = get("lora_alpha")
    if alpha is None:
        return None
    r = _pattern_value(get("rank_pattern"), inner) or get("r") or rank
    if get("use_rslora"):
        return float(alpha) / math.sqrt(float(r))
    return float(alpha) / float(r)


def parse_network(
    state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, name: str = "network"
) -> ParsedNetwork:
    """Group a LoRA-family state dict into modules. Raises :class:`LoraFileError` for DoRA."""
    groups: dict[str, dict[str, Tensor]] = {}
    styles: dict[str, str] = {}
    unknown: list[str] = []
    other: dict[str, set[str]] = {}
    bundled: set[str] = set()
    for key, tensor in state_dict.items():
        if key.startswith("bundle_emb."):
            bundled.add(key.split(".")[1])
            continue
        split = _split_key(key)
        if split is None:
            if m := _OTHER_TYPES.fullmatch(key):
                other.setdefault(m["m"], set()).add(m["p"])
            else:
                unknown.append(key)
            continue
        module, part, style = split
        groups.setdefault(module, {})[part] = tensor
        if style != "kohya" or module not in styles:
            styles[module] = style

    dora = [m for m, parts in groups.items() if "dora_scale" in parts or "lora_magnitude_vector" in parts]
    if dora:
        raise LoraFileError(
            f"{name}: this is a DoRA network ({len(dora)} modules carry dora_scale); DoRA is not supported"
        )

    config = adapter_config(metadata)
    parsed = ParsedNetwork(modules={}, unknown_keys=unknown)
    for module, parts in groups.items():
        built = _build(module, parts)
        if isinstance(built, NetworkModule) and (problem := _check(built)):
            built = problem
        if isinstance(built, str):
            parsed.unsupported[module] = built
            continue
        if styles[module] == "peft" and isinstance(built, LoraModule) and built.scale_override is None:
            peft = _peft_scale(module, built.rank, config)
            # No metadata and no alpha key: diffusers loads such files with alpha = r.
            built.scale_override = peft if peft is not None else (None if built.alpha else 1.0)
        elif styles[module] == "old" and built.alpha is None and built.scale_override is None:
            built.scale_override = 1.0
        parsed.modules[module] = built
    for module, parts in other.items():
        if module not in parsed.modules:
            kinds = ", ".join(sorted(parts))
            parsed.unsupported.setdefault(module, f"unsupported layer type (tensors: {kinds})")
    if bundled:
        parsed.notes.append(f"{len(bundled)} bundled embedding(s) ignored ({', '.join(sorted(bundled))})")
    return parsed


# --------------------------------------------------------------------------- family


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    base = str(metadata.get("ss_base_model_version") or "")
    arch = str(metadata.get("modelspec.architecture") or "")
    if base.startswith("flux1") or arch.startswith("flux-1"):
        return "flux1"
    if base.startswith("sd3") or arch.startswith("stable-diffusion-v3"):
        return "sd3"
    if base.startswith("sdxl_"):
        return "sdxl"
    if base.startswith("sd_v2") or str(metadata.get("ss_v2")) == "True":
        return "sd2"
    if base.startswith("sd_v1"):
        return "sd1"
    for prefix, family in (("stable-diffusion-xl-v1", "sdxl"), ("stable-diffusion-v2", "sd2"),
                           ("stable-diffusion-v1", "sd1")):
        if arch.startswith(prefix):
            return family
    return None


_TE_INPUT = re.compile(
    r"(?:lora_te_|text_encoder\.).*(?:q_proj|k_proj|v_proj)"
    r"(?:\.lora_down\.weight|\.lora_A\.weight|_lora\.down\.weight|\.lora_linear_layer\.down\.weight)"
)
_CROSS_ATTENTION_K = re.compile(
    r".*attn2[._]to_k(?:\.lora_down\.weight|\.lora_A\.weight|\.lora\.down\.weight)"
    r"|.*attn2\.processor\.to_k_lora\.down\.weight"
)
# The DiT families' block names, in any of their spellings (kohya ``lora_unet_double_blocks_0_…``,
# BFL / XLabs ``double_blocks.0.…``, diffusers ``single_transformer_blocks.0.…``); SD UNets have none.
_DIT_BLOCKS = (
    (re.compile(r"(?:^|[._])(?:double_blocks|single_blocks|single_transformer_blocks)[._]\d"), "flux1"),
    (re.compile(r"(?:^|[._])joint_blocks[._]\d"), "sd3"),
)
# diffusers' and OneTrainer's names for a DiT's transformer: FLUX.1 or SD3 (the SD UNet is "unet").
_DIT_PREFIXES = ("transformer.", "lora_transformer_")
_TE_WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}
_CONTEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def family_from_keys(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """FLUX.1 / SD3 from their block names (their files use ``lora_te1_`` / ``text_encoder_2.``
    too; a diffusers DiT file without FLUX.1's single blocks may be either: None), else SDXL from
    its second text encoder's names, else SD1/SD2 from the text width (CLIP-L 768, OpenCLIP-H
    1024), else from the UNet's cross-attention input width."""
    for pattern, family in _DIT_BLOCKS:
        if any(pattern.search(k) for k in shapes):
            return family
    if any(k.startswith(_DIT_PREFIXES) for k in shapes):
        return None
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in shapes):
        return "sdxl"
    for pattern, widths in ((_TE_INPUT, _TE_WIDTH_FAMILY), (_CROSS_ATTENTION_K, _CONTEXT_WIDTH_FAMILY)):
        for key, shape in shapes.items():
            if len(shape) >= 2 and pattern.fullmatch(key) and (family := widths.get(int(shape[1]))):
                return family
    return None


def detect_family(metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    return family_from_metadata(metadata) or family_from_keys(shapes)
