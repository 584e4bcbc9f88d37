"""`mixtral-chat ask`: one answer, streamed to stdout. Diagnostics go to stderr."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from mixtral_chat.app.argtypes import SEED_MAX, SEED_MIN, float_range, int_range


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ask",
        help="answer one prompt, streamed to stdout",
        description="Answer one prompt. PROMPT and piped stdin combine: "
        "git diff | mixtral-chat ask 'review this'",
    )
    parser.add_argument("prompt", nargs="?", help="the question (stdin is appended when piped)")
    parser.add_argument("--model", help="catalog name, repo id (org/name) or model directory")
    parser.add_argument("--system", help="system prompt (none unless given)")
    # Bounds as the engine's GenerationConfig has them, plus finite numbers (it lets NaN through).
    parser.add_argument(
        "--temperature", type=float_range("--temperature", 0), default=0.0, help="0 = greedy (default)"
    )
    parser.add_argument("--top-p", type=float_range("--top-p", 0, 1, low_open=True), default=1.0)
    parser.add_argument("--top-k", type=int_range("--top-k", 0), default=0, help="0 = no top-k cut")
    parser.add_argument("--max-tokens", type=int_range("--max-tokens", 1), default=512)
    parser.add_argument("--seed", type=int_range("--seed", SEED_MIN, SEED_MAX))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--quant", choices=["none", "int4", "nf4"], help="quantize a float model in memory")
    parser.add_argument(
        "--context", type=int_range("--context", 1), help="context length in tokens (default 4096)"
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    offload = parser.add_argument_group("expert offloading")
    offload.add_argument(
        "--experts-per-layer",
        type=int_range("--experts-per-layer", 1),
        metavar="K",
        help="experts kept on the compute device per layer",
    )
    offload.add_argument(
        "--gpu-mem", type=float_range("--gpu-mem", 0), metavar="GB", help="memory budget for the planner"
    )
    offload.add_argument(
        "--prefetch",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="speculative loading of the next layer's experts (off: it measured slower, docs/BENCHMARKS.md)",
    )
    offload.add_argument("--offload", choices=["ram", "disk"], help="where the other experts live")
    offload.add_argument("--cache-policy", default="lru", choices=["lru", "lfu"])
    offload.add_argument(
        "--simulate-link-gbps",
        type=float_range("--simulate-link-gbps", 0, low_open=True),
        metavar="GBPS",
        help=argparse.SUPPRESS,
    )
    offload.add_argument("--stats", action="store_true", help="print expert-cache statistics to stderr")
    offload.add_argument("--trace-routing", metavar="FILE", help="write chosen experts as JSON lines")
    parser.set_defaults(handler=run)


def read_prompt(args: argparse.Namespace) -> str:
    from mixtral_chat.app.errors import UsageError

    # A blank PROMPT counts as none, as blank stdin does.
    parts = [args.prompt] if args.prompt and args.prompt.strip() else []
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped.strip():
            parts.append(piped)
    if not parts:
        raise UsageError("no prompt: give PROMPT or pipe text on stdin")
    return "\n\n".join(part.strip("\n") for part in parts)


def run(args: argparse.Namespace) -> int:
    from mixtral_chat.app.errors import UsageError

    prompt = read_prompt(args)
    from mixtral_chat.engine.errors import MixtralChatError
    from mixtral_chat.engine.models.resolve import resolve_model
    from mixtral_chat.engine.runtime import Engine, GenerationConfig

    try:
        config = GenerationConfig(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
    except MixtralChatError as exc:
        raise UsageError(str(exc)) from None
    if args.model is not None and Path(args.model).expanduser().is_dir():
        # A damaged index, said as such (the registry would only find "no safetensors weights").
        from mixtral_chat.engine.checkpoint import read_weight_map

        read_weight_map(Path(args.model).expanduser())
    resolved = resolve_model(args.model)
    check_experts_per_layer(args, resolved.path)
    if resolved.is_demo and args.model is None:
        print(
            "mixtral-chat: using the bundled demo model; get Mixtral with "
            "`mixtral-chat models pull mixtral-8x7b-instruct`",
            file=sys.stderr,
        )
    engine = Engine.load(
        resolved.path,
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        context_length=args.context,
        name=resolved.name,
        offload=offload_options(args),
    )
    plan = engine.info.offload_plan
    # Automatic offloading is always announced: it explains a slower answer.
    if plan and (args.stats or plan.startswith("auto")):
        print(f"mixtral-chat: offload plan: {plan}", file=sys.stderr)
    trace_file = None
    if args.trace_routing:
        from mixtral_chat.engine.offload import RoutingTrace

        trace_file = open(args.trace_routing, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
        RoutingTrace(engine.model, trace_file)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    stop = threading.Event()
    stream = engine.chat(messages, config, stop_event=stop)
    for notice in stream.notices:
        print(f"mixtral-chat: {notice}", file=sys.stderr)
    pieces: list[str] = []
    interrupted = False
    try:
        for piece in stream:
            pieces.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        # Ctrl+C stops generation; what was printed stays, and the JSON says "cancelled".
        interrupted = True
        stop.set()
    finally:
        if trace_file:
            trace_file.close()
    stats = stream.stats
    cache = engine.cache_stats()
    engine.close()
    text = "".join(pieces)
    if args.json:
        finish = "cancelled" if interrupted or stats is None else stats.finish_reason
        print(
            json.dumps(
                {
                    "text": text,
                    "finish_reason": finish,
                    "model": engine.info.name,
                    "usage": {
                        "prompt_tokens": stats.prompt_tokens if stats else None,
                        "completion_tokens": stats.completion_tokens if stats else len(pieces),
                    },
                    "timings": {
                        "ttft_s": round(stats.ttft_s, 4) if stats else None,
                        "decode_tok_s": round(stats.decode_tok_s, 2) if stats else None,
                    },
                    **({"cache": cache_summary(cache)} if cache and args.stats else {}),
                },
                ensure_ascii=False,
            )
        )
    elif text and not text.endswith("\n"):
        sys.stdout.write("\n")
    if args.stats:
        print_stats(stats, cache)
    return 130 if interrupted else 0


def check_experts_per_layer(args: argparse.Namespace, model_dir: Path) -> None:
    """--experts-per-layer against the model's config.json, before the weights load."""
    if args.experts_per_layer is None:
        return
    from mixtral_chat.app.errors import UsageError
    from mixtral_chat.engine.config import ModelArgs

    model = ModelArgs.from_hf_config(model_dir)
    low, high = model.num_experts_per_tok, model.num_local_experts
    if not low <= args.experts_per_layer <= high:
        raise UsageError(
            f"--experts-per-layer must be between {low} (experts per token) and {high} for this "
            f"model, got {args.experts_per_layer}"
        )


