"""Progress of a pull (PullProgress: its download, then its quantization), the download's progress
over all files, and the byte counter huggingface_hub's `http_get` reports to (where a cancel
request stops a download between chunks)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mixtral_chat.engine.models.errors import DownloadCancelled


@dataclass(frozen=True)
class PullProgress:
    phase: str  # "download" | "quantize"
    bytes_done: int
    bytes_total: int
    speed: float  # bytes per second
    eta_s: float | None
    file: str | None = None

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0


@dataclass(frozen=True)
class DownloadProgress:
    bytes_done: int
    bytes_total: int
    speed: float  # bytes per second over the last few seconds of this run
    eta_s: float | None
    file: str | None


class ProgressTracker:
    """Aggregates bytes over all files; speed from a sliding window of this run's bytes only."""

    WINDOW_S = 5.0

    def __init__(self, total: int, callback: Callable[[DownloadProgress], None] | None) -> None:
        self.total = total
        self.done = 0
        self.file: str | None = None
        self._callback = callback
        self._samples: deque[tuple[float, int]] = deque()
        self._fetched = 0  # bytes received in this run (resumed bytes excluded)
        self._lock = threading.Lock()

    def add_present(self, n: int) -> None:
        """Bytes that were already on disk (cached files, resumed partials): done, not speed."""
        with self._lock:
            self.done += n
        self._emit()

    def add_fetched(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.done += n
            self._fetched += n
            self._samples.append((now, self._fetched))
            while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW_S:
                self._samples.popleft()
        self._emit()

    def speed(self) -> float:
        with self._lock:
            if len(self._samples) < 2:
                return 0.0
            (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> DownloadProgress:
        speed = self.speed()
        remaining = max(self.total - self.done, 0)
        eta = remaining / speed if speed > 0 else (0.0 if remaining == 0 else None)
        return DownloadProgress(self.done, self.total, speed, eta, self.file)

    def _emit(self) -> None:
        if self._callback is not None:
            self._callback(self.snapshot())


class ChunkSink:
    """What huggingface_hub's `http_get` takes as `tqdm_class`: counts bytes, honours cancel.

    `http_get` calls `update(len(chunk))` before writing each chunk, so raising here on cancel
    leaves the partial file holding only whole, correct chunks.
    """

    def __init__(
        self,
        *,
        tracker: ProgressTracker,
        cancel: threading.Event | None,
        **_tqdm_kwargs: Any,  # desc, total, initial, unit, unit_scale: the tracker knows better
    ) -> None:
        self._tracker = tracker
        self._cancel = cancel

    def __enter__(self) -> ChunkSink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int | float = 1) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise DownloadCancelled("download cancelled; the next pull resumes where it stopped")
        self._tracker.add_fetched(int(n))

    def close(self) -> None:
        return None
