"""Decode with RAM short of the model: mixtral-chat beside llama.cpp, each under a memory limit.

    python bench/bench_ram_short.py                      # limits 2.0, 1.6, 1.3 GB; 2 rounds
    python bench/bench_ram_short.py --limits-gb 1.5 --rounds 3 --tokens 24
    python bench/bench_ram_short.py --routing model      # beside llama.cpp, on the models' routing

The models are bench_peer.py's "real" ones (Mixtral-8x7B's widths, 2 layers; made there on first
use, in the same workdir): mixtral-chat's int4 g64 directory and llama.cpp's Q4_0 GGUF. Each run
is one fresh process in a child memory cgroup of this one (v1 or v2; the script says so and stops
where it cannot make one), with the model's files dropped from the page cache first
(posix_fadvise DONTNEED), so that every page it reads is charged to its cgroup. No swap is
assumed: under the limit the kernel can only drop page cache, as on a host whose RAM is short.

A first run of each engine without a limit gives its peak charge (its own memory plus every page
of its files it read) and its speed with everything cached. Then every engine runs under each of
the same limits: a host with that much RAM, the user's question (this RAM: which is faster?).
Each engine's own memory beside its files (mixtral-chat's torch, its int8 vocabulary weights)
counts against it, so at 2 layers, where the vocabulary is most of what is not experts, the
fixed parts weigh far more than in the 32-layer model. Engines:
- llama.cpp: llama-cpp-python's defaults (the file mmap'd; this AVX-512 build repacks Q4_0 for
  its CPU kernels into anonymous memory, so most of the model is not page cache it could drop:
  seen at a 1.6 GB limit, 1.59 GB anonymous and 2 MB of cache in its cgroup's memory.stat);
- mixtral-chat: `LoadOptions(device="cpu")`, the engine's own choice: it sees the limit
  (engine/host_ram.py), offloads, and by AUTO computes every expert in place from the mapped
  shards (no slots);
- mixtral-chat copy: the same with `on_miss="copy"`, what AUTO did before on a CPU: slots from
  the budget, each miss read into a slot with pread;
- mixtral-chat cpu-slots (`--engines` to add it): `on_miss="cpu"`, fixed slots from the budget
  and every other expert computed as AUTO computes it.
Routing (`--routing`): random weights route unlike a trained model (the same few experts token
after token, or none reused), and which experts come back decides what the page cache and the
slots hold. By default mixtral-chat's decode steps replay a synthetic trace calibrated to
Mixtral-8x7B-Instruct's LRU hit rates (engine/offload/replay.py), and llama.cpp, which cannot
replay one, is left out; `--routing model` keeps the model's own router for all (the comparison
with llama.cpp, on equal routing).
Each round runs every engine once per share, alternating the order. Reported per run: decode
tok/s (greedy, after a short prefill), the bytes it read from storage per decode token
(/proc/self/io read_bytes) and its peak charge; the ratios are each engine / llama.cpp (with a
trace: / mixtral-chat copy) per round, then the median. Prints markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import bench_peer  # noqa: E402  (the models, the llama.cpp venv and its worker)

ENGINES = ("llama", "ours", "ours-copy", "ours-cpu-slots")
ON_MISS = {"ours": "auto", "ours-copy": "copy", "ours-cpu-slots": "cpu"}


# --- a memory cgroup for one process ------------------------------------------------------------


class MemoryCgroup:
    """A child of this process's memory cgroup with a limit (None: none), made and removed."""

    def __init__(self, name: str) -> None:
        self.v2, parent = self._parent()
        self.path = parent / name
        self.path.mkdir(exist_ok=True)

    @staticmethod
    def _parent() -> tuple[bool, Path]:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if "memory" in controllers.split(","):
                return False, Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if hierarchy == "0" and controllers == "":
                return True, Path("/sys/fs/cgroup") / path.lstrip("/")
        raise SystemExit("error: no memory cgroup to make a child of")

    def limit(self, nbytes: int | None) -> None:
        if self.v2:
            (self.path / "memory.max").write_text("max" if nbytes is None else str(nbytes))
        else:
            (self.path / "memory.limit_in_bytes").write_text("-1" if nbytes is None else str(nbytes))
            (self.path / "memory.max_usage_in_bytes").write_text("0")  # the peak from now on

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text())

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this cgroup (the shell joins it, then becomes the command)."""
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *argv]

    def remove(self) -> None:
        with contextlib.suppress(OSError):  # busy: the kernel frees it once its process is gone
            self.path.rmdir()


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


# --- the workers (one fresh process each) -----------------------------------------------------------


def worker_ours(
    model: Path, prompt_tokens: int, tokens: int, threads: int, on_miss: str, trace: Path | None
) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app/cli.py does
    import torch

    from mixtral_chat.engine.options import LoadOptions
    from mixtral_chat.engine.runtime import Engine

    torch.set_num_threads(threads)
    engine = Engine.load(model, LoadOptions(device="cpu", on_miss=on_miss))
    net = engine.model
    if trace is not None:
        from mixtral_chat.engine.offload.replay import install_routing_replay

        install_routing_replay(net, trace, prediction_recall=None)
    net.setup_cache(prompt_tokens + tokens + 8)
    prompt = torch.tensor([bench_peer.prompt_ids(prompt_tokens)])
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = net(prompt, torch.arange(prompt_tokens), last_only=True)
        prefill = time.perf_counter() - t0
        token = int(logits[0, -1].argmax())
        read_before, t0 = read_bytes(), time.perf_counter()
        for pos in range(prompt_tokens, prompt_tokens + tokens):
            logits = net(torch.tensor([[token]]), torch.tensor([pos]))
            token = int(logits[0, -1].argmax())
        decode = time.perf_counter() - t0
    plan = engine.offloader.plan.describe() if engine.offloader else "resident"
    return {
        "prefill_tok_s": prompt_tokens / prefill,
        "decode_tok_s": tokens / decode,
        "read_per_token": (read_bytes() - read_before) / tokens,
        "plan": plan,
    }


def worker_llama(model: Path, prompt_tokens: int, tokens: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        str(model), n_ctx=prompt_tokens + tokens + 8, n_batch=512, n_threads=threads, verbose=False
    )
    vocab = llm.n_vocab()

    def last_argmax() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    t0 = time.perf_counter()
    llm.eval(bench_peer.prompt_ids(prompt_tokens))
    prefill = time.perf_counter() - t0
    token = last_argmax()
    read_before, t0 = read_bytes(), time.perf_counter()
    for _ in range(tokens):
        llm.eval([token])
        token = last_argmax()
    decode = time.perf_counter() - t0
    return {
        "prefill_tok_s": prompt_tokens / prefill,
        "decode_tok_s": tokens / decode,
        "read_per_token": (read_bytes() - read_before) / tokens,
        "plan": "llama.cpp defaults",
    }


# --- the driver -------------------------------------------------------------------------------------


def run_one(
    engine: str, files: list[Path], model: Path, python: Path, limit: int | None, args, trace: Path | None
) -> dict:
    cgroup = MemoryCgroup(f"mixtral-bench-{os.getpid()}")
    try:
        cgroup.limit(limit)
        drop_from_page_cache(files)
        argv = [str(python), __file__, "--worker", engine, "--model", str(model)]
        argv += ["--prompt-tokens", str(args.prompt_tokens), "--tokens", str(args.tokens)]
        argv += ["--threads", str(args.threads)]
        if trace is not None and engine != "llama":
            argv += ["--trace", str(trace)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        try:
            command = cgroup.command(argv)
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no answer in {args.timeout} s (thrashing)", "peak": cgroup.peak()}
        peak = cgroup.peak()
    finally:
        cgroup.remove()
    if result.returncode != 0:
        how = "killed (out of memory?)" if result.returncode in (-9, 137) else "failed"
        tail = result.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"{how}: {tail[0][:200]}", "peak": peak}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limits-gb", default="2.0,1.6,1.3", help="memory limits, GB (1e9 bytes)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--timeout", type=int, default=300, help="seconds a run may take (then: thrashing)")
    parser.add_argument("--engines", help="which of " + ", ".join(ENGINES) + " (default: all but cpu-slots)")
    parser.add_argument(
        "--routing", choices=("trace", "model"), default="trace", help="a Mixtral-like trace, or the router's"
    )
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "build" / "bench_peer")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trace", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "llama":
            out = worker_llama(args.model, args.prompt_tokens, args.tokens, args.threads)
        else:
            out = worker_ours(
                args.model, args.prompt_tokens, args.tokens, args.threads, ON_MISS[args.worker], args.trace
            )
        print(json.dumps(out))
        return

    limits = [int(float(s) * 1e9) for s in args.limits_gb.split(",")]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    llama_python = bench_peer.llama_venv(workdir)
    shape = {**bench_peer.SHAPES["real"], "num_hidden_layers": 2}
    source = bench_peer.write_checkpoint(workdir / "real-2l-bf16", shape)
    ours_dir = bench_peer.quantize_ours(source, workdir / "real-2l-int4")
    gguf = workdir / "real-2l-q4_0.gguf"
    if not gguf.exists():
        converter = bench_peer.llama_converter(workdir, llama_python)
        bench_peer.convert_llama(source, gguf, converter, llama_python)
    models = {
        "llama": (gguf, [gguf], llama_python),
        "ours": (ours_dir, sorted(ours_dir.glob("*.safetensors")), Path(sys.executable)),
        "ours-copy": (ours_dir, sorted(ours_dir.glob("*.safetensors")), Path(sys.executable)),
        "ours-cpu-slots": (ours_dir, sorted(ours_dir.glob("*.safetensors")), Path(sys.executable)),
    }
    trace = None
    if args.routing == "trace":
        from mixtral_chat.engine.offload.replay import synthetic_routing_trace
        from mixtral_chat.engine.offload.trace import write_routing_trace

        trace = workdir / "synthetic-trace-L2.jsonl"
        write_routing_trace(synthetic_routing_trace(2, num_tokens=512), trace)
    default = ENGINES[:3] if args.routing == "model" else ENGINES[1:3]
    models = {engine: models[engine] for engine in (args.engines.split(",") if args.engines else default)}
    if trace is not None and "llama" in models:
        raise SystemExit("error: llama.cpp cannot replay a trace: --routing model to compare with it")
    routing = "each model's own router" if trace is None else f"a synthetic Mixtral-like trace ({trace})"
    print(bench_peer.host_line())
    print(
        f"\nprefill {args.prompt_tokens}, greedy decode of {args.tokens}; {args.threads} threads; "
        f"{args.rounds} rounds; real widths, 2 layers; routing: {routing}\n"
    )
    for engine, (model, files, python) in models.items():
        out = run_one(engine, files, model, python, None, args, trace)
        if "error" in out:
            raise SystemExit(f"error: {engine} without a limit {out['error']}")
        size = sum(f.stat().st_size for f in files)
        print(
            f"- {engine}: files {size / 1e9:.2f} GB, peak charge without a limit "
            f"{out['peak'] / 1e9:.2f} GB, decode {out['decode_tok_s']:.2f} tok/s ({out['plan']})"
        )
    reference = "llama" if "llama" in models else "ours-copy"
    print(f"\n| limit | engine | decode tok/s per round | read/token | peak | vs {reference} |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for limit in limits:
        results: dict[str, list[dict]] = {engine: [] for engine in models}
        for r in range(args.rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for engine in order:
                model, files, python = models[engine]
                results[engine].append(run_one(engine, files, model, python, limit, args, trace))
        for engine, runs in results.items():
            ok = [x for x in runs if "error" not in x]
            speeds = " / ".join(f"{x['decode_tok_s']:.2f}" if "error" not in x else x["error"] for x in runs)
            read = statistics.median(x["read_per_token"] for x in ok) / 1e6 if ok else float("nan")
            peak = max(x["peak"] for x in runs) / 1e9
            ratio = ""
            if engine != reference and ok and reference in results:
                pairs = [
                    m["decode_tok_s"] / t["decode_tok_s"]
                    for m, t in zip(runs, results[reference], strict=True)
                    if "error" not in m and "error" not in t
                ]
                ratio = f"**{statistics.median(pairs):.2f}x**" if pairs else ""
            print(f"| {limit / 1e9:.2f} GB | {engine} | {speeds} | {read:.0f} MB | {peak:.2f} GB | {ratio} |")
        plans = {
            x["plan"] for engine, runs in results.items() if engine != "llama" for x in runs if "plan" in x
        }
        for plan in sorted(plans):
            print(f"|  |  | plan: {plan} |  |  |  |")


if __name__ == "__main__":
    main()
