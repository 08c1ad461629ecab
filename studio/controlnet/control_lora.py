"""Stability AI's Control-LoRAs (``control-lora-{canny,depth,recolor,sketch}-rank{128,256}``, SDXL).

A Control-LoRA is a ControlNet stored as a difference from the checkpoint it is used with: the
layers a ControlNet copies from the UNet's encoder come as LoRA pairs (``<module>.up`` /
``<module>.down``, the update is ``up @ down`` with no alpha), everything else as full tensors
(the hint CNN, zero convs, norms, biases). The file marks itself with a ``lora_controlnet`` key
and uses the original (ldm) names. The ControlNet therefore only exists together with the loaded
checkpoint's UNet: it is laid out as diffusers' ``ControlNetModel.from_unet`` would make it, its
weights are copies of the UNet's (the UNet is not touched) replaced by the file's full tensors,
and the LoRA updates are added on top, as ComfyUI and the A1111 extension do at run time. Fusing
once makes the result a plain ``ControlNetModel`` that the sampling loop runs like any other.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import torch

from studio.controlnet.models import HINT_KEY, ControlNetProbe, strip_prefix
from studio.models.ldm_keys import _unet_key
from studio.models.state_dict import ModelFileError, Shapes

MARKER = "lora_controlnet"
ORIGINAL_MARKER = "control_model." + MARKER
CONTROL_LORA = "Control-LoRA"
_UP, _DOWN = ".up", ".down"
_CONTEXT_KEY = re.compile(r"(input_blocks|middle_block)\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.(weight|down)")


def is_control_lora(keys: Collection[str]) -> bool:
    """A Control-LoRA file (tensor names or a state dict): the marker Stability's files carry."""
    return MARKER in keys or ORIGINAL_MARKER in keys


def controlnet_ldm_name(key: str, layers_per_block: int, hint_blocks: int) -> str:
    """A diffusers ``ControlNetModel`` parameter name -> its name in the original layout.

    The encoder is named like the UNet's (``studio.models.ldm_keys``); the ControlNet-only parts
    are the hint CNN (convs at the even indices of ``input_hint_block``, SiLUs between them), the
    zero convs and ``middle_block_out``."""
    module, _, param = key.rpartition(".")
    if module == "controlnet_cond_embedding.conv_in":
        return f"input_hint_block.0.{param}"
    if module == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{2 * (hint_blocks + 1)}.{param}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m[1]}.0.{param}"
    if module == "controlnet_mid_block":
        return f"middle_block_out.0.{param}"
    return _unet_key(key, layers_per_block, set())


