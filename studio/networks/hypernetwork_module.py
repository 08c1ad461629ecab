"""The torch side of a hypernetwork: :class:`HypernetworkModule` and its activations. Apart from the
reader and the library (studio.networks.hypernetworks) so that listing hypernetworks needs no torch."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from torch import nn

from studio.networks.hypernetwork_structure import (
    DEFAULT_LAYER_STRUCTURE,
    NO_ACTIVATION,
    check_layer_structure,
)

# Names A1111 lists explicitly; any other torch.nn activation is found by its lowercased class name.
# "swish" really is Hardswish in A1111, and files trained there depend on that.
_NAMED_ACTIVATIONS: Mapping[str, type[nn.Module]] = MappingProxyType(
    {
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
)

def activation_class(name: str) -> type[nn.Module]:
    """The ``torch.nn`` class for an ``activation_func`` name; ``ValueError`` if there is none."""
    key = name.lower()
    if key in _NAMED_ACTIVATIONS:
        return _NAMED_ACTIVATIONS[key]
    for cls_name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass):
        if cls.__module__ == nn.modules.activation.__name__ and cls_name.lower() == key:
            return cls
    raise ValueError(f"unsupported activation function {name!r}")


class HypernetworkModule(nn.Module):
    """One of the (k, v) transforms of a width: ``forward(x) = x + linear(x) * multiplier``.

    ``linear`` holds, for each step i of ``layer_structure``: a Linear, then the activation (left
    out after the last Linear unless ``activate_output``), then LayerNorm if enabled, then Dropout
    if ``dropout_structure[i + 1] > 0``. Dropout never fires because the module stays in eval mode.
    """

    def __init__(
        self,
        dim: int,
        layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
        activation_func: str | None = None,
        add_layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        check_layer_structure(layer_structure)
        if dropout_structure is not None and len(dropout_structure) < len(layer_structure):
            raise ValueError(
                f"dropout_structure {list(dropout_structure)} is shorter than layer_structure "
                f"{list(layer_structure)}"
            )
        activation = None
        if activation_func is not None and activation_func.lower() not in NO_ACTIVATION:
            activation = activation_class(activation_func)
        last = len(layer_structure) - 2
        entries: list[nn.Module] = []
        for i in range(len(layer_structure) - 1):
            width_in = int(dim * layer_structure[i])
            width_out = int(dim * layer_structure[i + 1])
            entries.append(nn.Linear(width_in, width_out))
            if activation is not None and (i < last or activate_output):
                entries.append(instantiate_activation(activation, activation_func or ""))
            if add_layer_norm:
                entries.append(nn.LayerNorm(width_out))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                p = float(dropout_structure[i + 1])
                if not 0 < p < 1:
                    raise ValueError(f"dropout probability {p} is not between 0 and 1")
                entries.append(nn.Dropout(p=p))
        self.linear = nn.Sequential(*entries)
        self.eval()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * multiplier


def instantiate_activation(cls: type[nn.Module], name: str) -> nn.Module:
    try:
        return cls()
    except TypeError as exc:  # e.g. "threshold" or "multiheadattention" need arguments
        raise ValueError(f"activation function {name!r} cannot be built without arguments") from exc
