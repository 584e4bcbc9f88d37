"""Routing replay: decode steps route as a recorded trace says; prefill keeps the real router."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from mixtral_chat.engine.offload import ExpertOffloader, RoutingTrace, plan_offload
from mixtral_chat.engine.offload.replay import install_routing_replay, synthetic_routing_trace
from mixtral_chat.engine.offload.slots import CacheCounters, LRUPolicy, SlotMap
from mixtral_chat.engine.offload.trace import (
    RoutingTraceError,
    load_trace,
    read_routing_trace,
    write_routing_trace,
)
from mixtral_chat.engine.weights import load_model
from mixtral_chat.quant.native import int4_kernel
from tests.conftest import save_tiny_checkpoint
from tests.test_attention_block import quantize_attention
from tests.test_moe_kernel import native_experts_model_from

LAYERS = 3
PROMPT = 6  # prefill tokens
STEPS = 12  # decode steps: more than the trace's tokens, so replay cycles


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("replay"), num_local_experts=8, num_hidden_layers=LAYERS, with_tokenizer=False
    )


# A hand-made trace: 5 tokens x 3 layers, top-2, experts far from what random weights choose.
TRACE = [
    {"token_idx": t, "layer": layer, "experts": experts, "gating_probs": probs}
    for t, rows in enumerate(
        [
            [([7, 6], [0.5, 0.2]), ([0, 1], [0.4, 0.3]), ([5, 3], [0.6, 0.1])],
            [([7, 6], [0.3, 0.25]), ([2, 1], [0.45, 0.2]), ([3, 5], [0.35, 0.3])],
            [([4, 0], [0.7, 0.1]), ([2, 1], [0.5, 0.15]), ([3, 5], [0.4, 0.12])],
            [([6, 7], [0.33, 0.32]), ([1, 2], [0.6, 0.3]), ([0, 7], [0.5, 0.4])],
            [([1, 2], [0.55, 0.05]), ([6, 4], [0.4, 0.35]), ([7, 0], [0.25, 0.24])],
        ]
    )
    for layer, (experts, probs) in enumerate(rows)
]


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    return write_routing_trace(TRACE, tmp_path / "trace.jsonl")


def run(model, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill PROMPT tokens, then STEPS single-token decode steps; all logits [1, S, V]."""
    model.setup_cache(64)
    with torch.no_grad():
        steps = [model(tokens[:, :PROMPT], torch.arange(PROMPT))]
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(PROMPT, PROMPT + STEPS)]
    return torch.cat(steps, dim=1)


def tokens() -> torch.Tensor:
    return torch.randint(0, 32000, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(5))


def test_recorded_routing_reproduces_the_replayed_trace(model_dir: Path, trace_file: Path) -> None:
    plain = load_model(model_dir)
    expected_logits = run(plain, tokens())
    model = load_model(model_dir)
    replay = install_routing_replay(model, trace_file)
    out = io.StringIO()
    RoutingTrace(model, out)
    logits = run(model, tokens())
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == STEPS * LAYERS
    for record in records:
        source = TRACE[(record["token_idx"] % 5) * LAYERS + record["layer"]]
        assert record["experts"] == source["experts"], record
        assert record["gating_probs"] == pytest.approx(source["gating_probs"], abs=1e-5)
    assert replay.step == STEPS
    # Prefill used the real router: its logits are the unreplayed model's, bit for bit.
    assert torch.equal(logits[:, :PROMPT], expected_logits[:, :PROMPT])
    assert not torch.equal(logits[:, PROMPT:], expected_logits[:, PROMPT:])  # decode was forced
    replay.uninstall()
    assert "route" not in model.layers[0].block_sparse_moe.__dict__
    out2 = io.StringIO()
    RoutingTrace(model, out2)
    assert torch.equal(run(model, tokens()), expected_logits)  # the real router again


