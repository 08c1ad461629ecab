"""BFL's FLUX.1 transformer names -> diffusers' ``FluxTransformer2DModel`` names, at any width.

diffusers 0.42's ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes the full
model's width (3072) to split a single block's fused ``linear1``, so it cannot read a
pruned or tiny FLUX.1; here every split size comes from the tensors themselves.

Only dim-0 ``torch.split`` / ``torch.cat`` touch the data: quantized GGUF tensors keep
whole rows along dim 0 (their blocks run along the last dimension) and diffusers'
``GGUFParameter`` carries its ``quant_type`` through those two operations; fp8 tensors
keep their dtype. The result is in diffusers' names exactly, which makes
``from_single_file`` skip its own conversion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from studio.models.state_dict import ModelFileError

_P = r"(weight|bias)"
_D = r"double_blocks\.(\d+)\."
_S = r"single_blocks\.(\d+)\."
_TD = r"transformer_blocks.\1."
_TS = r"single_transformer_blocks.\1."

# (BFL pattern, diffusers template): a one-to-one rename.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"time_in\.in_layer\." + _P, r"time_text_embed.timestep_embedder.linear_1.\1"),
    (r"time_in\.out_layer\." + _P, r"time_text_embed.timestep_embedder.linear_2.\1"),
    (r"vector_in\.in_layer\." + _P, r"time_text_embed.text_embedder.linear_1.\1"),
    (r"vector_in\.out_layer\." + _P, r"time_text_embed.text_embedder.linear_2.\1"),
    (r"guidance_in\.in_layer\." + _P, r"time_text_embed.guidance_embedder.linear_1.\1"),
    (r"guidance_in\.out_layer\." + _P, r"time_text_embed.guidance_embedder.linear_2.\1"),
    (r"txt_in\." + _P, r"context_embedder.\1"),
    (r"img_in\." + _P, r"x_embedder.\1"),
    (r"final_layer\.linear\." + _P, r"proj_out.\1"),
    (_D + r"img_mod\.lin\." + _P, _TD + r"norm1.linear.\2"),
    (_D + r"txt_mod\.lin\." + _P, _TD + r"norm1_context.linear.\2"),
    # BFL's RMSNorm calls its weight "scale".
    (_D + r"img_attn\.norm\.query_norm\.scale", _TD + "attn.norm_q.weight"),
    (_D + r"img_attn\.norm\.key_norm\.scale", _TD + "attn.norm_k.weight"),
    (_D + r"txt_attn\.norm\.query_norm\.scale", _TD + "attn.norm_added_q.weight"),
    (_D + r"txt_attn\.norm\.key_norm\.scale", _TD + "attn.norm_added_k.weight"),
    (_D + r"img_attn\.proj\." + _P, _TD + r"attn.to_out.0.\2"),
    (_D + r"txt_attn\.proj\." + _P, _TD + r"attn.to_add_out.\2"),
    (_D + r"img_mlp\.0\." + _P, _TD + r"ff.net.0.proj.\2"),
    (_D + r"img_mlp\.2\." + _P, _TD + r"ff.net.2.\2"),
    (_D + r"txt_mlp\.0\." + _P, _TD + r"ff_context.net.0.proj.\2"),
    (_D + r"txt_mlp\.2\." + _P, _TD + r"ff_context.net.2.\2"),
    (_S + r"modulation\.lin\." + _P, _TS + r"norm.linear.\2"),
    (_S + r"norm\.query_norm\.scale", _TS + "attn.norm_q.weight"),
    (_S + r"norm\.key_norm\.scale", _TS + "attn.norm_k.weight"),
    (_S + r"linear2\." + _P, _TS + r"proj_out.\2"),
)

# (BFL pattern, diffusers templates of the parts): fused linears, split along dim 0. The
# last part takes what the width-sized ones leave: a single block's MLP input.
_SPLITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (_D + r"img_attn\.qkv\." + _P, tuple(_TD + rf"attn.to_{x}.\2" for x in "qkv")),
    (_D + r"txt_attn\.qkv\." + _P, tuple(_TD + rf"attn.add_{x}_proj.\2" for x in "qkv")),
    (_S + r"linear1\." + _P, (*(_TS + rf"attn.to_{x}.\2" for x in "qkv"), _TS + r"proj_mlp.\2")),
)

# BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift).
_SWAPPED = (r"final_layer\.adaLN_modulation\.1\." + _P, r"norm_out.linear.\1")


def _split(value: Tensor, width: int, parts: int, name: str) -> tuple[Tensor, ...]:
    rest = value.shape[0] - width * (parts - 1)
    if rest <= 0 or (parts == 3 and rest != width):
        raise ModelFileError(f"{name}: {value.shape[0]} rows do not split into {parts} parts at width {width}")
    return torch.split(value, [width] * (parts - 1) + [rest], dim=0)


def _swap_halves(value: Tensor) -> Tensor:
    first, second = torch.chunk(value, 2, dim=0)
    return torch.cat([second, first], dim=0)


def _convert(name: str, value: Tensor, width: int) -> dict[str, Tensor]:
    """The diffusers tensors of one BFL tensor."""
    for pattern, template in _RENAMES:
        if m := re.fullmatch(pattern, name):
            return {m.expand(template): value}
    for pattern, templates in _SPLITS:
        if m := re.fullmatch(pattern, name):
            parts = _split(value, width, len(templates), name)
            return {m.expand(t): part for t, part in zip(templates, parts, strict=True)}
    if m := re.fullmatch(_SWAPPED[0], name):
        return {m.expand(_SWAPPED[1]): _swap_halves(value)}
    raise ModelFileError(f"FLUX.1 transformer: no diffusers name known for {name!r}")


def flux_to_diffusers(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename the BFL FLUX.1 transformer weights under ``prefix`` (other keys are ignored)
    to diffusers' ``FluxTransformer2DModel`` names, splitting the fused q/k/v (and a single
    block's MLP input) at the width of ``img_in``'s output. Raises ``ModelFileError`` on a
    name it has no rule for."""
    body = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "img_in.weight" not in body:
        raise ModelFileError(f"no FLUX.1 transformer under {prefix!r} (img_in.weight missing)")
    width = body["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for name, value in body.items():
        out |= _convert(name, value, width)
    return out
