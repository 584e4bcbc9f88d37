"""Hybrid placement, simulated: the planner's chosen placement against "copy every miss" and "compute
every miss on the CPU", for Mixtral-8x7B (nf4) on simulated hosts (bandwidth.PROFILES: a 3060 with
DDR4, a 4090 with DDR5) at 8-24 GB.

No GPU needed: routing comes from a Mixtral-calibrated synthetic trace (or --trace FILE) replayed
through the engine's own SlotMaps, layer by layer, with each layer's placement: a copying layer
runs LRU and pays link + device time per miss; a CPU layer keeps its slots fixed (the engine's
warm start: experts 0..k-1) and pays max(device time of its hits, CPU time of its misses). Costs
per expert are `placement.MissCosts` of the profile; the dense part is resident bytes / device
bandwidth. So the hit rates are measured on the trace, not the planner's k/E estimate.

    python bench/bench_placement.py [--trace FILE] [--tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import OutOfMemoryError
from mixtral_chat.engine.models.catalog import MIXTRAL_8X7B_CONFIG
from mixtral_chat.engine.offload.bandwidth import PROFILES
from mixtral_chat.engine.offload.placement import (
    COPY,
    CPU,
    LayerPlacement,
    MissCosts,
    copies_for,
    step_seconds,
)
from mixtral_chat.engine.offload.planner import OffloadPlan, plan_placement, sizes_of_config
from mixtral_chat.engine.offload.replay import synthetic_routing_trace
from mixtral_chat.engine.offload.slots import LRUPolicy, SlotMap
from mixtral_chat.engine.offload.trace import Trace, load_trace
from mixtral_chat.engine.runtime import default_context

BUDGETS_GB = (8, 12, 16, 24)
STRATEGIES = {"chosen": "auto", "copy every miss": "copy", "CPU every miss": "cpu"}
KIND = {"copy": "copy", "cpu": "CPU", "split": "split"}


def synthetic_trace(tokens: int) -> Trace:
    trace: Trace = {}
    for row in synthetic_routing_trace(32, 8, 2, tokens, seed=0):
        trace.setdefault(row["layer"], []).append(row["experts"])
    return trace


def simulate_layer(
    placement: LayerPlacement, steps: list[list[int]], costs: MissCosts
) -> tuple[float, int, int]:
    """Seconds, hits and misses of one layer over the trace's steps, as the engine would run them."""
    slots = SlotMap(placement.slots, LRUPolicy())
    slots.start_warm(list(range(placement.slots)))
    seconds = 0.0
    for needed in steps:
        if placement.on_miss == COPY:
            accesses = slots.access(needed)
            misses = sum(not a.hit for a in accesses)
            seconds += step_seconds(len(accesses) - misses, misses, 0, costs)
        elif placement.on_miss == CPU:
            found = slots.lookup(needed)
            misses = sum(slot is None for slot in found)
            seconds += step_seconds(len(found) - misses, 0, misses, costs)
        else:  # SPLIT, as LayerExpertCache does it
            missing = [e for e in needed if e not in slots.slot_of]
            hits = len(needed) - len(missing)
            copies = copies_for(len(missing), hits, costs, slots.capacity - hits)
            slots.access([e for e in needed if e not in missing[copies:]])
            slots.counters.misses += len(missing) - copies
            seconds += step_seconds(hits, copies, len(missing) - copies, costs)
    return seconds, slots.counters.hits, slots.counters.misses


def simulate(plan: OffloadPlan, trace: Trace, costs: MissCosts, dense_s: float) -> dict:
    tokens = len(trace[0])
    total_s, hits, misses = dense_s * tokens, 0, 0
    for layer, placement in enumerate(plan.layers):
        seconds, layer_hits, layer_misses = simulate_layer(placement, trace[layer], costs)
        total_s, hits, misses = total_s + seconds, hits + layer_hits, misses + layer_misses
    return {
        "ms_per_token": round(total_s / tokens * 1e3, 2),
        "tok_s": round(tokens / total_s, 2),
        "hit_rate": round(hits / (hits + misses), 4),
        "cpu_layers": plan.cpu_layers,
        "kinds": sorted({KIND[layer.on_miss] for layer in plan.layers}),
        "slots": plan.total_slots,
        "bound_ms": round(plan.decode_bound_s * 1e3, 2) if plan.decode_bound_s else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", help="a routing trace of a 32-layer, 8-expert model (default: synthetic)")
    parser.add_argument("--tokens", type=int, default=512, help="synthetic trace length")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    trace = load_trace(args.trace) if args.trace else synthetic_trace(args.tokens)
    model = ModelArgs.from_dict(MIXTRAL_8X7B_CONFIG, source="catalog")
    rows = []
    for profile_name, rates in PROFILES.items():
        for budget_gb in BUDGETS_GB:
            budget = int(budget_gb * 1e9)
            sizes = sizes_of_config(model, "nf4", default_context(model, 2, budget), dtype_bytes=2)
            costs = MissCosts.of(sizes.expert_bytes, rates)
            dense_s = sizes.dense_read_bytes / (rates.device_gbps * 1e9)
            row = {"profile": profile_name, "budget_gb": budget_gb}
            for label, on_miss in STRATEGIES.items():
                try:
                    plan = plan_placement(sizes, budget_bytes=budget, on_miss=on_miss, bandwidths=rates)
                except OutOfMemoryError:
                    row[label] = None  # copying needs top_k slots in every layer
                    continue
                row[label] = simulate(plan, trace, costs, dense_s)
            rows.append(row)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"trace: {args.trace or f'synthetic Mixtral-calibrated, {args.tokens} tokens'}; Mixtral-8x7B nf4")
    print(
        "| profile | budget | chosen: tok/s (hit, misses, slots) | copy every miss: tok/s (hit) "
        "| CPU every miss: tok/s (hit) | chosen wins |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        chosen = row["chosen"]

        def cell(result: dict | None, layers: bool = False) -> str:
            if result is None:
                return "cannot (too few slots)"
            extra = f", {'+'.join(result['kinds'])}, {result['slots']} slots" if layers else ""
            return f"{result['tok_s']:.2f} ({result['hit_rate']:.1%}{extra})"

        others = [row[label] for label in ("copy every miss", "CPU every miss") if row[label] is not None]
        wins = all(chosen["ms_per_token"] <= other["ms_per_token"] for other in others)
        copying, on_cpu = cell(row["copy every miss"]), cell(row["CPU every miss"])
        verdict = "yes" if wins else "no"
        where = f"| {row['profile']} | {row['budget_gb']} GB"
        print(f"{where} | {cell(chosen, True)} | {copying} | {on_cpu} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
