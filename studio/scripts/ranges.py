"""A1111's X/Y/Z plot value syntax, as pure functions.

An axis's values are one line of comma-separated values read with Python's CSV reader (so a value
holding a comma is written in double quotes), each stripped. Number axes also take ranges:

- ``1-5`` → 1, 2, 3, 4, 5; ``1-10 (+2)`` → 1, 3, 5, 7, 9; ``10-1 (-3)`` → 10, 7, 4 (A1111 adds 1 to
  the end of an integer range whatever the step's sign, so a falling range stops before its end+1);
- ``1-10 [5]`` → five values spread evenly from 1 to 10, truncated to integers: 1, 3, 5, 7, 10;
- floats alike: ``0.5-1.5 (+0.25)`` (NumPy's ``arange(start, end + step, step)``, so the end is
  included when the steps land on it) and ``1-2 [4]`` (``linspace``).

Errors are :class:`ValueError` with a message that says what was wrong; the script turns them into
request errors naming the axis.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Iterable, Sequence

import numpy as np

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
# A1111's four patterns (its float ones leave the dot unescaped, which only lets odd text through)
RE_INT_RANGE = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
RE_INT_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*\])?\s*")
RE_FLOAT_RANGE = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
RE_FLOAT_COUNT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+)\s*\])?\s*")
RE_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")

SYNTAX_HINT = "ranges are written 1-5, 1-10 (+2), 10-1 (-3) or 1-10 [5]"
# A range is expanded before the grid's size is checked: a bound keeps "1-999999999" from filling memory.
MAX_RANGE_VALUES = 10_000


def csv_values(text: str | None) -> list[str]:
    """One axis's text as A1111 reads it: CSV (double quotes around a value with commas), rows
    joined, every value stripped."""
    if not text:
        return []
    rows = csv.reader(io.StringIO(str(text)), skipinitialspace=True)
    return [value.strip() for value in itertools.chain.from_iterable(rows)]


def csv_string(values: Iterable[str]) -> str:
    """Values as one CSV line (A1111's ``list_to_csv_string``: what it writes as "X Values" when the
    values came from a dropdown)."""
    out = io.StringIO()
    csv.writer(out).writerow(list(values))
    return out.getvalue().strip()


def _number(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _count(text: str | None) -> int:
    return _bounded(int(text) if text is not None else 1)


def _bounded(count: float) -> int:
    if count > MAX_RANGE_VALUES:
        raise ValueError(f"a range may give at most {MAX_RANGE_VALUES} values (this one gives {int(count)})")
    return int(count)


def expand_ints(values: Sequence[str]) -> list[int]:
    """Integer values with ranges expanded; empty values are skipped, as A1111 does."""
    result: list[int] = []
    for value in values:
        if not value.strip():
            continue
        step_range = RE_INT_RANGE.fullmatch(value)
        count_range = RE_INT_COUNT.fullmatch(value)
        if step_range is not None:
            start, end = int(_number(step_range.group(1))), int(_number(step_range.group(2)))
            step = int(step_range.group(3)) if step_range.group(3) is not None else 1
            if step == 0:
                raise ValueError(f"{value!r}: the step of a range must not be 0")
            _bounded(len(range(start, end + 1, step)))
            expanded = list(range(start, end + 1, step))
        elif count_range is not None:
            start, end = int(_number(count_range.group(1))), int(_number(count_range.group(2)))
            expanded = [int(x) for x in np.linspace(start, end, _count(count_range.group(3))).tolist()]
        else:
            try:
                result.append(int(value))
            except ValueError:
                raise ValueError(f"{value!r} is not a whole number ({SYNTAX_HINT})") from None
            continue
        if not expanded:
            raise ValueError(f"{value!r} gives no values (a falling range needs a negative step, e.g. 10-1 (-1))")
        result += expanded
    return result


def expand_floats(values: Sequence[str]) -> list[float]:
    """Float values with ranges expanded; empty values are skipped, as A1111 does."""
    result: list[float] = []
    for value in values:
        if not value.strip():
            continue
        step_range = RE_FLOAT_RANGE.fullmatch(value)
        count_range = RE_FLOAT_COUNT.fullmatch(value)
        if step_range is not None:
            start, end = float(_number(step_range.group(1))), float(_number(step_range.group(2)))
            step = float(step_range.group(3)) if step_range.group(3) is not None else 1.0
            if step == 0:
                raise ValueError(f"{value!r}: the step of a range must not be 0")
            _bounded(max(0.0, (end + step - start) / step))
            expanded = np.arange(start, end + step, step).tolist()
        elif count_range is not None:
            start, end = float(_number(count_range.group(1))), float(_number(count_range.group(2)))
            expanded = np.linspace(start, end, _count(count_range.group(3))).tolist()
        else:
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number ({SYNTAX_HINT})") from None
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(f"{value!r} is not a finite number")
            result.append(number)
            continue
        if not expanded:
            raise ValueError(f"{value!r} gives no values (a falling range needs a negative step, e.g. 2-1 (-0.5))")
        result += [float(x) for x in expanded]
    return result


def permutations_of(values: Sequence[str]) -> list[tuple[str, ...]]:
    """Every order of the values (A1111's "Prompt order" axis)."""
    return list(itertools.permutations(values))


def parse_size(value: str) -> tuple[int, int]:
    """``"512x768"`` → (512, 768)."""
    match = RE_SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size; write it as WIDTHxHEIGHT, e.g. 512x768")
    return int(match.group(1)), int(match.group(2))


def format_number(value: object) -> str:
    """A value as A1111 prints it in a label: floats rounded to 8 places, Python's repr otherwise."""
    if isinstance(value, float):
        value = round(value, 8)
    return str(value)
