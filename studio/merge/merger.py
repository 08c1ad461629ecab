"""A1111's Checkpoint Merger (``modules/extras.py`` ``run_modelmerger``), one tensor at a time.

A1111 loads B (and C) whole, folds C into B, loads A whole, merges in place and saves the dict:
three models in memory. Here every output tensor is planned from the files' headers first
(names, dtypes, shapes), the header of the output is written, and each tensor is then read from
A/B/C, combined, written and dropped, into a temporary file renamed at the end. Peak memory is
a few tensors (plus a baked-in VAE, which is loaded whole: it is small).

What A1111 does, and this does too:

- Weighted sum ``(1 - M) * A + M * B``; Add difference ``A + M * (B - C)``; No interpolation: A.
- Only A's tensors are written; B's extra tensors are ignored. In SD-family files only names
  containing ``model`` are merged (the schedule buffers such as ``alphas_cumprod`` keep A's), and
  CLIP's ``position_ids`` never are. A tensor missing from B (or, for Add difference, from C)
  keeps A's value.
- An inpainting (9-channel) or instruct-pix2pix (8-channel) A merges with a 4-channel B in its
  first 4 input channels; the file name gets ``.inpainting`` / ``.instruct-pix2pix``. The other
  way round is refused with A1111's message.
- The default name: ``0.7(A) + 0.3(B)``, ``A + 0.3(B - C)`` or ``A`` (model names, M rounded to
  2 places); a baked-in VAE replaces ``first_stage_model.*``; ``discard_weights`` drops the
  names it matches (``re.search``); metadata as A1111 writes it (see :func:`merge_metadata`);
  a ``.yaml`` config next to an input is copied next to the output (``config_source``).

Where this differs, deliberately:

- Only ``.safetensors`` is written; other shape mismatches keep A's tensor and are listed in the
  result's notes (A1111 crashes); non-float tensors are copied from A, never averaged.
- ``save_as_half`` makes every 32/64-bit float tensor float16 (A1111 only converts the merged
  ones, unless there is no interpolation). bfloat16 and fp8 tensors keep their dtype, as in A1111.
- Merged values are computed in float32 (float64 if an input is) and stored in the inputs' dtype
  (torch's promotion of them when they differ); A1111 computes in the stored dtype.
- Families are checked: an SD1 model never merges with an SDXL one. In the DiT families every
  float tensor merges (their names have no ``model`` marker), and a bare transformer file merges
  with an all-in-one file of the same family (the ``model.diffusion_model.`` prefix is matched).
- ``discard_ema`` (not in A1111) leaves out ``model_ema.*``; A1111 keeps EMA weights, merged when
  both files have them and A's otherwise, so a merge's EMA copy is usually just A's.
- The recipe hashes are always filled in (A1111 writes None for a model not hashed yet), and a
  JSON-object metadata value copied from an input is written back as JSON text.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.config import atomic_write
from studio.errors import RequestError
from studio.merge.request import (
    ADD_DIFFERENCE,
    NO_INTERPOLATION,
    NO_VAE,
    WEIGHTED_SUM,
    MergeRequest,
    MergeResult,
)
from studio.merge.safetensors_writer import SafetensorsWriter, TensorSpec
from studio.merge.sources import ModelRef, Resolver, TensorSource, check_same_family, model_ref, read_metadata
from studio.models.dit_arch import component_prefixes
from studio.models.state_dict import ModelFileError
from studio.models.vae import is_diffusers_vae, read_vae_state_dict

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]

# A1111's ``checkpoint_dict_skip_on_merge``
SKIP_ON_MERGE = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
EMA_PREFIX = "model_ema."
LDM_VAE_PREFIX = "first_stage_model."
SUFFIX = ".safetensors"
_NOTE_EXAMPLES = 5
_SD_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")


@dataclass(frozen=True)
class _Step:
    """How one output tensor is made."""

    key: str
    spec: TensorSpec
    how: str             # "copy" (A's), "merge", "channels" (merge A's first channels), "vae"
    b_key: str = ""      # B's name for it (merge, channels), or the VAE file's (vae)
    c_key: str = ""      # C's name for it (Add difference)


@dataclass
class _Plan:
    steps: list[_Step]
    notes: list[str]
    is_inpainting: bool = False
    is_instruct_pix2pix: bool = False


def merge_checkpoints(req: MergeRequest, resolve_checkpoint: Resolver,
                      resolve_vae: Callable[[str], Path | None], out_dir: Path,
                      progress: Progress | None = None) -> MergeResult:
    """Merge as A1111's Checkpoint Merger does and write ``out_dir/<name>.safetensors``.

    ``resolve_checkpoint`` turns a model name into its catalog entry (or a path) and
    ``resolve_vae`` a VAE name into a path (None = no VAE); both raise RequestError for unknown
    names. Everything that can be refused is refused before the output file is created: names,
    families, shapes, the output name, the VAE. ``progress(done, total)`` counts written tensors.
    """
    method = req.interp_method
    refs = [model_ref("A", req.primary_model_name, resolve_checkpoint)]
    if method != NO_INTERPOLATION:
        refs.append(model_ref("B", req.secondary_model_name, resolve_checkpoint))
    if method == ADD_DIFFERENCE:
        refs.append(model_ref("C", req.tertiary_model_name, resolve_checkpoint))
    sources = [TensorSource(ref) for ref in refs]
    a, b, c = (sources + [None, None])[:3]
    for other in sources[1:]:
        check_same_family(a, other)

    vae_path = resolve_vae(req.bake_in_vae) if req.bake_in_vae != NO_VAE else None
    vae = _read_vae(vae_path) if vae_path is not None else None
    plan = _plan(req, a, b, c, vae)

    path = _output_path(req, out_dir, refs, plan)
    config = _config_to_copy(req.config_source, refs)
    config_target = path.with_suffix(".yaml") if config is not None else None
    if config_target is not None and config_target.exists() and not req.overwrite:
        raise RequestError(f"{config_target.name} already exists in {config_target.parent}: choose another "
                           "custom name, set overwrite to replace it, or config_source 3 to copy no config")

    _check_space(path, sum(step.spec.nbytes for step in plan.steps))
    metadata = merge_metadata(req, refs, plan.is_inpainting, plan.is_instruct_pix2pix)

    def write(temp: Path) -> None:
        with contextlib.ExitStack() as stack:
            for source in sources:
                stack.enter_context(source.reading())
            with open(temp, "wb") as f:
                writer = SafetensorsWriter(f, {s.key: s.spec for s in plan.steps}, metadata)
                steps = {s.key: s for s in plan.steps}
                total = len(writer.order)
                for done, key in enumerate(writer.order, 1):
                    # computed inside the call: no reference to the previous result outlives its write
                    writer.write(key, _tensor(steps[key], req, a, b, c, vae))
                    if progress is not None:
                        progress(done, total)
                writer.finish()
        if path.exists() and not req.overwrite:   # appeared while merging
            raise RequestError(f"{path.name} appeared in {path.parent} while merging; nothing was replaced")

    atomic_write(path, write)
    if config is not None and config_target is not None:
        shutil.copyfile(config, config_target)
    return MergeResult(path=path, notes=tuple(plan.notes), metadata=metadata or {}, config_path=config_target)


# --------------------------------------------------------------------------------------------- planning


def _read_vae(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = read_vae_state_dict(path)
    except ModelFileError as e:
        raise RequestError(f"bake_in_vae: {e}") from e
    if is_diffusers_vae(sd):
        raise RequestError(f"bake_in_vae: {path.name} is in the diffusers layout; baking in needs a VAE in the "
                           "original layout (encoder.down.0...), as .vae.safetensors / .vae.pt files are")
    return sd


def _mergeable(key: str, family: str, spec: TensorSpec) -> bool:
    if key in SKIP_ON_MERGE or not spec.dtype.is_floating_point:
        return False
    # A1111's rule for SD files ("model" in the name); DiT files have no such marker
    return "model" in key or family not in _SD_FAMILIES


def _out_dtype(dtypes: list[torch.dtype], half: bool) -> torch.dtype:
    import torch
    out = dtypes[0]
    for dtype in dtypes[1:]:
        try:
            out = torch.promote_types(out, dtype)
        except RuntimeError:   # fp8 promotes to nothing: store the result as float32
            out = torch.float32
    if half and out in (torch.float32, torch.float64):
        return torch.float16
    return out


def _channel_merge(key: str, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether A's tensor merges with B's in its first input channels (an inpainting or
    instruct-pix2pix A, a normal B); refuses the reverse as A1111 does."""
    if len(a) < 2 or a[0] != b[0] or a[2:] != b[2:] or a[1] == b[1]:
        return False
    if a[1] < b[1]:
        kind = {9: "inpainting", 8: "instruct-pix2pix"}.get(b[1])
        if a[1] == 4 and kind is not None:
            raise RequestError(f"When merging {kind} model with a normal one, A must be the {kind} model.")
        raise RequestError(f"{key}: B has more input channels ({b[1]}) than A ({a[1]}); make the model with more "
                           "input channels A")
    return True


