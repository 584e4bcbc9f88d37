"""A SPLIT layer's step on a real decode: its misses shared between the link and the CPU, timed.

The cost model (`placement.step_seconds`) times a SPLIT step as max(device + copies, CPU share):
the CPU computes its misses while the others are being copied. This runs the engine's own
offloader on the CPU with a simulated link (`Transfers(simulate_gbps=)`: a copy takes at least
bytes / bandwidth on the copy thread) and a Mixtral-calibrated synthetic routing trace, SPLIT
with one slot per layer, and prints ms per token beside the stall (time waiting for copies) and
the per-expert times (compute measured here, the copy's from the simulated link).

    python bench/bench_split.py [--link-gbps 4] [--tokens 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the app sets it (app/cli.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_offload import build_random_model, decode

from mixtral_chat.engine.offload import ExpertOffloader, plan_offload
from mixtral_chat.engine.offload.placement import SPLIT
from mixtral_chat.engine.offload.replay import RoutingReplay, synthetic_routing_trace
from mixtral_chat.engine.offload.trace import read_routing_trace, write_routing_trace

# Experts of 44 MB in float32 (hidden 1024, intermediate 3584): a copy at a few GB/s and the
# CPU's compute are both milliseconds, as a Mixtral expert's are over PCIe and DDR.
CONFIG = dict(
    vocab_size=512,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)


def expert_seconds(model: torch.nn.Module, rounds: int = 20) -> float:
    """One expert's [1, D] forward on the CPU, median of `rounds`."""
    expert = model.layers[0].block_sparse_moe.experts[0]
    x = torch.randn(1, CONFIG["hidden_size"])
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        expert(x)
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--link-gbps", type=float, default=4.0)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.conftest import host_line  # the suite's host line: CPU model and flags

    print(f"{host_line()}; torch threads {args.threads}")

    model = build_random_model(CONFIG, torch.device("cpu"), torch.float32, "none", seed=0)
    model.fuse_weights()
    expert_bytes = sum(
        t.numel() * t.element_size() for t in model.layers[0].block_sparse_moe.experts[0].parameters()
    )
    compute_s = expert_seconds(model)
    copy_s = expert_bytes / (args.link_gbps * 1e9)
    print(
        f"expert {expert_bytes / 1e6:.1f} MB: compute {compute_s * 1e3:.2f} ms here, "
        f"copy {copy_s * 1e3:.2f} ms at {args.link_gbps} GB/s (simulated)"
    )

    L, E, K = CONFIG["num_hidden_layers"], CONFIG["num_local_experts"], CONFIG["num_experts_per_tok"]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trace.jsonl"
        write_routing_trace(synthetic_routing_trace(L, E, K, args.warmup + args.tokens + 8, seed=0), path)
        replay = RoutingReplay(model, read_routing_trace(path)).install()
    plan = plan_offload(model, 64, experts_per_layer=1, on_miss=SPLIT)
    offloader = ExpertOffloader(model, plan, prefetch=False, simulate_link_gbps=args.link_gbps)
    try:
        model.setup_cache(64)
        result = decode(model, offloader, replay, args.warmup, args.tokens)
    finally:
        offloader.close()
    counters = result.counters
    assert counters is not None
    steps = L * args.tokens
    print(
        f"SPLIT, 1 slot/layer, {L} layers: {result.s_per_token * 1e3:.1f} ms/token "
        f"({result.tok_s:.1f} tok/s); waiting for copies "
        f"{counters.stall_s / args.tokens * 1e3:.1f} ms/token; "
        f"per layer-step {counters.hits / steps:.2f} hits, {counters.misses / steps:.2f} misses "
        f"({counters.cpu_computed / steps:.2f} computed on the CPU, the rest copied)"
    )


if __name__ == "__main__":
    main()