def test_a_native_int4_model_routes_as_the_trace_says(model_dir: Path, trace_file: Path) -> None:
    """The native attention block and the one-call decode stack route with the gate's weight in C;
    with a replay installed they leave routing to it (they once kept the gate's choice)."""
    if int4_kernel() is None:
        pytest.skip("the native kernel does not load on this host")
    model = native_experts_model_from(load_model(model_dir))
    quantize_attention(model)
    model.setup_cache(64)
    x = torch.randn(1, 1, model.args.hidden_size)
    assert model.native_decode_stack(x, None) is not None  # no replay: every layer in one call
    replay = install_routing_replay(model, trace_file)
    assert model.native_decode_stack(x, None) is None
    unheard = run(model, tokens())  # nothing listens: the per-layer path, native attention blocks
    replay.step = 0
    out = io.StringIO()
    RoutingTrace(model, out)
    heard = run(model, tokens())
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["experts"] for r in records] == [
        TRACE[(r["token_idx"] % 5) * LAYERS + r["layer"]]["experts"] for r in records
    ]
    assert len(records) == STEPS * LAYERS
    assert torch.equal(unheard, heard)
    for layer in model.layers:
        layer.block_sparse_moe.routing_hook = None  # the trace stops listening
    replay.uninstall()
    assert model.native_decode_stack(x, None) is not None  # the gate routes again, in one call


def decode_counters(
    offloader: ExpertOffloader, model, toks: torch.Tensor
) -> tuple[torch.Tensor, CacheCounters]:
    """Logits of `run`, and the counters of its decode steps only (prefill subtracted)."""
    model.setup_cache(64)
    with torch.no_grad():
        steps = [model(toks[:, :PROMPT], torch.arange(PROMPT))]
        before = dataclasses.replace(offloader.counters())
        steps += [model(toks[:, i : i + 1], torch.tensor([i])) for i in range(PROMPT, PROMPT + STEPS)]
    after = offloader.counters()
    delta = CacheCounters(
        **{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)}
    )
    return torch.cat(steps, dim=1), delta


@pytest.mark.parametrize("recall", [1.0, 0.0])
def test_replay_drives_the_offloaded_model_and_its_prefetcher(
    model_dir: Path, trace_file: Path, tmp_path: Path, recall: float
) -> None:
    resident = load_model(model_dir)
    install_routing_replay(resident, trace_file)
    expected = run(resident, tokens())
    model = load_model(model_dir)
    offloader = ExpertOffloader(model, plan_offload(model, 64, experts_per_layer=3), prefetch=True)
    try:
        install_routing_replay(model, trace_file, prediction_recall=recall)
        logits, counters = decode_counters(offloader, model, tokens())
    finally:
        offloader.close()
    assert torch.equal(logits, expected)  # same forced routing, offloaded or not: same logits
    # Layers 1 and 2 get a prediction per step; each needs 2 experts.
    assert counters.needed == STEPS * (LAYERS - 1) * 2
    assert counters.prefetch_recall == recall  # the simulated predictor is right exactly that often
    assert counters.hits + counters.misses == STEPS * LAYERS * 2


def test_prediction_recall_none_leaves_predictions_to_the_real_router(
    model_dir: Path, trace_file: Path
) -> None:
    model = load_model(model_dir)
    replay = install_routing_replay(model, trace_file, prediction_recall=None)
    x = torch.randn(1, 32)
    moe = model.layers[1].block_sparse_moe
    _, predicted, _ = moe.route(x)  # called from outside the layer's forward: a prediction
    _, real, _ = type(moe).route(moe, x)
    assert torch.equal(predicted, real)
    replay.uninstall()