def _plan(req: MergeRequest, a: TensorSource, b: TensorSource | None, c: TensorSource | None,
          vae: dict[str, torch.Tensor] | None) -> _Plan:
    discard = re.compile(req.discard_weights) if req.discard_weights else None
    vae_prefix = _vae_prefix(a) if vae is not None else ""
    plan = _Plan([], [])
    missing_b: list[str] = []
    missing_c: list[str] = []
    mismatched: list[str] = []
    merged = baked = 0
    for key, spec in a.specs.items():
        if (discard is not None and discard.search(key)) or (req.discard_ema and key.startswith(EMA_PREFIX)):
            continue
        if vae is not None and key.startswith(vae_prefix) and key[len(vae_prefix):] in vae:
            step = _vae_step(key, spec, vae[key[len(vae_prefix):]], vae_prefix, req.save_as_half)
            plan.steps.append(step)
            baked += 1
            continue
        step = _Step(key, TensorSpec(_out_dtype([spec.dtype], req.save_as_half), spec.shape), "copy")
        if b is not None and _mergeable(key, a.family, spec):
            b_key = b.key_for(key, a)
            c_key = c.key_for(key, a) if c is not None else ""
            b_spec = b.specs.get(b_key)
            c_spec = c.specs.get(c_key) if c is not None else None
            if b_spec is None or not b_spec.dtype.is_floating_point:
                missing_b.append(key)
            elif c is not None and (c_spec is None or not c_spec.dtype.is_floating_point):
                missing_c.append(key)
            elif c_spec is not None and c_spec.shape != b_spec.shape:
                mismatched.append(f"{key} (B {list(b_spec.shape)}, C {list(c_spec.shape)})")
            elif b_spec.shape == spec.shape or _channel_merge(key, spec.shape, b_spec.shape):
                how = "merge" if b_spec.shape == spec.shape else "channels"
                dtypes = [spec.dtype, b_spec.dtype] + ([c_spec.dtype] if c_spec is not None else [])
                step = _Step(key, TensorSpec(_out_dtype(dtypes, req.save_as_half), spec.shape), how, b_key, c_key)
                merged += 1
                if how == "channels":
                    plan.is_inpainting |= (spec.shape[1], b_spec.shape[1]) == (9, 4)
                    plan.is_instruct_pix2pix |= (spec.shape[1], b_spec.shape[1]) == (8, 4)
                    plan.notes.append(f"{key}: A has {spec.shape[1]} input channels, B {b_spec.shape[1]}: only the "
                                      f"first {b_spec.shape[1]} were merged")
            else:
                mismatched.append(f"{key} (A {list(spec.shape)}, B {list(b_spec.shape)})")
        plan.steps.append(step)
    if b is not None and merged == 0:
        raise RequestError(f"{a.ref.label} and {b.ref.label} have no tensors of the same name and shape to merge")
    if vae is not None and baked == 0:
        raise RequestError(f"bake_in_vae: none of the VAE's weights has a place in {a.ref.label} "
                           f"(no {vae_prefix}* tensors of those names)")
    plan.notes[:0] = [
        *_listed(mismatched, "tensors differ in shape and were kept from A"),
        *_listed(missing_b, "tensors of A are not in B and were kept from A"),
        *_listed(missing_c, "tensors of A are not in C and were kept from A"),
    ]
    return plan


