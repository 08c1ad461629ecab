"""LoRAs for the DiT families (FLUX.1, SD3/SD3.5), merged into the loaded model like the SD ones.

:class:`DiTLoraPatcher` keeps :class:`studio.networks.lora.NetworkPatcher`'s contract
(``apply(active, library) -> PatchReport``, ``restore()``, ``current``): every touched tensor is
backed up once, each set change starts again from the originals, and removing the networks puts
back the original bits. Files are read by the same :class:`LoraLibrary` (kohya, PEFT, LyCORIS …).

Names. Our transformers are diffusers' ``FluxTransformer2DModel`` / ``SD3Transformer2DModel``,
whose attention has separate q/k/v linears, while most files are trained on the original models
(BFL's FLUX, Stability's MMDiT), where q/k/v (and in a FLUX single block the MLP input too) are
one fused linear: ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``,
``lora_unet_joint_blocks_0_x_block_attn_qkv``. Such a module is split by rows: each diffusers
linear takes its rows of ΔW (for a LoRA, its rows of ``up``; ``down`` is shared), at the widths of
the loaded model's own layers, so pruned or tiny models work too. The final modulation (and SD3's
last, "pre-only" context modulation) is (shift, scale) in the originals and (scale, shift) in
diffusers' ``AdaLayerNormContinuous``: its rows are swapped the same way. Understood spellings:

- transformer, original names: kohya ``lora_unet_`` (old sd-scripts FLUX: ``lora_flux_``), bare or
  ``diffusion_model.`` dotted names (ComfyUI, BFL), XLabs ``double_blocks.N.processor.qkv_lora1``
  (img q/k/v), ``qkv_lora2`` (txt), ``proj_lora1/2`` and ``single_blocks.N.processor.qkv_lora``
  (q/k/v only) / ``proj_lora``;
- transformer, diffusers names: ``transformer.`` (diffusers/PEFT, ai-toolkit, SimpleTuner),
  ``base_model.model.``, bare, OneTrainer ``lora_transformer_``, ``lycoris_``;
- text encoders: kohya ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G (SD3) and T5 (older FLUX files),
  ``lora_te3_`` T5, in transformers-4 names (``text_model.`` added where transformers 5 flattened
  it); diffusers ``text_encoder.`` / ``text_encoder_2.`` / ``text_encoder_3.`` (diffusers'
  pipeline component names); ComfyUI ``text_encoders.clip_l.transformer.`` etc.

Storage. How a tensor is patched depends on how the loader keeps it (studio/models/storage.py):

- weights in the compute dtype are merged in place (float32 arithmetic, rounded once), with a CPU
  copy of the original, exactly as the SD patcher does;
- weights kept in their file's dtype (fp8, or bf16/fp16 on a float32 CPU) and upcast per call
  would lose the update to that dtype's rounding, so the merged weight is made in the compute
  dtype and takes the stored tensor's place (``param.data``: the Parameter itself, which other
  code may hold, stays); the stored tensor is kept (on the CPU) and put back on removal. The
  memory cost is the touched layers' compute-dtype copies;
- GGUF-quantized weights cannot take a merge: the layer gets a forward hook that adds
  ``x @ downᵀ @ upᵀ · scale`` (low rank, no dense ΔW), removed on restore.

Not supported: BFL's Depth/Canny control LoRAs widen ``img_in``'s input, which is an architecture
change (they are reported as not fitting); their norm-scale replacements are reported as ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from studio.models.storage import is_quantized

# The SD patcher's merge (float32 row blocks or one half-precision addmm, rounded once) and its
# per-tensor contribution record are reused as they are, so both families merge identically.
from studio.networks.lora import (
    ActiveNetwork,
    LoraFileError,
    LoraLibrary,
    MergingPatcher,
    PatchReport,
    _Contribution,
    _merge,
)
from studio.networks.lora_formats import FAMILY_NAMES, NetworkModule
from studio.networks.lora_keys import TEXT_ENCODER, TEXT_ENCODER_2, UNET, Target

__all__ = ["DiTLoraPatcher", "Piece", "build_routes", "dit_components"]

log = logging.getLogger(__name__)

TEXT_ENCODER_3 = "text_encoder_3"
_TARGET_TYPES = (nn.Linear, nn.Conv2d)
_TEXT_MODEL = "text_model."
Rows = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------- name maps


@dataclass(frozen=True)
class Piece:
    """One layer of the loaded model a file's module updates. ``rows``: the file module's output
    rows that, concatenated, are this layer's rows (None: all of them, a one-to-one layer)."""

    target: Target
    rows: Rows | None = None

    @property
    def row_count(self) -> int | None:
        return None if self.rows is None else sum(end - start for start, end in self.rows)


