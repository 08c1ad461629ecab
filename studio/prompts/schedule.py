"""The per-step conditioning plan of one generation: prompt editing, alternation and
``AND`` sub-prompts resolved to the texts in force at each sampler step (A1111's
``get_multicond_learned_conditioning`` + ``reconstruct_cond_batch``), encoded once per
distinct text, and stacked so the sampler loop can run them as one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from studio.prompts.encode import TextConditioner
from studio.prompts.parser import DEFAULT_EMPHASIS, cached_schedule, check_emphasis, split_and


def _pick(schedule: list[tuple[int, str]], step: int) -> str:
    """A1111 compares the 0-based sampler step with the 1-based end step (``step <= end``)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


@dataclass
class ConditioningPlan:
    conditioner: TextConditioner
    prompt: str
    negative: str
    steps: int
    clip_skip: int
    emphasis: str = DEFAULT_EMPHASIS  # A1111's ``emphasis`` option, see parser.EMPHASIS_MODES
    positive: list[tuple[list[tuple[int, str]], float]] = field(init=False)
    negative_schedule: list[tuple[int, str]] = field(init=False)
    chunks: int = field(init=False)
    _last: tuple | None = field(default=None, init=False)
    _last_value: tuple | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_emphasis(self.emphasis)
        self.positive = [(list(cached_schedule(text, self.steps)), weight)
                         for text, weight in split_and(self.prompt)]
        self.negative_schedule = list(cached_schedule(self.negative, self.steps))
        texts = {t for sched, _ in self.positive for _, t in sched} | {t for _, t in self.negative_schedule}
        # every text is padded to the longest one so they batch together
        self.chunks = max(len(self.conditioner.chunks(t, self.emphasis)) for t in texts)

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.positive]

    @property
    def all_texts(self) -> list[str]:
        texts = [t for sched, _ in self.positive for _, t in sched] + [t for _, t in self.negative_schedule]
        return list(dict.fromkeys(texts))

    def infotext_params(self) -> dict[str, str]:
        """``Emphasis: <mode>`` when the mode is not "Original" and a text the encoder sees holds
        "(" or "[", exactly when A1111's ``sd_hijack_clip`` writes it."""
        if self.emphasis != DEFAULT_EMPHASIS and any("(" in t or "[" in t for t in self.all_texts):
            return {"Emphasis": self.emphasis}
        return {}

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeds, pooled) for [negative, sub-prompt 1..k] at this sampler step; the stacked
        tensors are rebuilt only when the texts in force change."""
        key = (_pick(self.negative_schedule, step), *(_pick(s, step) for s, _ in self.positive))
        if key == self._last and self._last_value is not None:
            return self._last_value
        conds = [self.conditioner.encode(text, self.clip_skip, self.chunks, self.emphasis) for text in key]
        embeds = torch.cat([c.embeds for c in conds])
        pooled = torch.cat([c.pooled for c in conds]) if conds[0].pooled is not None else None
        self._last, self._last_value = key, (embeds, pooled)
        return embeds, pooled
