"""Prefill and decode speed of our engine vs transformers' `MixtralForCausalLM.generate`, on CPU.

Both run in this one process on the same checkpoint, dtype, prompt and thread count, alternating
(ours, theirs, ours, theirs, ...) because the machine is shared and noisy; the table reports
medians, and its ratios are medians of the per-round ratios. Both decode greedily for exactly
`--new-tokens` tokens (EOS never stops either side), and the script checks that they produce the
same tokens.

Without `--model` the script writes its own checkpoint: a random-weight Mixtral (8 experts, top-2,
GQA, ~260M parameters) saved by transformers' `save_pretrained`, with Mixtral's real tokenizer
(mistral-common's `tokenizer.model.v1`). It is made in a child process so that building it does
not count in this process's peak RSS.

    python bench/bench_engine.py                      # float32, ~2-3 minutes on 2 cores
    python bench/bench_engine.py --dtype bfloat16
    python bench/bench_engine.py --profile            # where our decode time goes (cProfile + torch.profiler)

Prefill tok/s is prompt tokens / time to first token (TTFT: from the call to the first generated
token, so it includes each side's per-call overhead). Decode tok/s is (N - 1) / (time of token N -
time of token 1).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning. On a shared machine whose cores are busy, spinning
# workers fight the thread they wait for: a 2-thread decode step measured 10-20x slower that way.
# Set before torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

# The benchmark checkpoint: Mixtral's shape (8 experts top-2, GQA 3:1, head_dim 64) scaled down.
BENCH_CONFIG = dict(
    vocab_size=32000,  # Mixtral's real tokenizer
    hidden_size=768,
    intermediate_size=1792,  # 2.33x hidden
    num_hidden_layers=6,
    num_attention_heads=12,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
)

PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil "
    "and a rag to polish the great lens. Ships passing the rocky headland relied on the beam to "
    "find the channel between the reefs, and in winter storms the keeper stayed awake all night. "
)

TRANSFORMERS_VARIANTS = {
    # name -> (attn_implementation, experts_implementation)
    "transformers eager": ("eager", "eager"),
    "transformers sdpa+grouped_mm": ("sdpa", "grouped_mm"),  # transformers 5's default on CPU
}


@dataclass
class RunResult:
    tokens: list[int]
    ttft_s: float  # call -> first generated token
    decode_s: float  # first generated token -> last generated token

    def prefill_tok_s(self, prompt_len: int) -> float:
        return prompt_len / self.ttft_s

    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s


@dataclass
class EngineRuns:
    name: str
    load_rss_mb: float
    runs: list[RunResult] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: make one)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="approximate prompt length")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager-only", action="store_true", help="skip the sdpa+grouped_mm row")
    parser.add_argument("--profile", action="store_true", help="profile our decode and print the top entries")
    parser.add_argument("--seed", type=int, default=0, help="weights seed of the generated checkpoint")
    args = parser.parse_args(argv)
    if args.model is not None and not (args.model / "config.json").exists():
        parser.error(f"{args.model}: no config.json there")
    if args.new_tokens < 2 or args.prompt_tokens < 8 or args.repeats < 1:
        parser.error("need --new-tokens >= 2, --prompt-tokens >= 8, --repeats >= 1")
    return args


def make_checkpoint(directory: str, seed: int) -> None:
    """Random Mixtral weights written by transformers' save_pretrained, plus the real tokenizer."""
    import mistral_common
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**BENCH_CONFIG)).eval()
    model.save_pretrained(directory)
    tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(tokenizer, Path(directory) / "tokenizer.model")


def make_checkpoint_in_child(directory: Path, seed: int) -> None:
    child = multiprocessing.get_context("spawn").Process(target=make_checkpoint, args=(str(directory), seed))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"bench: making the checkpoint failed (exit {child.exitcode})")


