"""Prompt styles in A1111's ``styles.csv`` (columns ``name, prompt, negative_prompt``).

A style text containing ``{prompt}`` wraps the user's prompt; otherwise it is appended
with ", " (A1111's ``merge_prompts``). The file is rewritten atomically on save, keeping
any other columns a user or another tool added.
"""

from __future__ import annotations

import csv
import io
import threading
from dataclasses import dataclass
from pathlib import Path

from studio.config import atomic_write_text

COLUMNS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""

    def api_dict(self) -> dict[str, str]:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_style(style_text: str, prompt: str) -> str:
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


class StyleError(ValueError):
    pass


class StyleDatabase:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._styles: dict[str, Style] = {}
        self._extra: dict[str, dict[str, str]] = {}
        self.error: str | None = None
        self.reload()

    def reload(self) -> None:
        styles, extra, error = {}, {}, None
        if self.path.exists():
            try:
                with open(self.path, encoding="utf-8-sig", newline="") as f:
                    for row in csv.DictReader(f):
                        name = (row.get("name") or "").strip()
                        if not name:
                            continue
                        styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
                        extra[name] = {k: v for k, v in row.items() if k not in COLUMNS and k}
            except (OSError, csv.Error, UnicodeDecodeError) as e:
                error = f"{self.path.name}: cannot read styles ({e})"
        with self._lock:
            self._styles, self._extra, self.error = styles, extra, error

    def all(self) -> list[Style]:
        with self._lock:
            return list(self._styles.values())

    def names(self) -> list[str]:
        return [s.name for s in self.all()]

    def apply(self, names: list[str] | tuple[str, ...], prompt: str, negative: str) -> tuple[str, str]:
        with self._lock:
            missing = [n for n in names if n not in self._styles]
            if missing:
                known = ", ".join(self._styles) or "none"
                raise StyleError(f"Unknown style(s): {', '.join(missing)}. Available: {known}")
            for name in names:
                style = self._styles[name]
                prompt = merge_style(style.prompt, prompt)
                negative = merge_style(style.negative_prompt, negative)
        return prompt, negative

    def save(self, style: Style) -> None:
        if not style.name.strip():
            raise StyleError("A style needs a name.")
        with self._lock:
            self._styles[style.name] = style
            extra_cols = sorted({k for cols in self._extra.values() for k in cols})
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, *extra_cols], lineterminator="\n")
            writer.writeheader()
            for s in self._styles.values():
                writer.writerow({**self._extra.get(s.name, {}), **s.api_dict()})
            atomic_write_text(self.path, buf.getvalue())
