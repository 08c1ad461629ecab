"""A1111 hypernetworks: reading ``.pt`` files, a library of them, and applying them to a UNet.

File side (A1111's ``modules/hypernetworks/hypernetwork.py``, see formats.md 3.2): a ``torch.save``
dict whose integer keys are context widths mapping to ``(k_state_dict, v_state_dict)``, plus
metadata (``layer_structure``, ``activation_func``, ``is_layer_norm``, ``activate_output``,
``use_dropout``, ``dropout_structure``, ``last_layer_dropout``, ...). Each state dict belongs to a
:class:`HypernetworkModule`, whose ``linear`` Sequential is built entry for entry like A1111's so
that the ``linear.{idx}`` keys line up.

Model side: in every attention forward A1111 feeds ``hk(context)`` to ``to_k`` and ``hv(context)``
to ``to_v``, choosing ``(hk, hv)`` by the context's last dimension. We get the same effect with
forward pre-hooks on each diffusers attention's ``to_k`` / ``to_v``, which keeps working whatever
attention processor (SDPA, xformers, sliced) is installed and whatever wraps the projection (PEFT).

Files are only opened with ``torch.load(weights_only=True)``: a genuine hypernetwork holds nothing
but dicts, tuples, lists, tensors and plain scalars, so anything else is refused, never executed.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.models.catalog import sha256_file
from studio.networks.files import (
    load_weights_only,
    optional_int,
    optional_str,
    pickle_failure_message,
    scan_files,
)
from studio.networks.hypernetwork_structure import DEFAULT_LAYER_STRUCTURE, check_layer_structure
from studio.networks.hypernetwork_structure import NO_ACTIVATION as _NO_ACTIVATION

if TYPE_CHECKING:
    import torch
    from torch import nn

    from studio.networks.hypernetwork_module import HypernetworkModule

HYPERNETWORK_SUFFIX = ".pt"
SHORTHASH_LENGTH = 10  # A1111's Hypernetwork.shorthash
DEFAULT_DROPOUT = 0.3  # what A1111 trains with when only ``use_dropout`` is stored



class HypernetworkFileError(ValueError):
    """A file that is not a usable hypernetwork (the message names the file)."""


# ---------------------------------------------------------------------------------------------
# The module


def fix_old_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` with the pre-Sequential ``linear1`` / ``linear2`` keys renamed."""
    renames = {"linear1": "linear.0", "linear2": "linear.1"}
    fixed: dict[str, Any] = {}
    for key, value in state_dict.items():
        head, dot, tail = str(key).partition(".")
        fixed[renames[head] + dot + tail if dot and head in renames else key] = value
    return fixed


def parse_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """The per-layer dropout A1111 derives for files that store only ``use_dropout``.

    No dropout after the first entry or the output; 0.3 in between, except after the
    second-to-last Linear unless ``last_layer_dropout``. So ``[1, 2, 1]`` gets none by default.
    """
    count = len(layer_structure)
    if not use_dropout:
        return [0.0] * count
    inner = [DEFAULT_DROPOUT] * max(count - 3, 0)
    return [0.0, *inner, DEFAULT_DROPOUT if last_layer_dropout else 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# A loaded file


@dataclass(eq=False)
class HypernetworkInfo:
    """A listed file: ``name`` is the stem used in ``<hypernet:name:multiplier>``."""

    name: str
    path: Path
    _hash: tuple[tuple[int, int], str] | None = field(default=None, init=False, repr=False)

    @property
    def shorthash(self) -> str:
        """sha256 of the whole file, first 10 hex characters (read on first use, and again
        only after the file changed)."""
        stamp = _stamp(self.path)
        if self._hash is None or self._hash[0] != stamp:
            self._hash = (stamp, sha256_file(self.path)[:SHORTHASH_LENGTH])
        return self._hash[1]

    def api_dict(self) -> dict[str, str]:
        """An item of A1111's ``GET /sdapi/v1/hypernetworks``."""
        return {"name": self.name, "path": str(self.path)}


@dataclass(eq=False)
class Hypernetwork:
    """A loaded hypernetwork: CPU float32 ``(k, v)`` modules per context width, and metadata."""

    name: str
    path: Path
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]
    layer_structure: list[float]
    activation_func: str | None
    is_layer_norm: bool
    activate_output: bool
    use_dropout: bool
    dropout_structure: list[float]
    last_layer_dropout: bool
    weight_initialization: str
    internal_name: str | None = None  # the "name" stored in the file; prompts use the stem
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    info: HypernetworkInfo | None = field(default=None, repr=False)
    _placed: dict[tuple[str, torch.dtype], dict[int, tuple[HypernetworkModule, HypernetworkModule]]] = field(
        default_factory=dict, init=False, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def widths(self) -> list[int]:
        return sorted(self.layers)

    @property
    def shorthash(self) -> str:
        if self.info is None:
            self.info = HypernetworkInfo(self.name, self.path)
        return self.info.shorthash

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.internal_name,
            "step": self.step,
            "layer_structure": list(self.layer_structure),
            "activation_func": self.activation_func,
            "is_layer_norm": self.is_layer_norm,
            "activate_output": self.activate_output,
            "use_dropout": self.use_dropout,
            "dropout_structure": list(self.dropout_structure),
            "last_layer_dropout": self.last_layer_dropout,
            "weight_initialization": self.weight_initialization,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "optional_info": self.optional_info,
        }

    def modules_for(
        self, device: torch.device | str, dtype: torch.dtype
    ) -> dict[int, tuple[HypernetworkModule, HypernetworkModule]]:
        """The modules on ``device`` in ``dtype``; copies are made once and kept for reuse."""
        import torch
        device = torch.device(device)
        if device.type == "cpu" and dtype == torch.float32:
            return self.layers
        key = (str(device), dtype)
        with self._lock:
            placed = self._placed.get(key)
            if placed is None:
                placed = {
                    width: tuple(copy.deepcopy(m).to(device=device, dtype=dtype) for m in pair)  # type: ignore[misc]
                    for width, pair in self.layers.items()
                }
                self._placed[key] = placed
            return placed

    def release_placed(self) -> None:
        """Forget the device copies (e.g. when the model moves or memory is short)."""
        with self._lock:
            self._placed.clear()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size)


