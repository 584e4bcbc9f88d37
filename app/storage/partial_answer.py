"""Saving an answer while it streams."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mixtral_chat.app.storage.store import Storage


class PartialAnswerSaver:
    """Saves an answer while it streams: at most once per `interval_s`, so a crash loses at most
    the text produced since the last save, and the database sees one small write per second
    rather than one per token."""

    def __init__(
        self,
        storage: Storage,
        message_id: int,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.message_id = message_id
        self.interval_s = interval_s
        self._clock = clock
        self._pieces: list[str] = []
        self._saved_length = 0
        self._last_save = clock()
        self.saves = 0
        self.finished = False
        self.version: int | None = None  # the message's version after this saver's last save

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def append(self, piece: str) -> None:
        self._pieces.append(piece)
        if self._clock() - self._last_save >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Save the text so far (still marked streaming) if anything is new."""
        text = self.text
        if len(text) == self._saved_length or self.finished:
            return
        self.version = self.storage.update_message(self.message_id, text)
        self._saved_length = len(text)
        self._last_save = self._clock()
        self.saves += 1

    def finish(self, status: str, stats: dict[str, Any] | None = None, text: str | None = None) -> None:
        """The final save: the whole text with its status (complete / stopped / error)."""
        if self.finished:
            return
        if text is not None:
            self._pieces = [text]
        self.version = self.storage.update_message(self.message_id, self.text, status=status, stats=stats)
        self.finished = True
        self.saves += 1
