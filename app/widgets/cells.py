"""Table cells as plain text: DataTable reads a str cell as markup, and names, paths and URLs are
the user's own text (a "[/]" in one would raise, a "[b]" would turn the rest bold)."""

from __future__ import annotations

from rich.text import Text


def plain(*cells: str) -> list[Text]:
    return [Text(cell) for cell in cells]
