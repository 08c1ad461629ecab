"""The "Fast" preset: few-step models and LoRAs (LCM, SD-Turbo / SDXL-Turbo, SDXL-Lightning, Hyper-SD,
TCD, DMD2) run with the sampler, steps and CFG they were distilled for.

Such a model is recognised by what its file says about itself: the file name, and the safetensors
metadata that training tools write (``modelspec.title``, ``ss_output_name``…). Nothing in the tensors
tells a distilled UNet from its base. A user whose file says nothing picks the kind by hand.

Pure: the caller hands in the names and metadata (the engine reads them from its catalogs), so the
rules are tested without files, and this module imports no torch (the UI uses it at start-up).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from studio.errors import RequestError
from studio.prompts.parser import extract_extra_networks

# metadata keys that carry a human-written name or description (kohya's sd-scripts, Stability's modelspec)
NAME_KEYS = ("modelspec.title", "modelspec.description", "modelspec.architecture", "ss_output_name",
             "ss_training_comment", "name", "description")

AUTO = "auto"


@dataclass(frozen=True)
class FastKind:
    id: str
    label: str
    pattern: str              # matched (case-insensitively) against the file's name and metadata
    sampler_name: str
    scheduler: str            # A1111's schedule name
    steps: int
    cfg_scale: float
    step_range: tuple[int, int] = (1, 8)   # steps a name may ask for ("8step")


# The settings each kind's authors publish for it. CFG 1 means no negative pass: half the UNet work
# (the ComfyUI/Forge and FastSD CPU defaults for these models).
KINDS: tuple[FastKind, ...] = (
    # latent-consistency/lcm-lora-sdv1-5 and -sdxl, LCM_Dreamshaper: LCMScheduler, 4 steps, guidance 1-2
    FastKind("lcm", "LCM", r"(?<![a-z])lcm(?![a-z])|latent[-_ ]?consistency", "LCM", "automatic", 4, 1.0),
    # TCD-SD15 / TCD-SDXL LoRAs: their own scheduler (gamma 0.3), 4 steps, no CFG
    FastKind("tcd", "TCD", r"(?<![a-z])tcd(?![a-z])", "TCD", "automatic", 4, 1.0),
    # ByteDance Hyper-SD(XL) n-step LoRAs: DDIM with trailing timesteps, no CFG
    FastKind("hyper", "Hyper-SD", r"hyper[-_ ]?sd", "DDIM", "sgm_uniform", 8, 1.0, (1, 12)),
    # ByteDance SDXL-Lightning 1/2/4/8-step: Euler with trailing ("SGM Uniform") timesteps, no CFG
    FastKind("lightning", "Lightning", r"lightning", "Euler", "sgm_uniform", 4, 1.0),
    # DMD2 (tianweiy): LCM sampling, 4 steps, no CFG
    FastKind("dmd2", "DMD2", r"dmd2", "LCM", "automatic", 4, 1.0),
    # Stability's SD-Turbo / SDXL-Turbo (ADD): one step is what they were made for; no CFG
    FastKind("turbo", "Turbo", r"turbo", "Euler a", "sgm_uniform", 1, 1.0, (1, 4)),
)
KIND_IDS = tuple(k.id for k in KINDS)
# the choices a user sees and the API accepts
CHOICES = (AUTO, *KIND_IDS)

_STEPS = re.compile(r"(?<![0-9.])(\d{1,2})[-_ ]?(?:steps?|stp)(?![a-z])", re.IGNORECASE)


def find_kind(kind_id: str) -> FastKind:
    for kind in KINDS:
        if kind.id == kind_id.lower():
            return kind
    raise RequestError(f"fast: unknown few-step kind {kind_id!r}; use one of: {', '.join(CHOICES)}")


def describe(texts: Iterable[str]) -> str:
    return " ".join(t for t in texts if t).lower()


def file_texts(name: str, metadata: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """What a file says about itself: its name and its metadata's name-like values."""
    metadata = metadata or {}
    return (name, *(str(metadata[k]) for k in NAME_KEYS if metadata.get(k)))


def kind_of(texts: Iterable[str]) -> FastKind | None:
    """The few-step kind a file's name or metadata names (the first rule that matches: "LCM" before
    "Turbo", so "lcm-turbo-mix" is run as LCM), or None."""
    text = describe(texts)
    for kind in KINDS:
        if re.search(kind.pattern, text):
            return kind
    return None


