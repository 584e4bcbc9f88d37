"""The expert-cache simulator: replay a recorded routing trace through the engine's cache classes.

A trace (read by `trace.load_trace`: per layer, the expert set of each generated token) replayed
here drives the same `SlotMap` and eviction policies the engine runs (offload/slots.py), one
`access(needed)` per token per layer, so the simulated hit rate is the engine's own policy on
that routing. Belady's offline optimum (evict the resident expert whose next use is farthest
away) is the ceiling no online policy can pass.

The replay starts with empty caches and sees only decode steps (the trace has no prefill), so
its counters count cold misses; the engine's own counters also include prefill and a warm start.
Pure Python: no torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from mixtral_chat.engine.offload.slots import CacheCounters, SlotMap, make_policy
from mixtral_chat.engine.offload.trace import Trace


@dataclass(frozen=True)
class TraceSummary:
    tokens: int  # generated tokens traced
    layers: int
    num_experts: int  # largest expert id + 1: the experts per layer the model has at least
    experts_per_token: int  # the most experts any one step needed
    steps: int  # (token, layer) pairs


def summarize(trace: Trace) -> TraceSummary:
    all_steps = [step for steps in trace.values() for step in steps]
    return TraceSummary(
        # A token's layers are all traced, so the longest layer has every token.
        tokens=max((len(steps) for steps in trace.values()), default=0),
        layers=len(trace),
        num_experts=max((max(step) for step in all_steps), default=-1) + 1,
        experts_per_token=max((len(step) for step in all_steps), default=0),
        steps=len(all_steps),
    )


def replay_layers(trace: Trace, experts_per_layer: int, policy: str) -> dict[int, CacheCounters]:
    """Each layer's counters after replaying its steps through a fresh SlotMap of k slots."""
    make_policy(policy)  # unknown names fail before any work
    result = {}
    for layer, steps in trace.items():
        slots = SlotMap(experts_per_layer, make_policy(policy))
        for needed in steps:
            slots.access(needed)
        result[layer] = slots.counters
    return result


def replay(trace: Trace, experts_per_layer: int, policy: str) -> CacheCounters:
    """All layers' counters summed: the engine's policy with k slots per layer on this routing."""
    total = CacheCounters()
    for counters in replay_layers(trace, experts_per_layer, policy).values():
        total.add(counters)
    return total


def replay_with_prefetch(
    trace: Trace, experts_per_layer: int, policy: str, recall: float, seed: int = 0
) -> dict[int, CacheCounters]:
    """The engine's prefetch order replayed through its SlotMaps: per token, layer l's demand
    first (`access`), then the prediction for layer l+1 (`prefetch`), right for each needed expert
    with probability `recall` and otherwise a wrong expert. Every copy is taken to finish before
    it is needed (a link fast enough): this counts loads and hits, not time."""
    rng = random.Random(seed)
    layers = sorted(trace)
    num_experts = max(e for steps in trace.values() for step in steps for e in step) + 1
    slot_maps = {layer: SlotMap(experts_per_layer, make_policy(policy)) for layer in layers}
    for t in range(max(len(trace[layer]) for layer in layers)):
        for index, layer in enumerate(layers):
            if t >= len(trace[layer]):
                continue
            slot_maps[layer].access(trace[layer][t])
            following = layers[index + 1] if index + 1 < len(layers) else None
            if following is None or t >= len(trace[following]):
                continue
            needed = trace[following][t]
            wrong = [e for e in range(num_experts) if e not in needed]
            predicted = [e if rng.random() < recall or not wrong else rng.choice(wrong) for e in needed]
            slot_maps[following].prefetch(sorted(set(predicted)))
    return {layer: slots.counters for layer, slots in slot_maps.items()}


def belady_layer(steps: Sequence[Sequence[int]], experts_per_layer: int) -> tuple[int, int]:
    """(hits, misses) of Belady's optimal offline policy on one layer's steps.

    On a miss with no free slot, evict the resident expert whose next use is farthest in the
    future (never used again counts as farthest), never one the current step needs. With every
    expert of a step required at once this farthest-next-use rule stays optimal (the usual
    exchange argument goes through with the step's experts protected).
    """
    if experts_per_layer < 1:
        raise ValueError("an expert cache needs at least one slot")
    # next_use[t][e]: the first step after t that needs expert e (infinity if none).
    next_use: list[dict[int, float]] = [{} for _ in steps]
    upcoming: dict[int, float] = {}
    for t in range(len(steps) - 1, -1, -1):
        for expert in steps[t]:
            next_use[t][expert] = upcoming.get(expert, math.inf)
        for expert in steps[t]:
            upcoming[expert] = t
    resident: dict[int, float] = {}  # expert -> the step that next needs it
    hits = misses = 0
    for t, needed in enumerate(steps):
        if len(set(needed)) > experts_per_layer:
            raise ValueError(
                f"a step needs {len(set(needed))} experts but the layer has {experts_per_layer} slots"
            )
        protected = set(needed)
        for expert in needed:
            if expert in resident:
                hits += 1
            else:
                misses += 1
                if len(resident) >= experts_per_layer:
                    victim = max((e for e in resident if e not in protected), key=lambda e: (resident[e], e))
                    del resident[victim]
            resident[expert] = next_use[t][expert]
    return hits, misses


def belady_counters(trace: Trace, experts_per_layer: int) -> dict[int, CacheCounters]:
    """Each layer's hits and misses under Belady's optimum, as CacheCounters."""
    result = {}
    for layer, steps in trace.items():
        hits, misses = belady_layer(steps, experts_per_layer)
        result[layer] = CacheCounters(hits=hits, misses=misses, loads=misses)
    return result


def belady(trace: Trace, experts_per_layer: int) -> float:
    """The hit rate of Belady's optimal offline policy over all layers: the ceiling."""
    total = CacheCounters()
    for counters in belady_counters(trace, experts_per_layer).values():
        total.add(counters)
    return total.hit_rate
