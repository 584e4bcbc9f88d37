"""How far a model load is: bytes of weights read of those the directory holds, tensors read, and
an ETA, for the TUI's progress bar and `ask`'s stderr line.

The readers (`safetensors_io.read_tensor`, the expert store's file reads) call `note_read(n)`;
what a load in the same thread (`counting`) has read is reported through its callback, at most
every `interval_s`, and once more at the end. Torch-free and cheap when no load is counting.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPORT_INTERVAL_S = 0.1


@dataclass(frozen=True)
class LoadProgress:
    bytes_done: int
    bytes_total: int  # the weight files' size: a load that streams experts from them reads less
    tensors: int
    elapsed_s: float
    finished: bool = False

    @property
    def fraction(self) -> float:
        if self.finished:
            return 1.0
        return min(self.bytes_done / self.bytes_total, 1.0) if self.bytes_total else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.finished:
            return 0.0
        if self.bytes_done <= 0 or self.elapsed_s <= 0 or not self.bytes_total:
            return None
        rate = self.bytes_done / self.elapsed_s
        return max(self.bytes_total - self.bytes_done, 0) / rate


class _Counter:
    def __init__(self, total: int, report: Callable[[LoadProgress], None], interval_s: float) -> None:
        self.total, self.report, self.interval_s = total, report, interval_s
        self.started = time.monotonic()
        self.last_report = 0.0
        self.bytes_done = 0
        self.tensors = 0

    def add(self, nbytes: int) -> None:
        self.bytes_done += nbytes
        self.tensors += 1
        now = time.monotonic()
        if now - self.last_report >= self.interval_s:
            self.last_report = now
            self.report(self.progress(now))

    def progress(self, now: float, finished: bool = False) -> LoadProgress:
        return LoadProgress(self.bytes_done, self.total, self.tensors, now - self.started, finished)


_counting: contextvars.ContextVar[_Counter | None] = contextvars.ContextVar("load_progress", default=None)


def weight_bytes(model_dir: Path) -> int:
    """What the directory's weight files hold (the load reads at most this)."""
    return sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))


@contextmanager
def counting(
    total_bytes: int, report: Callable[[LoadProgress], None] | None, interval_s: float = REPORT_INTERVAL_S
) -> Iterator[None]:
    """Count the reads of this thread while the block runs; a last report (finished) after it."""
    if report is None:
        yield
        return
    counter = _Counter(total_bytes, report, interval_s)
    token = _counting.set(counter)
    try:
        yield
    finally:
        _counting.reset(token)
    report(counter.progress(time.monotonic(), finished=True))


def note_read(nbytes: int) -> None:
    """A reader read `nbytes` of weights (one tensor or blob)."""
    counter = _counting.get()
    if counter is not None:
        counter.add(nbytes)
