"""A CPU path against the one before it, in the model: prefill ms and decode ms per token,
alternating fresh processes.

    python bench/bench_decode_paths.py <int4 model dir> --without stack --rounds 4
    python bench/bench_decode_paths.py build/bench_peer/small-6l-int4 --without stack block moe
    python bench/bench_decode_paths.py build/bench_peer/small-6l-int4 --without silu --rounds 6

Each run loads the model on the CPU (2 threads unless --threads), prefills `--prompt-tokens`
random ids (timed: the prefill), then times a greedy decode of `--tokens` tokens. "without" runs
force the earlier path by replacing one function:
- stack: every layer in one native call (`Mixtral.native_decode_stack`), then per-layer calls;
- route: the routing in the attention block's call (`DecoderLayer._router`), then torch's;
- block: the attention half in one call (`DecoderLayer.native_attention_block`), then per op;
- moe: a token's experts in one call (`engine.model.expert_operand`), then per expert;
- silu: a batch's silu(g) * u in the native kernel (`Int4Kernel.silu_mul`, prefill), then ATen's.
The last greedy token of every run is printed: equal paths give equal tokens. Prints medians.
(bench/bench_peer.py puts the result beside llama.cpp.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PATHS = ("stack", "route", "block", "moe", "silu")


def _aten_silu_mul(self, gate_up, threads=None):  # the batch path before Int4Kernel.silu_mul
    import torch.nn.functional as F

    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def force_earlier_paths(names: list[str]) -> None:
    import mixtral_chat.engine.model as model
    from mixtral_chat.quant.native import Int4Kernel

    replaced = {  # path: (owner, attribute, what returns "does not apply")
        "stack": (model.Mixtral, "native_decode_stack", lambda self, x, mask: None),
        "route": (model.DecoderLayer, "_router", lambda self: None),
        "block": (model.DecoderLayer, "native_attention_block", lambda self, x, mask: None),
        "moe": (model, "expert_operand", lambda *args, **kwargs: None),
        "silu": (Int4Kernel, "silu_mul", _aten_silu_mul),
    }
    for name in names:
        owner, attribute, none = replaced[name]
        if not hasattr(owner, attribute):  # renamed: this benchmark would measure nothing
            raise SystemExit(f"error: {owner.__name__}.{attribute} is gone; update {__file__}")
        setattr(owner, attribute, none)


def worker(args: argparse.Namespace) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app/cli.py does
    import torch

    from mixtral_chat.engine.options import LoadOptions
    from mixtral_chat.engine.runtime import Engine

    force_earlier_paths(args.without if args.worker == "without" else [])
    torch.set_num_threads(args.threads)
    net = Engine.load(args.model, LoadOptions(device="cpu")).model
    net.setup_cache(args.prompt_tokens + args.tokens + 8)
    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        start = time.perf_counter()
        token = int(net(prompt, torch.arange(args.prompt_tokens), last_only=True)[0, -1].argmax())
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for pos in range(args.prompt_tokens, args.prompt_tokens + args.tokens):
            token = int(net(torch.tensor([[token]]), torch.tensor([pos]))[0, -1].argmax())
        elapsed = time.perf_counter() - start
    return {"ms_per_token": elapsed / args.tokens * 1e3, "prefill_ms": prefill * 1e3, "last_token": token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--without", nargs="+", choices=PATHS, default=["stack"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["with", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for round_index in range(args.rounds):
        order = ("without", "with") if round_index % 2 == 0 else ("with", "without")
        for mode in order:
            command = [sys.executable, __file__, *sys.argv[1:], "--worker", mode]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for mode, label in (("without", f"without {' '.join(args.without)}"), ("with", "as it is")):
        times = [r["ms_per_token"] for r in runs[mode]]
        prefills = [r["prefill_ms"] for r in runs[mode]]
        tokens = sorted({r["last_token"] for r in runs[mode]})
        print(
            f"{label}: prefill {' / '.join(f'{t:.1f}' for t in prefills)} ms, median "
            f"{statistics.median(prefills):.1f}; decode {' / '.join(f'{t:.2f}' for t in times)} ms/token, "
            f"median {statistics.median(times):.2f}; last token {tokens}"
        )


if __name__ == "__main__":
    main()
