"""Hypernetworks: A1111's "Create hypernetwork" and the trainable that learns one.

The file is A1111's ``.pt`` (formats.md 3.2): integer context widths mapping to
``(k_state_dict, v_state_dict)`` of :class:`~studio.networks.hypernetwork_module.HypernetworkModule`,
plus ``layer_structure``, ``activation_func``, ``is_layer_norm``, ``weight_initialization``,
``use_dropout``, ``dropout_structure``, ``activate_output``, ``last_layer_dropout``, ``step``,
``name``, ``sd_checkpoint``, ``sd_checkpoint_name`` and ``optional_info``.

While training, the very modules being optimized sit in forward pre-hooks on every attention's
``to_k`` / ``to_v`` (installed by :func:`~studio.networks.hypernetworks.apply_hypernetworks`), with
multiplier 1. Dropout is active only in forwards with gradients on, so sample images made
mid-training (under ``torch.inference_mode``) are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.config import atomic_write
from studio.networks.hypernetwork_module import HypernetworkModule, activation_class
from studio.networks.hypernetworks import (
    HYPERNETWORK_SUFFIX,
    Hypernetwork,
    HypernetworkFileError,
    HypernetworkHooks,
    apply_hypernetworks,
    check_layer_structure,
    read_hypernetwork,
)
from studio.training.base import TrainingError, check_output_name
from studio.training.embedding import (
    check_free_name,
    checkpoint_fields,
    freeze_model,
    model_device,
    unfreeze_model,
)

DEFAULT_SIZES = (768, 320, 640, 1280)
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
# the UI's list; any other torch.nn activation works too, by its lowercased class name
ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid")


# ---------------------------------------------------------------------------------------------
# Parsing the "Create hypernetwork" fields


def parse_number_list(value: str | Sequence[float], label: str) -> list[float]:
    """``"1, 2, 1"`` (or a list) as floats; TrainingError for anything else."""
    if isinstance(value, str):
        items: list[Any] = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TrainingError(f"{label} must be a comma-separated list of numbers, got {value!r}")
    numbers: list[float] = []
    for item in items:
        if isinstance(item, bool):
            raise TrainingError(f"{label} {value!r}: {item!r} is not a number")
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise TrainingError(f"{label} {value!r}: {item!r} is not a number") from None
        if not math.isfinite(number):
            raise TrainingError(f"{label} {value!r}: {item!r} is not a finite number")
        numbers.append(number)
    return numbers


def parse_layer_structure(value: str | Sequence[float]) -> list[float]:
    structure = parse_number_list(value, "layer structure")
    try:
        check_layer_structure(structure)   # the reader's own rules: what we write, it reads
    except ValueError as e:
        raise TrainingError(f"{e} (e.g. 1, 2, 1)") from None
    return structure


def parse_dropout(
    value: str | Sequence[float], layer_structure: list[float], use_dropout: bool
) -> list[float]:
    """The per-layer dropout: all zeros unless ``use_dropout``; then one probability per
    layer-structure entry, 0 <= p < 1, starting and ending with 0."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    dropout = parse_number_list(value, "dropout structure")
    if len(dropout) != len(layer_structure):
        raise TrainingError(f"dropout structure {value!r} needs {len(layer_structure)} numbers, one per "
                            f"layer-structure entry")
    if dropout[0] != 0 or dropout[-1] != 0:
        raise TrainingError(f"dropout structure {value!r} must start and end with 0")
    if any(not 0 <= p < 1 for p in dropout):
        raise TrainingError(f"dropout structure {value!r}: every probability must be at least 0 and below 1")
    return dropout


def check_activation(name: str) -> str:
    name = (name or "linear").strip()
    if name.lower() == "linear":
        return "linear"
    try:
        activation_class(name)()
    except (ValueError, TypeError):
        raise TrainingError(
            f"unknown activation function {name!r} (try one of {', '.join(ACTIVATIONS)})") from None
    return name


def parse_sizes(sizes: Sequence[int | str]) -> list[int]:
    if isinstance(sizes, (str, int)):
        sizes = [part for part in str(sizes).split(",") if part.strip()]
    widths: list[int] = []
    for size in sizes:
        try:
            width = int(str(size).strip())
        except ValueError:
            raise TrainingError(f"module size {size!r} is not a whole number") from None
        if width <= 0:
            raise TrainingError(f"module size {width} must be above 0")
        if width not in widths:
            widths.append(width)
    if not widths:
        raise TrainingError("choose at least one module size (768, 1024, 320, 640, 1280)")
    return sorted(widths)


