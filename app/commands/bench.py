"""`mixtral-chat bench`: measurements that need no model. `bench cache` replays a routing trace."""

from __future__ import annotations

import argparse
import json

from mixtral_chat.app.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks (cache: replay a routing trace through the expert cache)",
        description="Benchmarks that run without a model.",
    )
    parser.set_defaults(handler=run_missing)
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", parser_class=type(parser))
    cache = benches.add_parser(
        "cache",
        help="expert-cache hit rate per k from a routing trace, with Belady's optimum",
        description="Replay a routing trace (`mixtral-chat ask --trace-routing FILE`) through the "
        "engine's expert cache and print the hit rate for each number of experts kept per layer, "
        "next to Belady's offline optimum. Caches start empty; the trace holds decode steps only.",
    )
    cache.add_argument("--trace", required=True, metavar="FILE", help="routing trace (JSON lines)")
    cache.add_argument(
        "--experts-per-layer",
        default=None,
        metavar="K",
        help="cache sizes to try: 3, 2..7 or 2,4,6 (default: top-k .. experts)",
    )
    cache.add_argument(
        "--policy",
        default="all",
        help="eviction policy: lru, lfu, or all (default all)",
    )
    cache.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cache.set_defaults(handler=run_cache)
    routing = benches.add_parser(
        "routing",
        help="how often consecutive tokens get the same experts, per layer (the Mixtral paper's Table 5)",
        description="From a routing trace (`mixtral-chat ask --trace-routing FILE`): per layer, the share "
        "of decode tokens whose first-choice expert, and whose whole set of experts, repeats the previous "
        "token's, next to the rate by chance. That locality is what the expert cache lives on.",
    )
    routing.add_argument("--trace", required=True, metavar="FILE", help="routing trace (JSON lines)")
    routing.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    routing.set_defaults(handler=run_routing)


def run_missing(args: argparse.Namespace) -> int:
    raise UsageError("choose a benchmark: mixtral-chat bench cache|routing --trace FILE")


def parse_k_values(text: str) -> list[int]:
    """'3' -> [3]; '2..7' -> [2, 3, 4, 5, 6, 7]; '2,4,6' -> [2, 4, 6]; parts combine: '2..4,6'."""
    values: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if ".." in part:
                low_text, high_text = part.split("..", 1)
                low, high = int(low_text), int(high_text)
                if low > high:
                    raise UsageError(f"--experts-per-layer: empty range {part!r} (write low..high)")
                values.update(range(low, high + 1))
            else:
                values.add(int(part))
        except ValueError:
            raise UsageError(
                f"--experts-per-layer: {text!r} is not a number, a range like 2..7, or a list like 2,4,6"
            ) from None
    if min(values) < 1:
        raise UsageError("--experts-per-layer: a cache needs at least 1 expert per layer")
    return sorted(values)


def parse_policies(text: str) -> list[str]:
    from mixtral_chat.engine.offload.slots import POLICIES

    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(POLICIES)
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names:
        raise UsageError(f"--policy: unknown policy {text!r} (choose from {', '.join(POLICIES)}, or all)")
    return list(dict.fromkeys(names))


