"""The prompt: a multi-line TextArea where Enter sends and Shift+Enter / Ctrl+J add a newline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import on
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    """Enter sends, Shift+Enter / Ctrl+J insert a newline (binding ids `prompt.send` and
    `prompt.newline`, so `App.set_keymap` can swap them). Up on the first line and Down on the
    last line walk the prompt history."""

    BINDINGS: ClassVar[list[BindingType]] = [
        # priority: TextArea inserts a newline for Enter in its key handler, before normal
        # bindings are looked at.
        Binding("enter", "submit", "Send", id="prompt.send", priority=True),
        Binding("shift+enter,ctrl+j", "newline", "Newline", id="prompt.newline", priority=True, show=False),
    ]

    @dataclass(eq=False)
    class Submitted(Message):
        prompt: PromptInput
        text: str

        @property
        def control(self) -> PromptInput:
            return self.prompt

    def __init__(self, history: list[str] | None = None, *, id: str | None = None) -> None:
        super().__init__(
            "",
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            compact=True,
            highlight_cursor_line=False,
            placeholder="Ask anything. Enter sends, Shift+Enter or Ctrl+J adds a line.",
            id=id,
        )
        self._history: list[str] = list(history or [])
        self._history_index: int | None = None  # None: editing the draft, not a history entry
        self._draft = ""

    @property
    def prompt_history(self) -> list[str]:
        return list(self._history)

    def remember(self, text: str) -> None:
        """Add a sent prompt to the history (moving a repeated one to the end)."""
        if text in self._history:
            self._history.remove(text)
        self._history.append(text)
        self._history_index = None

    def set_text(self, text: str) -> None:
        """Replace the text and put the cursor at its end."""
        self.load_text(text)
        self.move_cursor(self.document.end)

    @dataclass(eq=False)
    class KeyAction(Message, bubble=False):
        """Send / newline, queued behind the keys typed before them (see `action_submit`)."""

        name: str

    # Priority bindings run as soon as the app reads the key, while the characters typed just
    # before it may still wait in this widget's queue (fast typing, tmux send-keys, a paste of
    # "text\r"). Acting through a message queued here keeps the order the keys were typed in.
    def action_submit(self) -> None:
        self.post_message(self.KeyAction("submit"))

    def action_newline(self) -> None:
        self.post_message(self.KeyAction("newline"))

    @on(KeyAction)
    def _key_action(self, message: KeyAction) -> None:
        if message.name == "submit":
            self.post_message(self.Submitted(self, self.text))
        else:
            self.insert("\n")

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0 and self._history:
            self._history_step(-1)
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if (
            not select
            and self.cursor_location[0] == self.document.line_count - 1
            and self._history_index is not None
        ):
            self._history_step(+1)
        else:
            super().action_cursor_down(select)

    def _history_step(self, step: int) -> None:
        if self._history_index is None:
            if step > 0:
                return
            self._draft = self.text
            index = len(self._history) - 1
        else:
            index = self._history_index + step
        if index < 0:
            return  # already at the oldest entry
        if index >= len(self._history):
            self._history_index = None
            self.set_text(self._draft)
            return
        self._history_index = index
        self.set_text(self._history[index])