def init_weights(
    module: HypernetworkModule, scheme: str, activation: str, generator: torch.Generator
) -> None:
    """Fresh weights for a new module: Linear weights by ``scheme``, zero biases (LayerNorm keeps
    its identity start). "Normal" uses a small std so a new hypernetwork starts near identity."""
    nonlinearity = "relu" if activation.lower() in ("relu", "leakyrelu") else "linear"
    with torch.no_grad():
        for layer in module.linear:
            if not isinstance(layer, nn.Linear):
                continue
            weight = layer.weight
            if scheme == "Normal":
                weight.normal_(0.0, 0.01, generator=generator)
            elif scheme == "XavierUniform":
                bound = math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))
                weight.uniform_(-bound, bound, generator=generator)
            elif scheme == "XavierNormal":
                weight.normal_(0.0, math.sqrt(2.0 / (weight.shape[0] + weight.shape[1])), generator=generator)
            else:
                gain = nn.init.calculate_gain(nonlinearity)
                std = gain / math.sqrt(weight.shape[1])
                if scheme == "KaimingUniform":
                    bound = math.sqrt(3.0) * std
                    weight.uniform_(-bound, bound, generator=generator)
                else:
                    weight.normal_(0.0, std, generator=generator)
            layer.bias.zero_()


# ---------------------------------------------------------------------------------------------
# Creating a hypernetwork


def create_hypernetwork(
    name: str,
    sizes: Sequence[int | str] = DEFAULT_SIZES,
    layer_structure: str | Sequence[float] = "1, 2, 1",
    activation: str = "linear",
    weight_init: str = "Normal",
    add_layer_norm: bool = False,
    use_dropout: bool = False,
    dropout_structure: str | Sequence[float] = "0, 0, 0",
    overwrite: bool = False,
    *,
    folder: Path,
    seed: int | None = None,
) -> Path:
    """A1111's "Create hypernetwork": write ``folder/<name>.pt`` with fresh (k, v) modules for
    every width in ``sizes``. ``seed`` makes the weights reproducible (None: random)."""
    name = check_output_name(name)
    widths = parse_sizes(sizes)
    structure = parse_layer_structure(layer_structure)
    activation = check_activation(activation)
    if weight_init not in WEIGHT_INITS:
        raise TrainingError(
            f"unknown weight initialization {weight_init!r} (one of {', '.join(WEIGHT_INITS)})")
    dropout = parse_dropout(dropout_structure, structure, bool(use_dropout))
    folder = Path(folder)
    check_free_name(folder, name, (HYPERNETWORK_SUFFIX,), overwrite, "hypernetwork")

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    data: dict[Any, Any] = {}
    for width in widths:
        pair = []
        for _ in "kv":
            try:
                module = HypernetworkModule(
                    width, structure, activation, bool(add_layer_norm), False, dropout)
            except ValueError as exc:
                raise TrainingError(str(exc)) from exc
            init_weights(module, weight_init, activation, generator)
            pair.append(module.state_dict())
        data[width] = tuple(pair)
    data.update({
        "name": name, "step": 0, "layer_structure": structure, "activation_func": activation,
        "is_layer_norm": bool(add_layer_norm), "weight_initialization": weight_init,
        "use_dropout": bool(use_dropout), "dropout_structure": dropout,
        "activate_output": False, "last_layer_dropout": False,
        "sd_checkpoint": None, "sd_checkpoint_name": None, "optional_info": None,
    })
    path = folder / f"{name}{HYPERNETWORK_SUFFIX}"
    return atomic_write(path, lambda temp: torch.save(data, temp))


# ---------------------------------------------------------------------------------------------
# Training a hypernetwork


class _LiveHypernetwork:
    """What :func:`apply_hypernetworks` needs of a hypernetwork, handing out the trained modules
    themselves (``Hypernetwork.modules_for`` would copy them for another device or dtype)."""

    def __init__(self, layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]) -> None:
        self.layers = layers

    def modules_for(
        self, device: Any, dtype: Any
    ) -> dict[int, tuple[HypernetworkModule, HypernetworkModule]]:
        return self.layers


def _dropout_only_with_grad(module: nn.Module, _args: tuple[Any, ...]) -> None:
    # A1111 trains with dropout on; sampling (no gradients) must not drop anything.
    training = torch.is_grad_enabled()
    if module.training != training:
        module.train(training)


def attention_widths(unet: nn.Module) -> set[int]:
    """The context widths the attentions of ``unet`` see (their ``to_k`` input widths)."""
    widths: set[int] = set()
    for module in unet.modules():
        to_k = getattr(module, "to_k", None)
        width = getattr(to_k, "in_features", None)
        if isinstance(width, int):
            widths.add(width)
    return widths


