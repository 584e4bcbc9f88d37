"""The cache simulator: hand-computed hit rates, Belady as the ceiling, and `mixtral-chat bench cache`."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from mixtral_chat.engine.offload import simulate, slots
from mixtral_chat.engine.offload.simulate import belady, belady_layer, replay, replay_layers
from mixtral_chat.engine.offload.slots import LRUPolicy, SlotMap
from mixtral_chat.engine.offload.trace import RoutingTraceError, load_trace
from tests.conftest import run_cli, save_tiny_checkpoint

# One layer, top-2, 5 experts; with k = 3 Belady keeps what comes back soonest. Step 2 ([0, 3])
# finds 0 resident and never used again: only the rule "never evict an expert the step needs"
# stops the farthest-next-use choice from evicting 0 while step 2 still computes with it.
HAND_STEPS = [[0, 1], [2, 1], [0, 3], [1, 4], [2, 1], [3, 2]]
# Belady, k = 3, step by step (h = hit, m = miss):
#   [0,1] m m | [2,1] m h | [0,3] h m, evict 2 (next use step 4) over 1 (protected) and not 0
#   | [1,4] h m, evict 0 (never again) over 3 (step 5) | [2,1] m h, evict 4 (never) over 3
#   | [3,2] h h  ->  6 hits, 6 misses
# LRU, k = 3 (recency order oldest first after each step):
#   [0,1] m m (0 1) | [2,1] m h (0 2 1) | [0,3] h m evict 2 (1 0 3) | [1,4] h m evict 0 (3 1 4)
#   | [2,1] m h evict 3 (4 2 1) | [3,2] m h evict 4 (1 3 2)  ->  5 hits, 7 misses


def write_trace(path: Path, trace: dict[int, list[list[int]]], token_offset: int = 0) -> Path:
    with path.open("w", encoding="utf-8") as out:
        tokens = max(len(steps) for steps in trace.values())
        for t in range(tokens):
            for layer, steps in trace.items():
                if t < len(steps):
                    row = {"token_idx": t + token_offset, "layer": layer, "experts": steps[t]}
                    row["gating_probs"] = [round(1 / len(steps[t]), 6)] * len(steps[t])
                    out.write(json.dumps(row) + "\n")
    return path


def random_trace(seed: int, layers: int, tokens: int, experts: int, top_k: int) -> dict[int, list[list[int]]]:
    rng = random.Random(seed)
    # Skewed popularity, like a trained router: some experts are chosen far more often.
    weights = [rng.random() ** 2 + 0.05 for _ in range(experts)]
    trace = {}
    for layer in range(layers):
        steps = []
        for _ in range(tokens):
            chosen: list[int] = []
            while len(chosen) < top_k:
                expert = rng.choices(range(experts), weights)[0]
                if expert not in chosen:
                    chosen.append(expert)
            steps.append(chosen)
        trace[layer] = steps
    return trace


def brute_force_optimum(steps: list[list[int]], k: int) -> int:
    """Fewest misses over every possible eviction choice (exhaustive search over cache states)."""
    states = {frozenset(): 0}  # cache contents -> fewest misses to reach them
    for needed in steps:
        following: dict[frozenset, int] = {}
        for cache, misses in states.items():
            missing = [e for e in needed if e not in cache]
            keep_from = sorted(cache - set(needed))
            room = k - len(set(needed))  # slots left for experts the step does not need
            # A lazy cache loads only what the step needs and evicts just enough to fit.
            for kept in itertools.combinations(keep_from, min(room, len(keep_from))):
                state = frozenset(kept) | set(needed)
                total = misses + len(missing)
                if total < following.get(state, 1 << 30):
                    following[state] = total
        states = following
    return min(states.values())


def test_belady_on_the_hand_made_trace() -> None:
    assert belady_layer(HAND_STEPS, 3) == (6, 6)
    assert belady({0: HAND_STEPS}, 3) == 0.5
    # Top-1 cycle through 3 experts with 2 slots: LRU misses always, Belady keeps one of two.
    cycle = [[0], [1], [2], [0], [1], [2]]
    assert belady_layer(cycle, 2) == (2, 4)
    assert replay({0: cycle}, 2, "lru").hits == 0


def test_belady_equals_the_exhaustive_optimum() -> None:
    for seed in range(12):
        trace = random_trace(seed, layers=1, tokens=12, experts=5, top_k=2)
        for k in (2, 3, 4):
            hits, misses = belady_layer(trace[0], k)
            assert misses == brute_force_optimum(trace[0], k), (seed, k)
            assert hits + misses == 24


def test_lru_replay_matches_hand_count_and_slotmap() -> None:
    counters = replay({0: HAND_STEPS}, 3, "lru")
    assert (counters.hits, counters.misses, counters.loads) == (5, 7, 7)
    # The same steps through a SlotMap driven by hand, over two layers.
    trace = {0: HAND_STEPS, 1: [[1, 2], [3, 4], [1, 3], [2, 4], [1, 2], [0, 4]]}
    per_layer = replay_layers(trace, 3, "lru")
    total_hits = total_misses = 0
    for layer, steps in trace.items():
        slots = SlotMap(3, LRUPolicy())
        for needed in steps:
            slots.access(needed)
        assert per_layer[layer] == slots.counters
        total_hits += slots.counters.hits
        total_misses += slots.counters.misses
    summed = replay(trace, 3, "lru")
    assert (summed.hits, summed.misses) == (total_hits, total_misses)


def test_replay_drives_the_engines_policy_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy registered with the engine is what the replay runs: no second implementation."""
    victims: list[int] = []

    class RecordingLRU(LRUPolicy):
        name = "recording"

        def victim(self, resident, protected):
            chosen = super().victim(resident, protected)
            victims.append(chosen)
            return chosen

    monkeypatch.setitem(slots.POLICIES, "recording", RecordingLRU)
    counters = replay({0: HAND_STEPS}, 3, "recording")
    assert (counters.hits, counters.misses) == (5, 7)
    assert victims == [2, 0, 3, 4]  # the evictions of the hand count above
    with pytest.raises(ValueError, match="unknown cache policy"):
        replay({0: HAND_STEPS}, 3, "nope")