def _vae_prefix(a: TensorSource) -> str:
    if a.family in _SD_FAMILIES:
        return LDM_VAE_PREFIX
    prefix = component_prefixes(a.shapes).get("vae")
    if prefix is None:
        raise RequestError(f"bake_in_vae: {a.ref.label} holds no VAE to replace (a transformer-only file)")
    return prefix


def _vae_step(key: str, spec: TensorSpec, tensor: torch.Tensor, prefix: str, half: bool) -> _Step:
    if tuple(tensor.shape) != spec.shape:
        raise RequestError(f"bake_in_vae: the VAE does not fit this model: {key[len(prefix):]} is "
                           f"{list(tensor.shape)}, the model's is {list(spec.shape)}")
    return _Step(key, TensorSpec(_out_dtype([tensor.dtype], half), spec.shape), "vae", key[len(prefix):])


def _listed(keys: list[str], what: str) -> list[str]:
    if not keys:
        return []
    shown = ", ".join(keys[:_NOTE_EXAMPLES]) + (", ..." if len(keys) > _NOTE_EXAMPLES else "")
    return [f"{len(keys)} {what}: {shown}"]


# --------------------------------------------------------------------------------------------- names


def default_name(req: MergeRequest, refs: list[ModelRef]) -> str:
    """A1111's ``filename_weighted_sum`` / ``filename_add_difference`` / ``filename_nothing``."""
    m = float(req.multiplier)
    names = [r.model_name for r in refs]
    if req.interp_method == WEIGHTED_SUM:
        return f"{round(1 - m, 2)}({names[0]}) + {round(m, 2)}({names[1]})"
    if req.interp_method == ADD_DIFFERENCE:
        return f"{names[0]} + {round(m, 2)}({names[1]} - {names[2]})"
    return names[0]


