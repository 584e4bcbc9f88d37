"""Expert copies: close waits for them (defect 4); demand before speculation, real cancellation and
prefetch replayed through the engine's SlotMap (defect 6); traces with several sequences."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mixtral_chat.engine.model import Expert
from mixtral_chat.engine.offload import simulate
from mixtral_chat.engine.offload.cache import LayerExpertCache
from mixtral_chat.engine.offload.store import RamStore
from mixtral_chat.engine.offload.trace import load_trace, read_routing_trace, sequences_in
from mixtral_chat.engine.offload.transfers import PREFETCH, Transfers
from mixtral_chat.quant.blob import ExpertBlobLayout
from tests.conftest import run_cli
from tests.test_cache_sim import random_trace

CPU = torch.device("cpu")


def filled_store(experts: int = 4) -> RamStore:
    """A RAM store of small random experts (each blob ~100 KB)."""
    torch.manual_seed(0)
    modules = [Expert(64, 128) for _ in range(experts)]
    store = RamStore(ExpertBlobLayout.of_module(modules[0]), 1, experts, pin=False)
    for e, module in enumerate(modules):
        store.put(0, e, module)
    return store


def slow_transfers(store: RamStore, seconds_per_copy: float, chunks: int = 4) -> Transfers:
    """Copies that take `seconds_per_copy` each (a simulated link), in `chunks` chunks."""
    transfers = Transfers(CPU, simulate_gbps=store.layout.nbytes / seconds_per_copy / 1e9)
    transfers.CHUNK = -(-store.layout.nbytes // chunks)
    return transfers


def test_close_waits_for_copies_in_flight() -> None:
    store = filled_store()
    transfers = slow_transfers(store, 0.3)
    outs = [torch.zeros(store.layout.nbytes, dtype=torch.uint8) for _ in range(2)]
    submitted = [transfers.submit(store, 0, e, out) for e, out in enumerate(outs)]
    transfers.close()  # returns only once both copies are complete: the buffers may then be freed
    for e, (transfer, out) in enumerate(zip(submitted, outs, strict=True)):
        assert transfer.completed and transfer.done.is_set()
        assert torch.equal(out, store.blob(0, e))


def test_demand_copies_go_before_queued_prefetches() -> None:
    store = filled_store()
    transfers = slow_transfers(store, 0.2)
    out = [torch.zeros(store.layout.nbytes, dtype=torch.uint8) for _ in range(3)]
    try:
        first = transfers.submit(store, 0, 0, out[0], priority=PREFETCH)
        while not first.started:  # the thread is on it
            first.done.wait(0.001)
        guess = transfers.submit(store, 0, 1, out[1], priority=PREFETCH)
        demand = transfers.submit(store, 0, 2, out[2])
        transfers.wait(demand)
        assert first.completed  # it was running: it finishes first
        assert torch.equal(out[2], store.blob(0, 2))
    finally:
        transfers.close()
    assert guess.completed
    # Queued before the demand copy, the speculative one still ran after it.
    assert (first.run_index, demand.run_index, guess.run_index) == (0, 1, 2)


def test_cancellation_is_real_before_and_during_a_copy() -> None:
    store = filled_store()
    transfers = slow_transfers(store, 0.4, chunks=8)
    running_out = torch.zeros(store.layout.nbytes, dtype=torch.uint8)
    queued_out = torch.zeros(store.layout.nbytes, dtype=torch.uint8)
    try:
        running = transfers.submit(store, 0, 0, running_out, priority=PREFETCH)
        queued = transfers.submit(store, 0, 1, queued_out, priority=PREFETCH)
        while not running.started:
            running.done.wait(0.001)
        assert transfers.cancel(queued) and transfers.cancel(running)
        transfers.wait(running)
        transfers.wait(queued)
    finally:
        transfers.close()
    assert not running.completed and not torch.equal(running_out, store.blob(0, 0))  # stopped part-way
    assert not queued.started and not queued_out.any()  # never ran


def test_prefetch_replayed_through_the_slot_maps() -> None:
    trace = random_trace(seed=3, layers=4, tokens=200, experts=8, top_k=2)
    k = 4
    plain = simulate.replay(trace, k, "lru")
    per_layer = simulate.replay_with_prefetch(trace, k, "lru", recall=1.0)
    # A right guess for every expert: layers after the first never wait for a load.
    assert all(per_layer[layer].misses == 0 for layer in (1, 2, 3))
    assert per_layer[0].misses == simulate.replay_layers(trace, k, "lru")[0].misses
    wrong = simulate.replay_with_prefetch(trace, k, "lru", recall=0.0)
    total = simulate.CacheCounters()
    for counters in wrong.values():
        total.add(counters)
    # Every guess wrong: none needed by its step, and extra loads (a wrong guess may still be used later).
    assert total.predicted_needed == 0 and total.prefetch_recall == 0.0
    assert total.loads > plain.loads
    assert total.misses >= plain.misses


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_trace_of_several_sequences_replays_as_one_stream(tmp_path: Path) -> None:
    rows = []
    for problem, experts in (("a", [[0, 1], [2, 3]]), ("b", [[4, 5], [6, 7], [0, 2]])):
        for t, chosen in enumerate(experts):
            for layer in range(2):
                rows.append(
                    {
                        "problem_id": problem,
                        "token_idx": t,
                        "layer": layer,
                        "experts": chosen,
                        "gating_probs": [0.6, 0.4],
                    }
                )
    path = write_rows(tmp_path / "multi.jsonl", rows)
    assert sequences_in(path) == 2
    # Sequence a's tokens, then sequence b's: token_idx 0 appears in both and is no duplicate.
    assert load_trace(path)[0] == [[0, 1], [2, 3], [4, 5], [6, 7], [0, 2]]
    assert read_routing_trace(path).num_tokens == 5
    done = run_cli("bench", "cache", "--trace", str(path), "--experts-per-layer", "2")
    assert done.returncode == 0, done.stderr
    assert "2 sequences (problem_id / sequence field): replayed as one stream" in done.stdout
    as_json = run_cli("bench", "cache", "--trace", str(path), "--experts-per-layer", "2", "--json")
    data = json.loads(as_json.stdout)
    assert data["sequences"] == 2 and data["replayed_as"] == "one stream" and data["tokens"] == 5
    # Within one sequence a repeated (token, layer) is still an error.
    write_rows(path, [*rows, rows[0]])
    failed = run_cli("bench", "cache", "--trace", str(path))
    assert failed.returncode == 1 and "token 0 layer 0 of sequence a appears twice" in failed.stderr


def test_a_wrong_prefetch_still_in_flight_frees_its_slot_and_leaves_the_grid() -> None:
    store = filled_store()
    transfers = slow_transfers(store, 0.5, chunks=16)
    template = Expert(64, 128).to("meta")
    cache = LayerExpertCache(0, store, template, 3, "lru", CPU, transfers)
    try:
        cache.experts_for([0, 1])  # two misses, copied and waited for
        cache.prefetch([2])  # a guess: its copy takes 0.5 s
        assert cache.activity.prefetched == [2] and cache.slots.resident == [0, 1, 2]
        modules = cache.experts_for([0, 1])  # the guess was wrong and its copy has not completed
        assert cache.slots.resident == [0, 1]
        assert cache.activity.prefetched == [] and cache.activity.hits == [0, 1]
        assert cache.slots.counters.prefetch_cancelled == 1
        for expert, module in zip([0, 1], modules, strict=True):
            slot = cache.slots.slot_of[expert]
            assert module is cache.modules[slot] and torch.equal(cache.buffers[slot], store.blob(0, expert))
        cache.experts_for([0, 3])  # the freed slot takes the miss: nothing resident is evicted
        assert cache.slots.resident == [0, 1, 3]
    finally:
        transfers.close()


def test_the_stall_is_the_time_the_compute_waited_for_its_copies() -> None:
    store = filled_store()
    transfers = slow_transfers(store, 0.15)
    cache = LayerExpertCache(0, store, Expert(64, 128).to("meta"), 2, "lru", CPU, transfers)
    try:
        began = time.perf_counter()
        cache.experts_for([0, 1])  # two misses: copied one after the other, waited for
        elapsed = time.perf_counter() - began
        waited = cache.counters().stall_s
        assert 0.3 <= waited <= elapsed  # the copies' simulated time, within the step's
        # On the CPU the compute is the waiting thread: both figures are the one wait.
        assert cache.counters().host_wait_s == waited
        cache.experts_for([1, 0])  # both resident: no wait at all
        assert cache.counters().stall_s == waited
    finally:
        transfers.close()