def offload_options(args: argparse.Namespace):
    from mixtral_chat.engine.runtime import OffloadOptions

    # Without a flag that asks for it, offloading starts only when the model does not fit.
    asked = args.experts_per_layer is not None or args.gpu_mem is not None or args.offload
    return OffloadOptions(
        experts_per_layer=args.experts_per_layer,
        memory_budget_gb=args.gpu_mem,
        prefetch=args.prefetch,
        store=args.offload,
        policy=args.cache_policy,
        simulate_link_gbps=args.simulate_link_gbps,
        only_if_needed=not asked,
    )


def cache_summary(cache: dict) -> dict:
    return {k: v for k, v in cache.items() if k != "layers"}


def print_stats(stats, cache: dict | None) -> None:
    if stats:
        print(
            f"mixtral-chat: {stats.prompt_tokens} prompt + {stats.completion_tokens} completion tokens, "
            f"ttft {stats.ttft_s:.3f} s, decode {stats.decode_tok_s:.2f} tok/s, {stats.finish_reason}",
            file=sys.stderr,
        )
    if cache:
        print(
            f"mixtral-chat: expert cache: hit rate {cache['hit_rate']:.1%} ({cache['hits']} hits, "
            f"{cache['misses']} misses), prefetch recall {cache['prefetch_recall']:.1%}, "
            f"{cache['prefetch_hits']} prefetch hits, {cache['prefetch_wasted']} wasted, "
            f"bytes moved {cache['bytes_moved'] / 1e6:.1f} MB, stalled {cache['stall_s']:.3f} s",
            file=sys.stderr,
        )
