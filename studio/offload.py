"""``--medvram`` / ``--lowvram``: keep the model in CPU RAM and bring one piece at a time to the GPU.

A forward pre-hook on each *unit* moves that unit to the execution device just before it runs and
sends the previously resident unit back to storage, so at most one unit occupies GPU memory.

- medvram: the units are whole components: the UNet, the VAE, each text encoder.
- lowvram: the UNet and the VAE are split into their direct children (ModuleLists such as
  ``down_blocks`` are split into their blocks); text encoders stay whole.

Weights are moved with ``Module.to()``, which re-points each Parameter's ``.data`` rather than creating
new Parameters, so references held elsewhere (LoRA merging patches parameters in place) stay valid.
Nothing is ever put on the meta device: the real weights always live inside the modules.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

log = logging.getLogger(__name__)

MoveFn = Callable[["nn.Module", "torch.device"], None]  # strings: torch is imported when offloading starts


class OffloadMode(str, Enum):
    NONE = "none"
    MEDVRAM = "medvram"
    LOWVRAM = "lowvram"


def offload_mode(medvram: bool, lowvram: bool, medvram_sdxl: bool, is_sdxl: bool) -> OffloadMode:
    """The A1111 flag precedence: ``--lowvram`` wins; ``--medvram-sdxl`` counts only for SDXL."""
    if lowvram:
        return OffloadMode.LOWVRAM
    if medvram or (medvram_sdxl and is_sdxl):
        return OffloadMode.MEDVRAM
    return OffloadMode.NONE


@dataclass(frozen=True, eq=False)
class OffloadUnit:
    """``module`` is what moves; a call of any module in ``triggers`` brings it in first."""

    name: str
    module: nn.Module
    triggers: tuple[nn.Module, ...]


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _has_own_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


def _pieces(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The direct children of ``module`` that hold tensors, with ModuleList/ModuleDict opened up:
    a container without a forward is never called, so a hook on it would never fire."""
    from torch import nn
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}"
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _pieces(name, child)
        elif _has_tensors(child):
            # Parameter-free children (time_proj, conv_act) need nothing on the device; making them
            # units would only evict the previous unit for no reason.
            yield name, child


def _splittable(module: nn.Module) -> bool:
    """Splitting is only safe when no tensor sits directly on a container that is itself split."""
    from torch import nn
    if _has_own_tensors(module):
        return False
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and not _splittable(child):
            return False
    return True


def _whole(name: str, module: nn.Module) -> OffloadUnit:
    # The children are triggers too: the VAE is used through encode()/decode(), not forward(), so a
    # hook on the VAE itself would never fire; its children are always called as modules.
    triggers = (module, *(piece for _, piece in _pieces(name, module)))
    return OffloadUnit(name, module, triggers)


def _split(name: str, module: nn.Module) -> list[OffloadUnit]:
    if not _splittable(module):
        log.warning("%s holds tensors outside its children; offloading it whole", name)
        return [_whole(name, module)]
    # No hook on the component itself: its own forward needs no weights (inputs already arrive on
    # the execution device), and a hook there would pull every child in at once.
    return [OffloadUnit(piece_name, piece, (piece,)) for piece_name, piece in _pieces(name, module)]


def _te_names(count: int) -> list[str]:
    return ["text_encoder" if i == 0 else f"text_encoder_{i + 1}" for i in range(count)]


def offload_units(
    mode: OffloadMode,
    unet: nn.Module | None,
    vae: nn.Module | None,
    text_encoders: Iterable[nn.Module | None] = (),
) -> list[OffloadUnit]:
    """The units ``mode`` swaps: text encoders, then UNet, then VAE pieces in registration order.
    Pure: touches no weights.

    Every parameter and buffer of the given modules belongs to exactly one unit (tensor-free
    submodules belong to none). ``OffloadMode.NONE`` has no units.
    """
    mode = OffloadMode(mode)
    if mode is OffloadMode.NONE:
        return []
    tes = list(text_encoders)
    units = [_whole(name, te) for name, te in zip(_te_names(len(tes)), tes) if te is not None]
    for name, component in (("unet", unet), ("vae", vae)):
        if component is None:
            continue
        units.extend(_split(name, component) if mode is OffloadMode.LOWVRAM else [_whole(name, component)])
    return units


def move_module(module: nn.Module, device: torch.device) -> None:
    """The default move: ``Module.to`` swaps each Parameter's ``.data`` in place (ids stay stable)."""
    module.to(device)


class Offloader:
    """Installs and removes the swapping hooks for one model.

    ``move`` is the function that moves a module; it exists so tests can observe the swaps on a
    machine without a GPU (any callable ``(module, device) -> None``).
    """

    def __init__(
        self,
        execution_device: torch.device | str,
        storage_device: torch.device | str = "cpu",
        *,
        move: MoveFn | None = None,
    ) -> None:
        import torch
        self.execution_device = torch.device(execution_device)
        self.storage_device = torch.device(storage_device)
        self._move: MoveFn = move or move_module
        self._units: list[OffloadUnit] = []
        self._components: list[nn.Module] = []
        self._handles: list[RemovableHandle] = []
        self._resident: OffloadUnit | None = None
        # Hooks fire on whichever thread runs the model; a swap must not interleave with another.
        self._lock = threading.Lock()

    @property
    def resident(self) -> str | None:
        unit = self._resident
        return unit.name if unit is not None else None

    def units(self) -> list[str]:
        return [unit.name for unit in self._units]

    def attach(
        self,
        mode: OffloadMode,
        unet: nn.Module | None,
        vae: nn.Module | None,
        text_encoders: list[nn.Module | None],
    ) -> None:
        self.detach()
        self._components = [m for m in (*text_encoders, unet, vae) if m is not None]
        mode = OffloadMode(mode)
        if mode is OffloadMode.NONE or self.execution_device == self.storage_device:
            for component in self._components:
                self._move(component, self.execution_device)
            return
        self._units = offload_units(mode, unet, vae, text_encoders)
        for unit in self._units:
            self._move(unit.module, self.storage_device)
        for unit in self._units:
            hook = functools.partial(self._pre_hook, unit)
            for trigger in unit.triggers:
                # Prepended so that any other pre-hook (e.g. a LoRA one) already sees the weights
                # on the execution device.
                self._handles.append(trigger.register_forward_pre_hook(hook, prepend=True))
        log.info("%s offload: %d units swapped onto %s", mode.value, len(self._units), self.execution_device)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        with self._lock:
            previous, self._resident = self._resident, None
            if previous is not None:
                self._move(previous.module, self.storage_device)
            # Also covers mode NONE, where whole components were placed on the execution device.
            for component in self._components:
                self._move(component, self.storage_device)
        self._units = []
        self._components = []

    def _pre_hook(self, unit: OffloadUnit, module: nn.Module, args: tuple) -> None:
        self.bring(unit)

    def bring(self, unit: OffloadUnit) -> None:
        """Make ``unit`` the one resident on the execution device."""
        with self._lock:
            if self._resident is unit:
                return
            previous, self._resident = self._resident, None
            # Evict first, so the two units are never on the device together.
            if previous is not None:
                self._move(previous.module, self.storage_device)
            self._move(unit.module, self.execution_device)
            self._resident = unit