def read_hypernetwork(path: Path, name: str | None = None) -> Hypernetwork:
    """Read a hypernetwork file; raise :class:`HypernetworkFileError` for anything unusable."""
    path = Path(path)
    data = _load_pickle(path)
    if not isinstance(data, Mapping):
        raise HypernetworkFileError(f"{path}: holds a {type(data).__name__}, not a hypernetwork")
    pairs = {key: value for key, value in data.items() if type(key) is int}  # bools are ints, not widths
    if not pairs:
        raise HypernetworkFileError(f"{path}: no layers (no integer width keys); not a hypernetwork")

    layer_structure = _layer_structure(data.get("layer_structure"), path)
    activation_func = _activation_name(data.get("activation_func"), path)
    is_layer_norm = bool(data.get("is_layer_norm", False))
    activate_output = bool(data.get("activate_output", True))
    last_layer_dropout = bool(data.get("last_layer_dropout", False))
    stored_dropout = data.get("dropout_structure")
    if stored_dropout is not None:
        dropout_structure = _number_list(stored_dropout, path, "dropout_structure")
        use_dropout = any(dropout_structure) or bool(data.get("use_dropout", False))
    else:
        use_dropout = bool(data.get("use_dropout", False))
        dropout_structure = parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout)

    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
    for width, pair in sorted(pairs.items()):
        if width <= 0:
            raise HypernetworkFileError(f"{path}: invalid width {width}")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise HypernetworkFileError(f"{path}: width {width} must hold a (k, v) pair of state dicts")
        layers[width] = tuple(  # type: ignore[assignment]
            _build_module(
                path,
                width,
                label,
                state,
                layer_structure,
                activation_func,
                is_layer_norm,
                activate_output,
                dropout_structure,
            )
            for label, state in zip("kv", pair)
        )

    return Hypernetwork(
        name=path.stem if name is None else name,
        path=path,
        layers=layers,
        layer_structure=layer_structure,
        activation_func=activation_func,
        is_layer_norm=is_layer_norm,
        activate_output=activate_output,
        use_dropout=use_dropout,
        dropout_structure=dropout_structure,
        last_layer_dropout=last_layer_dropout,
        weight_initialization=optional_str(data.get("weight_initialization")) or "Normal",
        internal_name=optional_str(data.get("name")),
        step=optional_int(data.get("step")) or 0,
        sd_checkpoint=optional_str(data.get("sd_checkpoint")),
        sd_checkpoint_name=optional_str(data.get("sd_checkpoint_name")),
        optional_info=optional_str(data.get("optional_info")),
    )


