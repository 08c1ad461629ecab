"""Writing one benchmark's section into docs/benchmarks.md, leaving the others as they are."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, lines: list[str]) -> None:
    """Replace the section that starts with ``lines[0]`` (a ``## `` heading), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    marker = lines[0]
    if marker in text:
        head, _, rest = text.partition(marker)
        tail = rest.split("\n## ", 1)
        text = head + "\n".join(lines) + (("\n## " + tail[1]) if len(tail) > 1 else "")
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
