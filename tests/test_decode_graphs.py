"""engine/decode_graphs.py on the CPU: the bodies a GPU captures (attention halves, chosen
experts), run as they are, give the eager decode's logits, across buckets, with a sliding
window, offloaded, with a route replayed mid-answer, after every rebinding, and when a capture
fails; and when graphs are captured, with a stand-in for CUDA's (issue 14, defect 8)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mixtral_chat.engine.decode_graphs import ATTENTION, CAPTURE_AT_USE, DecodeGraphs, bucket_for
from mixtral_chat.engine.generate import decode_one, prefill
from mixtral_chat.engine.model import RMSNorm
from mixtral_chat.engine.offload import ExpertOffloader, plan_offload
from mixtral_chat.engine.offload.placement import CPU
from mixtral_chat.engine.offload.replay import install_routing_replay, synthetic_routing_trace
from mixtral_chat.engine.offload.trace import write_routing_trace
from mixtral_chat.engine.weights import load_model
from tests.conftest import save_tiny_checkpoint

LAYERS = 3
PROMPT = [1, 5, 9, 2, 7]
STEPS = 20  # positions 5..24: buckets 8, 16 and 32 with the smallest at 4
SMALLEST = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("graphs"), num_local_experts=8, num_hidden_layers=LAYERS, hidden_size=64
    )


def greedy(model, steps: int = STEPS) -> tuple[torch.Tensor, list[int]]:
    """The logits of a greedy decode after PROMPT, [steps + 1, V], and the tokens it chose."""
    model.setup_cache(64)
    logits = [prefill(model, PROMPT, 0)]
    tokens = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(decode_one(model, tokens[-1], len(PROMPT) + i))
    return torch.stack(logits), tokens


def with_graphs(model):
    model.decode_graphs = DecodeGraphs(model, capture=False, smallest_bucket=SMALLEST)
    return model


def test_buckets_are_powers_of_two_within_the_cache() -> None:
    assert [bucket_for(end, 64, 4) for end in (1, 4, 5, 8, 9, 33, 64)] == [4, 4, 8, 8, 16, 64, 64]
    assert bucket_for(300, 4096) == 512 and bucket_for(10, 100) == 100 and bucket_for(3000, 2048) == 2048


def test_the_graph_bodies_decode_as_the_eager_layers(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected, tokens = greedy(load_model(model_dir))
    model = with_graphs(load_model(model_dir))
    graphs = model.decode_graphs
    ran: list[tuple[int, int]] = []
    summed: list[int] = []
    attention, experts = graphs._attention, graphs._experts_body
    monkeypatch.setattr(graphs, "_attention", lambda i, b: (ran.append((i, b)), attention(i, b)))
    monkeypatch.setattr(graphs, "_experts_body", lambda buffers, *a: (summed.append(1), experts(buffers, *a)))
    got, got_tokens = greedy(model)
    # Every layer of every decode step ran its attention body, over the bucket its position
    # needs, and its experts' body (every expert is resident).
    expected_runs = [
        (i, bucket_for(len(PROMPT) + s + 1, 64, SMALLEST)) for s in range(STEPS) for i in range(LAYERS)
    ]
    assert ran == expected_runs and {b for _, b in ran} == {8, 16, 32}
    assert len(summed) == STEPS * LAYERS
    assert got_tokens == tokens
    # Attention over a masked bucket instead of the written rows alone: the same sums, another order.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.decode_graphs.state() == "eager (no capture)"


def test_a_sliding_window_masks_the_bucket_as_the_eager_mask(tmp_path: Path) -> None:
    directory = save_tiny_checkpoint(tmp_path, num_local_experts=4, num_hidden_layers=2, sliding_window=6)
    expected, _ = greedy(load_model(directory))
    got, _ = greedy(with_graphs(load_model(directory)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on_miss", ["copy", CPU])
def test_offloaded_layers_take_the_graphs_route(
    model_dir: Path, on_miss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected, _ = greedy(load_model(model_dir))
    model = with_graphs(load_model(model_dir))
    graphs = model.decode_graphs
    summed: list[int] = []
    experts = graphs._experts_body
    monkeypatch.setattr(graphs, "_experts_body", lambda buffers, *a: (summed.append(1), experts(buffers, *a)))
    offloader = ExpertOffloader(model, plan_offload(model, 64, experts_per_layer=2, on_miss=on_miss))
    try:
        got, _ = greedy(model)
        counters = offloader.counters()
        assert counters.misses > 0  # the experts really came from the cache
    finally:
        offloader.close()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if on_miss == "copy":  # every miss was copied into a slot and waited for: all graphed
        assert len(summed) == STEPS * LAYERS
    else:  # a layer with a miss computed on the CPU keeps its experts eager
        assert 0 < len(summed) < STEPS * LAYERS and counters.cpu_computed > 0


def test_a_route_replayed_mid_answer_is_followed(model_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_routing_trace(synthetic_routing_trace(LAYERS, 8, 2, 64), trace)
    runs = []
    for model in (load_model(model_dir), with_graphs(load_model(model_dir))):
        model.setup_cache(64)
        logits, tokens = [prefill(model, PROMPT, 0)], [3, 8, 1, 4, 6, 2, 9, 5, 7, 1]
        for i, token in enumerate(tokens):
            if i == 2:  # the graphs' buffers were made for the gate's own routing
                replay = install_routing_replay(model, trace, prediction_recall=None)
            logits.append(decode_one(model, token, len(PROMPT) + i))
        replay.uninstall()
        runs.append(torch.stack(logits))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)


def test_the_graphs_are_made_anew_when_what_they_read_is_rebound(model_dir: Path, tmp_path: Path) -> None:
    """Uncaptured bodies read the modules afresh each call; captured graphs keep their pointers,
    so every rebinding must make them anew (`DecodeGraphs.current`)."""
    model = with_graphs(load_model(model_dir))
    graphs = model.decode_graphs
    trace = tmp_path / "trace.jsonl"
    write_routing_trace(synthetic_routing_trace(LAYERS, 8, 2, 64), trace)

    def rebind_o_proj() -> None:
        o_proj = model.layers[1].self_attn.o_proj
        o_proj.weight = torch.nn.Parameter(o_proj.weight.detach() * 0.5, requires_grad=False)

    def replace_a_norm() -> None:
        model.layers[0].post_attention_layernorm = RMSNorm(model.args.hidden_size, model.args.rms_norm_eps)

    def replace_a_gate() -> None:
        moe = model.layers[2].block_sparse_moe
        moe.gate = copy.deepcopy(moe.gate)

    rebindings = {
        "a weight": rebind_o_proj,
        "a norm": replace_a_norm,
        "a gate": replace_a_gate,
        "the cache": lambda: model.setup_cache(64),
        "a replayed route": lambda: install_routing_replay(model, trace, prediction_recall=None),
    }
    greedy(model, steps=1)
    for what, rebind in rebindings.items():
        assert graphs.current(), what
        rebind()
        assert not graphs.current(), what
        greedy(model, steps=1)  # made anew
    assert graphs.current()


def test_a_failed_capture_leaves_the_bodies_eager_and_says_why(model_dir: Path) -> None:
    expected, _ = greedy(load_model(model_dir))
    model = load_model(model_dir)
    # Capture on the CPU fails at its first CUDA call, as a capture a GPU refuses would.
    model.decode_graphs = DecodeGraphs(model, capture=True, smallest_bucket=SMALLEST)
    got, _ = greedy(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    state = model.decode_graphs.state()
    assert state.startswith("eager: attention eager (capture failed: RuntimeError: ")
    assert ", experts eager (capture failed: " in state and state.endswith(" s)")  # "(capturing took 0.00 s)"


def test_frozen_graphs_capture_nothing_new(model_dir: Path) -> None:
    model = load_model(model_dir)
    model.decode_graphs = graphs = DecodeGraphs(model, capture=True, smallest_bucket=SMALLEST)
    graphs.frozen = True  # what gpu_check sets while it counts ops: bodies without a graph run eagerly
    greedy(model, steps=3)
    assert graphs.captures == 0 and graphs.state() == "on: 0 attention graphs, 0 experts graphs"


class ReplayedBody:
    """What a captured graph does on a GPU, on the CPU: replay runs the body it was made from."""

    def __init__(self, body: Callable[[], None]) -> None:
        self.body, self.replays = body, 0

    def replay(self) -> None:
        self.replays += 1
        self.body()


class BodiesAsGraphs(DecodeGraphs):
    """DecodeGraphs whose captures need no CUDA: which bodies get a graph, and when, is under test."""

    def _graph_of(self, body: Callable[[], None]) -> ReplayedBody:  # type: ignore[override]
        body()  # the warm-up run, as on a GPU
        return ReplayedBody(body)


def test_a_body_is_captured_at_its_second_use_and_replayed_after(model_dir: Path) -> None:
    expected, _ = greedy(load_model(model_dir))
    model = load_model(model_dir)
    model.decode_graphs = graphs = BodiesAsGraphs(model, capture=True, smallest_bucket=SMALLEST)
    got, _ = greedy(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    uses, kept = graphs._uses, graphs._graphs
    assert graphs.captures == len(kept) and not graphs.failures
    assert all(uses[key] == CAPTURE_AT_USE for key in kept)  # captured at the second use, then replayed
    used_once = [key for key, n in uses.items() if n == 1]
    assert used_once and not any(key in kept for key in used_once)  # chosen once: never captured
    assert any(key[0] != ATTENTION for key in kept)  # experts' graphs too
    # Each layer's attention served every step: eagerly before its capture, from its graph after.
    served = sum(uses[key] - (key in kept) for key in uses if key[0] == ATTENTION)
    served += sum(graph.graph.replays for key, graph in kept.items() if key[0] == ATTENTION)
    assert served == STEPS * LAYERS
    state = graphs.state()
    assert state.startswith(f"on: {sum(k[0] == ATTENTION for k in kept)} attention graphs, ")