def _build_module(
    path: Path,
    width: int,
    label: str,
    state: Any,
    layer_structure: list[float],
    activation_func: str | None,
    is_layer_norm: bool,
    activate_output: bool,
    dropout_structure: list[float],
) -> HypernetworkModule:
    import torch

    from studio.networks.hypernetwork_module import HypernetworkModule
    if not isinstance(state, Mapping):
        raise HypernetworkFileError(
            f"{path}: width {width} {label} is a {type(state).__name__}, not a state dict"
        )
    try:
        module = HypernetworkModule(
            width, layer_structure, activation_func, is_layer_norm, activate_output, dropout_structure
        )
    except ValueError as exc:
        raise HypernetworkFileError(f"{path}: {exc}") from exc
    fixed = fix_old_state_dict(state)
    bad = [key for key, value in fixed.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise HypernetworkFileError(f"{path}: width {width} {label}: {bad[0]!r} is not a tensor")
    try:
        module.load_state_dict(fixed, strict=True)
    except RuntimeError as exc:
        # load_state_dict lists every problem; the first lines say enough (missing / unexpected / size).
        detail = " ".join(str(exc).split())[:400]
        raise HypernetworkFileError(
            f"{path}: width {width} {label} weights do not fit layer_structure {layer_structure}, "
            f"activation {activation_func!r}, layer norm {is_layer_norm}: {detail}"
        ) from exc
    return module


def _load_pickle(path: Path) -> Any:
    try:
        return load_weights_only(path)
    except FileNotFoundError as exc:
        raise HypernetworkFileError(f"{path}: file not found") from exc
    except Exception as exc:
        raise HypernetworkFileError(pickle_failure_message(path, exc, "a hypernetwork")) from exc


def _layer_structure(value: Any, path: Path) -> list[float]:
    if value is None:
        return list(DEFAULT_LAYER_STRUCTURE)
    structure = _number_list(value, path, "layer_structure")
    try:
        check_layer_structure(structure)
    except ValueError as exc:
        raise HypernetworkFileError(f"{path}: {exc}") from exc
    return structure


def _activation_name(value: Any, path: Path) -> str | None:
    from studio.networks.hypernetwork_module import activation_class, instantiate_activation
    if value is None:
        return None
    if not isinstance(value, str):
        raise HypernetworkFileError(f"{path}: activation_func is a {type(value).__name__}, not a name")
    if value.lower() not in _NO_ACTIVATION:
        try:
            instantiate_activation(activation_class(value), value)
        except ValueError as exc:
            raise HypernetworkFileError(f"{path}: {exc}") from exc
    return value


def _number_list(value: Any, path: Path, label: str) -> list[float]:
    import torch
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(item, (int, float)) and not isinstance(item, bool) for item in value
    ):
        raise HypernetworkFileError(f"{path}: {label} must be a list of numbers, got {value!r}")
    return [float(item) for item in value]


# ---------------------------------------------------------------------------------------------
# The library


@dataclass
class _Loaded:
    stamp: tuple[int, int]  # (mtime_ns, size): re-read only when either changes
    hypernetwork: Hypernetwork


class HypernetworkLibrary:
    """All ``.pt`` files under some folders (recursively), listed by stem like A1111.

    :meth:`refresh` only lists files, so an unreadable one shows up and fails on :meth:`load`.
    When two files share a stem, the first in folder order wins (the prompt can name only one).
    Loaded hypernetworks are kept for the most recent ``max_cached`` files.
    """

    def __init__(self, folders: list[Path], max_cached: int = 4) -> None:
        self.folders = [Path(folder) for folder in folders]
        self.max_cached = max(1, max_cached)
        self._items: dict[str, HypernetworkInfo] = {}
        self._loaded: OrderedDict[Path, _Loaded] = OrderedDict()
        self._lock = threading.Lock()  # the API, the UI and a generation may use it at once

    def refresh(self) -> None:
        """Re-scan the folders. Never raises."""
        found: dict[str, HypernetworkInfo] = {}
        try:
            paths = list(self._scan())
        except OSError:  # a folder vanishing mid-scan must not break the UI or API
            paths = []
        with self._lock:
            old = {info.path: info for info in self._items.values()}
            for path, stamp in paths:
                name = path.stem
                if name in found or name == "None":  # A1111 reserves "None" for "no hypernetwork"
                    continue
                # Reusing the object keeps its hash, which re-checks the file's stamp itself.
                info = old.get(path)
                found[name] = info if info is not None and info.name == name else HypernetworkInfo(name, path)
            listed = {info.path for info in found.values()}
            for path in [p for p in self._loaded if p not in listed]:
                del self._loaded[path]
            self._items = found

    def items(self) -> list[HypernetworkInfo]:
        with self._lock:
            return list(self._items.values())

    def find(self, name: str) -> HypernetworkInfo | None:
        """The file named ``name``; if no stem matches exactly, a unique case-insensitive match."""
        with self._lock:
            info = self._items.get(name)
            if info is not None:
                return info
            folded = [item for key, item in self._items.items() if key.lower() == name.lower()]
            return folded[0] if len(folded) == 1 else None

    def load(self, info: HypernetworkInfo) -> Hypernetwork:
        """The hypernetwork of ``info``, read again only if the file changed since the last load."""
        try:
            stamp = _stamp(info.path)
        except OSError as exc:
            raise HypernetworkFileError(f"{info.path}: cannot read ({exc.strerror or exc})") from exc
        with self._lock:
            entry = self._loaded.get(info.path)
            if entry is not None and entry.stamp == stamp:
                self._loaded.move_to_end(info.path)
                return entry.hypernetwork
        # Read outside the lock: a large file must not stall listing.
        hypernetwork = read_hypernetwork(info.path, name=info.name)
        hypernetwork.info = info
        with self._lock:
            self._loaded[info.path] = _Loaded(stamp, hypernetwork)
            self._loaded.move_to_end(info.path)
            while len(self._loaded) > self.max_cached:
                self._loaded.popitem(last=False)
        return hypernetwork

    def api_dict(self) -> list[dict[str, str]]:
        """A1111's ``GET /sdapi/v1/hypernetworks`` body."""
        return [info.api_dict() for info in self.items()]

    def _scan(self) -> Iterator[tuple[Path, tuple[int, int]]]:
        # One real folder is walked only once, even when several configured folders reach it.
        seen_dirs: set[str] = set()
        for folder in self.folders:
            found = scan_files([folder], (HYPERNETWORK_SUFFIX,), seen_dirs=seen_dirs)
            # A1111 orders each folder's files by the lowercased path (not by walk order).
            yield from sorted(found, key=lambda item: str(item[0]).lower())