def steps_named(kind: FastKind, texts: Iterable[str]) -> int:
    """The step count a name asks for ("Hyper-SD15-8steps-lora", "sdxl_lightning_2step"), else the kind's."""
    for text in texts:
        match = _STEPS.search(text or "")
        if match:
            low, high = kind.step_range
            return min(max(int(match.group(1)), low), high)
    return kind.steps


@dataclass(frozen=True)
class FastLora:
    """A LoRA file the preset may add: its name as used in ``<lora:NAME:1>``, what it says about itself,
    and its model family ("sd1", "sdxl"… or None when unknown)."""

    name: str
    texts: tuple[str, ...]
    family: str | None = None


@dataclass(frozen=True)
class FastPreset:
    kind: FastKind
    sampler_name: str
    scheduler: str
    steps: int
    cfg_scale: float
    lora: str | None = None       # a LoRA the prompt gets (<lora:NAME:1>) when the speed comes from it
    source: str = ""              # what was recognised, for the user's note

    def fields(self) -> dict[str, object]:
        return {"sampler_name": self.sampler_name, "scheduler": self.scheduler, "steps": self.steps,
                "cfg_scale": self.cfg_scale}

    def note(self) -> str:
        cfg = f"{self.cfg_scale:g}"
        return (f"Fast preset ({self.kind.label}, {self.source}): {self.sampler_name}, {self.steps} steps, "
                f"CFG {cfg}" + (f", `<lora:{self.lora}:1>` added" if self.lora else ""))


def _same_family(lora: FastLora, family: str | None) -> bool:
    if family is None or lora.family is None:
        return True
    base = "sdxl" if family.startswith("sdxl") else family
    return lora.family == base or lora.family.startswith(base)


def _preset(kind: FastKind, texts: Sequence[str], lora: str | None, source: str) -> FastPreset:
    return FastPreset(kind, kind.sampler_name, kind.scheduler, steps_named(kind, texts), kind.cfg_scale, lora, source)


def choose(wanted: str, checkpoint: str, checkpoint_texts: Sequence[str], prompt: str,
           loras: Sequence[FastLora], family: str | None) -> FastPreset:
    """The preset for a generation on ``checkpoint``.

    ``wanted`` is "auto" or a kind. "auto" looks, in order, at the checkpoint (an SDXL-Turbo file), at a
    few-step LoRA already in the prompt, then for one in the LoRA folder made for the checkpoint's
    family (the preset adds it to the prompt). A kind chosen by hand is taken as the user's word that
    the model is of that kind: its settings, nothing added. Raises RequestError when "auto" finds none.
    """
    if wanted.lower() != AUTO:
        kind = find_kind(wanted)
        return _preset(kind, checkpoint_texts, None, "chosen")
    kind = kind_of(checkpoint_texts)
    if kind is not None:
        return _preset(kind, checkpoint_texts, None, f"checkpoint {checkpoint}")
    by_name = {lora.name.lower(): lora for lora in loras}
    _, tags = extract_extra_networks(prompt)
    for tag in tags:
        lora = by_name.get(tag.name.lower())
        if tag.kind in ("lora", "lyco") and lora is not None:
            kind = kind_of(lora.texts)
            if kind is not None:
                return _preset(kind, lora.texts, None, f"LoRA {lora.name} in the prompt")
    found = [(lora, kind) for lora in loras if _same_family(lora, family)
             for kind in (kind_of(lora.texts),) if kind is not None]
    if found:
        # prefer a LoRA whose family is known to match, then the kinds' order (LCM first), then the name
        lora, kind = min(found, key=lambda lk: (0 if lk[0].family else 1, KINDS.index(lk[1]), lk[0].name.lower()))
        return _preset(kind, lora.texts, lora.name, f"LoRA {lora.name}")
    raise RequestError(
        f"fast: {checkpoint} is not a few-step model by its name or metadata, and models/Lora has no few-step "
        "LoRA for it. Put one in models/Lora (an LCM, Lightning, Hyper-SD, TCD or DMD2 LoRA, e.g. "
        "lcm-lora-sdv1-5.safetensors) or a Turbo/Lightning/LCM checkpoint in models/Stable-diffusion, or "
        f"name the kind yourself ({', '.join(KIND_IDS)}).")


def with_lora(prompt: str, lora: str | None) -> str:
    """The prompt with ``<lora:NAME:1>`` appended, unless it already names that LoRA."""
    if not lora:
        return prompt
    _, tags = extract_extra_networks(prompt)
    if any(t.name.lower() == lora.lower() for t in tags):
        return prompt
    return f"{prompt.rstrip()} <lora:{lora}:1>".lstrip()
