"""The engine's load and offload flags, one definition for `ask` and `serve` (`load_options`
turns them into LoadOptions), and the placement flags `plan` shares with them."""

from __future__ import annotations

import argparse

from mixtral_chat.app.argtypes import float_range, int_range
from mixtral_chat.engine.options import CONTEXT_MIN, GPU_BUDGET_MIN, LOAD_CHOICES, LoadOptions


def add_engine_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Device, dtype, in-memory quantization, context and the offloading group (returned, for a
    command's own offloading flags)."""
    # Narrower than LOAD_CHOICES: no cuda:N or float16 on the command line.
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--quant", choices=LOAD_CHOICES["quant"], help="quantize a float model in memory")
    parser.add_argument(
        "--vocab-weights",
        default="auto",
        choices=LOAD_CHOICES["vocab_weights"],
        help="a 4-bit model's lm_head and embeddings on the CPU (auto: int8 where the native kernel runs)",
    )
    parser.add_argument(
        "--context",
        type=int_range("--context", CONTEXT_MIN),
        help="context length in tokens (default: the model's own, shortened if memory is short)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a GPU, replay decode layers' attention and experts as CUDA graphs (off: launch every op)",
    )
    offload = parser.add_argument_group("expert offloading")
    offload.add_argument(
        "--experts-per-layer",
        type=int_range("--experts-per-layer", 1),  # at least top-k, against the model's config
        metavar="K",
        help="experts kept on the compute device per layer",
    )
    offload.add_argument(
        "--gpu-mem",
        type=float_range("--gpu-mem", GPU_BUDGET_MIN),
        metavar="GB",
        help="memory budget for the planner",
    )
    offload.add_argument(
        "--prefetch",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="speculative loading of the next layer's experts (off: it measured slower, docs/BENCHMARKS.md)",
    )
    offload.add_argument(
        "--offload", choices=LOAD_CHOICES["offload_store"], help="where the other experts live"
    )
    offload.add_argument("--cache-policy", default="lru", choices=LOAD_CHOICES["cache_policy"])
    add_placement_flags(offload)
    offload.add_argument(
        "--simulate-link-gbps",
        type=float_range("--simulate-link-gbps", 0, low_open=True),
        metavar="GBPS",
        help=argparse.SUPPRESS,
    )
    return offload


def load_options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        context_length=args.context,
        # Without a flag that asks for it, offloading starts only when the model does not fit.
        offload=args.experts_per_layer is not None or args.gpu_mem is not None or args.offload is not None,
        experts_per_layer=args.experts_per_layer,
        gpu_budget_gb=args.gpu_mem,
        prefetch=args.prefetch,
        offload_store=args.offload or "ram",
        cache_policy=args.cache_policy,
        simulate_link_gbps=args.simulate_link_gbps,
        on_miss=args.on_miss,
        h2d_gbps=args.h2d_gbps,
        cpu_gbps=args.cpu_gbps,
        disk_gbps=args.disk_gbps,
        vocab_weights=args.vocab_weights,
        cuda_graphs=args.cuda_graphs,
    )


def add_placement_flags(group: argparse._ArgumentGroup) -> None:
    """What a missed expert does, and the bandwidths the planner assumes (`ask`, `serve`, `plan`)."""
    group.add_argument(
        "--on-miss",
        default="auto",
        choices=LOAD_CHOICES["on_miss"],
        help="missed experts: copied to the device, computed on the CPU, or split (auto: planned)",
    )
    group.add_argument(
        "--h2d-gbps",
        type=float_range("--h2d-gbps", 0, low_open=True),
        metavar="GBPS",
        help="host-to-device bandwidth the planner assumes (default: measured once per host)",
    )
    group.add_argument(
        "--cpu-gbps",
        type=float_range("--cpu-gbps", 0, low_open=True),
        metavar="GBPS",
        help="CPU memory bandwidth the planner assumes (default: measured once per host)",
    )
    group.add_argument(
        "--disk-gbps",
        type=float_range("--disk-gbps", 0, low_open=True),
        metavar="GBPS",
        help="read bandwidth of the disk an expert store on disk is read from (default: measured once)",
    )