# ---------------------------------------------------------------------------------------------
# Applying to a UNet


def _attention_classes() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention

    classes: list[type] = [Attention]
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers only has the one class
        pass
    else:
        classes.append(AttentionModuleMixin)
    return tuple(classes)


_Step = tuple[Mapping[int, "HypernetworkModule"], float]  # a string: the class comes with torch


class _ChainHook:
    """Pre-hook for one projection: runs its input through each hypernetwork's module in order."""

    def __init__(self, steps: list[_Step]) -> None:
        self.steps = steps

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        import torch
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        out = x
        for by_width, multiplier in self.steps:
            hyper = by_width.get(out.shape[-1])
            if hyper is None:
                continue
            weight_dtype = hyper.linear[0].weight.dtype
            # Autocast or an upcast attention can hand us another dtype than the module's.
            out = hyper(out.to(weight_dtype), multiplier).to(x.dtype)
        if out is x:
            return None
        return (out, *args[1:])


class HypernetworkHooks:
    """Hooks installed by :func:`apply_hypernetworks`; :meth:`remove` (or leaving the ``with``)
    takes every one of them off again."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def hook_count(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> HypernetworkHooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def apply_hypernetworks(
    unet: nn.Module,
    active: Sequence[tuple[Hypernetwork, float]],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> HypernetworkHooks:
    """Make every attention in ``unet`` see ``hk(context)`` / ``hv(context)`` for keys / values.

    ``active`` is applied in order (each transforms the previous one's output, as A1111 chains
    them). Entries with multiplier exactly 0 are skipped, so with nothing left no hook is
    installed and the UNet computes bit-identically. ``dtype`` / ``device`` default to the
    UNet's. Any module with diffusers attentions (a ControlNet, too) can be passed as ``unet``.
    """
    import torch
    from torch import nn
    hooks = HypernetworkHooks()
    used = [(hn, float(multiplier)) for hn, multiplier in active if float(multiplier) != 0.0 and hn.layers]
    if not used:
        return hooks
    if dtype is None or device is None:
        first = next(unet.parameters(), None)
        device = device if device is not None else (first.device if first is not None else "cpu")
        dtype = dtype if dtype is not None else (first.dtype if first is not None else torch.float32)
    placed = [(hn.modules_for(device, dtype), multiplier) for hn, multiplier in used]
    attention_classes = _attention_classes()
    try:
        for attention in unet.modules():
            if not isinstance(attention, attention_classes):
                continue
            for index, projection_name in enumerate(("to_k", "to_v")):
                projection = getattr(attention, projection_name, None)
                if not isinstance(projection, nn.Module):
                    continue
                steps = _steps_for(projection, placed, index)
                if not steps:
                    continue
                if getattr(attention, "fused_projections", False):
                    raise RuntimeError(
                        "hypernetworks need separate to_k / to_v projections; unfuse the QKV "
                        "projections (unfuse_qkv_projections) before applying them"
                    )
                hooks._handles.append(projection.register_forward_pre_hook(_ChainHook(steps)))
    except BaseException:
        hooks.remove()
        raise
    return hooks


def _steps_for(
    projection: nn.Module,
    placed: list[tuple[dict[int, tuple[HypernetworkModule, HypernetworkModule]], float]],
    index: int,
) -> list[_Step]:
    # Linear (and PEFT's wrapper) know their input width, so attentions that no hypernetwork
    # covers get no hook at all; without it the width is looked up per call.
    width = getattr(projection, "in_features", None)
    steps: list[_Step] = []
    for by_width, multiplier in placed:
        if isinstance(width, int) and width not in by_width:
            continue
        steps.append(({w: pair[index] for w, pair in by_width.items()}, multiplier))
    return steps
