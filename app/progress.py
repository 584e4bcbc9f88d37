"""The one progress line of the CLI's long commands (`quantize`, `models pull`), on stderr."""

from __future__ import annotations

import time
from typing import TextIO

TTY_INTERVAL_S = 0.2  # redraws per second on a terminal: at most 5


class ProgressLine:
    """Redrawn in place on a terminal, at most every 0.2 s; elsewhere (a log, a pipe) one line
    per `log_interval_s`. A new phase starts a new line; a phase's final line is drawn once and
    never throttled, so the 100% always shows."""

    def __init__(self, stream: TextIO, *, log_interval_s: float) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval_s = TTY_INTERVAL_S if self.tty else log_interval_s
        self.last = 0.0
        self.phase: str | None = None
        self.finished = False
        self.width = 0  # of the line drawn last on a terminal, to blank what a shorter one leaves

    def show(self, text: str, *, phase: str, final: bool = False) -> None:
        now = time.monotonic()
        if phase != self.phase:
            self.end()
            self.phase = phase
            self.finished = False
        elif self.finished or (now - self.last < self.interval_s and not final):
            return  # throttled, or the phase's final line is already out
        self.finished = final
        self.last = now
        if self.tty:
            self.stream.write("\r" + text + " " * max(self.width - len(text), 0))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        """Finish the line on a terminal (before other output, or at the end)."""
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0
