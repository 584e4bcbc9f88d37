"""Hybrid placement: missed experts copied into slots or computed on the CPU, per layer.

On a CPU-only host the device is the CPU too, so every placement runs the same code it runs next to
a GPU, and its output must be bit-identical in float32 to the resident model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.models.catalog import demo_dir
from mixtral_chat.engine.offload import ExpertOffloader, plan_offload
from mixtral_chat.engine.offload.bandwidth import CACHE_FILE, measured, with_overrides
from mixtral_chat.engine.offload.cache import AfterCopy
from mixtral_chat.engine.offload.placement import (
    COPY,
    CPU,
    SPLIT,
    Bandwidths,
    LayerPlacement,
    MissCosts,
    layer_seconds,
    place_layers,
    spread_slots,
)
from mixtral_chat.engine.options import GenerationConfig, LoadOptions
from mixtral_chat.engine.runtime import Engine
from mixtral_chat.engine.weights import load_model
from tests.conftest import save_tiny_checkpoint

DECODE_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("hybrid"),
        seed=5,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=128,
    )


def greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """A prefill (the many-token MoE path) then greedy single-token steps: the tokens and every logit."""
    model.setup_cache(64)
    tokens = list(prompt)
    logits = []
    with torch.no_grad():
        step = model(torch.tensor([tokens]), torch.arange(len(tokens)))
        logits.append(step[:, -1:])
        for _ in range(DECODE_TOKENS):
            tokens.append(int(step[0, -1].argmax()))
            step = model(torch.tensor([tokens[-1:]]), torch.tensor([len(tokens) - 1]))
            logits.append(step)
    return tokens, torch.cat(logits, dim=1)


def placements(num_layers: int, num_experts: int) -> dict[str, dict]:
    """Every kind of placement, as plan_offload arguments."""
    kinds = [LayerPlacement(2, COPY), LayerPlacement(0, CPU), LayerPlacement(1, SPLIT)]
    kinds.append(LayerPlacement(3, CPU))
    mixed = [kinds[i % len(kinds)] for i in range(num_layers)]
    return {
        "all-slots": dict(experts_per_layer=num_experts),
        "copy-misses": dict(experts_per_layer=2),
        "all-cpu": dict(experts_per_layer=0, on_miss=CPU),
        "some-slots-cpu": dict(experts_per_layer=3, on_miss=CPU),
        "split": dict(experts_per_layer=1, on_miss=SPLIT),
        "mixed": dict(layers=mixed),
        "disk-cpu": dict(experts_per_layer=1, on_miss=CPU, store="disk"),
        "disk-mixed": dict(layers=mixed, store="disk"),
    }


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_every_placement_is_bit_identical_to_the_resident_model(
    which: str, tiny_dir: Path, tmp_path: Path
) -> None:
    model_dir = demo_dir() if which == "demo" else tiny_dir
    resident = load_model(model_dir, "cpu", torch.float32)
    prompt = [1, 5, 9, 200, 31, 77, 4]
    expected_tokens, expected_logits = greedy(resident, prompt)
    L, E = resident.args.num_hidden_layers, resident.args.num_local_experts
    for name, kwargs in placements(L, E).items():
        model = load_model(model_dir, "cpu", torch.float32)
        plan = plan_offload(model, 64, **kwargs)
        offloader = ExpertOffloader(model, plan, prefetch=False, store_path=tmp_path / f"{name}.pack")
        try:
            tokens, logits = greedy(model, prompt)
        finally:
            offloader.close()
        assert tokens == expected_tokens, name
        assert torch.equal(logits, expected_logits), name
        counters = offloader.counters()
        has_cpu_misses = any(layer.on_miss != COPY and layer.slots < E for layer in plan.layers)
        assert (counters.cpu_computed > 0) == has_cpu_misses, name
        if all(layer.on_miss == CPU for layer in plan.layers):
            assert counters.bytes_moved == 0, name  # nothing copied after the warm start
        assert counters.hits + counters.misses > 0


def test_a_step_queues_its_device_experts_before_the_cpu_computes_its_misses(tiny_dir: Path) -> None:
    """The device, the CPU and the link work at once (`model.run_experts`): in each decode step's
    MoE, the slot hits run first (on a GPU: queued), then the CPU-computed misses, and last the
    experts whose copy was started this step (waiting for it), whatever their expert ids; the
    output stays bit-identical (the sum keeps ascending expert order)."""
    resident = load_model(tiny_dir, "cpu", torch.float32)
    prompt = [1, 5, 9, 200, 31, 77, 4]
    expected_tokens, expected_logits = greedy(resident, prompt)
    model = load_model(tiny_dir, "cpu", torch.float32)
    # SPLIT: its one slot holds whichever expert came last (a CPU layer's fixed slots hold the
    # lowest ids, so ascending order alone would put them first).
    plan = plan_offload(model, 64, experts_per_layer=1, on_miss=SPLIT)
    offloader = ExpertOffloader(model, plan, prefetch=False)
    slot_modules = {id(m) for cache in offloader.caches for m in cache.modules}
    # "slot", "cpu", "copied" (a slot run after its copy) per expert call; "step" / "prefill"
    # after each MoE call.
    calls: list[str] = []

    def record(module: torch.nn.Module, inputs: tuple, _output: object) -> None:
        if isinstance(module, AfterCopy):  # its slot's call was just recorded (hooks run inner first)
            calls[-1] = "copied"
        elif id(module) in slot_modules:
            calls.append("slot")
        elif offloader.cpu_experts is not None and any(
            m is module for m in offloader.cpu_experts._bound.values()
        ):
            calls.append("cpu")
        elif type(module).__name__ == "SparseMoE":
            calls.append("step" if inputs[0].shape[1] == 1 else "prefill")

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        tokens, logits = greedy(model, prompt)
    finally:
        handle.remove()
        offloader.close()
    assert tokens == expected_tokens and torch.equal(logits, expected_logits)
    steps, current = [], []
    for call in calls:
        if call in ("step", "prefill"):
            if call == "step":
                steps.append(current)
            current = []
        else:
            current.append(call)
    order = {"slot": 0, "cpu": 1, "copied": 2}
    assert all(step == sorted(step, key=order.__getitem__) for step in steps), steps
    assert any(set(step) == {"slot", "cpu"} for step in steps), "no step had a hit and a CPU miss"
    assert any(set(step) == {"copied", "cpu"} for step in steps), "no step had a copy and a CPU miss"


def test_the_engine_computes_misses_on_the_cpu_when_asked(tiny_dir: Path) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    config = GenerationConfig(max_tokens=DECODE_TOKENS)
    resident = Engine.load(tiny_dir, LoadOptions(device="cpu", dtype="float32"))
    expected = "".join(resident.chat(messages, config))
    engine = Engine.load(
        tiny_dir,
        LoadOptions(device="cpu", dtype="float32", offload=True, experts_per_layer=0, on_miss="cpu"),
    )
    try:
        assert "".join(engine.chat(messages, config)) == expected
        stats = engine.cache_stats()
        assert stats is not None
        assert stats["cpu_layers"] == 3 and stats["cpu_computed"] == stats["misses"] > 0
        assert stats["hits"] == 0 and all(layer["on_miss"] == "cpu" for layer in stats["layers"])
        assert "misses computed on the CPU in 3 of 3 layers" in (engine.info.offload_plan or "")
    finally:
        engine.close()


def test_a_cpu_only_host_computes_every_miss_in_place_by_default(tiny_dir: Path) -> None:
    """on_miss auto without a host-to-device link: a miss computes on the store's bytes where they
    are (a copy into a slot would be a memcpy before the same GEMV), and without a k, no slots."""
    for k, slots in ((3, 3), (None, 0)):
        options = LoadOptions(device="cpu", dtype="float32", offload=True, experts_per_layer=k)
        engine = Engine.load(tiny_dir, options)
        try:
            assert engine.offloader is not None
            assert engine.offloader.plan.layers == (LayerPlacement(slots, CPU),) * 3
        finally:
            engine.close()


def test_a_copy_layer_needs_top_k_slots_and_a_cpu_layer_none(tiny_dir: Path) -> None:
    model = load_model(tiny_dir)
    with pytest.raises(MixtralChatError, match=r"between 2 \(experts per token\) and 8, got 1"):
        plan_offload(model, 64, experts_per_layer=1, on_miss=COPY)
    assert plan_offload(model, 64, experts_per_layer=0, on_miss=CPU).total_slots == 0
    with pytest.raises(MixtralChatError, match="unknown miss handling 'gpu'"):
        plan_offload(model, 64, experts_per_layer=2, on_miss="gpu")


# -- the cost model ---------------------------------------------------------------------------------

EXPERT = 99_000_000  # a Mixtral nf4 expert


def test_a_miss_goes_where_it_costs_least() -> None:
    slow_link = MissCosts.of(EXPERT, Bandwidths(h2d_gbps=8.0, cpu_gbps=40.0, device_gbps=300.0))
    fast_link = MissCosts.of(EXPERT, Bandwidths(h2d_gbps=50.0, cpu_gbps=20.0, device_gbps=900.0))
    assert slow_link.cheaper_on_miss() == CPU
    assert fast_link.cheaper_on_miss() == COPY
    # The costs follow the bytes: the link time is bytes / bandwidth.
    assert slow_link.copy_s == pytest.approx(EXPERT / 8e9)
    for costs in (slow_link, fast_link):
        cheaper = costs.cheaper_on_miss()
        other = COPY if cheaper == CPU else CPU
        assert layer_seconds(LayerPlacement(2, cheaper), 8, 2, costs) < layer_seconds(
            LayerPlacement(2, other), 8, 2, costs
        )


def test_slots_spread_evenly_and_copy_needs_top_k_everywhere() -> None:
    assert spread_slots(10, 4, 8) == [3, 3, 2, 2]
    assert spread_slots(100, 4, 8) == [8, 8, 8, 8]
    assert place_layers(7, 4, 8, 2, COPY) is None  # 7 slots cannot give 4 layers 2 each
    assert place_layers(9, 4, 8, 2, COPY) == [LayerPlacement(2, COPY)] * 4
    assert [layer.slots for layer in place_layers(7, 4, 8, 2, CPU)] == [2, 2, 2, 1]


def test_bandwidths_are_measured_once_and_cached(tmp_path: Path) -> None:
    first = measured(torch.device("cpu"), tmp_path)
    assert first.source == "measured" and first.h2d_gbps is None and first.cpu_gbps > 0
    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    assert [entry["cpu_gbps"] for entry in cached.values()] == [first.cpu_gbps]
    assert measured(torch.device("cpu"), tmp_path) == first  # read back, not measured again
    given = with_overrides(first, h2d_gbps=12.5)
    assert given.h2d_gbps == 12.5 and given.cpu_gbps == first.cpu_gbps and "flags (h2d_gbps)" in given.source
