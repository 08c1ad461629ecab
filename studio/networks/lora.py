"""LoRA files on disk and merging them into a loaded model, A1111-style.

- :class:`LoraLibrary` lists ``models/Lora`` (names are file stems, the alias is the metadata's
  ``ss_output_name``, hashes are A1111's "addnet" sha256 cached in ``cache.json`` under
  ``hashes-addnet``) and parses files on demand, keeping the last few parsed.
- :class:`NetworkPatcher` merges the wanted networks into the model's weights, like A1111's
  default (non-"functional") mode: every touched tensor is backed up once, on the CPU, and each
  set change starts again from the backups, so sampling with LoRAs costs exactly what it costs
  without them, and removing them restores the original bits.

Merging is done per weight tensor, in float32, and rounded once to the weight's dtype
(A1111: ``(w.float() + ΔW).to(w.dtype)``). Networks are applied in a canonical order (path,
then multipliers), so a prompt's order never changes the result. A tensor whose contributions
are the same as the ones already merged into it is left alone, which makes, e.g., changing only
the UNet multiplier cheap and leaves the text encoders (and the caller's prompt cache) valid.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from studio.networks.lora_files import LoraInfo, LoraLibrary, addnet_hash
from studio.networks.lora_formats import (
    FAMILY_NAMES,
    LoraFileError,
    NetworkModule,
)
from studio.networks.lora_keys import UNET, Target, build_alias_table, components_by_name

__all__ = [
    "ActiveNetwork",
    "LoraFileError",
    "LoraInfo",
    "LoraLibrary",
    "NetworkPatcher",
    "PatchReport",
    "addnet_hash",
]

log = logging.getLogger(__name__)

# On the CPU, rows of a weight are merged through one reused float32 buffer of this many elements
# (2 MiB, about a core's L2): materialising a float32 ΔW per tensor instead was several times
# slower, its fresh allocations page-faulting on every set change; smaller blocks cost more in
# per-call overhead and matmul efficiency.
_CPU_CHUNK_ELEMENTS = 1 << 19
_CHANNELS_LAST = (0, 2, 3, 1)


# --------------------------------------------------------------------------- patching


@dataclass(frozen=True)
class ActiveNetwork:
    """A network wanted for the next generation. ``dyn`` (A1111's dynamic-rank cut) is accepted
    for prompt compatibility and ignored: the whole rank is always merged."""

    info: LoraInfo = field(hash=False)  # LoraInfo is mutable, hence unhashable
    te_multiplier: float
    unet_multiplier: float
    dyn: int | None = None


@dataclass
class PatchReport:
    applied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    changed: bool = False      # False: the wanted set was already applied and nothing was done
    te_changed: bool = False   # text-encoder weights changed: prompt encodings are stale


@dataclass(frozen=True)
class _Contribution:
    module: NetworkModule
    multiplier: float
    part: str                  # "weight" | "bias"
    in_channels: int | None    # ΔW's input channels when they are fewer than the weight's (inpaint conv_in)
    signature: tuple


_Op = Callable[[Tensor, int, int], None]


def _rows(t: Tensor) -> tuple[Tensor, tuple[int, ...] | None] | None:
    """A ``[out, -1]`` view of ``t`` in memory order, and the permutation that order implies."""
    if t.dim() <= 1:
        return t.view(-1, 1), None
    if t.is_contiguous():
        return t.view(t.shape[0], -1), None
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(*_CHANNELS_LAST).view(t.shape[0], -1), _CHANNELS_LAST
    return None


def _layout(t: Tensor, shape: torch.Size, perm: tuple[int, ...] | None) -> Tensor:
    """Lay a ``[lead, in, kh, kw]`` factor out like the weight: zero-pad missing input channels
    (a 4-channel ΔW on a 9-channel inpainting conv_in, as A1111 does), follow its memory order."""
    if len(shape) == 4 and t.dim() == 4 and t.shape[1] < shape[1]:
        t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, shape[1] - t.shape[1]))
    if perm is not None and t.dim() == 4:
        t = t.permute(*perm)
    return t.reshape(t.shape[0], -1)


def _prepare(c: _Contribution, shape: torch.Size, perm: tuple[int, ...] | None, device: torch.device) -> _Op:
    if c.part == "bias":
        dense = c.module.bias_delta(device).mul_(c.multiplier).reshape(-1, 1)
        return lambda buf, r0, r1: buf.add_(dense[r0:r1])
    delta_shape = tuple(shape) if c.in_channels is None else (shape[0], c.in_channels, *shape[2:])
    factors = c.module.low_rank(device)
    if factors is not None:
        up, down = factors
        down = _layout(down.reshape(down.shape[0], *delta_shape[1:]), shape, perm).contiguous()
        alpha = c.module.scale * c.multiplier
        return lambda buf, r0, r1: buf.addmm_(up[r0:r1], down, alpha=alpha)
    dense = _layout(c.module.delta(delta_shape, device).mul_(c.multiplier), shape, perm)
    return lambda buf, r0, r1: buf.add_(dense[r0:r1])


def _low_rank_factors(c: _Contribution, shape: torch.Size, perm: tuple[int, ...] | None,
                      device: torch.device) -> tuple[Tensor, Tensor] | None:
    """(up·scale·multiplier, down laid out like the weight), or None for dense updates."""
    if c.part != "weight":
        return None
    factors = c.module.low_rank(device)
    if factors is None:
        return None
    up, down = factors
    delta_shape = tuple(shape) if c.in_channels is None else (shape[0], c.in_channels, *shape[2:])
    down = _layout(down.reshape(down.shape[0], *delta_shape[1:]), shape, perm)
    return up * (c.module.scale * c.multiplier), down


def _merge_half(rows: Tensor, src_rows: Tensor, parts: Sequence[_Contribution], shape: torch.Size,
                perm: tuple[int, ...] | None, device: torch.device) -> bool:
    """Half-precision weights with low-rank updates: one ``addmm`` over the concatenated factors
    (rank Σr) in the weight's dtype. The kernel accumulates in float32 and rounds once, so the
    result is the exact sum up to the factors' own rounding to bf16/fp16 (within one ulp of the
    float32 path, in ~0.1% of elements); it runs on AMX / tensor cores and takes about 60% of
    the float32 path's time on a full SD1.5 set change."""
    factors = [_low_rank_factors(c, shape, perm, device) for c in parts]
    if any(f is None for f in factors):
        return False
    ups = torch.cat([u for u, _ in factors], dim=1).to(rows.dtype)
    downs = torch.cat([d for _, d in factors], dim=0).to(rows.dtype)
    torch.addmm(src_rows, ups, downs, out=rows)
    return True


