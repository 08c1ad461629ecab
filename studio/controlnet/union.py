"""ControlNet Union / ProMax for SDXL (xinsir's ``controlnet-union-sdxl-1.0``): one model, many
control types, the type chosen per unit.

The files are in diffusers' layout (``diffusion_pytorch_model(_promax).safetensors``), often
downloaded without their ``config.json``, so the config is derived from tensor shapes: the
ControlNet part with the rules of ordinary ControlNet files (:func:`derive_controlnet_config`,
on the names mapped to the original layout), the union extras from their own tensors. The model
is diffusers' ``ControlNetUnionModel``.

The control type: the model has ``num_control_type`` slots (6 in the first release, 8 in ProMax),
in xinsir's order: openpose, depth, hed/pidi/scribble/ted, canny/lineart/anime_lineart/mlsd,
normal, segment, tile, repaint. The A1111 extension names them in a unit's ``union_control_type``
("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint";
"Unknown" when unset), which its UI fills from the Control Type radio. When a client leaves it
unset, the studio takes the type from the unit's preprocessor ("canny" -> Hard Edge); a unit with
neither (module "none") is refused with a message naming the field, since a union model without a
type guesses, and the extension's silent fallback is not something a user can see.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch

from studio.controlnet.control_lora import controlnet_ldm_name
from studio.controlnet.models import ControlNetProbe, derive_controlnet_config, probe_controlnet
from studio.errors import RequestError
from studio.models.state_dict import ModelFileError, Shapes

UNION = "ControlNet Union"
# The extension's ControlNetUnionControlType values, in the model's slot order.
UNION_TYPES: tuple[str, ...] = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation",
                                "Tile", "Inpaint")
UNKNOWN_TYPE = "Unknown"
# Lower-cased spellings a client may send for a slot: the extension's own values, its Control
# Type radio names (which its UI maps with ``from_str``), and xinsir's names.
_TYPE_ALIASES: dict[str, int] = {
    **{name.lower(): i for i, name in enumerate(UNION_TYPES)},
    "softedge": 2, "scribble": 2, "scribble/sketch": 2, "sketch": 2, "hed": 2, "pidi": 2,
    "hardedge": 3, "canny": 3, "lineart": 3, "mlsd": 3,
    "normal": 4, "normalmap": 4, "segment": 5, "seg": 5,
    "tile/blur": 6, "blur": 6, "repaint": 7,
}
# Preprocessor name prefixes -> slot (the extension's preprocessor tags; first match wins).
_MODULE_PREFIXES: tuple[tuple[str, int], ...] = (
    ("openpose", 0), ("dw_openpose", 0), ("animal_openpose", 0), ("densepose", 0),
    ("depth", 1),
    ("softedge", 2), ("scribble", 2), ("t2ia_sketch", 2),
    ("canny", 3), ("lineart", 3), ("mlsd", 3), ("invert", 3),
    ("normal", 4),
    ("seg_", 5),
    ("tile", 6), ("blur", 6),
    ("inpaint", 7),
)
_EXTRA_PREFIXES = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
_EXTRA_KEYS = ("task_embedding", "control_add_embedding.linear_1.weight")


# --------------------------------------------------------------------------- files


def is_union_state_dict(keys: Collection[str]) -> bool:
    """A Union ControlNet's weights (tensor names or a state dict): its task embedding and the
    control-type embedding the plain ControlNet does not have."""
    return all(k in keys for k in _EXTRA_KEYS)


def _hint_blocks(shapes: Shapes) -> int:
    return len({m[1] for k in shapes if (m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight", k))})


def _layers_per_block(shapes: Shapes) -> int:
    return len({m[1] for k in shapes if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})


def _controlnet_part_in_ldm_names(shapes: Shapes) -> Shapes:
    layers, hint_blocks = _layers_per_block(shapes), _hint_blocks(shapes)
    try:
        return {controlnet_ldm_name(k, layers, hint_blocks): s for k, s in shapes.items()
                if not k.startswith(_EXTRA_PREFIXES)}
    except KeyError as e:
        raise ModelFileError(f"not a ControlNet Union layout: {e}") from e


def derive_union_config(shapes: Shapes) -> dict[str, Any]:
    """A ``ControlNetUnionModel`` config from diffusers-named tensor shapes."""
    from diffusers import ControlNetUnionModel

    if not is_union_state_dict(shapes):
        raise ModelFileError("not a ControlNet Union (no task_embedding / control_add_embedding tensors)")
    if any(k.startswith(("input_hint_block.", "control_model.")) for k in shapes):
        raise ModelFileError("a ControlNet Union in the original (ldm) layout is not supported; use the "
                             "diffusers-layout file (diffusion_pytorch_model(_promax).safetensors)")
    ldm = _controlnet_part_in_ldm_names(shapes)
    probe = probe_controlnet(ldm, UNION)
    config = derive_controlnet_config(ldm, probe)
    num_types, trans_width = shapes["task_embedding"]
    config.update({
        "_class_name": "ControlNetUnionModel",
        "num_control_type": num_types,
        "num_trans_channel": trans_width,
        "num_trans_head": 8,  # xinsir's; a head count leaves no trace in the shapes
        "num_trans_layer": len({m[1] for k in shapes if (m := re.match(r"transformer_layes\.(\d+)\.", k))}),
        "num_proj_channel": shapes["spatial_ch_projs.weight"][0],
    })
    accepted = set(inspect.signature(ControlNetUnionModel.__init__).parameters) | {"_class_name"}
    return {k: v for k, v in config.items() if k in accepted}


def union_probe(config: Mapping[str, Any]) -> ControlNetProbe:
    """The probe the library reports for a Union model, from its config (file or folder)."""
    family = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd1"
    return ControlNetProbe(family, config["cross_attention_dim"], config.get("conditioning_channels", 3),
                           config["in_channels"], UNION)


def load_union(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", name: str = UNION) -> Any:
    """A diffusers ``ControlNetUnionModel`` from a config-less weights file, ready for inference."""
    from diffusers import ControlNetUnionModel

    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    try:
        config = derive_union_config(shapes)
        model = ControlNetUnionModel.from_config(config)
        model.load_state_dict(dict(state_dict), strict=True)
    except ModelFileError as e:
        raise ModelFileError(f"{name}: {e}") from e
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{name}: weights do not fit a ControlNet Union: {e}") from e
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def is_union_model(model: Any) -> bool:
    """A loaded ``ControlNetUnionModel`` (its config has the control-type count)."""
    config = getattr(model, "config", None)
    return config is not None and "num_control_type" in config


# --------------------------------------------------------------------------- control types


def union_type_for_module(module: str) -> int:
    """The slot a preprocessor's maps belong to ("canny" -> Hard Edge, "depth_midas" -> Depth)."""
    name = (module or "").strip().lower()
    for prefix, index in _MODULE_PREFIXES:
        if name.startswith(prefix):
            return index
    raise RequestError(f"a ControlNet Union model needs a control type and preprocessor {module!r} implies none: "
                       f"set the unit's union_control_type to one of {', '.join(UNION_TYPES)}")


