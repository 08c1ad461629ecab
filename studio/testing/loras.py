"""Writers for LoRA-family files in their real on-disk layouts (formats.md §2), sized for the
tiny models of :func:`studio.testing.tiny_components`.

Targets are kohya's: in the UNet every Linear and 1x1 conv of the transformer blocks
(``proj_in``, ``proj_out``, attention ``to_q/k/v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2``),
in the text encoders ``q/k/v/out_proj`` and ``fc1``/``fc2``; ``conv=True`` (LoCon) adds the
resnet convs, ``time_emb_proj`` and the down/upsampler convs. Up weights are random and
non-zero (training starts them at zero) so that a test sees an effect. Every writer creates the
parent folder and returns the path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from studio.models.ldm_keys import base_family
from studio.networks.lora_keys import unet_ldm_names

_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_UNET_LINEAR_TAILS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_UNET_CONV_TAILS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
_TE_TAILS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_FACTOR_SCALE = 0.1


def _ends(name: str, tails: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in tails)


def unet_targets(unet: nn.Module, conv: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """(diffusers name, layer) of each UNet layer kohya trains."""
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        in_transformer = ".attentions." in f".{name}" and _ends(name, _UNET_LINEAR_TAILS)
        if in_transformer or (conv and _ends(name, _UNET_CONV_TAILS)):
            yield name, module


def te_targets(text_encoder: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name without ``text_model.``, layer) of each text-encoder layer kohya trains."""
    for name, module in text_encoder.named_modules():
        if isinstance(module, nn.Linear) and _ends(name, _TE_TAILS):
            yield name.removeprefix("text_model."), module


def _text_encoders(components: Mapping[str, Any]) -> list[tuple[str, nn.Module]]:
    return [(k, components[k]) for k in ("text_encoder", "text_encoder_2") if components.get(k) is not None]


def kohya_names(components: Mapping[str, Any], family: str, conv: bool = False,
                te: bool = True) -> list[tuple[str, nn.Module]]:
    """(kohya module name, layer): diffusers-style UNet names for SD1/SD2, LDM names for SDXL."""
    sdxl = base_family(family) == "sdxl"
    unet = components["unet"]
    ldm = unet_ldm_names(unet) if sdxl else {}
    out = [("lora_unet_" + ldm.get(name, name).replace(".", "_"), m) for name, m in unet_targets(unet, conv)]
    if te:
        for index, (_, encoder) in enumerate(_text_encoders(components)):
            prefix = f"lora_te{index + 1}_" if sdxl else "lora_te_"
            out += [(prefix + "text_model_" + name.replace(".", "_"), m) for name, m in te_targets(encoder)]
    return out


def _randn(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=generator) * _FACTOR_SCALE