def _merge(weight: Tensor, original: Tensor, parts: Sequence[_Contribution], scratch: Tensor | None) -> Tensor | None:
    """weight = round(original + Σ multiplier·ΔW), in float32 row blocks. Returns the scratch
    buffer for reuse by the next tensor."""
    device = weight.device
    source = original.to(device) if original.device != device else original
    view = _rows(weight)
    if view is None:  # unusual strides: work on a contiguous float32 copy
        staged = source.to(torch.float32).contiguous()
        rows, perm = _rows(staged)
        for op in [_prepare(c, weight.shape, perm, device) for c in parts]:
            op(rows, 0, rows.shape[0])
        weight.copy_(staged)
        return scratch
    rows, perm = view
    src_view = _rows(source)
    src_rows = src_view[0] if src_view is not None and src_view[1] == perm else _layout(source, source.shape, perm)
    if weight.dtype in (torch.bfloat16, torch.float16) and _merge_half(rows, src_rows, parts, weight.shape, perm,
                                                                       device):
        return scratch
    ops = [_prepare(c, weight.shape, perm, device) for c in parts]
    out, cols = rows.shape
    step = max(1, _CPU_CHUNK_ELEMENTS // cols) if device.type == "cpu" else out
    need = min(step, out) * cols
    if scratch is None or scratch.device != device or scratch.numel() < need:
        scratch = torch.empty(need, dtype=torch.float32, device=device)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        buf = scratch[: (r1 - r0) * cols].view(r1 - r0, cols)
        buf.copy_(src_rows[r0:r1])
        for op in ops:
            op(buf, r0, r1)
        rows[r0:r1].copy_(buf)
    return scratch


def _base_family(family: str) -> str:
    return "sdxl" if family.startswith("sdxl") else family.split("-", 1)[0]


def _family_name(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


class MergingPatcher:
    """What every model's LoRA patcher shares: the applied set's signature, and ``apply``: plan each
    network's contributions (``_plan``), write them all from the originals (``_write``), and on any
    failure put everything back (``restore``). The SD UNet patcher and the DiT one
    (networks/dit_lora.py) differ in how they find and change their weights."""

    def __init__(self) -> None:
        self._applied: dict[Target, tuple] = {}
        self._current: tuple = ()
        self._last = PatchReport()
        self._lock = threading.RLock()

    @property
    def current(self) -> tuple:
        """The signature of the applied set: ``(path, mtime_ns, te, unet)`` per network (the
        conditioner keys its prompt cache on it)."""
        return self._current

    def _plan(self, network: ActiveNetwork, sig: tuple, library: LoraLibrary,
              warnings: list[str]) -> list[tuple[Target, _Contribution]] | None:
        raise NotImplementedError

    def _write(self, contributions: dict[Target, list[_Contribution]]) -> bool:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def apply(self, active: list[ActiveNetwork], library: LoraLibrary) -> PatchReport:
        with self._lock:
            wanted = self._canonical(active)
            signature = tuple(sig for sig, _ in wanted)
            if signature == self._current:
                return PatchReport(list(self._last.applied), list(self._last.warnings), False, False)
            report = PatchReport(changed=True)
            contributions: dict[Target, list[_Contribution]] = {}
            for sig, network in wanted:
                planned = self._plan(network, sig, library, report.warnings)
                if planned is None:
                    continue
                report.applied.append(network.info.name)
                for target, contribution in planned:
                    contributions.setdefault(target, []).append(contribution)
            try:
                report.te_changed = self._write(contributions)
            except BaseException:
                self.restore()
                raise
            self._current = signature
            self._last = report
            for warning in report.warnings:
                log.warning("%s", warning)
            return PatchReport(list(report.applied), list(report.warnings), True, report.te_changed)

    @staticmethod
    def _canonical(active: Iterable[ActiveNetwork]) -> list[tuple[tuple, ActiveNetwork]]:
        wanted = []
        for network in active:
            te, unet = float(network.te_multiplier), float(network.unet_multiplier)
            if te == 0 and unet == 0:
                continue  # contributes nothing: leaving it out keeps the weights exact
            try:
                mtime = network.info.path.stat().st_mtime_ns
            except OSError:
                mtime = -1
            wanted.append(((str(network.info.path), mtime, te, unet), network))
        wanted.sort(key=lambda item: item[0])
        return wanted


class NetworkPatcher(MergingPatcher):
    """Merges LoRA-family networks into one loaded SD model's weights, reversibly."""

    def __init__(self, unet: nn.Module, text_encoders: list, family: str, is_sdxl: bool):
        super().__init__()
        self.family = family
        self.is_sdxl = is_sdxl
        self._components = components_by_name(unet, text_encoders, family)
        self._text_encoders = list(text_encoders)
        self._aliases: dict[str, Target] | None = None
        self._modules: dict[str, dict[str, nn.Module]] = {}
        self._backups: dict[Target, Tensor] = {}

    @property
    def backed_up(self) -> int:
        """How many tensors have a backup (the memory cost of the applied networks)."""
        return len(self._backups)

    @torch.no_grad()
    def restore(self) -> None:
        """Every touched tensor back to its original bits; backups are dropped."""
        with self._lock:
            for target, backup in self._backups.items():
                self._tensor(target).copy_(backup)
            self._backups.clear()
            self._applied.clear()
            self._current = ()
            self._last = PatchReport()

    # ---------------------------------------------------------------- planning

    def _alias_table(self) -> dict[str, Target]:
        if self._aliases is None:
            self._aliases = build_alias_table(self._components[UNET], self._text_encoders, self.family)
        return self._aliases

    def _tensor(self, target: Target) -> Tensor | None:
        modules = self._modules.get(target.component)
        if modules is None:
            modules = self._modules[target.component] = dict(self._components[target.component].named_modules())
        param = getattr(modules.get(target.module), target.param, None)
        return param.data if isinstance(param, Tensor) else None

    @staticmethod
    def _input_channels(module: NetworkModule, target: Target, shape: torch.Size) -> int | None | bool:
        """None when ΔW fits as is, 4 for a 4-channel ΔW on a 9-channel inpainting conv_in,
        False when it does not fit."""
        if module.fits(tuple(shape)):
            return None
        natural = module.shape
        if (target.component == UNET and target.module == "conv_in" and len(shape) == 4 and shape[1] == 9
                and natural is not None and natural[0] == shape[0]
                and torch.Size(natural).numel() == shape[0] * 4 * shape[2] * shape[3]):
            return 4
        return False

    def _plan(self, network: ActiveNetwork, sig: tuple, library: LoraLibrary,
              warnings: list[str]) -> list[tuple[Target, _Contribution]] | None:
        """Check a whole file against the model before anything is written; None: skip it."""
        name = network.info.name
        try:
            parsed = library.load(network.info)
        except LoraFileError as e:
            warnings.append(f"lora '{name}': {e}: skipped")
            return None
        model_family = _base_family(self.family)
        if network.info.family and network.info.family != model_family:
            warnings.append(f"lora '{name}' is for {_family_name(network.info.family)}, "
                            f"the loaded model is {_family_name(model_family)}: skipped")
            return None

        aliases = self._alias_table()
        # A tensor's contributions are identified by file and its own multiplier only, so that
        # changing the UNet multiplier leaves text-encoder tensors (and prompt caches) alone.
        file_id = sig[:2]
        planned: list[tuple[Target, _Contribution]] = []
        unmatched: list[str] = []
        misfits: list[str] = []
        matched = 0
        for module_name, module in parsed.modules.items():
            target = aliases.get(module_name)
            if target is None:
                unmatched.append(module_name)
                continue
            multiplier = network.te_multiplier if target.is_text_encoder else network.unet_multiplier
            multiplier = float(multiplier)
            if module.shape is not None:
                weight = self._tensor(target)
                channels = self._input_channels(module, target, weight.shape)
                if channels is False:
                    misfits.append(f"{module_name} {list(module.shape)} vs {list(weight.shape)}")
                    continue
                if multiplier:
                    planned.append((target, _Contribution(module, multiplier, "weight", channels,
                                                           (file_id, module_name, "weight", multiplier))))
            if module.bias is not None:
                bias_target = target.with_param("bias")
                bias = self._tensor(bias_target)
                if bias is None or tuple(bias.shape) != tuple(module.bias.shape):
                    misfits.append(f"{module_name} bias {list(module.bias.shape)}")
                    continue
                if multiplier:
                    planned.append((bias_target, _Contribution(module, multiplier, "bias", None,
                                                               (file_id, module_name, "bias", multiplier))))
            matched += 1

        total = len(parsed.modules)
        if misfits:
            warnings.append(f"lora '{name}': {len(misfits)} of {total} modules do not fit the loaded model's "
                            f"layers (e.g. {misfits[0]}): skipped")
            return None
        if matched == 0:
            warnings.append(f"lora '{name}': none of its {total} modules match a layer of the loaded "
                            f"{_family_name(model_family)} model (e.g. {unmatched[0]}): skipped")
            return None
        if unmatched:
            warnings.append(f"lora '{name}': {len(unmatched)} of {total} modules match no layer of the "
                            f"loaded model and were ignored (e.g. {unmatched[0]})")
        if parsed.unsupported:
            example, reason = next(iter(parsed.unsupported.items()))
            warnings.append(f"lora '{name}': {len(parsed.unsupported)} modules ignored "
                            f"(e.g. {example}: {reason})")
        if parsed.unknown_keys:
            warnings.append(f"lora '{name}': {len(parsed.unknown_keys)} unrecognised keys ignored "
                            f"(e.g. {parsed.unknown_keys[0]})")
        warnings.extend(f"lora '{name}': {note}" for note in parsed.notes)
        return planned

    # ---------------------------------------------------------------- writing

    @torch.no_grad()
    def _write(self, contributions: dict[Target, list[_Contribution]]) -> bool:
        """Bring every tensor to original + its contributions; returns whether a text-encoder
        tensor was written."""
        te_changed = False
        scratch: Tensor | None = None
        for target in [*self._backups, *(t for t in contributions if t not in self._backups)]:
            parts = contributions.get(target, [])
            signature = tuple(c.signature for c in parts)
            if self._applied.get(target, ()) == signature:
                continue  # already holds exactly this
            weight = self._tensor(target)
            if not parts:
                weight.copy_(self._backups[target])
                del self._applied[target]
            else:
                original = self._backups.get(target)
                if original is None:
                    original = self._backups[target] = weight.detach().to("cpu", copy=True)
                scratch = _merge(weight, original, parts, scratch)
                self._applied[target] = signature
            te_changed = te_changed or target.is_text_encoder
        return te_changed