def test_belady_is_the_ceiling_on_a_random_trace() -> None:
    trace = random_trace(7, layers=4, tokens=300, experts=8, top_k=2)
    for k in range(2, 9):
        best = belady(trace, k)
        lru = replay(trace, k, "lru").hit_rate
        lfu = replay(trace, k, "lfu").hit_rate
        assert best >= lru - 1e-12 and best >= lfu - 1e-12, k
        if 2 < k < 8:
            assert best > lru and best > lfu  # strictly better with real choices to make
    # k = top-k leaves no choice: every policy evicts all experts the step does not need.
    assert belady(trace, 2) == replay(trace, 2, "lru").hit_rate == replay(trace, 2, "lfu").hit_rate


def test_everything_fits_when_k_is_the_number_of_experts() -> None:
    trace = random_trace(3, layers=3, tokens=100, experts=8, top_k=2)
    distinct = sum(len({e for step in steps for e in step}) for steps in trace.values())
    for policy in ("lru", "lfu"):
        counters = replay(trace, 8, policy)
        assert counters.misses == distinct  # cold misses only
        per_layer = replay_layers(trace, 8, policy)
        for layer, steps in trace.items():
            # After each expert's first use, every access hits.
            first_uses = len({e for step in steps for e in step})
            assert per_layer[layer].misses == first_uses
            assert per_layer[layer].hits == 2 * len(steps) - first_uses
    assert belady(trace, 8) == replay(trace, 8, "lru").hit_rate == 1 - distinct / (3 * 100 * 2)