def test_trace_that_does_not_fit_the_model_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    model = load_model(model_dir)
    two_layers = write_routing_trace([r for r in TRACE if r["layer"] < 2], tmp_path / "two.jsonl")
    with pytest.raises(RoutingTraceError, match="the trace has 2 layers, the model 3"):
        install_routing_replay(model, two_layers)
    replay = install_routing_replay(model, two_layers, wrap_layers=True)  # layer 2 replays layer 0
    out = io.StringIO()
    RoutingTrace(model, out)
    model.setup_cache(8)
    with torch.no_grad():
        model(torch.tensor([[1]]), torch.tensor([0]))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records[2]["experts"] == TRACE[0]["experts"]
    replay.uninstall()
    top3 = [
        {**r, "experts": [*r["experts"], 3 if 3 not in r["experts"] else 4], "gating_probs": [0.1] * 3}
        for r in TRACE
    ]
    with pytest.raises(RoutingTraceError, match="chooses 3 experts per token, the model 2"):
        install_routing_replay(model, write_routing_trace(top3, tmp_path / "top3.jsonl"))
    big = [{**r, "experts": [9, 1]} if r["token_idx"] == 0 else r for r in TRACE]
    with pytest.raises(RoutingTraceError, match="uses expert 9, the model has 8"):
        install_routing_replay(model, write_routing_trace(big, tmp_path / "big.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"token_idx": 0, "layer": 0}\n')
    with pytest.raises(RoutingTraceError, match=r"bad.jsonl:1: not a routing record"):
        read_routing_trace(tmp_path / "bad.jsonl")
    gap = write_routing_trace(
        [r for r in TRACE if (r["token_idx"], r["layer"]) != (3, 1)], tmp_path / "gap.jsonl"
    )
    with pytest.raises(RoutingTraceError, match=r"token 3 lacks layers \[1\]"):
        read_routing_trace(gap)
    with pytest.raises(RoutingTraceError, match="not found"):
        read_routing_trace(tmp_path / "missing.jsonl")


def test_the_simulator_and_the_replay_read_traces_alike(tmp_path: Path) -> None:
    path = write_routing_trace(TRACE, tmp_path / "trace.jsonl")
    assert path.read_text().splitlines()[0] == json.dumps(TRACE[0])  # the file format, key order
    per_layer, per_token = load_trace(path), read_routing_trace(path)
    assert per_layer == {
        layer: [token[layer] for token in per_token.experts] for layer in range(per_token.num_layers)
    }
    # A malformed line is the same error, with the same words, from both readers.
    for line in ['{"token_idx": 0, "layer": 0}', '{"token_idx": 0, "layer": 0, "experts": [1, 1]}']:
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        messages = set()
        for read in (load_trace, read_routing_trace):
            with pytest.raises(RoutingTraceError) as caught:
                read(tmp_path / "bad.jsonl")
            messages.add(str(caught.value))
        assert len(messages) == 1 and messages.pop().startswith(f"{tmp_path / 'bad.jsonl'}:1: ")
    # The simulator needs no gating probabilities; the replay does, and positive ones.
    bare = write_routing_trace([{k: r[k] for k in ("token_idx", "layer", "experts")} for r in TRACE], path)
    assert load_trace(bare) == per_layer
    with pytest.raises(RoutingTraceError, match=r"jsonl:1: not a routing record \(missing 'gating_probs'\)"):
        read_routing_trace(bare)
    zero = write_routing_trace([{**TRACE[0], "gating_probs": [0.5, 0.0]}], path)
    assert load_trace(zero) == {0: [TRACE[0]["experts"]]}
    with pytest.raises(RoutingTraceError, match="non-positive probabilities"):
        read_routing_trace(zero)
    for read in (load_trace, read_routing_trace):
        with pytest.raises(RoutingTraceError, match="no such routing trace"):
            read(tmp_path / "missing.jsonl")


def test_synthetic_trace_has_mixtral_like_cache_behaviour(tmp_path: Path) -> None:
    records = synthetic_routing_trace(num_layers=4, num_tokens=1500, seed=1)
    trace = read_routing_trace(write_routing_trace(records, tmp_path / "synthetic.jsonl"))
    assert (trace.num_tokens, trace.num_layers, trace.top_k) == (1500, 4, 2)
    assert all(p[0] >= p[1] for token in trace.probs for p in token)  # gate order
    # LRU hit rates per experts cached per layer, against recorded Mixtral-8x7B-Instruct decoding
    # (35-40% at 2, 47-51% at 3, 60-62% at 4, 81% at 6), with a few points of sampling slack.
    for k, low, high in [(2, 0.33, 0.42), (3, 0.45, 0.53), (4, 0.57, 0.65), (6, 0.77, 0.85)]:
        hits = misses = 0
        for layer in range(trace.num_layers):
            slots = SlotMap(k, LRUPolicy())
            for token in trace.experts:
                slots.access(token[layer])
            hits, misses = hits + slots.counters.hits, misses + slots.counters.misses
        assert low <= hits / (hits + misses) <= high, (k, hits / (hits + misses))
