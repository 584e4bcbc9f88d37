"""Held-out perplexity of a model in float and in each 4-bit scheme, side by side.

    python bench/bench_quality.py [--model assets/demo] [--heldout tests/data/demo_heldout.jsonl]
    python bench/bench_quality.py --decode-paths    # the replies scored by decode steps

The held-out file holds single-turn chats ({"messages": [user, assistant]}); the loss is the mean
NLL of the reply tokens and their </s>, as assets/demo/eval.json defines it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch

from mixtral_chat.engine.tokenizer import Tokenizer
from mixtral_chat.engine.weights import load_model

REPO = Path(__file__).resolve().parent.parent
VARIANTS = [  # (label, scheme, group size, double quant, lm_head: "int8", an int4 group size, or None)
    ("float32", None, None, False, None),
    ("int4 g32", "int4", 32, False, None),
    ("int4 g64", "int4", 64, False, None),
    ("int4 g128", "int4", 128, False, None),
    ("nf4 b64", "nf4", 64, False, None),
    ("nf4 b64 double-quant", "nf4", 64, True, None),
    # lm_head quantized too (issue 16: it is 4% of the bytes per token at 32 layers, 37% at 2):
    ("int4 g64, lm_head + embeddings int8 (what the engine runs on a CPU)", "int4", 64, False, "int8"),
    ("int4 g64, lm_head int4 g32", "int4", 64, False, 32),
    ("int4 g64, lm_head int4 g64", "int4", 64, False, 64),
]


def quantize_lm_head(model, group_size: int) -> None:
    """lm_head as an int4 layer (the native kernel where it runs), from its float weight."""
    from mixtral_chat.quant.int4 import Int4Linear, quantize_int4

    weight = model.lm_head.weight
    parts = quantize_int4(weight, group_size)
    vocab, hidden = weight.shape
    model.lm_head = Int4Linear.from_parts(parts, vocab, hidden, group_size, weight.device, weight.dtype)


def heldout_nll(
    model, tokenizer: Tokenizer, chats: list[list[dict]], decode_steps: bool = False
) -> tuple[float, int]:
    """Summed NLL of the replies and their count; `decode_steps`: each reply token scored by its
    own decode step (teacher-forced), the path a chat's tokens take, instead of one forward (a
    prefill's path)."""
    total, count = 0.0, 0
    for chat in chats:
        prompt = tokenizer.encode_chat(chat[:1])
        ids = [*prompt, *tokenizer.encode(chat[1]["content"]), tokenizer.eos_id]
        model.setup_cache(len(ids))
        with torch.no_grad():
            if decode_steps:
                prefill = torch.tensor([ids[: len(prompt)]])
                steps = [model(prefill, torch.arange(len(prompt)), last_only=True)[0, -1]]
                for pos in range(len(prompt), len(ids) - 1):
                    steps.append(model(torch.tensor([[ids[pos]]]), torch.tensor([pos]))[0, -1])
                logits = torch.stack(steps)  # [R, V]
            else:
                logits = model(torch.tensor([ids]), torch.arange(len(ids)))[0][len(prompt) - 1 : -1]  # [R, V]
        logprobs = torch.log_softmax(logits.double(), dim=-1)  # [R, V]
        targets = torch.tensor(ids[len(prompt) :])  # [R]
        total -= float(logprobs.gather(-1, targets[:, None]).sum())
        count += len(targets)
    return total, count


def decode_paths_table(args: argparse.Namespace, chats: list[list[dict]], tokenizer: Tokenizer) -> None:
    """What the engine runs on a CPU (int4 g64, int8 vocabulary weights), its replies scored by
    decode steps: the native one-call paths against the per-op path they replaced."""
    sys.path.insert(0, str(REPO))
    import bench.bench_decode_paths as paths
    from mixtral_chat.quant import quantize_model_in_memory
    from mixtral_chat.quant.int8 import quantize_vocab_weights

    print("\n| int4 g64, int8 vocabulary weights, scored by decode steps | held-out loss | perplexity |")
    print("| --- | ---: | ---: |")
    for label, earlier in (("native one-call paths", []), ("per-op path", list(paths.PATHS))):
        paths.force_earlier_paths(earlier)
        model = load_model(args.model, "cpu", torch.float32)
        quantize_model_in_memory(model, "int4", 64, False)
        if not quantize_vocab_weights(model):
            raise SystemExit("error: the int8 lm_head needs the native kernel, unavailable here")
        nll, count = heldout_nll(model, tokenizer, chats, decode_steps=True)
        print(f"| {label} | {nll / count:.4f} | {math.exp(nll / count):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "assets" / "demo")
    parser.add_argument("--heldout", type=Path, default=REPO / "tests" / "data" / "demo_heldout.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--decode-paths", action="store_true", help="only the decode-step table: native paths vs per-op"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from mixtral_chat.quant import quantize_model_in_memory

    chats = [json.loads(line)["messages"] for line in args.heldout.read_text().splitlines()]
    tokenizer = Tokenizer(args.model / "tokenizer.model")
    print(f"$ python bench/bench_quality.py --model {args.model} --heldout {args.heldout}")
    print(f"{len(chats)} held-out chats\n")
    if args.decode_paths:
        decode_paths_table(args, chats, tokenizer)
        return
    print("| variant | held-out loss | perplexity | vs float32 | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = None
    for label, scheme, group, double_quant, head_group in VARIANTS:
        started = time.perf_counter()
        model = load_model(args.model, "cpu", torch.float32)
        if scheme:
            quantize_model_in_memory(model, scheme, group, double_quant)
        if head_group == "int8":
            from mixtral_chat.quant.int8 import quantize_vocab_weights

            if not quantize_vocab_weights(model):
                raise SystemExit("error: the int8 lm_head needs the native kernel, unavailable here")
        elif head_group:
            quantize_lm_head(model, head_group)
        nll, count = heldout_nll(model, tokenizer, chats)
        loss = nll / count
        ppl = math.exp(loss)
        base = base or ppl
        change = "-" if scheme is None else f"{(ppl / base - 1) * 100:+.2f}%"
        print(f"| {label} | {loss:.4f} | {ppl:.3f} | {change} | {time.perf_counter() - started:.1f} |")


if __name__ == "__main__":
    main()