def _output_path(req: MergeRequest, out_dir: Path, refs: list[ModelRef], plan: _Plan) -> Path:
    name = req.custom_name.strip()
    if name.lower().endswith(SUFFIX):
        name = name[:-len(SUFFIX)]
    name = name or default_name(req, refs)
    name += ".inpainting" if plan.is_inpainting else ""
    name += ".instruct-pix2pix" if plan.is_instruct_pix2pix else ""
    relative = Path(name.replace("\\", "/") + SUFFIX)
    root = Path(out_dir).resolve()
    path = (root / relative).resolve()
    if "\x00" in name or relative.is_absolute() or ".." in relative.parts or not path.is_relative_to(root):
        raise RequestError(f"custom_name {req.custom_name!r}: give a file name (sub-folders of {root} allowed)")
    for ref in refs:
        if ref.path.resolve() == path:
            raise RequestError(f"the output {path.name} would replace {ref.label}, which the merge reads; "
                               "choose another custom name")
    if path.exists() and not req.overwrite:
        raise RequestError(f"{path.name} already exists in {path.parent}: choose another custom name, or set "
                           "overwrite to replace it")
    return path


def _check_space(path: Path, needed: int) -> None:
    """Refuse at once rather than fail after minutes of merging with a full disk."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + (1 << 20):
        raise RequestError(f"not enough disk space in {folder}: the merged model needs {needed / 2**30:.2f} GiB, "
                           f"{free / 2**30:.2f} GiB are free")


def _config_to_copy(source: int, refs: list[ModelRef]) -> Path | None:
    """A1111's ``create_config``: the ``<model>.yaml`` beside A, B or C (the first found), B, C, or none."""
    def near(index: int) -> Path | None:
        if index >= len(refs):
            return None
        candidate = refs[index].path.with_suffix(".yaml")
        return candidate if candidate.is_file() else None

    if source == 0:
        return near(0) or near(1) or near(2)
    return near(source) if source in (1, 2) else None