def _kernel(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else ()


def _io(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    return module.out_features, module.in_features


def kohya_metadata(family: str, module: str, rank: int, alpha: float, name: str) -> dict[str, str]:
    base = base_family(family)
    return {
        "ss_network_module": module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": _BASE_MODEL_VERSION[base],
        "ss_v2": str(base == "sd2"),
        "ss_output_name": name,
    }


def _save(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], dtype: torch.dtype) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    if path.suffix.lower() == ".safetensors":
        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


def write_kohya_lora(
    path: str | Path,
    components: Mapping[str, Any],
    family: str,
    rank: int = 4,
    alpha: float = 2.0,
    conv: bool = False,
    te: bool = True,
    seed: int = 0,
    *,
    conv_in_channels: int | None = None,
    output_name: str | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """kohya LoRA (``conv=True``: LoCon, 3x3 convs get a 3x3 down and a 1x1 up).

    ``conv_in_channels`` adds a ``conv_in`` module with that many input channels (4 on an
    inpainting model reproduces what A1111 pads).
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    modules = kohya_names(components, family, conv, te)
    if conv_in_channels is not None:
        modules.append(("lora_unet_conv_in", components["unet"].conv_in))
    for name, module in modules:
        out_dim, in_dim = _io(module)
        if name == "lora_unet_conv_in" and conv_in_channels is not None:
            in_dim = conv_in_channels
        kernel = _kernel(module)
        ones = (1, 1) if kernel else ()
        tensors[f"{name}.lora_down.weight"] = _randn(generator, rank, in_dim, *kernel)
        tensors[f"{name}.lora_up.weight"] = _randn(generator, out_dim, rank, *ones)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    module_type = "lycoris.kohya" if conv else "networks.lora"
    metadata = kohya_metadata(family, module_type, rank, alpha, output_name or Path(path).stem)
    return _save(Path(path), tensors, metadata, dtype)


def write_loha(
    path: str | Path,
    components: Mapping[str, Any],
    family: str,
    rank: int = 4,
    alpha: float = 2.0,
    conv: bool = False,
    te: bool = True,
    seed: int = 0,
    *,
    tucker: bool = False,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """LyCORIS LoHa; ``tucker=True`` writes the tucker form (``hada_t1/t2``) for kxk convs."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for name, module in kohya_names(components, family, conv, te):
        out_dim, in_dim = _io(module)
        kernel = _kernel(module)
        for i in (1, 2):
            if tucker and kernel and kernel != (1, 1):
                tensors[f"{name}.hada_t{i}"] = _randn(generator, rank, rank, *kernel)
                tensors[f"{name}.hada_w{i}_a"] = _randn(generator, rank, out_dim)
                tensors[f"{name}.hada_w{i}_b"] = _randn(generator, rank, in_dim)
            else:
                flat = in_dim * (kernel[0] * kernel[1] if kernel else 1)
                tensors[f"{name}.hada_w{i}_a"] = _randn(generator, out_dim, rank)
                tensors[f"{name}.hada_w{i}_b"] = _randn(generator, rank, flat)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    metadata = kohya_metadata(family, "lycoris.kohya", rank, alpha, Path(path).stem)
    metadata["ss_network_args"] = json.dumps({"algo": "loha", "use_tucker": tucker})
    return _save(Path(path), tensors, metadata, dtype)


def _factor(dim: int) -> tuple[int, int]:
    """dim = a * b with a <= b as close as possible (LyCORIS' default split)."""
    a = int(dim ** 0.5)
    while dim % a:
        a -= 1
    return a, dim // a


def write_lokr(
    path: str | Path,
    components: Mapping[str, Any],
    family: str,
    rank: int = 2,
    alpha: float = 2.0,
    conv: bool = False,
    te: bool = True,
    seed: int = 0,
    *,
    decompose_w1: bool = False,
    decompose_w2: bool = True,
    tucker: bool = False,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """LyCORIS LoKr: ΔW = kron(w1, w2), each factor full (``lokr_w1``) or decomposed
    (``lokr_w1_a/b``); ``tucker=True`` uses ``lokr_t2`` for a decomposed kxk conv w2."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for name, module in kohya_names(components, family, conv, te):
        out_dim, in_dim = _io(module)
        kernel = _kernel(module)
        (a, c), (b, d) = _factor(out_dim), _factor(in_dim)
        if decompose_w1:
            tensors[f"{name}.lokr_w1_a"] = _randn(generator, a, rank)
            tensors[f"{name}.lokr_w1_b"] = _randn(generator, rank, b)
        else:
            tensors[f"{name}.lokr_w1"] = _randn(generator, a, b)
        if not decompose_w2:
            tensors[f"{name}.lokr_w2"] = _randn(generator, c, d, *kernel)
        elif tucker and kernel and kernel != (1, 1):
            tensors[f"{name}.lokr_t2"] = _randn(generator, rank, rank, *kernel)
            tensors[f"{name}.lokr_w2_a"] = _randn(generator, rank, c)
            tensors[f"{name}.lokr_w2_b"] = _randn(generator, rank, d)
        else:
            flat = d * (kernel[0] * kernel[1] if kernel else 1)
            tensors[f"{name}.lokr_w2_a"] = _randn(generator, c, rank)
            tensors[f"{name}.lokr_w2_b"] = _randn(generator, rank, flat)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    metadata = kohya_metadata(family, "lycoris.kohya", rank, alpha, Path(path).stem)
    metadata["ss_network_args"] = json.dumps({"algo": "lokr"})
    return _save(Path(path), tensors, metadata, dtype)


def write_peft_lora(
    path: str | Path,
    components: Mapping[str, Any],
    family: str,
    rank: int = 4,
    alpha: float = 8.0,
    te: bool = True,
    seed: int = 0,
    *,
    alpha_pattern: Mapping[str, float] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """diffusers ``save_lora_weights`` layout: ``unet.<module>.lora_A.weight`` /
    ``lora_B.weight`` (``text_encoder.``, ``text_encoder_2.`` for the encoders, with module names
    as the transformers 5 models have them) and the PEFT configs, prefixed per component, in the
    ``lora_adapter_metadata`` JSON. ``alpha_pattern`` is written into the UNet's config."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    config: dict[str, Any] = {}
    parts = [("unet", components["unet"], list(unet_targets(components["unet"])))]
    if te:
        parts += [(key, enc, [(n, m) for n, m in enc.named_modules()
                              if isinstance(m, nn.Linear) and _ends(n, _TE_TAILS)])
                  for key, enc in _text_encoders(components)]
    for prefix, _, targets in parts:
        for name, module in targets:
            out_dim, in_dim = _io(module)
            kernel = _kernel(module)
            tensors[f"{prefix}.{name}.lora_A.weight"] = _randn(generator, rank, in_dim, *kernel)
            tensors[f"{prefix}.{name}.lora_B.weight"] = _randn(generator, out_dim, rank, *((1, 1) if kernel else ()))
        config |= {f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha, f"{prefix}.rank_pattern": {},
                   f"{prefix}.alpha_pattern": dict(alpha_pattern or {}) if prefix == "unet" else {},
                   f"{prefix}.target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in targets})}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    return _save(Path(path), tensors, metadata, dtype)


def write_old_diffusers_lora(
    path: str | Path,
    components: Mapping[str, Any],
    family: str,
    rank: int = 4,
    te: bool = True,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """The pre-PEFT diffusers layout (attention processors): ``unet.….attn1.processor.to_q_lora
    .down.weight`` and ``text_encoder.text_model.….q_proj.lora_linear_layer.down.weight``."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for name, module in unet_targets(components["unet"]):
        if not re.search(r"\.attn[12]\.to_", name):
            continue  # the old format only covered attention processors
        attention, _, proj = name.rpartition(".to_")
        proj = "to_out" if proj == "out.0" else f"to_{proj}"
        out_dim, in_dim = _io(module)
        key = f"unet.{attention}.processor.{proj}_lora"
        tensors[f"{key}.down.weight"] = _randn(generator, rank, in_dim)
        tensors[f"{key}.up.weight"] = _randn(generator, out_dim, rank)
    if te:
        for prefix, encoder in _text_encoders(components):
            for name, module in te_targets(encoder):
                out_dim, in_dim = _io(module)
                key = f"{prefix}.text_model.{name}.lora_linear_layer"
                tensors[f"{key}.down.weight"] = _randn(generator, rank, in_dim)
                tensors[f"{key}.up.weight"] = _randn(generator, out_dim, rank)
    return _save(Path(path), tensors, {"format": "pt"}, dtype)
