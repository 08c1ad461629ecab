"""Chroma's transformer names (lodestones' files, BFL style) -> diffusers' ``ChromaTransformer2DModel``
names, at any width.

Chroma is FLUX.1 schnell with the per-block modulation pruned away: every block it kept has
FLUX.1's names and is renamed and split by FLUX.1's rules (:mod:`studio.models.flux_keys`); what
is its own is the ``distilled_guidance_layer`` (the "approximator" that computes all modulations
from the timestep), renamed here.

diffusers 0.42's ``convert_chroma_transformer_checkpoint_to_diffusers`` hard-codes the full
model's width (3072) to split a single block's fused ``linear1``; here the split sizes come
from the tensors, as in flux_keys, with the same guarantees: only renames and dim-0 splits
touch the data, so GGUF tensors keep their quantization and fp8 tensors their dtype.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from studio.models.flux_keys import _RENAMES as FLUX_RENAMES
from studio.models.flux_keys import _SPLITS as FLUX_SPLITS
from studio.models.flux_keys import _split
from studio.models.state_dict import ModelFileError

_P = r"(weight|bias)"
_A = "distilled_guidance_layer."

# (Chroma pattern, diffusers template): the approximator's own names. Its MLP layers are
# diffusers' PixArtAlphaTextProjection (linear_1/linear_2); BFL's RMSNorm calls its weight "scale".
_APPROXIMATOR_RENAMES: tuple[tuple[str, str], ...] = (
    (r"distilled_guidance_layer\.(in_proj|out_proj)\." + _P, _A + r"\1.\2"),
    (r"distilled_guidance_layer\.layers\.(\d+)\.in_layer\." + _P, _A + r"layers.\1.linear_1.\2"),
    (r"distilled_guidance_layer\.layers\.(\d+)\.out_layer\." + _P, _A + r"layers.\1.linear_2.\2"),
    (r"distilled_guidance_layer\.norms\.(\d+)\.scale", _A + r"norms.\1.weight"),
)

# FLUX.1 names Chroma pruned: a file holding them is not a Chroma transformer.
_PRUNED = re.compile(r"(double_blocks\.\d+\.(img|txt)_mod|single_blocks\.\d+\.modulation|final_layer\.adaLN_modulation"
                     r"|time_in|vector_in|guidance_in)\.")


def _convert(name: str, value: Tensor, width: int) -> dict[str, Tensor]:
    """The diffusers tensors of one Chroma tensor."""
    if not _PRUNED.match(name):
        for pattern, template in (*_APPROXIMATOR_RENAMES, *FLUX_RENAMES):
            if m := re.fullmatch(pattern, name):
                return {m.expand(template): value}
        for pattern, templates in FLUX_SPLITS:
            if m := re.fullmatch(pattern, name):
                parts = _split(value, width, len(templates), name)
                return {m.expand(t): part for t, part in zip(templates, parts, strict=True)}
    raise ModelFileError(f"Chroma transformer: no diffusers name known for {name!r}")


def chroma_to_diffusers(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename the Chroma transformer weights under ``prefix`` (other keys are ignored) to
    diffusers' ``ChromaTransformer2DModel`` names, splitting the fused q/k/v (and a single
    block's MLP input) at the width of ``img_in``'s output. Raises ``ModelFileError`` on a
    name it has no rule for, FLUX.1's modulation weights included."""
    body = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "img_in.weight" not in body or _A + "in_proj.weight" not in body:
        raise ModelFileError(f"no Chroma transformer under {prefix!r} (img_in / distilled_guidance_layer missing)")
    width = body["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for name, value in body.items():
        out |= _convert(name, value, width)
    return out