Route = tuple[Piece, ...]

# (original layer, the diffusers layers it became, in row order), per block and for the whole model.
_FLUX_DOUBLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
    ("img_mod.lin", ("norm1.linear",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    # XLabs trains its attention processors: q/k/v of the image (1) and text (2) streams, and
    # the output projections.
    ("processor.qkv_lora1", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("processor.qkv_lora2", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("processor.proj_lora1", ("attn.to_out.0",)),
    ("processor.proj_lora2", ("attn.to_add_out",)),
)
_FLUX_SINGLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation.lin", ("norm.linear",)),
    ("processor.qkv_lora", ("attn.to_q", "attn.to_k", "attn.to_v")),  # XLabs: linear1's q/k/v rows only
    ("processor.proj_lora", ("proj_out",)),
)
_FLUX_GLOBAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),
)
_SD3_JOINT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("x_block.attn.proj", ("attn.to_out.0",)),
    ("context_block.attn.proj", ("attn.to_add_out",)),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),  # SD3.5 Medium's MMDiT-X
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)),
    ("x_block.mlp.fc2", ("ff.net.2",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)),
    ("context_block.mlp.fc2", ("ff_context.net.2",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",)),
)
_SD3_GLOBAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x_embedder.proj", ("pos_embed.proj",)),
    ("context_embedder", ("context_embedder",)),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),
)
# family -> ((original block prefix, diffusers block list, table), ...), then the global table
_BLOCKS = {
    "flux1": (("double_blocks", "transformer_blocks", _FLUX_DOUBLE),
              ("single_blocks", "single_transformer_blocks", _FLUX_SINGLE)),
    "sd3": (("joint_blocks", "transformer_blocks", _SD3_JOINT),),
}
_GLOBAL = {"flux1": _FLUX_GLOBAL, "sd3": _SD3_GLOBAL}