def hint_out_channels(shapes: Shapes) -> list[int]:
    """``conditioning_embedding_out_channels`` from the hint CNN's shapes (the rule of
    ``derive_controlnet_config``): conv_in, then pairs of (same-width, widening) convs, then
    conv_out, so every second output is a new width."""
    ids = sorted(int(m[1]) for k in shapes if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    if len(ids) < 2:
        raise ModelFileError("no conditioning (input_hint_block) convolutions")
    return [shapes[f"input_hint_block.{i}.weight"][0] for i in ids[:-1]][0::2]


def probe_control_lora(shapes: Shapes, name: str = CONTROL_LORA) -> ControlNetProbe:
    """What a Control-LoRA file is for, from its tensor names and shapes (``kind`` "Control-LoRA").

    SDXL files carry the size/pooled-text MLP (``label_emb``); the text width is read from a
    cross-attention key projection, full or LoRA'd (``down`` is [rank, context])."""
    shapes = strip_prefix(shapes)
    if MARKER not in shapes:
        raise ModelFileError(f"{name}: not a Control-LoRA (no {MARKER!r} tensor)")
    hint = shapes.get(HINT_KEY)
    conv_in = shapes.get("input_blocks.0.0.weight", shapes.get("input_blocks.0.0.down"))
    context = next((s for k, s in shapes.items() if _CONTEXT_KEY.fullmatch(k)), None)
    if hint is None or conv_in is None or context is None:
        raise ModelFileError(f"{name}: incomplete Control-LoRA (no hint, input or cross-attention layers)")
    if any(k.startswith("label_emb.") for k in shapes):
        family = "sdxl"
    else:
        family = "sd2" if context[1] == 1024 else "sd1"
    return ControlNetProbe(family, context[1], hint[1], conv_in[1], CONTROL_LORA)


def _lora_delta(up: torch.Tensor, down: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``up @ down`` shaped as the weight: linear [out, r] @ [r, in]; conv [out, r, 1, 1] and
    [r, in, kh, kw] are flattened to matrices first, as the LoRA layers of ComfyUI and the
    extension compute it."""
    up, down = up.flatten(1).float(), down.flatten(1).float()
    if up.shape[0] != shape[0] or down.shape[1] != shape[1:].numel() or up.shape[1] != down.shape[0]:
        raise ValueError(f"update {tuple(up.shape)} @ {tuple(down.shape)} does not fit weight {tuple(shape)}")
    return (up @ down).reshape(shape)


def _split(sd: Mapping[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Full tensors by ldm name, and (up, down) pairs by ldm module name."""
    full: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    downs: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == MARKER:
            continue
        if key.endswith(_UP):
            ups[key[: -len(_UP)]] = value
        elif key.endswith(_DOWN):
            downs[key[: -len(_DOWN)]] = value
        else:
            full[key] = value
    unpaired = set(ups) ^ set(downs)
    if unpaired:
        raise ModelFileError(f"{name}: LoRA tensors without their pair: {sorted(unpaired)[:3]}")
    return full, {m: (ups[m], downs[m]) for m in ups}


def build_control_lora(state_dict: Mapping[str, torch.Tensor], base_unet: Any, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", name: str = CONTROL_LORA) -> Any:
    """The diffusers ``ControlNetModel`` a Control-LoRA makes with ``base_unet`` (the loaded SDXL
    checkpoint's UNet, left unchanged), in ``dtype`` on ``device``, ready for inference.

    Raises ModelFileError when the file is not an SDXL Control-LoRA, when the checkpoint is not
    SDXL, or when a tensor does not fit the UNet (another architecture, an inpainting UNet)."""
    from diffusers import ControlNetModel

    sd = strip_prefix(dict(state_dict))
    probe = probe_control_lora({k: tuple(v.shape) for k, v in sd.items()}, name)
    if probe.family != "sdxl":
        raise ModelFileError(f"{name}: a Control-LoRA for {probe.label}; only SDXL Control-LoRAs are supported")
    config = base_unet.config
    if config.get("addition_embed_type") != "text_time":
        raise ModelFileError(f"{name} is an SDXL Control-LoRA: it needs an SDXL base checkpoint, "
                             "the loaded one is not SDXL; select an SDXL checkpoint")
    if config.get("cross_attention_dim") != probe.context_dim:
        raise ModelFileError(f"{name}: made for an SDXL UNet with {probe.context_dim}-wide text, the loaded "
                             f"checkpoint's is {config.get('cross_attention_dim')}; select an SDXL base checkpoint")
    full, pairs = _split(sd, name)
    out_channels = hint_out_channels({k: tuple(v.shape) for k, v in full.items()})
    # Built empty (no random init of ~1.2 B parameters at full size), then every weight assigned:
    # the UNet's copy, the file's tensor, plus the update.
    with torch.device("meta"):
        model = ControlNetModel.from_unet(base_unet, conditioning_embedding_out_channels=tuple(out_channels),
                                          conditioning_channels=probe.hint_channels, load_weights_from_unet=False)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    layers = model.config.layers_per_block
    hint_blocks = len(model.controlnet_cond_embedding.blocks)
    by_ldm = {controlnet_ldm_name(k, layers, hint_blocks): k for k in shapes}
    unknown = sorted(k for k in [*full, *(m + ".weight" for m in pairs)] if k not in by_ldm)
    if unknown:
        raise ModelFileError(f"{name}: tensors that the checkpoint's UNet has no place for: {unknown[:3]} "
                             "(a Control-LoRA made for another SDXL architecture)")
    full = {by_ldm[k]: v for k, v in full.items()}
    pairs = {by_ldm[m + ".weight"]: pair for m, pair in pairs.items()}
    # The ControlNet-only parts have nothing to copy from the UNet: the file must have them all.
    base = base_unet.state_dict()
    missing = sorted(k for k in shapes if k not in full and k not in base)
    if missing:
        raise ModelFileError(f"{name}: incomplete Control-LoRA (no {missing[:3]})")
    weights = {}
    try:
        with torch.no_grad():
            for key, shape in shapes.items():
                # float32 on the target device: the updates are matrix products, fast there
                value = (full[key] if key in full else base[key]).to(device=device, dtype=torch.float32)
                if value.shape != shape:
                    raise ValueError(f"{key} is {tuple(value.shape)} in the file, {tuple(shape)} in the ControlNet")
                if key in pairs:  # after the full tensor: an update applies to whatever weight the layer has
                    up, down = (t.to(device=device, dtype=torch.float32) for t in pairs[key])
                    value = value + _lora_delta(up, down, shape)
                # a copy even when nothing changed: the ControlNet must not share the UNet's tensors
                weights[key] = value.to(dtype=dtype, copy=True)
    except ValueError as e:
        raise ModelFileError(f"{name}: does not fit the loaded checkpoint's UNet: {e}") from e
    model.load_state_dict(weights, strict=True, assign=True)
    if any(b.is_meta for b in model.buffers()):  # a diffusers change adding buffers would show here
        raise ModelFileError(f"{name}: the ControlNet has buffers that the UNet does not provide")
    return model.eval().requires_grad_(False)
