"""One decoding query's attention on the CPU: SDPA, two matmuls (engine/model.py `decode_attention`)
and the native kernel (quant/csrc/attention.c), per call, at the demo's, small and Mixtral's heads.

    python bench/bench_attention.py --threads 2

Each shape: a float32 cache sliced to its positions as the model hands it over, 10 warm-up calls,
then the median of 5 x 200 calls (wall time, microseconds per call).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixtral_chat.engine.model import decode_attention
from mixtral_chat.quant.native import int4_kernel

# (query heads, KV heads, head dim, cached positions)
SHAPES = [
    (4, 4, 48, 64),
    (4, 4, 48, 520),
    (8, 2, 64, 64),
    (8, 2, 64, 520),
    (8, 2, 64, 4096),
    (32, 8, 128, 256),
    (32, 8, 128, 520),
    (32, 8, 128, 1024),
    (32, 8, 128, 4096),
]


def per_call_us(fn: Callable[[], object], calls: int = 200) -> float:
    for _ in range(10):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def measure(heads: int, kv_heads: int, dim: int, length: int, threads: int) -> tuple[float, float, float]:
    """(SDPA, two matmuls, native) microseconds per call at one shape."""
    kernel = int4_kernel()
    assert kernel is not None
    q = torch.randn(1, heads, 1, dim)
    k_cache = torch.randn(1, kv_heads, length + 64, dim)
    v_cache = torch.randn_like(k_cache)
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]  # [1, KVH, L, D] views, as the model's
    gqa = heads != kv_heads
    return (
        per_call_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)),
        per_call_us(lambda: decode_attention(q, k, v)),
        per_call_us(lambda: kernel.decode_attention(q, k, v, threads=threads)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if int4_kernel() is None:
        raise SystemExit("error: the native kernel does not load on this host")
    print(f"{args.threads} threads; microseconds per call, median of 5 x 200")
    print("| heads x dim, KV heads, positions | SDPA | two matmuls | native | SDPA / native |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for heads, kv_heads, dim, length in SHAPES:
        sdpa, matmuls, native = measure(heads, kv_heads, dim, length, args.threads)
        print(
            f"| {heads}x{dim}, {kv_heads}, {length} | {sdpa:.1f} | {matmuls:.1f} | {native:.1f} "
            f"| {sdpa / native:.2f}x |"
        )


if __name__ == "__main__":
    main()