# How files spell a transformer layer, by the name style they start from.
_ORIGINAL_SPELLINGS = {"flux1": ("lora_unet_", "lora_flux_"), "sd3": ("lora_unet_",)}
_ORIGINAL_DOTTED = ("", "diffusion_model.")
_DIFFUSERS_DOTTED = ("transformer.", "base_model.model.", "")
_DIFFUSERS_UNDERSCORED = ("lora_transformer_", "lycoris_", "lora_unet_")
# Which kohya / ComfyUI names each text-encoder component answers to, per family.
_KOHYA_TE = {
    "flux1": {TEXT_ENCODER: ("lora_te1_", "lora_te_"), TEXT_ENCODER_2: ("lora_te2_", "lora_te3_")},
    "sd3": {TEXT_ENCODER: ("lora_te1_",), TEXT_ENCODER_2: ("lora_te2_",), TEXT_ENCODER_3: ("lora_te3_",)},
}
_COMFY_TE = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
             "t5xxl": "text_encoders.t5xxl.transformer."}


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _is_t5(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", "") in ("t5", "umt5")


def _encoder_kinds(text_encoders: Sequence[Any]) -> list[str]:
    """"clip_l" / "clip_g" / "t5xxl" per encoder: T5 by its config, the CLIPs in order (L first)."""
    kinds, clips = [], iter(("clip_l", "clip_g"))
    for model in text_encoders:
        kinds.append("t5xxl" if _is_t5(model) else next(clips, "clip"))
    return kinds


def dit_components(transformer: nn.Module, text_encoders: Sequence[Any], family: str) -> dict[str, nn.Module]:
    """Component name -> module, in diffusers' pipeline names: FLUX.1 ``text_encoder`` (CLIP-L)
    and ``text_encoder_2`` (T5); SD3 ``text_encoder`` (CLIP-L), ``text_encoder_2`` (CLIP-G),
    ``text_encoder_3`` (T5), whichever the model has."""
    names = {"clip_l": TEXT_ENCODER, "clip_g": TEXT_ENCODER_2,
             "t5xxl": TEXT_ENCODER_2 if family == "flux1" else TEXT_ENCODER_3}
    out: dict[str, nn.Module] = {UNET: transformer}
    for kind, model in zip(_encoder_kinds(text_encoders), text_encoders):
        if kind in names:
            out[names[kind]] = model
    return out


def _out_rows(module: nn.Module) -> int:
    weight = module.weight
    shape = getattr(weight, "quant_shape", None) or weight.shape
    return int(shape[0])


def _pieces(modules: dict[str, nn.Module], parts: Sequence[str]) -> Route | None:
    """The route of one original layer onto diffusers ``parts`` (None when the model lacks one)."""
    found = [modules.get(p) for p in parts]
    if any(m is None or not isinstance(m, _TARGET_TYPES) for m in found):
        return None
    if len(parts) == 1:
        parent = modules.get(parts[0].rpartition(".")[0])
        if type(parent).__name__ == "AdaLayerNormContinuous":
            # The originals modulate with (shift, scale), diffusers' continuous norm with (scale, shift).
            half = _out_rows(found[0]) // 2
            return (Piece(Target(UNET, parts[0]), ((half, 2 * half), (0, half))),)
        return (Piece(Target(UNET, parts[0])),)
    route, start = [], 0
    for part, module in zip(parts, found):
        rows = _out_rows(module)
        route.append(Piece(Target(UNET, part), ((start, start + rows),)))
        start += rows
    return tuple(route)


def _original_routes(transformer: nn.Module, family: str) -> Iterator[tuple[str, Route]]:
    """(original layer name, route) for every original layer the loaded transformer has."""
    modules = dict(transformer.named_modules())
    for original_prefix, diffusers_prefix, table in _BLOCKS.get(family, ()):
        blocks = getattr(transformer, diffusers_prefix, None) or ()
        for index in range(len(blocks)):
            for original, parts in table:
                route = _pieces(modules, [f"{diffusers_prefix}.{index}.{p}" for p in parts])
                if route is not None:
                    yield f"{original_prefix}.{index}.{original}", route
    for original, parts in _GLOBAL.get(family, ()):
        route = _pieces(modules, parts)
        if route is not None:
            yield original, route


def _transformer_aliases(transformer: nn.Module, family: str) -> Iterator[tuple[str, Route]]:
    for original, route in _original_routes(transformer, family):
        for prefix in _ORIGINAL_SPELLINGS.get(family, ()):
            yield prefix + _underscored(original), route
        for prefix in _ORIGINAL_DOTTED:
            yield prefix + original, route
    for name, module in transformer.named_modules():
        if isinstance(module, _TARGET_TYPES):
            route = (Piece(Target(UNET, name)),)
            for prefix in _DIFFUSERS_DOTTED:
                yield prefix + name, route
            for prefix in _DIFFUSERS_UNDERSCORED:
                yield prefix + _underscored(name), route


def _text_encoder_aliases(model: nn.Module, component: str, kind: str, family: str) -> Iterator[tuple[str, Route]]:
    flattened = not hasattr(model, "text_model") and kind != "t5xxl"  # transformers 5's CLIPTextModel
    kohya = _KOHYA_TE.get(family, {}).get(component, ())
    for name, module in model.named_modules():
        if not isinstance(module, _TARGET_TYPES):
            continue
        route = (Piece(Target(component, name)),)
        full = _TEXT_MODEL + name if flattened else name     # the transformers 4 name
        bare = full.removeprefix(_TEXT_MODEL)
        for prefix in kohya:
            yield prefix + _underscored(full), route
        yield f"{component}.{full}", route
        yield f"{component}.{bare}", route
        yield _COMFY_TE[kind] + full, route


def build_routes(transformer: nn.Module, text_encoders: Sequence[Any], family: str) -> dict[str, Route]:
    """Every module name a FLUX.1 / SD3 LoRA file may use -> the layers (and rows) it updates.
    A name two different routes would claim is left out rather than guessed."""
    pairs: list[tuple[str, Route]] = list(_transformer_aliases(transformer, family))
    components = dit_components(transformer, text_encoders, family)
    kinds = dict(zip(map(id, text_encoders), _encoder_kinds(text_encoders)))
    for component, model in components.items():
        if component != UNET:
            pairs.extend(_text_encoder_aliases(model, component, kinds[id(model)], family))
    table: dict[str, Route] = {}
    ambiguous: set[str] = set()
    for alias, route in pairs:
        if table.setdefault(alias, route) != route:
            ambiguous.add(alias)
    for alias in ambiguous:
        del table[alias]
    return table


# --------------------------------------------------------------------------- split modules


@dataclass
class RowSlice(NetworkModule):
    """Some output rows of another module's update: a fused layer's share for one diffusers
    layer. Its ΔW is exactly those rows of the source's ΔW (for a LoRA: rows of ``up``, the
    whole ``down``), with the source's scale."""

    source: NetworkModule = field(default=None)  # type: ignore[assignment]
    rows: Rows = ()

    kind = "slice"

    def _index(self, device: torch.device | str | None) -> Tensor:
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.rows])

    @property
    def rank(self) -> int | None:
        return self.source.rank

    @property
    def scale(self) -> float:
        return self.source.scale

    @property
    def shape(self) -> tuple[int, ...] | None:
        shape = self.source.shape
        if shape is None:
            return None
        return (sum(b - a for a, b in self.rows), *shape[1:])

    @property
    def bias(self) -> Tensor | None:
        bias = self.source.bias
        return None if bias is None else torch.cat([bias[a:b] for a, b in self.rows])

    def low_rank(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor] | None:
        factors = self.source.low_rank(device)
        if factors is None:
            return None
        up, down = factors
        return up.index_select(0, self._index(up.device)), down

    def _dense(self, device: torch.device | str | None) -> Tensor:
        dense = self.source._dense(device)
        return dense.reshape(dense.shape[0], -1).index_select(0, self._index(dense.device))