def union_type_index(union_control_type: str | None, module: str, num_types: int = len(UNION_TYPES)) -> int:
    """The slot a unit uses: its ``union_control_type`` when set (the extension's names, its Control
    Type names, case-insensitive), else its preprocessor's. ``num_types`` is the model's slot count:
    the first Union release has no Tile and Inpaint slots."""
    name = (union_control_type or "").strip()
    if name and name.lower() != UNKNOWN_TYPE.lower():
        index = _TYPE_ALIASES.get(name.lower())
        if index is None:
            raise RequestError(f"unknown union_control_type {union_control_type!r}; "
                               f"known: {', '.join(UNION_TYPES)} (or {UNKNOWN_TYPE} to follow the preprocessor)")
    else:
        index = union_type_for_module(module)
    if index >= num_types:
        raise RequestError(f"control type {UNION_TYPES[index]} needs a ControlNet Union ProMax model: the selected one "
                           f"has {num_types} types ({', '.join(UNION_TYPES[:num_types])})")
    return index


def union_residuals(model: Any, x: torch.Tensor, t: Any, context: torch.Tensor, added: dict | None,
                    cond_image: torch.Tensor, type_index: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The down and mid residuals of one Union unit for the UNet batch ``x``: the map
    ``cond_image`` ([1 or B, 3, H, W] in [0, 1]) as control type ``type_index`` (one-hot over
    the model's slots, one row per batch entry), at conditioning scale 1 (the unit's weight is
    applied by the caller, as for plain ControlNets)."""
    num_types = model.config.num_control_type
    if not 0 <= type_index < num_types:
        raise RequestError(f"control type {type_index} is outside the model's {num_types} types")
    param = next(model.parameters())
    sample = x[:, :model.config.in_channels].to(param.device, param.dtype)
    cond = cond_image.to(param.device, param.dtype).expand(sample.shape[0], -1, -1, -1)
    control_type = torch.zeros(sample.shape[0], num_types, device=param.device, dtype=param.dtype)
    control_type[:, type_index] = 1
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    down, mid = model(sample, t, encoder_hidden_states=context.to(param.dtype), controlnet_cond=[cond],
                      control_type=control_type, control_type_idx=[type_index], conditioning_scale=1.0,
                      return_dict=False, **kwargs)
    return list(down), mid
