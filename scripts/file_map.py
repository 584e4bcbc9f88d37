"""Rewrite the "## Files" list of docs/ARCHITECTURE.md from the modules themselves: one line per
file, its line count and the first line of its docstring. Usage: python scripts/file_map.py
[--check] (exit 1 if the list is out of date)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
ORDER = ["engine", "quant", "app"]  # the layers, bottom up
START = "scripts/file_map.py` rewrites this list, and the suite checks that it is current)\n\n"
END = "\n\nOver 400 lines, and why:"
WIDTH = 150


def entry(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(text)) or ""
    summary = " ".join(doc.split("\n\n")[0].split())
    if len(summary) > WIDTH:
        summary = summary[:WIDTH].rsplit(" ", 1)[0] + " ..."
    return f"- `{path.relative_to(ROOT)}` ({len(text.splitlines())}): {summary}"


def file_list() -> str:
    paths = [
        path
        for folder in ORDER
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.read_text(encoding="utf-8").strip()  # an empty __init__.py says nothing
    ]
    return "\n".join(entry(p) for p in paths)


def main() -> int:
    doc = DOC.read_text(encoding="utf-8")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + file_list() + END + tail
    if "--check" in sys.argv:
        return 0 if new == doc else 1
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