def _inner(shape: Sequence[int]) -> int:
    """Elements per output row (a conv's kernel counts: flattened kernels still fit)."""
    return math.prod(int(size) for size in shape[1:])


# --------------------------------------------------------------------------- GGUF layers


class _LoraHook:
    """A forward hook adding the networks' update to a layer's output, for weights a merge
    cannot touch (GGUF): ``x·downᵀ·upᵀ`` over all low-rank updates concatenated (rank Σr), plus
    ``x·ΔWᵀ`` for dense ones and the bias change. Factors are float32 on the CPU and cast once
    per (device, dtype) the layer runs in."""

    def __init__(self, parts: Sequence[_Contribution], shape: tuple[int, ...]):
        ups: list[Tensor] = []
        downs: list[Tensor] = []
        dense: Tensor | None = None
        bias: Tensor | None = None
        for c in parts:
            if c.part == "bias":
                change = c.module.bias_delta("cpu") * c.multiplier
                bias = change if bias is None else bias + change
                continue
            factors = c.module.low_rank("cpu")
            if factors is not None:
                up, down = factors
                ups.append(up * (c.module.scale * c.multiplier))
                downs.append(down.reshape(down.shape[0], -1))
            else:
                change = c.module.delta(shape, "cpu").reshape(shape[0], -1) * c.multiplier
                dense = change if dense is None else dense + change
        self._cpu = (torch.cat(downs) if downs else None, torch.cat(ups, dim=1) if ups else None, dense, bias)
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[Tensor | None, ...]] = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
        key = (device, dtype)
        if key not in self._cast:
            self._cast[key] = tuple(None if t is None else t.to(device=device, dtype=dtype) for t in self._cpu)
        return self._cast[key]

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        down, up, dense, bias = self._on(output.device, output.dtype)
        x = args[0].to(output.dtype)
        if down is not None:
            output = output + F.linear(F.linear(x, down), up)
        if dense is not None:
            output = output + F.linear(x, dense)
        if bias is not None:
            output = output + bias
        return output


# --------------------------------------------------------------------------- the patcher


@dataclass
class _Saved:
    """How one tensor was patched and what undoes it.

    ``copy``: merged in place, ``tensor`` is a CPU copy of the original. ``stored``: the stored
    (fp8 / bf16 …) tensor, kept (on the CPU) while a compute-dtype merge takes its place.
    ``hook``: a GGUF layer computing the update on the fly through ``handle``.
    """

    mode: str
    tensor: Tensor | None = None
    handle: RemovableHandle | None = None