def test_load_trace_orders_by_token_and_validates(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"token_idx": 1, "layer": 0, "experts": [3, 1], "gating_probs": [0.6, 0.4]},
        {"token_idx": 0, "layer": 1, "experts": [2, 0], "gating_probs": [0.5, 0.5]},
        {"token_idx": 0, "layer": 0, "experts": [0, 1]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_trace(path) == {0: [[0, 1], [3, 1]], 1: [[2, 0]]}

    bad_lines = {
        "not json": "not valid JSON",
        "[1, 2]": "expected a JSON object",
        '{"layer": 0, "experts": [1]}': "missing 'token_idx'",
        '{"token_idx": -1, "layer": 0, "experts": [1]}': "token_idx must be a non-negative integer",
        '{"token_idx": 0, "layer": "0", "experts": [1]}': "layer must be a non-negative integer",
        '{"token_idx": 0, "layer": 0, "experts": []}': "experts must be a non-empty list",
        '{"token_idx": 0, "layer": 0, "experts": [1.5]}': "expert ids must be non-negative integers",
        '{"token_idx": 0, "layer": 0, "experts": [1, 1]}': "listed twice",
        '{"token_idx": 0, "layer": 0, "experts": [1, 2], "gating_probs": [1]}': "gating_probs",
        '{"token_idx": 0, "layer": 0, "experts": [0, 1]}': "token 0 layer 0 appears twice",
    }
    good = json.dumps(rows[2])
    for line, message in bad_lines.items():
        path.write_text(f"{good}\n{line}\n")
        with pytest.raises(RoutingTraceError, match=message) as caught:
            load_trace(path)
        assert str(caught.value).startswith(f"{path}:2: ")
        assert "\n" not in str(caught.value)
    path.write_text("\n")
    with pytest.raises(RoutingTraceError, match="empty"):
        load_trace(path)
    with pytest.raises(RoutingTraceError, match="no such routing trace"):
        load_trace(tmp_path / "missing.jsonl")
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RoutingTraceError, match="not UTF-8"):
        load_trace(path)


