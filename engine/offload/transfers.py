"""Expert copies off the compute path.

One copy thread takes copies in priority order: a step's own misses (demand) before speculative
prefetches, first come first served within each. On CUDA the copies run on a dedicated copy stream,
chunk by chunk, and the thread waits for each chunk before it queues the next: so a copy counts as
done only when its bytes are there, and stopping one (a wrong prefetch) really stops it at the next
chunk, where copies queued on a stream all at once could no longer be taken back. A copy may end
with a step run after its last chunk, on the same thread and stream (`then`: packing a staged int4
blob into its slot's runtime form), and counts as done once that step has run too.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mixtral_chat.engine.offload.store import ExpertStore

DEMAND, PREFETCH = 0, 1  # priorities: lower goes first


@dataclass
class Transfer:
    layer: int
    expert: int
    priority: int
    done: threading.Event = field(default_factory=threading.Event)  # set once it ran or was skipped
    stop: threading.Event = field(default_factory=threading.Event)  # set: skip it, or end at the next chunk
    started: bool = False
    run_index: int | None = None  # the how-manieth copy the thread ran (None: skipped or queued)
    completed: bool = False  # every byte copied
    error: BaseException | None = None


class Transfers:
    """Runs copies off the compute path on one thread, demand first.

    Copies go in chunks so a wrong prefetch can be stopped part-way instead of holding the queue
    for a whole expert. `simulate_gbps` makes each chunk take at least bytes / bandwidth, so the
    overlap of prefetch and compute can be measured on a machine without a GPU link.
    """

    CHUNK = 8 << 20  # bytes

    def __init__(self, device: torch.device, simulate_gbps: float | None = None) -> None:
        self.device = device
        self.simulate_gbps = simulate_gbps
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._runs = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="expert-copy", daemon=True)
        self._thread.start()

    def submit(
        self,
        store: ExpertStore,
        layer: int,
        expert: int,
        out: Tensor,
        *,
        priority: int = DEMAND,
        then: Callable[[], None] | None = None,
    ) -> Transfer:
        """Copy the expert's blob into `out`, then run `then` (on the copy stream on CUDA), unless
        the copy was stopped first."""
        if self._closed:
            raise RuntimeError("the expert copies were closed")
        transfer = Transfer(layer, expert, priority)
        ready = None
        if self.cuda:
            # The slot may still be read by compute queued before this point: the copy waits for it.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self._queue.put((priority, next(self._order), (transfer, store, out, ready, then)))
        return transfer

    def cancel(self, transfer: Transfer) -> bool:
        """Stop a copy: skipped if it has not started, ended at its next chunk if it has. False if
        it had already completed (the bytes are there)."""
        transfer.stop.set()
        return not transfer.completed

    def wait(self, transfer: Transfer) -> None:
        transfer.done.wait()
        if transfer.error is not None:
            raise transfer.error

    def _serve(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            transfer, store, out, ready, then = job
            try:
                if not transfer.stop.is_set():
                    transfer.run_index = next(self._runs)
                    transfer.started = True
                    self._copy(transfer, store, out, ready, then)
            except BaseException as exc:  # handed to the waiting compute thread
                transfer.error = exc
            finally:
                transfer.done.set()

    def _copy(
        self, transfer: Transfer, store: ExpertStore, out: Tensor, ready, then: Callable[[], None] | None
    ) -> None:
        nbytes = store.layout.nbytes
        if self._stream is not None:
            self._stream.wait_event(ready)
        for start in range(0, nbytes, self.CHUNK):
            if transfer.stop.is_set():
                return
            began = time.perf_counter()
            end = min(start + self.CHUNK, nbytes)
            if self._stream is None:
                store.copy_into(transfer.layer, transfer.expert, out, start, end, False)
            else:
                with torch.cuda.stream(self._stream):
                    store.copy_into(transfer.layer, transfer.expert, out, start, end, True)
                    chunk = torch.cuda.Event()
                    chunk.record(self._stream)
                chunk.synchronize()  # the thread waits, not the compute stream
            if self.simulate_gbps:
                remaining = (end - start) / (self.simulate_gbps * 1e9) - (time.perf_counter() - began)
                if remaining > 0:
                    time.sleep(remaining)
        if then is not None:
            if self._stream is None:
                then()
            else:
                with torch.cuda.stream(self._stream):  # after the copy, in stream order
                    then()
                    finished = torch.cuda.Event()
                    finished.record(self._stream)
                finished.synchronize()
        transfer.completed = True

    def close(self) -> None:
        """Wait for every queued and in-flight copy, then stop the thread: the slot buffers may be
        freed after this returns."""
        if self._closed:
            return
        self._closed = True
        self._queue.put((2, next(self._order), None))  # after every copy already queued
        self._thread.join()
        if self._stream is not None:
            self._stream.synchronize()