class DiTLoraPatcher(MergingPatcher):
    """Merges LoRA-family networks into a loaded FLUX.1 / SD3 model, reversibly."""

    def __init__(self, transformer: nn.Module, text_encoders: Sequence[Any], family: str,
                 compute_dtype: torch.dtype):
        super().__init__()
        self.family = family
        self.compute_dtype = compute_dtype
        self._transformer = transformer
        self._text_encoders = list(text_encoders)
        self._components = dit_components(transformer, text_encoders, family)
        self._routes: dict[str, Route] | None = None
        self._modules: dict[str, dict[str, nn.Module]] = {}
        self._saved: dict[Target, _Saved] = {}

    @property
    def backed_up(self) -> int:
        """How many tensors are patched (each with its way back)."""
        return len(self._saved)

    @torch.no_grad()
    def restore(self) -> None:
        """Every touched tensor (and hooked layer) back to its original state."""
        with self._lock:
            for target in list(self._saved):
                self._undo(target)
            self._current = ()
            self._last = PatchReport()

    # ---------------------------------------------------------------- planning

    def routes(self) -> dict[str, Route]:
        if self._routes is None:
            self._routes = build_routes(self._transformer, self._text_encoders, self.family)
        return self._routes

    def _module(self, target: Target) -> nn.Module | None:
        modules = self._modules.get(target.component)
        if modules is None:
            modules = self._modules[target.component] = dict(self._components[target.component].named_modules())
        return modules.get(target.module)

    def _param(self, target: Target) -> nn.Parameter | None:
        param = getattr(self._module(target), target.param, None)
        return param if isinstance(param, Tensor) else None

    def _shape(self, target: Target) -> tuple[int, ...] | None:
        """The logical shape (a GGUF weight's ``shape`` is its packed bytes')."""
        param = self._param(target)
        if param is None:
            return None
        return tuple(getattr(param, "quant_shape", None) or param.shape)

    def _misfit(self, module: NetworkModule, route: Route) -> str | None:
        """Why ``module`` cannot update the route's layers, or None."""
        shape = module.shape
        if shape is not None:
            split = route[0].rows is not None
            total = sum(p.row_count or 0 for p in route)
            for piece in route:
                target = self._shape(piece.target)
                if target is None:
                    return "no weight"
                if split and (shape[0] != total or _inner(shape) != _inner(target)):
                    return f"{list(shape)} vs {total} rows of {list(target[1:])}"
                if not split and not module.fits(target):
                    return f"{list(shape)} vs {list(target)}"
                if is_quantized(self._param(piece.target)) and not isinstance(self._module(piece.target), nn.Linear):
                    return "a quantized non-linear layer"
        if module.bias is not None:
            length = int(module.bias.shape[0])
            split = route[0].rows is not None
            if split and length != sum(p.row_count or 0 for p in route):
                return f"bias {[length]}"
            for piece in route:
                bias = self._param(piece.target.with_param("bias"))
                if bias is None or tuple(bias.shape) != ((piece.row_count if split else length),):
                    return f"bias {[length]}"
        return None

    def _family_note(self, name: str, family: str | None) -> str | None:
        if family and family != self.family:
            return (f"lora '{name}' is for {FAMILY_NAMES.get(family, family)}, the loaded model is "
                    f"{FAMILY_NAMES.get(self.family, self.family)}: skipped")
        return None

    def _plan(self, network: ActiveNetwork, sig: tuple, library: LoraLibrary,
              warnings: list[str]) -> list[tuple[Target, _Contribution]] | None:
        """Check a whole file against the model before anything is written; None: skip it."""
        name = network.info.name
        try:
            parsed = library.load(network.info)
        except LoraFileError as e:
            warnings.append(f"lora '{name}': {e}: skipped")
            return None
        if note := self._family_note(name, network.info.family):
            warnings.append(note)
            return None

        routes = self.routes()
        file_id = sig[:2]
        planned: list[tuple[Target, _Contribution]] = []
        unmatched: list[str] = []
        misfits: list[str] = []
        for module_name, module in parsed.modules.items():
            route = routes.get(module_name)
            if route is None:
                unmatched.append(module_name)
                continue
            if problem := self._misfit(module, route):
                misfits.append(f"{module_name}: {problem}")
                continue
            is_te = route[0].target.is_text_encoder
            multiplier = float(network.te_multiplier if is_te else network.unet_multiplier)
            if multiplier:
                planned.extend(self._contributions(module_name, module, route, multiplier, file_id))

        total = len(parsed.modules)
        matched = total - len(unmatched) - len(misfits)
        label = FAMILY_NAMES.get(self.family, self.family)
        if misfits:
            warnings.append(f"lora '{name}': {len(misfits)} of {total} modules do not fit the loaded model's "
                            f"layers (e.g. {misfits[0]}): skipped")
            return None
        if matched == 0:
            warnings.append(f"lora '{name}': none of its {total} modules match a layer of the loaded {label} "
                            f"model (e.g. {unmatched[0]}): skipped")
            return None
        if unmatched:
            warnings.append(f"lora '{name}': {len(unmatched)} of {total} modules match no layer of the "
                            f"loaded model and were ignored (e.g. {unmatched[0]})")
        if parsed.unsupported:
            example, reason = next(iter(parsed.unsupported.items()))
            warnings.append(f"lora '{name}': {len(parsed.unsupported)} modules ignored (e.g. {example}: {reason})")
        if parsed.unknown_keys:
            warnings.append(f"lora '{name}': {len(parsed.unknown_keys)} unrecognised keys ignored "
                            f"(e.g. {parsed.unknown_keys[0]})")
        warnings.extend(f"lora '{name}': {note}" for note in parsed.notes)
        return planned

    @staticmethod
    def _contributions(module_name: str, module: NetworkModule, route: Route, multiplier: float,
                       file_id: tuple) -> Iterable[tuple[Target, _Contribution]]:
        for piece in route:
            part = module if piece.rows is None else RowSlice(name=module.name, source=module, rows=piece.rows)
            key = (file_id, module_name, piece.rows, multiplier)
            if module.shape is not None:
                yield piece.target, _Contribution(part, multiplier, "weight", None, (*key, "weight"))
            if module.bias is not None:
                yield piece.target.with_param("bias"), _Contribution(part, multiplier, "bias", None, (*key, "bias"))

    # ---------------------------------------------------------------- writing

    @torch.no_grad()
    def _write(self, contributions: dict[Target, list[_Contribution]]) -> bool:
        """Bring every tensor to original + its contributions; returns whether a text-encoder
        tensor changed."""
        te_changed = False
        scratch: Tensor | None = None
        for target in [*self._saved, *(t for t in contributions if t not in self._saved)]:
            parts = contributions.get(target, [])
            if self._applied.get(target, ()) == tuple(c.signature for c in parts):
                continue  # already holds exactly this
            if parts:
                scratch = self._put(target, parts, scratch)
            else:
                self._undo(target)
            te_changed = te_changed or target.is_text_encoder
        return te_changed

    def _save(self, param: Tensor) -> _Saved:
        if is_quantized(param):
            return _Saved("hook")
        if param.is_floating_point() and param.dtype != self.compute_dtype:
            # The stored tensor itself when it is on the CPU already: no copy.
            return _Saved("stored", param.data.to("cpu"))
        return _Saved("copy", param.detach().to("cpu", copy=True))

    def _put(self, target: Target, parts: list[_Contribution], scratch: Tensor | None) -> Tensor | None:
        """Patch one tensor; returns the merge's scratch buffer for the next one."""
        param = self._param(target)
        saved = self._saved.get(target)
        if saved is None:
            saved = self._saved[target] = self._save(param)
        if saved.mode == "hook":
            if saved.handle is not None:
                saved.handle.remove()
            saved.handle = self._module(target).register_forward_hook(_LoraHook(parts, self._shape(target)))
        elif saved.mode == "stored":
            source = saved.tensor.to(device=param.device, dtype=self.compute_dtype)
            merged = torch.empty_like(source)
            scratch = _merge(merged, source, parts, scratch)
            param.data = merged
        else:
            scratch = _merge(param.data, saved.tensor, parts, scratch)
        self._applied[target] = tuple(c.signature for c in parts)
        return scratch

    def _undo(self, target: Target) -> None:
        saved = self._saved.pop(target)
        self._applied.pop(target, None)
        if saved.mode == "hook":
            if saved.handle is not None:
                saved.handle.remove()
            return
        param = self._param(target)
        if saved.mode == "stored":
            param.data = saved.tensor.to(param.device)
        else:
            param.data.copy_(saved.tensor)

