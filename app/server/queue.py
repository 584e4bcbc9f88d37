"""The engine's FIFO queue: one generation runs at a time, at most `max_waiting` requests wait
behind it, and one more is refused with 429 and a Retry-After estimated from recent answers.

Used from the event loop only (asyncio, no threads): `admit` at once when a request arrives (so a
refusal is a status code, not a broken stream), `wait` for the turn, and `release` when the
generation's thread has finished (the app schedules that on the loop).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from mixtral_chat.app.server.errors import ApiError

RECENT_DURATIONS = 8  # answers the Retry-After estimate averages over


class Turn:
    """A place in the queue; `granted` once it is this request's turn on the engine."""

    def __init__(self) -> None:
        self.granted = asyncio.get_running_loop().create_future()
        self.started_at: float | None = None


class EngineQueue:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._waiting: deque[Turn] = deque()
        self._running: Turn | None = None
        self._durations: deque[float] = deque(maxlen=RECENT_DURATIONS)

    @property
    def running(self) -> int:
        return 1 if self._running is not None else 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self) -> Turn:
        """A place at the back of the queue; ApiError 429 when the queue is full."""
        if self._running is not None and len(self._waiting) >= self.max_waiting:
            raise ApiError(
                429,
                f"the server is busy: {self.running + self.waiting} requests are ahead of this one; "
                "retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s())},
            )
        turn = Turn()
        if self._running is None:
            self._grant(turn)
        else:
            self._waiting.append(turn)
        return turn

    async def wait(self, turn: Turn) -> None:
        """Until it is `turn`'s turn. Cancelled (the client went away), it leaves the queue."""
        try:
            await asyncio.shield(turn.granted)
        except asyncio.CancelledError:
            self.leave(turn)
            raise

    def leave(self, turn: Turn) -> None:
        """`turn` gives up its place, or the engine if it had it and never started on it."""
        if turn in self._waiting:
            self._waiting.remove(turn)
        elif self._running is turn:
            self.release(turn)

    def release(self, turn: Turn) -> None:
        """The generation of `turn` is over: the next in line gets the engine."""
        if self._running is not turn:
            return
        if turn.started_at is not None:
            self._durations.append(time.monotonic() - turn.started_at)
        self._running = None
        if self._waiting:
            self._grant(self._waiting.popleft())

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: a full queue moves up one place when the running
        answer ends, so the mean time of recent answers."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean))

    def _grant(self, turn: Turn) -> None:
        self._running = turn
        turn.started_at = time.monotonic()
        turn.granted.set_result(None)
