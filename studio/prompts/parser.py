"""Prompt syntax parsing, compatible with AUTOMATIC1111's webui (v1.8 - v1.10).

Pure Python (no torch). Everything here is a pure function of its arguments and
never raises on arbitrary prompt text.

A1111 applies the syntax in this order, and callers should do the same:

1. :func:`extract_extra_networks` removes ``<kind:name:args>`` tags from the whole
   prompt (``modules/extra_networks.py parse_prompt``).
2. :func:`split_and` splits the result into composable-diffusion sub-prompts on
   ``AND``, each with an optional trailing ``:weight``
   (``prompt_parser.get_multicond_prompt_list``).
3. :func:`prompt_schedule` turns each sub-prompt into a list of
   ``(end_at_step, text)`` pairs for prompt editing ``[from:to:when]`` and
   alternation ``[a|b]`` (``get_learned_conditioning_prompt_schedules``).
4. :func:`parse_attention` splits each scheduled text into ``(text, weight)``
   chunks for ``(emphasis)``, ``[de-emphasis]``, ``(text:1.3)`` and ``BREAK``
   (``parse_prompt_attention``); this is what the tokenizer/encoder consumes.

The scheduling grammar is run by ``lark``'s Earley parser, as A1111 does, because
the grammar is ambiguous and A1111's output depends on how Earley resolves that
ambiguity; the grammar below is written to have the same structure so that the
same derivations are chosen.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import lark

from studio.errors import RequestError

__all__ = [
    "EMPHASIS_MODES",
    "ExtraNetworkTag",
    "cached_schedule",
    "check_emphasis",
    "emphasis_pieces",
    "extract_extra_networks",
    "parse_attention",
    "prompt_schedule",
    "split_and",
]


# --------------------------------------------------------------------------------------
# Attention / emphasis
# --------------------------------------------------------------------------------------

_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1

# One token of the emphasis syntax. The alternatives are tried in order, like the
# alternation in A1111's ``re_attention``; together they match every character.
_ATTENTION_TOKEN = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\]?)                 # \( \) \[ \] \\  or a lone backslash
    | (?P<open_round>\()
    | (?P<open_square>\[)
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)          # ":1.3)" closes a round bracket with a weight
    | (?P<close_round>\))
    | (?P<close_square>\])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)

_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(chunk, weight)`` pairs like A1111's ``parse_prompt_attention``.

    * ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` by 1/1.1 and ``(x:1.5)``
      by 1.5; nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal
      characters.
    * ``BREAK`` as a whole word (with the whitespace around it) becomes the item
      ``("BREAK", -1.0)``.
    * Adjacent chunks with equal weights are merged; an empty prompt gives
      ``[("", 1.0)]``.

    A1111 quirks reproduced on purpose:

    * Weights are multiplied in the order the brackets close, with the same float
      arithmetic, so ``((house:1.3))`` gives ``1.5730000000000004``, not ``1.573``.
    * Brackets still open at the end are closed then: first all round ones
      (outermost first), then all square ones. Unmatched ``)`` / ``]`` are literal.
    * ``:w)`` closes the innermost *round* bracket even when a square bracket was
      opened after it (``([a:2)`` gives ``a`` a weight of 2/1.1). With no round bracket
      open, ``:w)`` is literal text. Elsewhere ``:`` is literal text.
    * A backslash not followed by ``()[]\\`` is dropped (it yields an empty chunk that
      is normally merged away).
    * A ``BREAK`` inside brackets has its ``-1`` multiplied like any chunk
      (``(a BREAK b)`` gives ``("BREAK", -1.1)``), and two ``BREAK`` markers are never
      adjacent (an empty text chunk separates them).

    Deviation: A1111 raises ``ValueError`` on a weight such as ``(a:1.2.3)`` or
    ``(a:.)`` (``float()`` fails). Here that ``:`` is taken as literal text and
    parsing goes on, as if the weighted-close form had not matched.
    """
    chunks: list[list] = []  # [text, weight]; mutated while brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for chunk in chunks[start:]:
            chunk[1] *= factor

    def add_text(piece: str) -> None:
        for i, part in enumerate(_BREAK.split(piece)):
            if i:
                chunks.append(["BREAK", -1.0])
            chunks.append([part, 1.0])

    pos = 0
    end = len(text)
    while pos < end:
        m = _ATTENTION_TOKEN.match(text, pos)
        if m is None:  # cannot happen: the alternatives cover every character
            add_text(text[pos:])
            break
        kind = m.lastgroup
        pos = m.end()
        if kind == "escape":
            chunks.append([m.group(0)[1:], 1.0])
        elif kind == "open_round":
            round_open.append(len(chunks))
        elif kind == "open_square":
            square_open.append(len(chunks))
        elif kind == "weight" and round_open:
            try:
                factor = float(m.group("weight"))
            except ValueError:
                # A1111 raises here; treat the ":" as text and rescan after it.
                add_text(":")
                pos = m.start() + 1
                continue
            multiply_from(round_open.pop(), factor)
        elif kind == "close_round" and round_open:
            multiply_from(round_open.pop(), _ROUND_MULTIPLIER)
        elif kind == "close_square" and square_open:
            multiply_from(square_open.pop(), _SQUARE_MULTIPLIER)
        else:
            add_text(m.group(0))

    for start in round_open:
        multiply_from(start, _ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, _SQUARE_MULTIPLIER)

    if not chunks:
        return [("", 1.0)]

    merged: list[list] = [chunks[0]]
    for chunk in chunks[1:]:
        if chunk[1] == merged[-1][1]:
            merged[-1][0] += chunk[0]
        else:
            merged.append(chunk)
    return [(t, float(w)) for t, w in merged]