def run_cache(args: argparse.Namespace) -> int:
    from mixtral_chat.engine.offload import simulate
    from mixtral_chat.engine.offload.trace import load_trace, sequences_in

    policies = parse_policies(args.policy)
    k_values = parse_k_values(args.experts_per_layer) if args.experts_per_layer is not None else None
    trace = load_trace(args.trace)
    sequences = sequences_in(args.trace)
    summary = simulate.summarize(trace)
    if k_values is None:
        k_values = list(range(summary.experts_per_token, summary.num_experts + 1))
    if k_values[0] < summary.experts_per_token:
        raise UsageError(
            f"--experts-per-layer {k_values[0]}: the trace has steps that need "
            f"{summary.experts_per_token} experts at once, so k must be at least that"
        )
    if k_values[-1] > summary.num_experts:
        raise UsageError(
            f"--experts-per-layer {k_values[-1]}: the trace's layers have {summary.num_experts} "
            f"experts, so k must be at most that"
        )

    rows = []
    for k in k_values:
        results = {name: simulate.replay_layers(trace, k, name) for name in policies}
        results["belady"] = simulate.belady_counters(trace, k)
        rows.append({"k": k, **{name: _result(per_layer, summary) for name, per_layer in results.items()}})

    if args.json:
        print(
            json.dumps(
                {
                    "trace": str(args.trace),
                    "tokens": summary.tokens,
                    "layers": summary.layers,
                    "experts": summary.num_experts,
                    "experts_per_token": summary.experts_per_token,
                    "sequences": sequences,
                    "replayed_as": "one stream" if sequences > 1 else "one sequence",
                    "policies": policies,
                    "rows": rows,
                }
            )
        )
        return 0
    print(
        f"trace {args.trace}: {summary.tokens} tokens x {summary.layers} layers, "
        f"{summary.num_experts} experts per layer, top-{summary.experts_per_token}; "
        f"caches start empty"
    )
    if sequences > 1:
        print(
            f"{sequences} sequences (problem_id / sequence field): replayed as one stream, in file order, "
            "the caches kept from one to the next"
        )
    columns = [*policies, "belady"]
    header = ["k", *(f"{name} hit" for name in columns), *(f"{name} miss/tok" for name in columns)]
    table = [header]
    for row in rows:
        table.append(
            [
                str(row["k"]),
                *(f"{row[name]['hit_rate']:.1%}" for name in columns),
                *(f"{row[name]['misses_per_token']:.2f}" for name in columns),
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    return 0


def run_routing(args: argparse.Namespace) -> int:
    from mixtral_chat.engine.offload import locality, simulate
    from mixtral_chat.engine.offload.trace import load_trace

    trace = load_trace(args.trace)
    summary = simulate.summarize(trace)
    layers = locality.trace_repeats(trace)
    chance_first, chance_pair = locality.chance_rates(summary.num_experts, summary.experts_per_token)
    first, pair = locality.overall(list(layers.values()))
    if args.json:
        rows = [
            {"layer": layer, "tokens": c.tokens, "first_repeat": c.first_rate, "pair_repeat": c.pair_rate}
            for layer, c in layers.items()
        ]
        print(
            json.dumps(
                {
                    "trace": str(args.trace),
                    "experts": summary.num_experts,
                    "experts_per_token": summary.experts_per_token,
                    "chance_first": chance_first,
                    "chance_pair": chance_pair,
                    "first_repeat": first,
                    "pair_repeat": pair,
                    "layers": rows,
                }
            )
        )
        return 0
    print(
        f"trace {args.trace}: {summary.tokens} tokens x {summary.layers} layers, "
        f"{summary.num_experts} experts per layer, top-{summary.experts_per_token}"
    )
    table = [["layer", "tokens", "first repeat", "pair repeat"]]
    for layer, counts in layers.items():
        table.append(
            [str(layer), str(counts.tokens), _percent(counts.first_rate), _percent(counts.pair_rate)]
        )
    table.append(
        ["all", str(max((c.tokens for c in layers.values()), default=0)), _percent(first), _percent(pair)]
    )
    table.append(["chance", "", _percent(chance_first), _percent(chance_pair)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    return 0


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def _result(per_layer: dict, summary) -> dict:
    from mixtral_chat.engine.offload.slots import CacheCounters

    total = CacheCounters()
    for counters in per_layer.values():
        total.add(counters)
    return {
        "hit_rate": round(total.hit_rate, 4),
        "hits": total.hits,
        "misses": total.misses,
        # expert loads per generated token, all layers together
        "misses_per_token": round(total.misses / summary.tokens, 4) if summary.tokens else 0.0,
        "layer_hit_rates": {str(layer): round(c.hit_rate, 4) for layer, c in per_layer.items()},
    }
