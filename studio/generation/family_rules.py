"""What a request becomes on a given model family: the family's presets for the fields the caller
left unset (FLUX.1 runs at CFG 1 with its distilled guidance 3.5, schnell in 4 steps), its size
rule, and a clear refusal of every field the family cannot honour yet -- never a silent no-op.
Runs on the worker once the model (and so its family) is known."""

from __future__ import annotations

from typing import Any

from studio.errors import RequestError
from studio.generation.flow_samplers import FLOW_SAMPLER_NAMES, flow_sampler_supported
from studio.generation.request import PRESET_FIELDS, Txt2ImgRequest
from studio.generation.samplers import zero_snr_samplers
from studio.prompts.parser import extract_extra_networks


def unset_preset_fields(req: Txt2ImgRequest) -> tuple[str, ...]:
    """The preset fields the caller did not send (``sampler_index`` is the old name of ``sampler_name``)."""
    given = set(req.model_fields_set)
    if "sampler_index" in given:
        given.add("sampler_name")
    return tuple(f for f in PRESET_FIELDS if f not in given)


def uses_guidance(model: Any) -> bool:
    """Whether the model takes FLUX's distilled guidance as an input (dev, Fill, Kontext; not schnell)."""
    return bool(getattr(model.denoiser.config, "guidance_embeds", False))


def adapt_to_family(req: Txt2ImgRequest, model: Any) -> Txt2ImgRequest:
    spec = model.spec
    notes = list(req.notes)
    if not spec.is_flow:
        if model.probe.zero_terminal_snr and req.sampler_name not in zero_snr_samplers():
            raise RequestError(f"sampler {req.sampler_name!r} cannot sample {model.label}: its scheduler has no "
                               f"zero-terminal-SNR schedule; use one of: {', '.join(zero_snr_samplers())}")
        if req.distilled_cfg_scale is not None:
            notes.append(f"Distilled CFG Scale is an input of guidance-distilled models (FLUX.1 dev); "
                         f"{model.label} does not use it.")
        return req.model_copy(update={"notes": tuple(notes)}) if notes != list(req.notes) else req
    _refuse_unsupported(req, model)
    presets = spec.presets_for(model.probe.variant)
    changes: dict[str, Any] = {k: presets[k] for k in (req.preset_fields or ()) if k in presets}
    if uses_guidance(model):
        if req.distilled_cfg_scale is None:
            changes["distilled_cfg_scale"] = presets.get("distilled_cfg_scale", 3.5)
    elif req.distilled_cfg_scale is not None:
        notes.append(f"Distilled CFG Scale is not used by {model.label} (no guidance input).")
    if model.probe.variant == "kontext" and getattr(req, "init_images", None) and req.denoising_strength < 1:
        notes.append("FLUX.1 Kontext edits the init image from noise: denoising strength is not used.")
    notes += prompt_length_notes(req, model)
    sampler = changes.get("sampler_name", req.sampler_name)
    if not flow_sampler_supported(sampler):
        raise RequestError(f"sampler {sampler!r} is not available for {spec.label} models (flow matching); "
                           f"use one of: {', '.join(FLOW_SAMPLER_NAMES)}")
    multiple = spec.size_multiple
    width, height = req.width - req.width % multiple, req.height - req.height % multiple
    if (width, height) != (req.width, req.height):
        notes.append(f"Size {req.width}x{req.height} rounded down to {width}x{height} "
                     f"({spec.label} needs multiples of {multiple}).")
        changes |= {"width": width, "height": height}
    changes["notes"] = tuple(notes)
    return req.model_copy(update=changes)


def _refuse_unsupported(req: Txt2ImgRequest, model: Any) -> None:
    """Features written for SD's UNet and CLIP that the DiT engines do not have yet."""
    label = model.spec.label
    refused = []
    if any(u.enabled for u in req.controlnet_units) and model.spec.id != "flux1":
        # FLUX.1 takes its own ControlNets (checked per unit against the checkpoint's family)
        refused.append("ControlNet units")
    if req.tiling:
        refused.append("tiling (seamless textures)")
    if req.token_merging_ratio or req.token_merging_ratio_hr:
        refused.append("token merging (a UNet optimisation)")
    for field in ("prompt", "hr_prompt"):
        _, tags = extract_extra_networks(getattr(req, field) or "")
        if not model.spec.loras and any(t.kind in ("lora", "lyco") for t in tags):
            refused.append(f"LoRAs (<lora:...>): their key maps for {label} are not written yet")
        hypernets = [t for t in tags if t.kind == "hypernet"]
        if hypernets:   # hypernetworks hook SD's UNet attention; LoRAs have their DiT patcher
            refused.append("hypernetworks (" + ", ".join(f"<hypernet:{t.name}>" for t in hypernets)
                           + "): they are trained for SD's UNet")
            break
    if model.probe.variant == "fill" and getattr(req, "mask", None) is None:
        refused.append("FLUX.1 Fill without a mask (it repaints a masked image: use img2img's inpaint)")
    if model.probe.variant == "control":
        refused.append("the FLUX.1 Depth/Canny variant (its control image input)")
    if refused:
        raise RequestError(f"{label} models do not support " + "; ".join(dict.fromkeys(refused)) + " yet")


def prompt_length_notes(req: Txt2ImgRequest, model: Any) -> list[str]:
    """Where a DiT family's encoders stop reading: T5 at its sequence length, CLIP (when it is more than a
    pooled vector) at 75 tokens. Said once per prompt, as A1111 warns about truncated prompts."""
    notes = []
    conditioner = model.conditioner
    for name in ("prompt", "negative_prompt"):
        text, _ = extract_extra_networks(getattr(req, name) or "")
        if not text:
            continue
        counts = conditioner.token_counts(text)
        for key, label in (("t5", "T5"), ("qwen3", "Qwen3")):
            if key in counts and counts[key][0] > counts[key][1]:
                count, limit = counts[key]
                notes.append(f"The {name.replace('_', ' ')} is {count} {label} tokens; {model.spec.label} reads "
                             f"{limit}: the rest is ignored.")
        if model.spec.id == "sd3" and counts["clip"][0] > counts["clip"][1]:
            notes.append(f"The {name.replace('_', ' ')} is {counts['clip'][0]} CLIP tokens; SD3's CLIP encoders "
                         "read the first 75 (T5 reads on).")
    return notes
