"""The conversation list in the sidebar, and the model-loading line."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, LoadingIndicator, OptionList, ProgressBar
from textual.widgets.option_list import Option

from mixtral_chat.app.storage import Conversation
from mixtral_chat.engine.units import format_age, format_duration, format_size

if TYPE_CHECKING:
    from mixtral_chat.engine.load_progress import LoadProgress


def relative_time(timestamp: float, now: float | None = None) -> str:
    return format_age((now or time.time()) - timestamp)


# Marks a chat that another running mixtral-chat is answering in.
BUSY_MARK = "● "
BUSY_STYLE = "bold yellow"


class ConversationList(OptionList):
    """Conversations, most recently used first; option ids are `chat-<id>`. A chat another app
    is answering in is marked busy (`busy`: conversation id -> that app's pid)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._plain_labels: dict[int, str] = {}

    def show(
        self,
        conversations: list[Conversation],
        current_id: int | None,
        busy: Mapping[int, int] | None = None,
    ) -> None:
        now = time.time()
        busy = busy or {}
        self.clear_options()
        self._plain_labels = {}
        options = []
        for conversation in conversations:
            title = Text(no_wrap=True, overflow="ellipsis")
            if conversation.id in busy:
                title.append(BUSY_MARK, style=BUSY_STYLE)
            title.append(conversation.title)
            if conversation.id in busy:
                age = Text("busy", style=BUSY_STYLE)
            else:
                age = Text(relative_time(conversation.updated_at, now), style="dim")
            # Two columns: the title is cut with an ellipsis to one line, the age keeps its own.
            label = Table.grid(expand=True, padding=(0, 0, 0, 2))
            label.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
            label.add_column(justify="right", no_wrap=True)
            label.add_row(title, age)
            self._plain_labels[conversation.id] = f"{title.plain} {age.plain}"
            options.append(Option(label, id=f"chat-{conversation.id}"))
        self.add_options(options)
        self.select_conversation(current_id)

    def select_conversation(self, conversation_id: int | None) -> None:
        if conversation_id is None:
            self.highlighted = None
            return
        try:
            self.highlighted = self.get_option_index(f"chat-{conversation_id}")
        except Exception:  # not in the list (deleted elsewhere)
            self.highlighted = None

    def label_text(self, conversation_id: int) -> str:
        """A conversation's row as plain text (title, then its age or "busy")."""
        return self._plain_labels.get(conversation_id, "")

    @staticmethod
    def conversation_id(option: Option) -> int:
        return int(str(option.id).removeprefix("chat-"))


class ModelLoadingBar(Horizontal):
    """Shown while a model loads: a spinner, what is being loaded, a bar of the weights read so far
    (`Engine.load`'s progress) with the seconds so far and an ETA."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._what = ""
        self._started = 0.0
        self.progress: LoadProgress | None = None

    def compose(self) -> ComposeResult:
        yield LoadingIndicator()
        yield Label("", classes="loading-label")
        yield ProgressBar(show_eta=False, show_percentage=True, id="loading-progress")

    def on_mount(self) -> None:
        self.set_interval(0.5, self._tick)

    def begin(self, what: str, progress: LoadProgress | None) -> None:
        """A load starts; said again once its model is resolved (the name may change), which keeps
        the time shown. `progress`: the load's own so far (its messages may come before the screen
        says it is loading), None for none yet."""
        self._what = what
        if not self.display:
            self._started = time.monotonic()
        self.display = True
        if progress is None:
            self.progress = None
            self.query_one(ProgressBar).update(total=None, progress=0)
            self._tick()
        else:
            self.show_progress(progress)

    def end(self) -> None:
        self.display = False

    def show_progress(self, progress: LoadProgress) -> None:
        self.progress = progress
        bar = self.query_one(ProgressBar)
        bar.update(total=progress.bytes_total or None, progress=progress.fraction * progress.bytes_total)
        self._tick()

    def _tick(self) -> None:
        if not self.display:
            return
        elapsed = time.monotonic() - self._started
        text = f"Loading {self._what}… {elapsed:.0f} s"
        progress = self.progress
        if progress is not None and progress.bytes_total:
            text += f", {format_size(progress.bytes_done)} of {format_size(progress.bytes_total)}"
            if progress.eta_s is not None and not progress.finished:
                text += f", about {format_duration(progress.eta_s)} left"
        self.query_one(".loading-label", Label).update(text)