# --------------------------------------------------------------------------------------------- metadata


def merge_metadata(req: MergeRequest, refs: list[ModelRef], is_inpainting: bool = False,
                   is_instruct_pix2pix: bool = False) -> dict[str, str] | None:
    """The header metadata A1111 writes: the inputs' fields (A, then B, then C), the request's
    JSON fields, ``format: pt``, and with ``add_merge_recipe`` ``sd_merge_recipe`` (the request and
    the inputs' sha256) and ``sd_merge_models`` (sha256 -> name, legacy hash, the input's own
    recipe; then the inputs' own ``sd_merge_models``), both as JSON text. None when nothing is saved."""
    if not req.save_metadata:
        return None
    metadata: dict[str, Any] = {}
    if req.copy_metadata_fields:
        for ref in refs:
            metadata.update(read_metadata(ref.path))
    metadata.update(req.extra_metadata)
    metadata["format"] = "pt"
    if req.add_merge_recipe:
        hashes = [ref.full_hash() for ref in refs] + [None, None]
        recipe = {
            "type": "webui",
            "primary_model_hash": hashes[0],
            "secondary_model_hash": hashes[1],
            "tertiary_model_hash": hashes[2],
            "interp_method": req.interp_method,
            "multiplier": req.multiplier,
            "save_as_half": req.save_as_half,
            "custom_name": req.custom_name,
            "config_source": req.config_source,
            "bake_in_vae": req.bake_in_vae,
            "discard_weights": req.discard_weights,
            "is_inpainting": is_inpainting,
            "is_instruct_pix2pix": is_instruct_pix2pix,
        }
        models: dict[str, Any] = {}
        for ref, digest in zip(refs, hashes, strict=False):
            own = read_metadata(ref.path)
            models[digest] = {"name": ref.name, "legacy_hash": ref.legacy_hash(),
                              "sd_merge_recipe": own.get("sd_merge_recipe")}
            if isinstance(own.get("sd_merge_models"), dict):
                models.update(own["sd_merge_models"])
        metadata["sd_merge_recipe"] = json.dumps(recipe)
        metadata["sd_merge_models"] = json.dumps(models)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


# --------------------------------------------------------------------------------------------- tensors


def _tensor(step: _Step, req: MergeRequest, a: TensorSource, b: TensorSource | None, c: TensorSource | None,
            vae: dict[str, torch.Tensor] | None) -> torch.Tensor:
    if step.how == "vae" and vae is not None:
        out = vae.pop(step.b_key)   # each VAE weight is written once: free it as it goes
    elif step.how == "copy" or b is None:
        out = a.get(step.key)
    else:
        out = _merged(step, float(req.multiplier), a.get(step.key), b.get(step.b_key),
                      c.get(step.c_key) if c is not None else None)
    return out.to(step.spec.dtype).contiguous()


def _merged(step: _Step, m: float, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    import torch
    work = torch.float64 if torch.float64 in (a.dtype, b.dtype, getattr(c, "dtype", None)) else torch.float32
    if c is None:
        def combine(x: torch.Tensor) -> torch.Tensor:
            return (1 - m) * x + m * b.to(work)
    else:
        def combine(x: torch.Tensor) -> torch.Tensor:
            return x + m * (b.to(work) - c.to(work))
    if step.how == "channels":
        out = a.to(work, copy=True)
        width = b.shape[1]
        out[:, :width] = combine(out[:, :width])
        return out
    return combine(a.to(work))
