"""Writer for tiny A1111 hypernetwork files (formats.md 3.2), with weights large enough to matter.

The ``linear.{idx}`` key layout is worked out here on its own rather than by building the
studio's module, so that a test reading these files really checks the reader's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from studio.testing.factory import UNET_CHANNELS, unet_config

# Activations without parameters: they only shift the indices of the entries after them.
_PARAMETER_FREE = ("relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "gelu", "silu", "hardswish")


def tiny_widths(family: str) -> tuple[int, ...]:
    """Context widths a tiny ``family`` UNet's attentions see: its block widths and its text width."""
    text_width = int(unet_config(family)["cross_attention_dim"])
    return tuple(sorted({*UNET_CHANNELS, text_width}))


def dropout_structure_for(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """What A1111 stores as ``dropout_structure`` for these settings."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    middle = [0.3] * (len(layer_structure) - 3)
    return [0.0, *middle, 0.3 if last_layer_dropout else 0.0, 0.0]


def expected_keys(
    layer_structure: Sequence[float] = (1, 2, 1),
    activation: str | None = "relu",
    layer_norm: bool = False,
    dropout_structure: Sequence[float] | None = None,
    activate_output: bool = True,
) -> list[str]:
    """The state-dict keys of one A1111 HypernetworkModule with these settings."""
    keys: list[str] = []
    index = 0
    steps = len(layer_structure) - 1
    for i in range(steps):
        keys += [f"linear.{index}.weight", f"linear.{index}.bias"]
        index += 1
        if activation not in (None, "linear") and (i < steps - 1 or activate_output):
            index += 1
        if layer_norm:
            keys += [f"linear.{index}.weight", f"linear.{index}.bias"]
            index += 1
        if dropout_structure is not None and dropout_structure[i + 1] > 0:
            index += 1
    return keys


def write_hypernetwork(
    path: Path,
    widths: Sequence[int] = (32, 64),
    layer_structure: Sequence[float] = (1, 2, 1),
    activation: str | None = "relu",
    layer_norm: bool = False,
    dropout: bool = False,
    seed: int = 0,
    old_style: bool = False,
    *,
    activate_output: bool = True,
    last_layer_dropout: bool = False,
    name: str | None = None,
    step: int = 1000,
    sd_checkpoint: str | None = "abcdef1234",
    sd_checkpoint_name: str | None = "tiny-sd1",
    optional_info: str | None = None,
    scale: float = 0.5,
) -> Path:
    """Write an A1111 hypernetwork ``.pt`` and return its path.

    ``old_style`` writes the early layout: ``linear1`` / ``linear2`` keys (``layer_structure``
    (1, 2, 1), no activation) and no structure metadata. ``scale`` sets the weights' size relative
    to 1/sqrt(fan-in); A1111's own init (std 0.01) would barely change an image.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if activation not in (None, "linear") and activation.lower() not in _PARAMETER_FREE:
        raise ValueError(f"write_hypernetwork cannot write weights for activation {activation!r}")
    if old_style and (tuple(layer_structure) != (1, 2, 1) or layer_norm or dropout):
        raise ValueError("old-style files only had layer_structure (1, 2, 1) without extras")
    generator = torch.Generator().manual_seed(seed)
    dropout_structure = dropout_structure_for(layer_structure, dropout, last_layer_dropout)
    data: dict[object, object] = {}
    for width in widths:
        data[int(width)] = tuple(
            _module_state(
                width,
                layer_structure,
                None if old_style else activation,
                layer_norm,
                dropout_structure,
                activate_output,
                generator,
                scale,
                old_style,
            )
            for _ in range(2)
        )
    data["step"] = step
    data["name"] = path.stem if name is None else name
    data["sd_checkpoint"] = sd_checkpoint
    data["sd_checkpoint_name"] = sd_checkpoint_name
    if not old_style:
        data |= {
            "layer_structure": list(layer_structure),
            "activation_func": activation,
            "is_layer_norm": layer_norm,
            "weight_initialization": "Normal",
            "activate_output": activate_output,
            "use_dropout": dropout,
            "dropout_structure": dropout_structure,
            "last_layer_dropout": last_layer_dropout,
            "optional_info": optional_info,
        }
    torch.save(data, path)
    return path


def _module_state(
    width: int,
    layer_structure: Sequence[float],
    activation: str | None,
    layer_norm: bool,
    dropout_structure: Sequence[float],
    activate_output: bool,
    generator: torch.Generator,
    scale: float,
    old_style: bool,
) -> dict[str, torch.Tensor]:
    keys = expected_keys(layer_structure, activation, layer_norm, dropout_structure, activate_output)
    sizes = [int(width * factor) for factor in layer_structure]
    state: dict[str, torch.Tensor] = {}
    linear_step = 0
    for key_w, key_b in zip(keys[::2], keys[1::2]):
        # Keys come in Linear, then (optionally) LayerNorm pairs; tell them apart by position.
        is_norm = layer_norm and len(state) // 2 % 2 == 1
        if is_norm:
            size = sizes[linear_step]
            state[key_w] = 1 + 0.1 * torch.randn(size, generator=generator)
            state[key_b] = 0.1 * torch.randn(size, generator=generator)
            continue
        fan_in, fan_out = sizes[linear_step], sizes[linear_step + 1]
        std = scale / fan_in**0.5
        state[key_w] = std * torch.randn(fan_out, fan_in, generator=generator)
        state[key_b] = std * torch.randn(fan_out, generator=generator)
        linear_step += 1
    if old_style:
        renames = {"linear.0": "linear1", "linear.1": "linear2"}
        state = {renames[key.rsplit(".", 1)[0]] + "." + key.rsplit(".", 1)[1]: v for key, v in state.items()}
    return state