@pytest.fixture(scope="module")
def recorded_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A routing trace written by a real `mixtral-chat ask --trace-routing` on a tiny 8-expert model."""
    directory = tmp_path_factory.mktemp("cache-sim")
    model = save_tiny_checkpoint(directory / "model", num_local_experts=8, num_experts_per_tok=2)
    trace = directory / "trace.jsonl"
    result = run_cli(
        "ask", "--model", str(model), "--max-tokens", "40", "--trace-routing", str(trace), "Tell me a story"
    )
    assert result.returncode == 0, result.stderr
    return trace


def test_cli_bench_cache_table_and_json(recorded_trace: Path) -> None:
    trace = load_trace(recorded_trace)
    assert set(trace) == {0, 1} and all(len(s) >= 20 for s in trace.values())

    result = run_cli("bench", "cache", "--trace", str(recorded_trace), "--experts-per-layer", "2..8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"trace {recorded_trace}: ")
    assert "8 experts per layer, top-2" in lines[0]
    assert lines[1].split() == [
        "k", "lru", "hit", "lfu", "hit", "belady", "hit",
        "lru", "miss/tok", "lfu", "miss/tok", "belady", "miss/tok",
    ]  # fmt: skip
    rows = [line.split() for line in lines[2:]]
    assert [int(row[0]) for row in rows] == list(range(2, 9))
    tokens = max(len(steps) for steps in trace.values())
    for row in rows:
        k = int(row[0])
        lru, lfu = replay(trace, k, "lru"), replay(trace, k, "lfu")
        assert row[1:4] == [f"{lru.hit_rate:.1%}", f"{lfu.hit_rate:.1%}", f"{belady(trace, k):.1%}"]
        assert float(row[4]) == pytest.approx(lru.misses / tokens, abs=0.005)
        assert float(row[5]) == pytest.approx(lfu.misses / tokens, abs=0.005)
    assert float(rows[-1][3].rstrip("%")) > 80  # k = 8: only cold misses

    options = ["--experts-per-layer", "3,5", "--policy", "lru", "--json"]
    as_json = run_cli("bench", "cache", "--trace", str(recorded_trace), *options)
    assert as_json.returncode == 0, as_json.stderr
    payload = json.loads(as_json.stdout)
    assert payload["experts"] == 8 and payload["experts_per_token"] == 2 and payload["layers"] == 2
    assert [row["k"] for row in payload["rows"]] == [3, 5]
    for row in payload["rows"]:
        assert set(row) == {"k", "lru", "belady"}
        lru_per_layer = replay_layers(trace, row["k"], "lru")
        assert row["lru"]["misses"] == sum(c.misses for c in lru_per_layer.values())
        assert row["lru"]["layer_hit_rates"] == {
            str(layer): round(c.hit_rate, 4) for layer, c in lru_per_layer.items()
        }
        assert row["belady"]["hit_rate"] >= row["lru"]["hit_rate"]


def test_cli_bench_cache_bad_input(recorded_trace: Path, tmp_path: Path) -> None:
    trace = str(recorded_trace)
    usage_errors = {
        ("--experts-per-layer", "1"): "at least that",
        ("--experts-per-layer", "2..9"): "at most that",
        ("--experts-per-layer", "7..2"): "empty range",
        ("--experts-per-layer", "two"): "is not a number",
        ("--experts-per-layer", "0..3"): "at least 1 expert",
        ("--policy", "fifo"): "unknown policy",
    }
    for extra, message in usage_errors.items():
        result = run_cli("bench", "cache", "--trace", trace, *extra)
        assert result.returncode == 2, (extra, result.stderr)
        assert f"mixtral-chat: error: --{extra[0][2:]}" in result.stderr and message in result.stderr
        assert result.stdout == ""
    assert run_cli("bench").returncode == 2
    assert run_cli("bench", "cache").returncode == 2  # --trace is required

    broken = tmp_path / "broken.jsonl"
    broken.write_text(recorded_trace.read_text().splitlines()[0] + "\n{oops\n")
    json_error = "Expecting property name enclosed in double quotes"
    result = run_cli("bench", "cache", "--trace", str(broken))
    assert result.returncode == 1
    assert result.stderr.strip() == f"mixtral-chat: error: {broken}:2: not valid JSON ({json_error})"
    missing = run_cli("bench", "cache", "--trace", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 1 and "no such routing trace" in missing.stderr


def test_default_k_range_and_concatenated_traces(tmp_path: Path) -> None:
    first = write_trace(tmp_path / "a.jsonl", random_trace(1, layers=2, tokens=30, experts=6, top_k=2))
    second = write_trace(
        tmp_path / "b.jsonl", random_trace(2, layers=2, tokens=30, experts=6, top_k=2), token_offset=30
    )
    both = tmp_path / "both.jsonl"
    both.write_text(first.read_text() + second.read_text())
    trace = load_trace(both)
    assert simulate.summarize(trace).tokens == 60
    assert trace[0][:30] == load_trace(first)[0] and trace[0][30:] == load_trace(second)[0]
    result = run_cli("bench", "cache", "--trace", str(both), "--json")
    assert result.returncode == 0, result.stderr
    assert [row["k"] for row in json.loads(result.stdout)["rows"]] == [2, 3, 4, 5, 6]


def test_routing_repeats_from_a_trace_and_the_cli(recorded_trace: Path) -> None:
    from mixtral_chat.engine.offload import locality

    # By hand: layer 0 repeats its first choice once in two comparisons, its pair never.
    layers = locality.trace_repeats({0: [[1, 2], [1, 3], [4, 1]], 1: [[5, 6], [6, 5], [6, 5]]})
    assert (layers[0].tokens, layers[0].first, layers[0].pair) == (2, 1, 0)
    assert (layers[1].first_rate, layers[1].pair_rate) == (0.5, 1.0)  # {5,6} == {6,5}
    assert locality.chance_rates(8, 2) == (0.125, 1 / 28)

    trace = load_trace(recorded_trace)
    expected = locality.trace_repeats(trace)
    result = run_cli("bench", "routing", "--trace", str(recorded_trace), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chance_first"] == 0.125 and report["chance_pair"] == pytest.approx(1 / 28)
    assert [row["first_repeat"] for row in report["layers"]] == [
        expected[0].first_rate,
        expected[1].first_rate,
    ]
    assert [row["tokens"] for row in report["layers"]] == [len(trace[0]) - 1, len(trace[1]) - 1]

    table = run_cli("bench", "routing", "--trace", str(recorded_trace)).stdout.splitlines()
    assert table[1].split() == ["layer", "tokens", "first", "repeat", "pair", "repeat"]
    assert table[-1].split() == ["chance", "12.5%", "3.6%"]