def build_prompt(tokenizer: Any, target_tokens: int) -> list[int]:
    """A chat prompt of at least target_tokens tokens (whole sentences, so the template stays valid)."""
    sentences = [s.strip() + "." for s in PROMPT_TEXT.split(".") if s.strip()]
    text = ""
    ids: list[int] = []
    i = 0
    while len(ids) < target_tokens:
        text += ("" if not text else " ") + sentences[i % len(sentences)]
        ids = tokenizer.encode_chat([{"role": "user", "content": text + " Summarise the story."}])
        i += 1
    return ids


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ours(engine: Any, prompt: list[int], new_tokens: int) -> RunResult:
    from mixtral_chat.engine.generate import generate_tokens
    from mixtral_chat.engine.options import GenerationConfig

    tokens: list[int] = []
    stamps: list[float] = []
    start = time.perf_counter()
    # eos_id=-1: no token is EOS, so exactly new_tokens come out, as on the transformers side.
    for token in generate_tokens(
        engine.model, prompt, eos_id=-1, params=GenerationConfig(temperature=0.0, max_tokens=new_tokens)
    ):
        stamps.append(time.perf_counter())
        tokens.append(token)
    return RunResult(tokens, stamps[0] - start, stamps[-1] - stamps[0])


class TimingStreamer:
    """transformers' streamer protocol: put(prompt ids) once, then put(new token) per step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_theirs(model: Any, variant: str, prompt: list[int], new_tokens: int) -> RunResult:
    from transformers import GenerationConfig

    attn, experts = TRANSFORMERS_VARIANTS[variant]
    model.set_attn_implementation(attn)
    model.set_experts_implementation(experts)
    # eos_token_id=None: nothing stops generation and no logits processor masks EOS (which
    # min_new_tokens would do, changing the greedy tokens), so both sides decode the same way.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, bos_token_id=1
    )
    streamer = TimingStreamer()
    ids = torch.tensor([prompt])  # [1, S]
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, generation_config=config, streamer=streamer)
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == new_tokens == len(streamer.stamps), (len(tokens), len(streamer.stamps))
    return RunResult(tokens, streamer.stamps[0] - start, streamer.stamps[-1] - streamer.stamps[0])


def agreement(ours: list[int], theirs: list[int]) -> str:
    if ours == theirs:
        return f"yes ({len(ours)}/{len(ours)} tokens)"
    shorter = min(len(ours), len(theirs))
    first = next((i for i in range(shorter) if ours[i] != theirs[i]), shorter)
    return (
        f"NO: first difference at generated token {first} of {len(ours)} "
        f"(ours {ours[first : first + 1]}, theirs {theirs[first : first + 1]})"
    )


def table(results: list[EngineRuns], prompt_len: int) -> str:
    ours = results[0]
    lines = [
        "| engine | prefill tok/s | decode tok/s | TTFT (s) | load RSS (MB) | ours/theirs prefill "
        "| ours/theirs decode | decode tok/s, all runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for entry in results:
        prefill = statistics.median(r.prefill_tok_s(prompt_len) for r in entry.runs)
        decode = statistics.median(r.decode_tok_s() for r in entry.runs)
        ttft = statistics.median(r.ttft_s for r in entry.runs)
        ratios = ("-", "-")
        if entry is not ours:
            # Median of per-round ratios: runs of one round are seconds apart, so they share the
            # machine's load at that moment better than the medians of each column do.
            pairs = list(zip(ours.runs, entry.runs, strict=True))
            prefill_ratio = statistics.median(b.ttft_s / a.ttft_s for a, b in pairs)
            decode_ratio = statistics.median(a.decode_tok_s() / b.decode_tok_s() for a, b in pairs)
            ratios = (f"{prefill_ratio:.2f}x", f"{decode_ratio:.2f}x")
        lines.append(
            f"| {entry.name} | {prefill:.1f} | {decode:.2f} | {ttft:.3f} | {entry.load_rss_mb:.0f} "
            f"| {ratios[0]} | {ratios[1]} | {', '.join(f'{r.decode_tok_s():.1f}' for r in entry.runs)} |"
        )
    return "\n".join(lines)


def profile_our_decode(engine: Any, prompt: list[int], new_tokens: int) -> None:
    """cProfile (Python-level) and torch.profiler (op-level) over our decode steps only."""
    import cProfile
    import io
    import pstats

    from mixtral_chat.engine.generate import decode_one, prefill, sample
    from mixtral_chat.engine.options import GenerationConfig

    greedy = GenerationConfig(temperature=0.0)

    def decode_loop() -> None:
        logits = prefill(engine.model, prompt, 0)
        for i in range(new_tokens):
            token = sample(logits, greedy)
            logits = decode_one(engine.model, token, len(prompt) + i)

    decode_loop()  # warm
    profiler = cProfile.Profile()
    logits = prefill(engine.model, prompt, 0)
    start = time.perf_counter()
    profiler.enable()
    for i in range(new_tokens):
        token = sample(logits, greedy)
        logits = decode_one(engine.model, token, len(prompt) + i)
    profiler.disable()
    elapsed = time.perf_counter() - start
    rate = new_tokens / elapsed
    print(f"\n## cProfile of our decode ({new_tokens} tokens, {rate:.2f} tok/s under the profiler)")
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(25)
    print(buffer.getvalue())

    from torch.profiler import ProfilerActivity, profile

    logits = prefill(engine.model, prompt, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(new_tokens):
            token = sample(logits, greedy)
            logits = decode_one(engine.model, token, len(prompt) + i)
    print(f"## torch.profiler of our decode ({new_tokens} tokens), by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def timed(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    print(f"  {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + shlex.join(["bench/bench_engine.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="bench-mixtral-") as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            timed("made the checkpoint", lambda: make_checkpoint_in_child(model_dir, args.seed))
        return bench(args, model_dir, command)


def bench(args: argparse.Namespace, model_dir: Path, command: str) -> int:
    from transformers import MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    from mixtral_chat.engine.options import LoadOptions
    from mixtral_chat.engine.runtime import Engine

    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    rss0 = current_rss_mb()
    engine = timed("loaded ours", lambda: Engine.load(model_dir, LoadOptions(device="cpu", dtype=args.dtype)))
    rss1 = current_rss_mb()
    dtype = getattr(torch, args.dtype)
    hf_model = timed(
        "loaded transformers",
        lambda: MixtralForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
        ).eval(),
    )
    rss2 = current_rss_mb()
    prompt = build_prompt(engine.tokenizer, args.prompt_tokens)
    if len(prompt) + args.new_tokens > engine.info.context_length:
        raise SystemExit(f"bench: prompt + new tokens exceed the context ({engine.info.context_length})")

    if args.profile:
        profile_our_decode(engine, prompt, args.new_tokens)
        return 0

    variants = ["transformers eager"] if args.eager_only else list(TRANSFORMERS_VARIANTS)
    results = [EngineRuns("ours", rss1 - rss0)] + [EngineRuns(v, rss2 - rss1) for v in variants]
    runners: list[Callable[[], RunResult]] = [lambda: run_ours(engine, prompt, args.new_tokens)]
    runners += [lambda v=v: run_theirs(hf_model, v, prompt, args.new_tokens) for v in variants]

    # Warm-up (first calls allocate and pick kernels), then alternate the timed runs.
    warm_prompt = prompt[:32]
    run_ours(engine, warm_prompt, 4)
    for v in variants:
        run_theirs(hf_model, v, warm_prompt, 4)
    for rep in range(args.repeats):
        for entry, runner in zip(results, runners, strict=True):
            result = runner()
            entry.runs.append(result)
            print(
                f"  rep {rep + 1} {entry.name}: prefill {result.prefill_tok_s(len(prompt)):.1f} tok/s, "
                f"decode {result.decode_tok_s():.2f} tok/s, TTFT {result.ttft_s:.3f} s",
                file=sys.stderr,
            )

    n_params = engine.info.n_params
    print(f"\n## Engine vs transformers on CPU ({args.dtype}, {args.threads} threads)\n")
    wait_policy = os.environ["OMP_WAIT_POLICY"]
    print(f"Command: `{command}`\n")
    print(
        f"Checkpoint: {model_dir if args.model else 'generated'}, {n_params / 1e6:.0f}M params "
        f"({engine.info.n_active_params / 1e6:.0f}M active per token); prompt {len(prompt)} tokens, "
        f"{args.new_tokens} new tokens, greedy; median of {args.repeats} alternating rounds (ratios: "
        f"median of the per-round ratios); "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"OMP_WAIT_POLICY={wait_policy}, load average before/after "
        f"{load_before:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.\n"
    )
    print(table(results, len(prompt)))
    print()
    for entry in results[1:]:
        same = agreement(results[0].runs[0].tokens, entry.runs[0].tokens)
        print(f"Greedy tokens equal ({entry.name} vs ours): {same}")
    print(f"Peak RSS of the process (both engines loaded): {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
