"""Expert copies off the compute path.

On CUDA a dedicated copy stream with one event per copy; on CPU one background thread. The
compute waits only for the slot it needs.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from mixtral_chat.engine.offload.store import ExpertStore


@dataclass
class Transfer:
    future: Future
    stop: threading.Event  # set: the copy ends at its next chunk (a wrong prefetch)


class Transfers:
    """Runs copies off the compute path: a CUDA copy stream, or one background thread on CPU.

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
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-copy")

    def submit(self, store: ExpertStore, layer: int, expert: int, out: Tensor) -> Transfer:
        compute_stream = torch.cuda.current_stream(self.device) if self.cuda else None
        stop = threading.Event()

        def copy_chunks(non_blocking: bool) -> None:
            for start in range(0, store.layout.nbytes, self.CHUNK):
                if stop.is_set():
                    return
                began = time.perf_counter()
                end = min(start + self.CHUNK, store.layout.nbytes)
                store.copy_into(layer, expert, out, start, end, non_blocking)
                if self.simulate_gbps:
                    remaining = (end - start) / (self.simulate_gbps * 1e9) - (time.perf_counter() - began)
                    if remaining > 0:
                        time.sleep(remaining)

        def run() -> object:
            if self._stream is None:
                copy_chunks(non_blocking=False)
                return None
            with torch.cuda.stream(self._stream):
                # The slot may still be read by compute queued earlier: wait for it first.
                self._stream.wait_stream(compute_stream)
                copy_chunks(non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            return event

        return Transfer(self._pool.submit(run), stop)

    def wait(self, transfer: Transfer) -> None:
        event = transfer.future.result()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