class HypernetworkTrainable:
    """Learns the modules of an existing hypernetwork file (made with :func:`create_hypernetwork`).

    Only the modules of widths the model's attentions use are trained; the others are saved as
    they were. Multiplier 1 while training, as in A1111.
    """

    kind = "hypernetwork"

    def __init__(self, path: Path, output_path: Path, lr: float) -> None:
        self.path = Path(path)
        self.output_path = Path(output_path)
        if self.output_path.suffix.lower() != HYPERNETWORK_SUFFIX:
            self.output_path = self.output_path.with_name(self.output_path.name + HYPERNETWORK_SUFFIX)
        self.name = check_output_name(self.output_path.stem)
        self.lr = float(lr)
        self.hypernetwork: Hypernetwork | None = None
        self.initial_step = 0           # the step stored in the source file (A1111 continues from it)
        self._trained_widths: list[int] = []
        self._hooks: HypernetworkHooks | None = None
        self._mode_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._frozen: list[nn.Parameter] = []
        self._attached = False

    def _modules(self, widths: Sequence[int] | None = None) -> list[tuple[str, HypernetworkModule]]:
        assert self.hypernetwork is not None
        layers = self.hypernetwork.layers
        chosen = sorted(layers) if widths is None else widths
        return [(f"{width}.{label}", module)
                for width in chosen for label, module in zip("kv", layers[width])]

    # -- installing ------------------------------------------------------------------------
    def attach(self, model: Any) -> list[dict[str, Any]]:
        if self._attached:
            raise TrainingError("this hypernetwork is already attached to a model")
        try:
            hn = read_hypernetwork(self.path)
        except (HypernetworkFileError, OSError) as exc:
            raise TrainingError(f"cannot read the hypernetwork to train: {exc}") from exc
        used = sorted(set(hn.layers) & attention_widths(model.unet))
        if not used:
            raise TrainingError(f"hypernetwork {self.path.name} has modules for widths {sorted(hn.layers)}, "
                                f"none of which this model's attentions use")
        device = model_device(model)
        self.hypernetwork = hn
        self.initial_step = hn.step or 0
        self._trained_widths = used
        for _, module in self._modules():
            module.to(device=device, dtype=torch.float32)
        params: list[nn.Parameter] = []
        self._frozen = freeze_model(model)
        for _, module in self._modules(used):
            module.requires_grad_(True)
            params.extend(module.parameters())
            self._mode_hooks.append(module.register_forward_pre_hook(_dropout_only_with_grad))
        try:
            self._hooks = apply_hypernetworks(model.unet, [(_LiveHypernetwork(hn.layers), 1.0)],
                                              dtype=torch.float32, device=device)
        except BaseException:
            self._undo()
            raise
        self._attached = True
        return [{"params": params, "lr": self.lr}]

    def encode(
        self, model: Any, captions: list[str], clip_skip: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The text encoders do not learn here: no graph through them.
        with torch.no_grad():
            context, pooled = model.conditioner.encode_for_training(captions, clip_skip)
        return context.detach(), (pooled.detach() if pooled is not None else None)

    # -- saving and resuming ---------------------------------------------------------------
    def save(self, path: Path, step: int, metadata: dict[str, str]) -> Path:
        hn = self.hypernetwork
        if hn is None:
            raise TrainingError("attach the hypernetwork before saving it")
        sd_checkpoint, sd_checkpoint_name = checkpoint_fields(metadata)
        path = Path(path)
        if path.suffix.lower() != HYPERNETWORK_SUFFIX:
            path = path.with_name(path.name + HYPERNETWORK_SUFFIX)
        data: dict[Any, Any] = {
            width: tuple({key: value.detach().to("cpu", torch.float32).clone()
                          for key, value in module.state_dict().items()} for module in pair)
            for width, pair in sorted(hn.layers.items())
        }
        data.update({
            "name": path.stem, "step": int(step), "layer_structure": list(hn.layer_structure),
            "activation_func": hn.activation_func or "linear", "is_layer_norm": hn.is_layer_norm,
            "weight_initialization": hn.weight_initialization, "use_dropout": hn.use_dropout,
            "dropout_structure": list(hn.dropout_structure), "activate_output": hn.activate_output,
            "last_layer_dropout": hn.last_layer_dropout,
            "sd_checkpoint": sd_checkpoint or hn.sd_checkpoint,
            "sd_checkpoint_name": sd_checkpoint_name or hn.sd_checkpoint_name,
            "optional_info": hn.optional_info,
        })
        return atomic_write(path, lambda temp: torch.save(data, temp))

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.hypernetwork is None:
            return {}
        return {f"{prefix}.{key}": value.detach().to("cpu").clone()
                for prefix, module in self._modules() for key, value in module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.hypernetwork is None:
            raise TrainingError("attach the hypernetwork before loading a training state")
        own = self.state_dict()
        if set(state) != set(own):
            raise TrainingError("the saved training state does not fit this hypernetwork "
                                f"({len(state)} tensors, expected {len(own)})")
        for prefix, module in self._modules():
            part = {key[len(prefix) + 1:]: value
                    for key, value in state.items() if key.startswith(prefix + ".")}
            try:
                with torch.no_grad():
                    module.load_state_dict(part, strict=True)
            except RuntimeError as exc:
                raise TrainingError(
                    f"the saved training state does not fit this hypernetwork: {exc}") from exc

    # -- removing --------------------------------------------------------------------------
    def detach(self, model: Any) -> None:
        if not self._attached:
            return
        self._undo()
        self._attached = False

    def _undo(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for handle in self._mode_hooks:
            handle.remove()
        self._mode_hooks = []
        if self.hypernetwork is not None:
            for _, module in self._modules():
                module.eval()
                module.requires_grad_(False)
        unfreeze_model(self._frozen)
        self._frozen = []
