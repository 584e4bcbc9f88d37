"""How long the compute waited for expert copies: a layer cache's stall figure.

On the CPU the compute is the thread that waits, so its stall is the host's wait. On CUDA the two
differ: while the host waits for a copy, the GPU may still be running work queued before the wait,
and it idles only from the end of that work until the host queues the next. So each wait records
an event on the compute stream as it begins (reached once the work queued before it is done) and
one as it ends (reached as soon as it is queued on an idle GPU); the time between them is the GPU's
idle time. A pair is read only once the GPU has reached its second event (`Event.query`, which
does not block): the decode path takes no host sync for this figure.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StallClock:
    """Sums a compute device's waits for copies: `device_s` (the compute's, GPU-side on CUDA) and
    `host_s` (the waiting thread's, equal to `device_s` on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.host_s = 0.0
        self._device_s = 0.0  # the waits read so far
        # (began, ended) pairs on CUDA, oldest first: the decode thread appends, stats readers
        # (the answer loop's thread, the TUI's) read them under the lock.
        self._unread: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._reading = threading.Lock()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        began = time.perf_counter()
        began_on_device = self._record() if self.cuda else None
        try:
            yield
        finally:
            waited = time.perf_counter() - began
            self.host_s += waited
            if began_on_device is None:
                with self._reading:
                    self._device_s += waited
            else:
                self._unread.append((began_on_device, self._record()))

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    @property
    def device_s(self) -> float:
        """The compute's stall so far: every wait whose end the device has reached (on CUDA one
        still queued counts once the GPU gets there; one stream reaches them in order)."""
        with self._reading:
            while self._unread and self._unread[0][1].query():
                began, ended = self._unread.popleft()
                self._device_s += began.elapsed_time(ended) / 1e3  # ms -> s
            return self._device_s
