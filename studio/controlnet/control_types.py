"""sd-webui-controlnet's "Control Type" table: for each type, the preprocessors and models it offers
and the pair the UI picks when the type is chosen (``/controlnet/control_types`` and the UI's
Control Type radio).

The extension filters by names only: a module or model belongs to a type when the type's name, or
one of its aliases, appears in the lower-cased name. These are pure functions over names, so the
table works for whatever preprocessors and ControlNet files the studio has, extensions' included.
"""

from __future__ import annotations

from dataclasses import dataclass

NO_MODULE = "none"
NO_MODEL = "None"

# type -> the module the extension selects with it (its ``preprocessor_filters``), in the
# extension's order, which is also the order its UI draws the radio in
DEFAULT_MODULES: dict[str, str] = {
    "All": "none",
    "Canny": "canny",
    "Depth": "depth_midas",
    "NormalMap": "normal_bae",
    "OpenPose": "openpose_full",
    "MLSD": "mlsd",
    # the extension lists it under its UI alias "lineart_standard (from white bg & black line)";
    # the studio serves modules by name
    "Lineart": "lineart_standard",
    "SoftEdge": "softedge_pidinet",
    "Scribble/Sketch": "scribble_pidinet",
    "Segmentation": "seg_ofade20k",
    "Shuffle": "shuffle",
    "Tile/Blur": "tile_resample",
    "Inpaint": "inpaint_only",
    "InstructP2P": "none",
    "Reference": "reference_only",
    "Recolor": "recolor_luminance",
    "Revision": "revision_clipvision",   # the studio has flux_redux under it (Revision's FLUX twin)
    "T2I-Adapter": "none",
    "IP-Adapter": "ip-adapter_clip_sd15",
    "Instant_ID": "instant_id",
    "SparseCtrl": "none",
}
CONTROL_TYPES: tuple[str, ...] = tuple(DEFAULT_MODULES)

# extra substrings per type (lower-cased type name -> substrings), because model files and module
# names abbreviate: "control_v11e_sd15_ip2p", "seg_ofcoco", "t2iadapter_sketch_sd15v2"
_ALIASES: dict[str, tuple[str, ...]] = {
    "instructp2p": ("ip2p",),
    "segmentation": ("seg",),
    "normalmap": ("normal",),
    "t2i-adapter": ("t2i_adapter", "t2iadapter", "t2ia"),
    "ip-adapter": ("ip_adapter", "ipadapter"),
    "scribble/sketch": ("scribble", "sketch"),
    "tile/blur": ("tile", "blur"),
    "openpose": ("openpose", "densepose"),
    # FLUX.1 Redux is Revision's idea (the image's embedding as prompt tokens) for FLUX
    "revision": ("redux",),
}
# types whose line drawings may come white-on-black or black-on-white: "invert" is offered too
_WITH_INVERT = ("canny", "lineart", "scribble/sketch", "mlsd")


@dataclass(frozen=True)
class ControlTypeChoice:
    """What choosing a control type offers: the API's per-type object."""

    module_list: list[str]
    model_list: list[str]
    default_option: str
    default_model: str

    def api_dict(self) -> dict[str, object]:
        return {"module_list": list(self.module_list), "model_list": list(self.model_list),
                "default_option": self.default_option, "default_model": self.default_model}


def _matches(name: str, control_type: str) -> bool:
    pattern = control_type.lower()
    lowered = name.lower()
    return pattern in lowered or any(alias in lowered for alias in _ALIASES.get(pattern, ()))


def _preferred_model(models: list[str]) -> str:
    """The extension prefers a v1.1 model (``control_v11p_sd15_canny``) over an older one: the
    first whose name, before the ``[hash]``, contains "11"; else the first."""
    for name in models:
        if "11" in name.split("[")[0]:
            return name
    return models[0]


def select_control_type(control_type: str, modules: list[str], models: list[str]) -> ControlTypeChoice:
    """The extension's ``select_control_type`` over the studio's ``modules`` (preprocessor names,
    in display order) and ``models`` (ControlNet API names, without "None").

    - modules: "none" plus those matching the type (and "invert" for line-drawing types);
    - models: "None" plus those matching; "All" gets everything;
    - default_option: the type's usual module when the studio has it, else the first matching
      module (the extension's current rule), else "none";
    - default_model: the preferred matching model, or "None" when no model matches.
    """
    if control_type not in DEFAULT_MODULES:
        raise KeyError(f"unknown control type {control_type!r}; known: {', '.join(CONTROL_TYPES)}")
    all_models = [NO_MODEL, *(m for m in models if m != NO_MODEL)]
    ordered = [NO_MODULE, *(m for m in modules if m != NO_MODULE)]
    if control_type == "All":
        return ControlTypeChoice(ordered, all_models, NO_MODULE, NO_MODEL)
    picked = [m for m in ordered if m == NO_MODULE or _matches(m, control_type)]
    if control_type.lower() in _WITH_INVERT:
        picked += [m for m in ordered if "invert" in m.lower() and m not in picked]
    matching_models = [m for m in all_models[1:] if _matches(m, control_type)]
    default_option = DEFAULT_MODULES[control_type]
    if default_option not in picked:
        default_option = picked[1] if len(picked) > 1 else NO_MODULE
    default_model = _preferred_model(matching_models) if matching_models else NO_MODEL
    return ControlTypeChoice(picked, [NO_MODEL, *matching_models], default_option, default_model)


def control_types_table(modules: list[str], models: list[str]) -> dict[str, ControlTypeChoice]:
    """Every control type, in the extension's order."""
    return {t: select_control_type(t, modules, models) for t in CONTROL_TYPES}


def api_control_types(modules: list[str], models: list[str]) -> dict[str, dict[str, dict[str, object]]]:
    """The body of ``GET /controlnet/control_types``."""
    return {"control_types": {t: c.api_dict() for t, c in control_types_table(modules, models).items()}}
