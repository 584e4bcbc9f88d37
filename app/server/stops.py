"""Stop sequences on a stream of text pieces: text goes out as soon as it cannot be the start of
a stop sequence, and never the stop sequence itself (OpenAI's `stop`)."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed pieces with `add`; it returns the text that is safe to send. `stopped` turns true once
    a stop sequence is complete: the text before it has been returned, nothing after it will be."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""  # the tail that may still grow into a stop sequence
        self.stopped = False

    def add(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        text = self._held + piece
        ends = [(text.find(stop), stop) for stop in self._stops if stop in text]
        if ends:
            self.stopped = True
            self._held = ""
            return text[: min(at for at, _ in ends)]
        keep = self._longest_partial(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held tail, once the stream ended without completing a stop sequence."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial(self, text: str) -> int:
        """Length of the longest end of `text` that some stop sequence starts with."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
