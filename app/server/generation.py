"""One answer on the engine, run in its own thread and read from the event loop.

The engine is synchronous (torch); its stream is iterated in a thread that hands each piece to
the loop. `cancel()` sets the stream's stop event: the engine checks it after every token, so a
client that went away stops its generation within one token. The thread, not the request, gives
the engine's turn back (`on_done(finished)` on the loop), once the engine is really free.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mixtral_chat.app.errors import one_line_error
from mixtral_chat.app.server.stops import StopMatcher

if TYPE_CHECKING:
    from mixtral_chat.engine.runtime import ChatStream, GenerationStats


@dataclass(frozen=True)
class Finished:
    """How the answer ended. `finish_reason` is OpenAI's: "stop" (end of answer or a stop
    sequence), "length", or "cancelled" (the client went away; nobody reads it)."""

    finish_reason: str
    stats: GenerationStats | None
    error: str | None = None


class GenerationJob:
    def __init__(
        self,
        stream: ChatStream,
        stop_event: threading.Event,
        stops: tuple[str, ...],
        on_done: Callable[[Finished], None],
    ) -> None:
        self._stream = stream
        self._stop_event = stop_event
        self._matcher = StopMatcher(stops)
        self._on_done = on_done
        self._events: asyncio.Queue[str | Finished] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished: Finished | None = None
        self.started = False

    def start(self) -> None:
        self.started = True
        threading.Thread(target=self._run, name="generation", daemon=True).start()

    def cancel(self) -> None:
        self._stop_event.set()

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text as it comes; `finished` is set when this ends."""
        while True:
            event = await self._events.get()
            if isinstance(event, Finished):
                self.finished = event
                return
            yield event

    def _run(self) -> None:
        pieces = iter(self._stream)
        error = None
        try:
            for piece in pieces:
                text = self._matcher.add(piece)
                if text:
                    self._post(text)
                if self._matcher.stopped:
                    break  # the stop sequence is the end of the answer
            tail = self._matcher.flush()
            if tail:
                self._post(tail)
        except Exception as exc:  # told to the client as an error; the text sent so far stays
            error = one_line_error(exc)
        finally:
            pieces.close()  # a generator stopped early: the engine keeps its KV cache consistent
            stats = self._stream.stats
            if self._matcher.stopped:
                reason = "stop"
            elif self._stop_event.is_set() or stats is None:
                reason = "cancelled"
            else:
                reason = stats.finish_reason
            finished = Finished(reason, stats, error)
            self._post(finished)
            self._call_on_loop(self._on_done, finished)

    def _post(self, event: str | Finished) -> None:
        self._call_on_loop(self._events.put_nowait, event)

    def _call_on_loop(self, function: Callable[..., None], *args: object) -> None:
        # RuntimeError: the server stopped and closed its loop, so nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(function, *args)
