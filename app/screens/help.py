"""F1: every key of the app in one list, by where it works, with the user's keymap applied. It
reads the bindings of the classes it is given, so a new binding shows here without more work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static

# (where the keys work, the classes whose bindings those are)
HelpSections = Sequence[tuple[str, Sequence[type]]]


def key_rows(
    classes: Sequence[type], keymap: Mapping[str, str], seen: set[str] | None = None
) -> list[tuple[str, str]]:
    """(keys as the user presses them, what they do) for each binding of `classes`, in order; a
    binding the keymap rebinds shows its new keys. An action already in `seen` (the app's, listed
    again by a screen to order its footer) is left out; `seen` gains the actions listed."""
    rows: list[tuple[str, str]] = []
    seen = set() if seen is None else seen
    for cls in classes:
        for item in getattr(cls, "BINDINGS", []):
            binding = item if isinstance(item, Binding) else Binding(*item)
            action = binding.action.removeprefix("app.")
            if action in seen:
                continue
            seen.add(action)
            keys = keymap.get(binding.id or "", binding.key)
            rows.append((", ".join(_key_name(key) for key in keys.split(",")), binding.description))
    return rows


def _key_name(key: str) -> str:
    key = key.strip()
    names = {"escape": "Esc", "enter": "Enter", "up": "Up", "down": "Down", "tab": "Tab"}
    if key in names:
        return names[key]
    parts = key.split("+")
    return "+".join(part.capitalize() if len(part) > 1 else part.upper() for part in parts)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,f1", "dismiss", "Close", id="help.close"),
    ]

    def __init__(self, sections: HelpSections, keymap: Mapping[str, str]) -> None:
        super().__init__(classes="dialog-screen")
        self.sections = sections
        self.keymap = keymap

    def rows(self) -> list[tuple[str, str, str]]:
        """(where, keys, what they do), in the order shown; the palette's key with the first
        section's (it is Textual's own binding, in no class here)."""
        rows: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for index, (where, classes) in enumerate(self.sections):
            rows += [(where, keys, action) for keys, action in key_rows(classes, self.keymap, seen)]
            if index == 0:
                rows.append((where, "Ctrl+P", "The command palette: every action, by name"))
        return rows

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide tall"):
            yield Label("Keys", classes="dialog-title")
            with VerticalScroll(id="help-keys"):
                rows = self.rows()
                for where in dict.fromkeys(where for where, _, _ in rows):
                    table = Table.grid(padding=(0, 2))
                    table.add_column(style="bold", no_wrap=True, min_width=14)
                    table.add_column()
                    for _, keys, action in (row for row in rows if row[0] == where):
                        table.add_row(keys, action)
                    yield Label(where, classes="help-section")
                    yield Static(table, classes="help-table")
        yield Footer()
