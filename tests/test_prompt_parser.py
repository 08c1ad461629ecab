"""Tests for studio.prompts.parser: A1111-compatible prompt syntax (pure Python, fast)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studio.prompts.parser import (
    ExtraNetworkTag,
    extract_extra_networks,
    parse_attention,
    prompt_schedule,
    split_and,
)


def approx_chunks(chunks):
    return [(t, pytest.approx(w)) for t, w in chunks]


# --------------------------------------------------------------------------------------
# parse_attention
# --------------------------------------------------------------------------------------

# A1111's parse_prompt_attention doctests, compared exactly (float for float).
A1111_ATTENTION_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text,expected", A1111_ATTENTION_DOCTESTS)
def test_attention_a1111_doctests_exact(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("", [("", 1.0)]),
    ("(a)", [("a", 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("((a:1.5))", [("a", 1.5 * 1.1)]),
    ("([a])", [("a", 1.0)]),  # 1/1.1*1.1 == 1.0 exactly in floats
    ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
    ("x (a, b:0.8) y", [("x ", 1.0), ("a, b", 0.8), (" y", 1.0)]),
])
def test_attention_constructs(text, expected):
    assert parse_attention(text) == approx_chunks(expected)


@pytest.mark.parametrize("text,expected", [
    ("\\(a\\)", [("(a)", 1.0)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("(\\(x\\))", [("(x)", 1.1)]),
    ("a\\b", [("ab", 1.0)]),          # a lone backslash is dropped
    ("\\", [("", 1.0)]),
    ("(a\\:1.2)", [("a", 1.2)]),      # "\:" is no escape: the backslash is dropped
])
def test_attention_escapes(text, expected):
    assert parse_attention(text) == approx_chunks(expected)


@pytest.mark.parametrize("text,expected", [
    ("a)", [("a)", 1.0)]),                # unmatched closers are literal
    ("a]", [("a]", 1.0)]),
    ("a:1.2)", [("a:1.2)", 1.0)]),        # weight without an open round bracket: literal
    ("a:b", [("a:b", 1.0)]),
    ("[a:1.5]", [("a:1.5", 1 / 1.1)]),    # weights only work with ()
    ("(a", [("a", 1.1)]),
    ("[a", [("a", 1 / 1.1)]),
    ("((a", [("a", 1.1 * 1.1)]),
    ("(a [b", [("a ", 1.1), ("b", 1.1 / 1.1)]),  # all round closed first, then square
    ("([a:2)", [("a", 2 / 1.1)]),       # ":w)" closes the round bracket across a "["
    ("a (b) c)", [("a ", 1.0), ("b", 1.1), (" c)", 1.0)]),
    ("()", [("", 1.0)]),
    ("a()b", [("ab", 1.0)]),
])
def test_attention_unbalanced_and_odd(text, expected):
    assert parse_attention(text) == approx_chunks(expected)


def test_attention_bad_weight_never_raises():
    # A1111 raises ValueError here (float("1.2.3")); we read the ":" as text.
    assert parse_attention("(a:1.2.3)") == approx_chunks([("a:1.2.3", 1.1)])
    assert parse_attention("(a:.)") == approx_chunks([("a:.", 1.1)])
    assert parse_attention("((a:..) b:2)") == approx_chunks([("a:..", 2.2), (" b", 2.0)])


@pytest.mark.parametrize("text,expected", [
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),   # needs word boundaries
    ("a break b", [("a break b", 1.0)]),  # case-sensitive
    ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # weighted BREAK (A1111 quirk)
])
def test_attention_break(text, expected):
    assert parse_attention(text) == approx_chunks(expected)


def test_attention_merges_equal_neighbours():
    assert parse_attention("(a)(b) c (d)") == approx_chunks([("ab", 1.1), (" c ", 1.0), ("d", 1.1)])


# --------------------------------------------------------------------------------------
# prompt_schedule
# --------------------------------------------------------------------------------------

def g(prompt, steps=10, hires=None, old=False):
    return [list(x) for x in prompt_schedule(prompt, steps, hires, old)]


# A1111's get_learned_conditioning_prompt_schedules doctests (v1.8-1.10), 10 steps.
A1111_SCHEDULE_DOCTESTS = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"],
                     [6, "(b:1.1)"], [7, "a"], [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"],
                   [6, "male"], [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"],
                     [6, "male"], [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
]


@pytest.mark.parametrize("prompt,expected", A1111_SCHEDULE_DOCTESTS)
def test_schedule_a1111_doctests(prompt, expected):
    assert g(prompt) == expected


def test_schedule_a1111_stale_doctest():
    # A1111's docstring claims [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right
    # now"), but with the v1.8+ grammar "|" only exists inside [a|b], so A1111 actually
    # fails to parse this prompt and returns it unchanged.
    assert g("a [{b|d{:.5] c") == [[10, "a [{b|d{:.5] c"]]


@pytest.mark.parametrize("prompt,expected", [
    ("a [b:.5] c", [[10, "a b c"]]),
    ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]]),
])
def test_schedule_a1111_hires_doctests(prompt, expected):
    assert g(prompt, 10, 10) == expected


def test_schedule_a1111_comment_example():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert g(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


def test_schedule_wiki_example_all_constructs():
    prompt = "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"
    head = "((emphasis)), (emphasis1:1.1), "
    assert g(prompt, 4) == [
        [1, head + ", from, from, alt"],
        [2, head + "to, from, to, alt1"],
        [3, head + "to, , to, alt"],
        [4, head + "to, , to, alt1"],
    ]


@pytest.mark.parametrize("prompt,steps,expected", [
    ("a [b:c:5] d", 10, [[5, "a b d"], [10, "a c d"]]),
    ("a [b:c:0.5] d", 20, [[10, "a b d"], [20, "a c d"]]),
    ("a [b:c:0] d", 10, [[10, "a c d"]]),             # when < 1: "to" from the start
    ("a [b:c:-3] d", 10, [[10, "a c d"]]),
    ("a [b:c:15] d", 10, [[10, "a b d"]]),            # capped at the step count
    ("a [b:c:+2.5] d", 10, [[10, "a b d"]]),          # "." -> fraction: 25 steps, capped
    ("a [b:c:1e1] d", 20, [[10, "a b d"], [20, "a c d"]]),  # no "." -> step number
    ("a [b:c:0.33] d", 10, [[3, "a b d"], [10, "a c d"]]),  # int() truncates
    ("[x:y:3][x:y:3]", 10, [[3, "xx"], [10, "yy"]]),
    ("[a:[b|c]:2]", 4, [[1, "a"], [2, "a"], [3, "b"], [4, "c"]]),
    ("(a [b:c:3]:1.2)", 10, [[3, "(a b:1.2)"], [10, "(a c:1.2)"]]),
    ("[a|b|c] [d:e:f:3]", 4, [[1, "a [d:e:f:3]"], [2, "b [d:e:f:3]"],
                              [3, "c [d:e:f:3]"], [4, "a [d:e:f:3]"]]),
    ("a[|b]", 4, [[1, "a"], [2, "ab"], [3, "a"], [4, "ab"]]),
    ("[a:b:2]", 0, [[0, "a"]]),                       # 0 steps: step 0 <= when 0
    ("a \\[b:c:2\\] d", 10, [[10, "a \\[b:c:2\\] d"]]),  # escaped: left for parse_attention
    ("[a:b: 3 ]", 10, [[3, "a"], [10, "b"]]),
    ("[a:b:c]", 10, [[10, "[a:b:c]"]]),             # not a number: literal
])
def test_schedule_constructs(prompt, steps, expected):
    assert g(prompt, steps) == expected


def test_schedule_parse_failure_returns_prompt_unchanged():
    assert g("a \\") == [[10, "a \\"]]             # trailing backslash
    assert g("a \\\n[b:3]") == [[10, "a \\\n[b:3]"]]  # backslash before a newline
    assert g("a \\", 10, 20) == [[20, "a \\"]]     # hires: in hires steps


def test_schedule_without_square_brackets_is_unchanged():
    assert g("a|b (c:1.2) ((d)) e:3]", 10, 20) == [[20, "a|b (c:1.2) ((d)) e:3]"]]
    deep = "(" * 3000 + "a" + ")" * 3000  # must not go through Earley (fast path)
    assert g(deep) == [[10, deep]]


def test_schedule_hires_offsets():
    # int `when` counts from the start of the first pass; > steps is in the hires pass
    assert g("a [b:c:15] d", 10, 20) == [[5, "a b d"], [20, "a c d"]]
    assert g("a [b:c:5] d", 10, 20) == [[20, "a c d"]]
    # fractions: 0..1 is the first pass, 1..2 the hires pass
    assert g("a [b:c:1.25] d", 10, 20) == [[5, "a b d"], [20, "a c d"]]
    assert g("a [b:c:0.5] d", 10, 20) == [[20, "a c d"]]
    # old scheduling: hires_steps ignored, < 1 is a fraction of the (first-pass) steps
    assert g("a [b:c:15] d", 10, 20, True) == [[10, "a b d"]]
    assert g("a [b:c:0.5] d", 10, 20, True) == [[5, "a b d"], [10, "a c d"]]
    assert g("a [b:c:1.0] d", 10, None, True) == [[1, "a b d"], [10, "a c d"]]
    assert g("a [b:c:1.0] d", 10) == [[10, "a b d"]]


def test_schedule_overflowing_when_never_raises():
    # A1111 raises OverflowError from int(inf) here.
    assert g("a [b:c:1e999] d") == [[10, "a b d"]]
    assert g("a [b:c:-1e999] d") == [[10, "a c d"]]
    assert g("a [b:c:1.0e999] d", 0, 0) == [[0, "a b d"]]


def test_schedule_returns_tuples():
    out = prompt_schedule("a [b:3]", 10)
    assert out == [(3, "a "), (10, "a b")]
    assert all(isinstance(x, tuple) for x in out)


# --------------------------------------------------------------------------------------
# split_and
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,expected", [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat :1.2 AND a dog", [("a cat", 1.2), (" a dog", 1.0)]),
    ("a cat:1.2 AND a dog : 0.5", [("a cat", 1.2), (" a dog", 0.5)]),
    ("a AND b AND c:-0.5", [("a", 1.0), (" b", 1.0), (" c", -0.5)]),
    ("a:+.5", [("a", 0.5)]),
    ("a:2.", [("a", 2.0)]),
    ("ANDROID and AND", [("ANDROID and", 1.0), ("", 1.0)]),  # whole word, case-sensitive
    ("(a:1.2", [("(a", 1.2)]),     # A1111 takes any trailing :number
    ("(a:1.2)", [("(a:1.2)", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("a \n:1.5 \n", [("a", 1.5)]),
    ("  lead  ", [("  lead", 1.0)]),
])
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


# --------------------------------------------------------------------------------------
# extra networks
# --------------------------------------------------------------------------------------

def test_extra_lora_single_multiplier():
    text, tags = extract_extra_networks("a cat <lora:name:0.8>, sitting")
    assert text == "a cat , sitting"
    assert len(tags) == 1
    t = tags[0]
    assert (t.kind, t.name, t.positional, t.named, t.items) == (
        "lora", "name", ("name", "0.8"), (), ("name", "0.8"))
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (0.8, 0.8, None)


def test_extra_lora_te_and_unet():
    _, [t] = extract_extra_networks("<lora:name:0.5:1.0>")
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (0.5, 1.0, None)
    _, [t] = extract_extra_networks("<lora:name:0.5:1.0:16>")
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (0.5, 1.0, 16)


def test_extra_lora_named():
    _, [t] = extract_extra_networks("<lora:name:te=0.3:unet=0.9>")
    assert t.name == "name" and t.positional == ("name",)
    assert t.named == (("te", "0.3"), ("unet", "0.9"))
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (0.3, 0.9, None)
    _, [t] = extract_extra_networks("<lora:name:1:unet=0.5:dyn=13>")
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (1.0, 0.5, 13)
    _, [t] = extract_extra_networks("<lora:name:dyn=13:te=1:unet=0.5>")
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (1.0, 0.5, 13)
    # named te overrides positional te, and unet defaults to the final te
    _, [t] = extract_extra_networks("<lora:name:0.2:te=0.7>")
    assert (t.te_multiplier, t.unet_multiplier) == (0.7, 0.7)
    # the name is the first *positional* item
    _, [t] = extract_extra_networks("<lora:te=0.4:name>")
    assert (t.name, t.te_multiplier) == ("name", 0.4)


def test_extra_lora_defaults_and_bad_numbers():
    _, [t] = extract_extra_networks("<lora:name>")
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (1.0, 1.0, None)
    # A1111 raises on these; bad values are ignored (the default / previous value stays)
    _, [t] = extract_extra_networks("<lora:name:abc:x:y>")
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (1.0, 1.0, None)
    _, [t] = extract_extra_networks("<lora:name:0.5:te=zz:unet=nan:dyn=8.0>")
    assert (t.te_multiplier, t.unet_multiplier, t.dyn) == (0.5, 0.5, None)
    _, [t] = extract_extra_networks("<lora:name::>")
    assert t.positional == ("name", "", "") and t.te_multiplier == 1.0
    _, [t] = extract_extra_networks("<lora:te=1>")
    assert t.name == "" and t.positional == ()
    _, [t] = extract_extra_networks("<lora:n:inf>")
    assert t.te_multiplier == 1.0


def test_extra_named_parsing_rules():
    _, [t] = extract_extra_networks("<lora:n:a=b=c:te =2:te=3:te=4>")
    assert t.positional == ("n", "a=b=c")           # two "=": positional (split('=', 2))
    assert t.named == (("te ", "2"), ("te", "4"))    # keys not stripped; last value wins
    assert t.te_multiplier == 4.0


def test_extra_hypernet():
    text, [t] = extract_extra_networks("x <hypernet:name:0.7> y")
    assert text == "x  y"
    assert (t.kind, t.name, t.multiplier) == ("hypernet", "name", 0.7)
    _, [t] = extract_extra_networks("<hypernet:name>")
    assert t.multiplier == 1.0
    _, [t] = extract_extra_networks("<hypernet:name:bad>")
    assert t.multiplier == 1.0


def test_extra_several_tags_in_order():
    text, tags = extract_extra_networks(
        "1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray> <lora:a:0.5>BREAK")
    assert text == "1girl,    BREAK"
    assert [(t.kind, t.name, t.items) for t in tags] == [
        ("hypernet", "agm", ("agm", "1.1")),
        ("extrasupernet", "master", ("master", "12", "13", "14")),
        ("hypernet", "ray", ("ray",)),
        ("lora", "a", ("a", "0.5")),
    ]


@pytest.mark.parametrize("prompt", [
    "<lora>", "<lora:>", "<:name:1>", "<lo ra:x:1>", "a < b > c", "<lora:x", "lora:x:1>",
])
def test_extra_non_tags_left_alone(prompt):
    assert extract_extra_networks(prompt) == (prompt, [])


def test_extra_odd_tags():
    # "[^>]+" spans anything up to the first ">", "<" and newlines included
    text, [t] = extract_extra_networks("a <lora:x<y:1\n> b")
    assert text == "a  b" and t.items == ("x<y", "1\n") and t.te_multiplier == 1.0
    text, [t] = extract_extra_networks("<<lora:x:1>>")
    assert text == "<>" and t.name == "x"
    text, [t] = extract_extra_networks("<ロラ:名前:0.5>")  # \w is Unicode
    assert (t.kind, t.name, t.multiplier) == ("ロラ", "名前", 0.5)


def test_extra_tag_is_frozen_and_hashable():
    t = ExtraNetworkTag.from_items("lora", ["n", "0.5"])
    with pytest.raises(AttributeError):
        t.name = "other"  # type: ignore[misc]
    assert hash(t) == hash(ExtraNetworkTag.from_items("lora", ("n", "0.5")))
    # built without raw items (positionally), helpers still work
    t2 = ExtraNetworkTag("hypernet", "h", ("h", "0.25"), ())
    assert t2.multiplier == 0.25


# --------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------

SYNTAX_HEAVY = st.text(alphabet="ab ()[]:|<>\\.,=-+01259eBREAKND_\n\t", max_size=40)
ANY_TEXT = st.one_of(st.text(max_size=60), SYNTAX_HEAVY)
PLAIN_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="()[]:|<>\\", blacklist_categories=("Cs",)),
    max_size=60,
).filter(lambda s: "BREAK" not in s and "AND" not in s)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


@FAST
@given(ANY_TEXT)
def test_prop_attention_never_raises(text):
    out = parse_attention(text)
    assert out and all(isinstance(t, str) and isinstance(w, float) for t, w in out)
    # no two neighbours share a weight
    assert all(a[1] != b[1] for a, b in itertools.pairwise(out))


@FAST
@given(ANY_TEXT, st.integers(0, 25), st.one_of(st.none(), st.integers(0, 25)), st.booleans())
def test_prop_schedule_never_raises(text, steps, hires, old):
    out = prompt_schedule(text, steps, hires, old)
    assert out
    ends = [s for s, _ in out]
    assert ends == sorted(set(ends))
    last = hires if hires is not None and not old else steps
    assert ends[-1] == last
    assert all(isinstance(t, str) for _, t in out)


@FAST
@given(ANY_TEXT)
def test_prop_split_and_never_raises(text):
    out = split_and(text)
    assert out and all(isinstance(t, str) and isinstance(w, float) for t, w in out)


@FAST
@given(ANY_TEXT)
def test_prop_extract_never_raises(text):
    rest, tags = extract_extra_networks(text)
    assert isinstance(rest, str) and len(rest) <= len(text)
    for tag in tags:
        assert isinstance(tag.te_multiplier, float) and math.isfinite(tag.te_multiplier)
        assert isinstance(tag.unet_multiplier, float) and math.isfinite(tag.unet_multiplier)
        assert tag.dyn is None or isinstance(tag.dyn, int)
        assert isinstance(tag.multiplier, float) and math.isfinite(tag.multiplier)


@FAST
@given(PLAIN_TEXT, st.integers(0, 50))
def test_prop_plain_text_passes_through(text, steps):
    assert parse_attention(text) == [(text, 1.0)]
    assert prompt_schedule(text, steps) == [(steps, text)]
    assert extract_extra_networks(text) == (text, [])
    assert split_and(text) == [(text.rstrip(), 1.0)]
