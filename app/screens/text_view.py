"""A message's text in a read-only text area: select with the mouse or Shift+arrows and copy from
there, for terminals that ignore OSC 52 (the copy's fallback)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, TextArea


class TextViewScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close", id="text_view.close"),
    ]

    def __init__(self, title: str, text: str) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog text-view"):
            yield Label(self.title_text, classes="dialog-question", markup=False)
            yield TextArea(self.text, read_only=True, soft_wrap=True, id="text-view-area")
        yield Footer()  # the dialog's keys

    def on_mount(self) -> None:
        area = self.query_one(TextArea)
        area.focus()
        area.select_all()
