"""The shape of an A1111 hypernetwork's layers, shared by the file reader (studio.networks.hypernetworks,
imported at start-up) and the torch modules (studio.networks.hypernetwork_module, imported on first use)."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_LAYER_STRUCTURE = (1.0, 2.0, 1.0)
NO_ACTIVATION = ("linear", "")   # activation_func names that mean none


def check_layer_structure(layer_structure: Sequence[float]) -> None:
    if len(layer_structure) < 2:
        raise ValueError(f"layer_structure {list(layer_structure)} needs at least two entries")
    if layer_structure[0] != 1 or layer_structure[-1] != 1:
        # The residual x + linear(x) only works when the stack maps width -> width.
        raise ValueError(f"layer_structure {list(layer_structure)} must start and end with 1")
    if any(value <= 0 for value in layer_structure):
        raise ValueError(f"layer_structure {list(layer_structure)}: every number must be above 0")
