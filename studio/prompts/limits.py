"""Limits on what one prompt may ask for, checked before a request is queued.

A1111 has none, and a few characters can cost minutes or all the memory there is:

- every ``AND`` sub-prompt is one more row of the UNet batch at every step (the batch is
  ``images x (1 + sub-prompts)``), so 100 ``AND`` parts run the UNet 50 times as wide as a plain
  prompt and need that much activation memory;
- prompt editing and alternation (``[a:b:5]``, ``[a|b|c]``) give each step its own text, and each
  distinct text is one pass of the text encoder (``[a|b|c|d|e|f|g] [h|i|j|k|l|m|n|o]`` alone is 56
  texts over 56 steps, and each ``AND`` part has schedules of its own);
- the editing grammar is ambiguous and parsed with Earley, whose time grows far faster than
  linearly with the brackets and colons it has to branch on: ``"[" * 1000`` took 33 s, 133
  ``(x:1.1),`` groups next to one ``[a]`` took 17 s on a 2-core machine;
- the text itself is tokenized, and every text is padded to the longest one.

:func:`check_prompt_limits` is pure and cheap where the input is large: the length and ``AND``
counts are checked first, and the parse only ever sees a prompt within the syntax limit. It parses
through :func:`~studio.prompts.parser.cached_schedule`, the same cache the conditioning plan uses,
so the work is not repeated when the job runs.
"""

from __future__ import annotations

from studio.errors import RequestError
from studio.prompts.parser import cached_schedule, extract_extra_networks, split_and

# About 2,500 CLIP tokens of English text (34 chunks of 75): far beyond any prompt that helps.
MAX_PROMPT_CHARS = 10_000
# Each sub-prompt widens the UNet batch by one image's worth: 16 parts run 17x as wide as none.
MAX_AND_SUBPROMPTS = 16
# Distinct texts the schedules of one prompt produce, each one text-encoder pass; also what the
# encoder's cache holds (encode.CACHE_SIZE), so each of them is encoded once per job.
MAX_SCHEDULED_TEXTS = 64
# In a prompt that uses "[" (the only case that runs the Earley parse), the characters the
# grammar branches on. 200 keeps the worst parse measured to about 3 s on a busy 2-core machine.
MAX_EDITING_SYNTAX_CHARS = 200
EDITING_SYNTAX = "()[]:|"


def check_prompt_limits(prompt: str | None, steps: int, field: str = "prompt") -> None:
    """Raise :class:`RequestError` naming the limit and the count when ``prompt`` exceeds one.

    ``steps`` is the step count the prompt is scheduled over (prompt editing depends on it);
    ``field`` names the prompt in the message (``negative_prompt``, ``hr_prompt``...). Extra-network
    tags (``<lora:...>``) count towards the length but are removed before the rest is checked, as
    the engine removes them before encoding. A negative prompt is checked like a positive one.
    """
    prompt = prompt or ""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"{field} is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
    text, _ = extract_extra_networks(prompt)
    subprompts = split_and(text)
    if len(subprompts) > MAX_AND_SUBPROMPTS:
        raise RequestError(f"{field} has {len(subprompts)} AND sub-prompts; the limit is {MAX_AND_SUBPROMPTS} "
                           "(each one adds a full UNet pass per image at every step)")
    if "[" in text:
        syntax = sum(text.count(c) for c in EDITING_SYNTAX)
        if syntax > MAX_EDITING_SYNTAX_CHARS:
            raise RequestError(
                f"{field} uses [ ] (prompt editing, alternation or de-emphasis) and has {syntax} of the "
                f"characters {' '.join(EDITING_SYNTAX)}; with [ ] the limit is {MAX_EDITING_SYNTAX_CHARS} "
                "(the editing grammar's parse time grows steeply with them)")
    texts = {t for sub, _ in subprompts for _, t in cached_schedule(sub, max(1, int(steps)))}
    if len(texts) > MAX_SCHEDULED_TEXTS:
        raise RequestError(f"{field} gives {len(texts)} different texts over {steps} steps (prompt editing and "
                           f"alternation); the limit is {MAX_SCHEDULED_TEXTS}")