# A1111's ``emphasis`` option (``modules/sd_emphasis.py``): what ``(x)``, ``[x]`` and
# ``(x:1.3)`` do. The weighting itself happens after the text encoder (encode.py); this
# decides which (text, weight) pieces the tokenizer sees.
#   "None"     - no emphasis parsing at all: brackets, weights and BREAK are literal text;
#   "Ignore"   - parsed (brackets disappear, BREAK works), but every weight is 1.0;
#   "Original" - parsed and weighted, the chunk's mean restored afterwards (A1111's default);
#   "No norm"  - parsed and weighted, without restoring the mean.
EMPHASIS_MODES = ("None", "Ignore", "Original", "No norm")
DEFAULT_EMPHASIS = "Original"


def check_emphasis(mode: str) -> str:
    """``mode`` if it is one of :data:`EMPHASIS_MODES`; otherwise a RequestError. A1111 falls back
    to "Original" for an unknown name; refusing it here tells the caller about a typo instead."""
    if mode not in EMPHASIS_MODES:
        raise RequestError(f"unknown emphasis mode {mode!r}; expected one of {', '.join(EMPHASIS_MODES)}")
    return mode


def emphasis_pieces(text: str, mode: str = DEFAULT_EMPHASIS) -> list[tuple[str, float]]:
    """The (text, weight) pieces the tokenizer consumes under emphasis ``mode``.

    "Ignore" gives the pieces of "Original" (so the same tokens) with every weight 1.0, which is
    what A1111 encodes when it computes the multipliers and then does not apply them. The
    ``("BREAK", -1.0)`` markers are kept: they are chunk breaks, not weights. A ``BREAK`` inside
    brackets (weight -1.1, which A1111 tokenizes as the word "BREAK") stays that word.
    """
    check_emphasis(mode)
    if mode == "None":
        return [(text, 1.0)]
    pieces = parse_attention(text)
    if mode == "Ignore":
        return [(t, -1.0 if (t == "BREAK" and w == -1) else 1.0) for t, w in pieces]
    return pieces


# --------------------------------------------------------------------------------------
# Composable diffusion (AND)
# --------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into composable-diffusion sub-prompts, like A1111's ``get_multicond_prompt_list``.

    The prompt is split on the word ``AND`` (``\\bAND\\b``, case-sensitive). Each
    sub-prompt may end with ``:weight`` (``a cat :1.2 AND a dog``); the default
    weight is 1.0. As in A1111, the returned text keeps its leading whitespace but
    loses its trailing whitespace and the weight suffix, the split keeps the
    whitespace around ``AND`` (``"a AND b"`` gives ``"a"`` and ``" b"``), and a
    trailing ``:number`` is taken as a weight even when it was meant as something
    else (``"(a:1.2"`` gives ``("(a", 1.2)``). Always returns at least one item.
    """
    result: list[tuple[str, float]] = []
    for sub in _AND.split(prompt):
        m = _SUBPROMPT_WEIGHT.search(sub)
        if m is None:  # cannot happen: the pattern matches any string
            result.append((sub, 1.0))
            continue
        text, weight = m.group(1), m.group(2)
        try:
            value = float(weight) if weight is not None else 1.0
        except ValueError:  # pragma: no cover - the pattern only admits valid numbers
            value = 1.0
        result.append((text, value))
    return result


# --------------------------------------------------------------------------------------
# Prompt editing / alternation schedules
# --------------------------------------------------------------------------------------

# Same shape as A1111's ``schedule_parser`` grammar, which is ambiguous (a "[" may
# open a construct or be a stray character): lark's Earley resolution picks rules by
# the order of their alternatives, so the order and the optional parts below matter.
#   start      - prompt text, possibly interleaved with stray "[", "]", "(", ")", ":".
#   emphasized - brackets kept verbatim in the output (handled later by parse_attention).
#   scheduled  - [from:to:when], [to:when], [from::when]; whitespace around `when` is dropped.
#   alternate  - [a|b|...], options may be empty.
#   plain      - any run of text; a backslash escapes the next character.
_SCHEDULE_GRAMMAR = r"""
!start: (prompt | STRAY+)*

prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*

!emphasized: "(" prompt ")"
           | "(" prompt ":" prompt ")"
           | "[" prompt "]"

scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] WHEN [WHITESPACE] "]"

alternate: "[" prompt ("|" [prompt])+ "]"

plain: TEXT

STRAY: /[][():]/
TEXT: /(?:[^\\\[\]():|]|\\.)+/
WHITESPACE: /\s+/
%import common.SIGNED_NUMBER -> WHEN
"""


@lru_cache(maxsize=1)
def _schedule_parser() -> lark.Lark:
    """Build the Earley parser on first use (a constant, like a compiled regex;
    ``Lark.parse`` keeps no state between calls)."""
    return lark.Lark(
        _SCHEDULE_GRAMMAR,
        parser="earley",
        lexer="dynamic",
        ambiguity="resolve",
        maybe_placeholders=True,
    )


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None  # None for [to:when]
    after: tuple
    when: float  # step after which `after` is used (already resolved)


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # of parts tuples; an empty option is ()


_Part = str | _Scheduled | _Alternate


class _Lowering:
    """Turns the lark tree into nested tuples of parts, resolving `when` to steps."""

    def __init__(self, steps: int, int_offset: int, flt_offset: float, old: bool):
        self.steps = steps
        self.int_offset = int_offset
        self.flt_offset = flt_offset
        self.old = old
        self.boundaries: set[int] = {steps}

    def resolve_when(self, literal: str) -> float:
        steps = self.steps
        value = float(literal)
        if self.old:
            value = value * steps if value < 1 else value
        elif "." in literal:
            value = (value - self.flt_offset) * steps
        else:
            value = value - self.int_offset
        if math.isnan(value) or value == math.inf:
            when: float = steps  # A1111 raises OverflowError/ValueError in int()
        elif value == -math.inf:
            when = -math.inf
        else:
            when = min(steps, int(value))
        if when >= 1:
            self.boundaries.add(int(when))
        return when

    def lower(self, node) -> tuple:
        parts: list[_Part] = []
        self._lower_into(node, parts)
        # join adjacent strings
        out: list[_Part] = []
        for part in parts:
            if isinstance(part, str) and out and isinstance(out[-1], str):
                out[-1] += part
            elif part != "":
                out.append(part)
        return tuple(out)

    def _lower_into(self, node, parts: list) -> None:
        if node is None:
            return
        if isinstance(node, lark.Token):
            parts.append(str(node))
            return
        rule = node.data
        if rule == "scheduled":
            before, after = node.children[0], node.children[1]
            literal = next(c for c in node.children
                           if isinstance(c, lark.Token) and c.type == "WHEN")
            when = self.resolve_when(str(literal))
            parts.append(_Scheduled(
                before=None if before is None else self.lower(before),
                after=self.lower(after),
                when=when,
            ))
        elif rule == "alternate":
            self.boundaries.update(range(1, self.steps + 1))
            parts.append(_Alternate(options=tuple(
                () if child is None else self.lower(child) for child in node.children)))
        else:  # start, prompt, emphasized, plain: children verbatim
            for child in node.children:
                self._lower_into(child, parts)


def _render(parts: tuple, step: int, out: list[str]) -> None:
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, _Scheduled):
            if step <= part.when:
                _render(part.before or (), step, out)
            else:
                _render(part.after, step, out)
        else:
            options = part.options
            _render(options[(step - 1) % len(options)], step, out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None,
                    use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """The text to use at each sampling step, like A1111's ``get_learned_conditioning_prompt_schedules``.

    Returns ``(end_at_step, text)`` pairs sorted by step: ``text`` is used for steps
    up to and including ``end_at_step`` (1-based), the last pair ends at the number of
    steps. Syntax:

    * ``[from:to:when]`` uses ``from`` until step ``when``, then ``to``;
      ``[to:when]`` adds ``to`` after ``when``; ``[from::when]`` removes ``from``
      after ``when``. Constructs nest, and ``(emphasis)`` is left verbatim.
    * ``when`` without a ``.`` is a step number; with a ``.`` it is a fraction of the
      steps (``[b:.5]`` with 10 steps switches after step 5). The value is truncated
      with ``int()`` and capped at the step count; ``when`` < 1 means "from the start".
    * ``[a|b|c]`` cycles through the options every step; options may be empty
      (``[fe|]male``).

    ``steps`` is the first-pass step count. When ``hires_steps`` is given (and
    ``use_old_scheduling`` is false) the result is the schedule of the hires pass, in
    hires steps: integer ``when`` values count from the start of the first pass (so
    ``steps + k`` is hires step ``k``) and fractions count the first pass as 0..1 and
    the hires pass as 1..2 (``[b:1.5]`` switches halfway through the hires pass). With
    ``use_old_scheduling`` (A1111's "old prompt editing timelines" option), a ``when``
    below 1 is a fraction and anything else a step, and ``hires_steps`` is ignored,
    exactly as A1111 does.

    A prompt the grammar cannot parse (for example a backslash at the very end, or
    before a newline) is returned unchanged as ``[(steps, prompt)]`` (``steps`` being
    ``hires_steps`` in the hires case), as A1111 does.

    A1111 quirks reproduced on purpose: stray or unbalanced brackets are kept
    verbatim (``"a [unbalanced"``), whitespace around ``when`` is dropped
    (``[b: 3]``), every scheduled construct contributes its step boundary even if it
    sits in a branch not shown at that step, and any alternation makes every step a
    boundary. The grammar is ambiguous; in a few degenerate inputs (empty constructs
    such as ``[:1]`` next to stray brackets) even A1111's own choice between readings
    depends on Python's hash seed, and the same holds here.

    Deviations (A1111 raises in these cases): an infinite ``when`` (``[a:b:1e999]``)
    never switches, ``-1e999`` switches from the start; a prompt too deeply nested
    for Python's recursion limit is returned unchanged.

    Cost: like A1111, Earley parsing is roughly quadratic-to-cubic in the prompt
    length when it contains ``[`` (about 0.2 s for a 600-character prompt), and any
    alternation makes the result ``steps`` entries long. Prompts without ``[`` are
    returned without parsing.
    """
    if hires_steps is None or use_old_scheduling:
        effective_steps, int_offset, flt_offset = steps, 0, 0.0
    else:
        effective_steps, int_offset, flt_offset = hires_steps, steps, 1.0

    if "[" not in prompt:
        # Without "[" there is no [from:to:when] or [a|b]; whether or not the grammar
        # accepts the prompt, A1111's answer is the prompt unchanged. Skipping Earley
        # here also avoids its cost on long or deeply nested "((...))" prompts.
        return [(effective_steps, prompt)]
    try:
        tree = _schedule_parser().parse(prompt)
        lowering = _Lowering(effective_steps, int_offset, flt_offset, use_old_scheduling)
        parts = lowering.lower(tree)
        schedule = []
        for step in sorted(lowering.boundaries):
            out: list[str] = []
            _render(parts, step, out)
            schedule.append((step, "".join(out)))
        return schedule
    except Exception:  # noqa: BLE001 - lark.exceptions.LarkError, RecursionError, ...
        return [(effective_steps, prompt)]


@lru_cache(maxsize=256)
def cached_schedule(prompt: str, steps: int) -> tuple[tuple[int, str], ...]:
    """``prompt_schedule`` without its cost where possible: the Earley parse of a long prompt
    takes ~0.5 s on a small CPU, yet text without ``[`` can hold no editing or alternation,
    and a repeated prompt parses once (A1111 likewise skips parsing for an unchanged prompt).
    Request validation (``studio.prompts.limits``) and the conditioning plan call it with the
    same arguments, so a prompt checked before queueing is not parsed again when it runs."""
    if "[" not in prompt:
        return ((steps, prompt),)
    return tuple(prompt_schedule(prompt, steps))


# --------------------------------------------------------------------------------------
# Extra networks (<lora:...>, <hypernet:...>)
# --------------------------------------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def _to_float(text: str) -> float | None:
    try:
        value = float(text)
    except (ValueError, TypeError):
        return None
    return value if math.isfinite(value) else None


def _to_int(text: str) -> int | None:
    try:
        return int(text)
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One ``<kind:arg1:arg2:...>`` tag, parsed like A1111's ``ExtraNetworkParams``.

    ``items`` are the raw ``:``-separated arguments. An argument containing exactly one
    ``=`` is named (``te=0.5``; the key is not stripped, a repeated key keeps its first
    position and its last value); every other argument is positional, including
    ``a=b=c``. ``positional`` is A1111's ``positional`` list, so for a normal tag
    ``positional[0]`` is the network name and the parameters follow.

    ``name`` is the network the tag refers to: ``positional[0]`` for ``lora``/``lyco``
    (A1111's Lora extension) and ``items[0]`` for other kinds (A1111's hypernetwork
    handler). It is ``""`` when there is none (``<lora:te=1>``, for which A1111
    fails with an ``IndexError``).
    """

    kind: str
    name: str
    positional: tuple[str, ...]
    named: tuple[tuple[str, str], ...]
    items: tuple[str, ...] = ()

    @classmethod
    def from_items(cls, kind: str, items: tuple[str, ...] | list[str]) -> ExtraNetworkTag:
        items = tuple(items)
        positional: list[str] = []
        named: dict[str, str] = {}
        for item in items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        if kind in ("lora", "lyco"):
            name = positional[0] if positional else ""
        else:
            name = items[0] if items else ""
        return cls(kind=kind, name=name, positional=tuple(positional),
                   named=tuple(named.items()), items=items)

    def _named(self, key: str) -> str | None:
        return dict(self.named).get(key)

    @staticmethod
    def _override(current, text: str | None, convert):
        value = convert(text) if text is not None else None
        return current if value is None else value

    @property
    def te_multiplier(self) -> float:
        """LoRA text-encoder multiplier: ``positional[1]``, overridden by ``te=``; default 1.0.

        A value ``float()`` rejects (or a non-finite one) is ignored, i.e. the value it
        would have overridden is kept (A1111 raises and skips all LoRAs instead).
        """
        te = 1.0
        if len(self.positional) > 1:
            te = self._override(te, self.positional[1], _to_float)
        return self._override(te, self._named("te"), _to_float)

    @property
    def unet_multiplier(self) -> float:
        """LoRA UNet multiplier: ``positional[2]``, overridden by ``unet=``; defaults to
        :attr:`te_multiplier`. Bad numbers are ignored as for :attr:`te_multiplier`."""
        unet = self.te_multiplier
        if len(self.positional) > 2:
            unet = self._override(unet, self.positional[2], _to_float)
        return self._override(unet, self._named("unet"), _to_float)

    @property
    def dyn(self) -> int | None:
        """LoRA ``dyn`` dimension (DyLoRA): ``positional[3]``, overridden by ``dyn=``;
        default None. Parsed with ``int()`` as A1111 does (``"8.0"`` is rejected);
        a rejected value is ignored."""
        dyn = None
        if len(self.positional) > 3:
            dyn = self._override(dyn, self.positional[3], _to_int)
        return self._override(dyn, self._named("dyn"), _to_int)

    @property
    def multiplier(self) -> float:
        """Hypernetwork strength: the second raw argument (``items[1]``), default 1.0.

        A1111's hypernetwork handler reads raw items, not positional ones. A bad number
        gives 1.0 (A1111 raises)."""
        args = self.items if self.items else self.positional
        if len(args) > 1:
            value = _to_float(args[1])
            if value is not None:
                return value
        return 1.0


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove ``<kind:args>`` tags from a prompt, like A1111's ``extra_networks.parse_prompt``.

    Tags match ``<(\\w+):([^>]+)>``; the arguments are split on ``:``. Each tag is
    replaced by nothing, so the surrounding text, whitespace and commas stay as they
    are (``"a <lora:x:1>, b"`` gives ``"a , b"``). Tags are returned in prompt order;
    unknown kinds are returned too (A1111 skips them later when activating). Forms:
    ``<lora:name:te[:unet[:dyn]]>`` with named ``te=``/``unet=``/``dyn=``, and
    ``<hypernet:name:multiplier>``; see :class:`ExtraNetworkTag`.
    """
    tags: list[ExtraNetworkTag] = []

    def found(m: re.Match) -> str:
        tags.append(ExtraNetworkTag.from_items(m.group(1), m.group(2).split(":")))
        return ""

    return _EXTRA_NETWORK.sub(found, prompt), tags
