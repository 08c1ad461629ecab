"""Prompt limits: each one refuses one over the limit with a message naming it and the count, and
lets a prompt exactly at the limit through."""

from __future__ import annotations

import pytest

from studio.errors import RequestError
from studio.prompts import limits
from studio.prompts.limits import (
    MAX_AND_SUBPROMPTS,
    MAX_EDITING_SYNTAX_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SCHEDULED_TEXTS,
    check_prompt_limits,
)
from studio.prompts.parser import cached_schedule, extract_extra_networks, split_and


def alternation(n: int) -> str:
    """``[w0|w1|...]``: n distinct texts when there are at least n steps."""
    return "[" + "|".join(f"w{i}" for i in range(n)) + "]"


def test_length_limit():
    check_prompt_limits("a" * MAX_PROMPT_CHARS, 20)
    with pytest.raises(RequestError, match=f"prompt is {MAX_PROMPT_CHARS + 1} characters long; "
                                           f"the limit is {MAX_PROMPT_CHARS}"):
        check_prompt_limits("a" * (MAX_PROMPT_CHARS + 1), 20)


def test_and_limit_counts_subprompts():
    check_prompt_limits(" AND ".join(["a cat"] * MAX_AND_SUBPROMPTS), 20)
    over = " AND ".join(["a cat :1.2"] * (MAX_AND_SUBPROMPTS + 1))
    with pytest.raises(RequestError, match=f"has {MAX_AND_SUBPROMPTS + 1} AND sub-prompts; "
                                           f"the limit is {MAX_AND_SUBPROMPTS}"):
        check_prompt_limits(over, 20)
    # "and", "ANDROID" are not the AND keyword
    check_prompt_limits(" and ".join(["ANDROID"] * (MAX_AND_SUBPROMPTS + 5)), 20)


def test_editing_syntax_limit_applies_when_the_prompt_uses_square_brackets():
    at_limit = "[a]" + ":" * (MAX_EDITING_SYNTAX_CHARS - 2)
    check_prompt_limits(at_limit, 20)
    with pytest.raises(RequestError, match=f"has {MAX_EDITING_SYNTAX_CHARS + 1} of the characters "
                                           rf"\( \) \[ \] : \|; with \[ \] the limit is {MAX_EDITING_SYNTAX_CHARS}"):
        check_prompt_limits(at_limit + "(", 20)
    # without "[" the grammar is never run: many weights are fine
    check_prompt_limits("(masterpiece:1.2), " * 300, 20)
    # extra-network tags are removed before parsing, so their colons do not count
    check_prompt_limits("[a] " + "<lora:x:0.5>" * 150, 20)


def test_scheduled_texts_limit_depends_on_steps():
    check_prompt_limits(alternation(MAX_SCHEDULED_TEXTS), MAX_SCHEDULED_TEXTS)
    over = alternation(MAX_SCHEDULED_TEXTS + 1)
    with pytest.raises(RequestError, match=f"gives {MAX_SCHEDULED_TEXTS + 1} different texts over "
                                           f"{MAX_SCHEDULED_TEXTS + 1} steps .*the limit is {MAX_SCHEDULED_TEXTS}"):
        check_prompt_limits(over, MAX_SCHEDULED_TEXTS + 1)
    check_prompt_limits(over, 10)  # ten steps see only ten of the options


def test_scheduled_texts_add_up_over_and_subprompts():
    half = MAX_SCHEDULED_TEXTS // 2
    steps = MAX_SCHEDULED_TEXTS
    check_prompt_limits(f"{alternation(half)} AND x{alternation(half)}", steps)
    with pytest.raises(RequestError, match=f"gives {MAX_SCHEDULED_TEXTS + 2} different texts"):
        check_prompt_limits(f"{alternation(half + 1)} AND x{alternation(half + 1)}", steps)


def test_field_is_named_in_the_message():
    with pytest.raises(RequestError, match="^negative_prompt is"):
        check_prompt_limits("a" * (MAX_PROMPT_CHARS + 1), 20, field="negative_prompt")
    check_prompt_limits(None, 20)
    check_prompt_limits("", 20)


def test_huge_prompts_are_refused_before_any_parsing(monkeypatch):
    def must_not_parse(*args, **kwargs):
        raise AssertionError("parsed a prompt that should have been refused first")

    monkeypatch.setattr(limits, "cached_schedule", must_not_parse)
    with pytest.raises(RequestError, match="characters long"):
        check_prompt_limits("[" * 10_000_000, 20)
    with pytest.raises(RequestError, match="AND sub-prompts"):
        check_prompt_limits("[a|b] AND " * 1000, 20)
    with pytest.raises(RequestError, match="with \\[ \\] the limit"):
        check_prompt_limits("[" * (MAX_EDITING_SYNTAX_CHARS + 1), 20)


def test_the_check_parses_into_the_plan_s_cache():
    prompt = "a [cat:dog:0.5] <lora:x:1> AND [b|c]"
    cached_schedule.cache_clear()
    check_prompt_limits(prompt, 20)
    parsed = cached_schedule.cache_info().misses
    # what the engine and ConditioningPlan do for the same request: tags removed, then one
    # schedule per sub-prompt; all of them are cache hits now
    text, _ = extract_extra_networks(prompt)
    for sub, _ in split_and(text):
        cached_schedule(sub, 20)
    assert cached_schedule.cache_info().misses == parsed == 2
