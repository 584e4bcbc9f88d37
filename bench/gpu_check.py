"""The GPU path in one run (issue 14): correctness, `mixtral-chat ask` end to end, and the figures per
memory budget. `bench/gpu_check.sh` runs it; `--dry-run` runs the same logic on a small model on the
CPU (the suite runs it: tests/test_gpu_check.py).

Nothing is downloaded. The model is a synthetic Mixtral-8x7B (random weights) made the app's way:
a float checkpoint of two full-size layers in the HF layout, quantized by the real
`mixtral-chat quantize`, then widened to 32 layers by copying the quantized layers' tensors under
new layer indices (the format of a quantized layer does not depend on its index), and loaded by
`Engine.load` as the app loads any model.

Every row prints as soon as it is measured:
- correctness: device logits against CPU float32 on a small model (int4, and nf4 where bitsandbytes
  is installed: it quantizes nf4, and runs it on CUDA; the GPU machines' image has none, so a
  slimmed copy can travel with the run, bench/gpu_carry.sh); offloaded == resident
  on the device; a model quantized on the CPU then run on the device (defect 1): loaded on the CPU
  and moved with `.to()`, and offloaded with int4 streamed from the files into slots that repack;
- `mixtral-chat ask --gpu-mem B` end to end for each budget;
- per budget, routing replayed from a Mixtral-calibrated synthetic trace: decode tok/s, hit rate,
  bytes moved and CPU-computed experts per token, the measured bandwidths, the plan's bound and
  measured/bound, host syncs per token (counted at `.item()`, `.tolist()` and `int()`), ATen ops per
  token (each a kernel launch or more on CUDA), and the stall per token: the GPU's idle time waiting
  for copies (CUDA events, engine/offload/stall_clock.py) beside the host thread's wait;
- what launches, syncs and gathering an expert by a device index cost (bench/launch_costs.py),
  and its per-token arithmetic: the figures that decide device-side routing and CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_offload import tokenizer_model, write_checkpoint  # noqa: E402 (the bench folder is not a package)
from bench_ops import op_counter  # noqa: E402
from launch_costs import measure as measure_launch_costs  # noqa: E402
from launch_costs import per_token as launch_costs_per_token  # noqa: E402
from launch_costs import synchronize  # noqa: E402

from mixtral_chat.engine.models.catalog import MIXTRAL_8X7B_CONFIG  # noqa: E402

# Mixtral-8x7B's own shape (the catalog's config, so the two cannot drift), less the HF keys.
FULL = {k: v for k, v in MIXTRAL_8X7B_CONFIG.items() if k not in ("architectures", "model_type")}
SMALL = {**FULL, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4}
SMALL.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
FULL_BUDGETS_GB = (8.0, 12.0, 24.0)
# CUDA against CPU float32: bf16/fp16 activations and another kernel order (stated, not tuned).
LOGITS_TOLERANCE = 0.15
CONTEXT = 512  # tokens, for the budgets' KV caches and every load
WARMUP_TOKENS = 64  # decode tokens before the timed ones: the routing trace's pairs mostly seen


def say(line: str) -> None:
    print(line, flush=True)


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mixtral_chat.app.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def quantized_model(workdir: Path, shape: dict[str, Any], scheme: str, dtype: torch.dtype) -> Path:
    """The synthetic model, quantized by the app's quantizer and widened to shape's layer count."""
    layers = shape["num_hidden_layers"]
    target = workdir / f"{scheme}-h{shape['hidden_size']}-L{layers}"
    if (target / "config.json").exists():
        return target
    source = write_checkpoint(
        workdir / f"float-h{shape['hidden_size']}", {**shape, "num_hidden_layers": 2}, dtype
    )
    two = workdir / f"{scheme}-h{shape['hidden_size']}-L2"
    if not (two / "config.json").exists():
        done = cli("quantize", str(source), str(two), "--scheme", scheme, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"quantize failed: {done.stderr.strip()}")
    widen(two, target, layers)
    return target


def widen(source: Path, target: Path, layers: int) -> None:
    """source's layers 0 and 1 repeated to `layers` layers: tensors copied under new indices."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shared: dict[str, torch.Tensor] = {}
    per_layer: dict[int, dict[str, torch.Tensor]] = {0: {}, 1: {}}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(source / file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                parts = key.split(".")
                if parts[:2] == ["model", "layers"]:
                    per_layer[int(parts[2])][".".join(parts[3:])] = handle.get_tensor(key)
                else:
                    shared[key] = handle.get_tensor(key)
    weight_map: dict[str, str] = {}
    total = 0

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        nonlocal total
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()

    save(shared, "model-shared.safetensors")
    for layer in range(layers):
        tensors = {f"model.layers.{layer}.{rest}": t for rest, t in per_layer[layer % 2].items()}
        save(tensors, f"model-layer-{layer:03d}.safetensors")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (partial / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("quant_config.json", "tokenizer.model", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, partial / name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def greedy_logits(engine: Any, prompt: list[int], steps: int) -> torch.Tensor:
    from mixtral_chat.engine.generate import decode_one, prefill

    model = engine.model
    with torch.no_grad():
        logits = [prefill(model, prompt, 0).float().cpu()]
        for i in range(steps):
            logits.append(decode_one(model, int(logits[-1].argmax()), len(prompt) + i).float().cpu())
    return torch.stack([row.flatten() for row in logits])


def loaded_on_cpu_then_moved(model_dir: Path, device: str) -> Any:
    """Defect 1's path without offloading: the model built on the CPU (int4 on the CPU's own
    backend), then `.to(device)`, where each int4 layer repacks for the device."""
    from types import SimpleNamespace

    from mixtral_chat.engine.runtime import resolve_dtype
    from mixtral_chat.engine.weights import load_model

    model = load_model(model_dir, "cpu", resolve_dtype("auto", torch.device(device)))
    model.to(device)
    model.setup_cache(64)
    return SimpleNamespace(model=model, close=lambda: None, cache_stats=lambda: None)


def streamed_as_expected(engine: Any, scheme: str, dry: bool) -> str | None:
    """Offloaded int4 must stream from the quantized files; on CUDA into slots that repack after
    each copy (defect 1), on the dry run's CPU into slots that view the blobs. Why not, or None."""
    stats = engine.cache_stats()
    if stats is None or scheme != "int4":
        return None
    if not stats["store_from_files"]:
        return "the int4 experts were loaded, not streamed from the quantized files"
    if stats["slots_repacked"] == dry:
        return f"slots_repacked is {stats['slots_repacked']} on {'the CPU' if dry else 'CUDA'}"
    return None


def with_decode_graphs(engine: Any, dry: bool) -> Any:
    """The engine with its decode through engine/decode_graphs.py: captured on CUDA (what
    `Engine.load` sets there), the same bodies uncaptured on the dry run's CPU."""
    from mixtral_chat.engine.decode_graphs import DecodeGraphs

    if dry:
        engine.model.decode_graphs = DecodeGraphs(engine.model, capture=False)
    return engine


def graphs_as_expected(engine: Any, name: str, dry: bool) -> str | None:
    """On CUDA the graphs row must have captured its graphs (a failed capture runs eagerly, with
    the same logits, and would pass unseen). Why not, or None."""
    if name != "CUDA graphs == eager" or dry:
        return None
    state = engine.decode_graphs_state()
    return None if (state or "").startswith("on:") and "failed" not in state else f"decode graphs {state}"


def without_bitsandbytes() -> str | None:
    """Why nf4 cannot run here (bitsandbytes quantizes it, and runs it on CUDA), or None."""
    from mixtral_chat.quant.bnb import bitsandbytes

    try:
        bitsandbytes()
    except Exception as exc:  # absent, or present and broken: nf4's rows are skipped either way
        return f"bitsandbytes does not import ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return None


def fitted_to_the_tokenizer(shape: dict[str, Any]) -> dict[str, Any]:
    """shape, its vocabulary cut to the tokenizer's pieces where the tokenizer has fewer (the demo's
    8192, where Mixtral's is not at hand: `ask` refuses ids its tokenizer cannot decode)."""
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model())).vocab_size()
    return shape if pieces >= shape["vocab_size"] else {**shape, "vocab_size": pieces}


def correctness(workdir: Path, small: dict[str, Any], device: str, dry: bool) -> bool:
    from mixtral_chat.engine.options import LoadOptions
    from mixtral_chat.engine.runtime import Engine

    ok = True
    prompt = [1, 415, 2936, 6040, 285, 1142]  # ids any tokenizer here holds (the demo's has 8192)
    for scheme in ("int4", "nf4"):
        if scheme == "nf4" and (why := without_bitsandbytes()):
            say(f"| correctness | nf4 | every row | SKIP | {why} |")
            continue
        # Quantized on the CPU (`mixtral-chat quantize`): on CUDA every row below is defect 1's
        # check too, and the last two rows are its two paths (load on the CPU, then move; offload).
        model_dir = quantized_model(workdir, small, scheme, torch.float32)
        # Float vocabulary weights everywhere (a CPU would take int8 ones, quant/int8.py): the
        # rows compare the 4-bit paths, and the dry run's stay bit-identical.
        cpu = Engine.load(
            model_dir, LoadOptions(device="cpu", dtype="float32", context_length=64, vocab_weights="float")
        )
        expected = greedy_logits(cpu, prompt, 8)
        cpu.close()
        checks: dict[str, Any] = {
            "device vs CPU float32": lambda d=model_dir: Engine.load(
                d, LoadOptions(device=device, context_length=64, vocab_weights="float", cuda_graphs=False)
            ),
            "CUDA graphs == eager": lambda d=model_dir: with_decode_graphs(
                Engine.load(d, LoadOptions(device=device, context_length=64, vocab_weights="float")), dry
            ),
            "loaded on CPU, moved to the device": lambda d=model_dir: loaded_on_cpu_then_moved(d, device),
            "offloaded == resident (copy)": lambda d=model_dir: Engine.load(
                d,
                LoadOptions(
                    device=device,
                    context_length=64,
                    offload=True,
                    experts_per_layer=2,
                    on_miss="copy",
                    vocab_weights="float",
                ),
            ),
            "offloaded == resident (cpu)": lambda d=model_dir: Engine.load(
                d,
                LoadOptions(
                    device=device,
                    context_length=64,
                    offload=True,
                    experts_per_layer=1,
                    on_miss="cpu",
                    vocab_weights="float",
                ),
            ),
        }
        resident = None
        for name, load in checks.items():
            try:
                engine = load()
                got = greedy_logits(engine, prompt, 8)
                why_not = streamed_as_expected(engine, scheme, dry) or graphs_as_expected(engine, name, dry)
                engine.close()
                reference = expected if resident is None else resident
                diff = float((got - reference).abs().max())
                exact = dry and torch.equal(got, reference)
                passed = (exact or diff <= LOGITS_TOLERANCE) and why_not is None
                if resident is None:
                    resident = got
                detail = "bit-identical" if exact else f"max |diff| {diff:.4f} (tolerance {LOGITS_TOLERANCE})"
                if why_not:
                    detail += f"; {why_not}"
            except Exception as exc:  # a row says what failed; the run goes on
                passed, detail = False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            ok &= passed
            say(f"| correctness | {scheme} | {name} | {'PASS' if passed else 'FAIL'} | {detail} |")
    return ok


class SyncCounter:
    """Counts host syncs: Tensor.item / tolist / __int__ calls (each waits for the device)."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> SyncCounter:
        for name in ("item", "tolist", "__int__"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def budgets_for(dry: bool, model_dir: Path, scheme: str) -> list[tuple[str, float]]:
    """(label, GB): the full-size budgets, or the small model's at the same shares of its experts."""
    if not dry:
        return [(f"{gb:g} GB", gb) for gb in FULL_BUDGETS_GB]
    from mixtral_chat.engine.config import ModelArgs
    from mixtral_chat.engine.offload.planner import sizes_of_config

    full = sizes_of_config(ModelArgs.from_dict(FULL), scheme, 4096)
    small = sizes_of_config(ModelArgs.from_hf_config(model_dir), scheme, CONTEXT, dtype_bytes=4)
    out = []
    for gb in FULL_BUDGETS_GB:
        share = (gb * 1e9 - full.resident_bytes - full.kv_cache_bytes) / (32 * 8 * full.expert_bytes)
        slots = share * small.num_layers * small.num_experts * small.expert_bytes
        out.append((f"{gb:g} GB-like", (small.resident_bytes + small.kv_cache_bytes + slots) / 1e9))
    return out


def link_flags(dry: bool) -> dict[str, float | str]:
    """The dry run has no link: it plans with the 3060/DDR4 profile's, so the hybrid choices run,
    and keeps the vocabulary weights float as a GPU does (a CPU makes them int8: smaller, so the
    GPU-sized budgets would hold every expert)."""
    if not dry:
        return {}
    from mixtral_chat.engine.offload.bandwidth import PROFILES

    profile = PROFILES["3060-ddr4"]
    return {"h2d_gbps": profile.h2d_gbps, "cpu_gbps": profile.cpu_gbps, "vocab_weights": "float"}


def end_to_end(
    model_dir: Path, budgets: list[tuple[str, float]], device: str, links: dict[str, float | str]
) -> bool:
    ok = True
    flags = [arg for name, value in links.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    for label, gb in budgets:
        done = cli(
            "ask", "--model", str(model_dir), "--gpu-mem", f"{gb:.6f}", "--device", device,
            "--max-tokens", "16", "--context", str(CONTEXT), "--stats", "--json", *flags, "Say hello",
        )  # fmt: skip
        passed = done.returncode == 0
        detail = "exit 0"
        if passed:
            cache = json.loads(done.stdout).get("cache") or {}
            detail = f"hit rate {cache.get('hit_rate')}, {cache.get('cpu_computed')} CPU-computed"
        else:
            detail = (
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            )
        ok &= passed
        say(f"| ask end to end | {label} | --gpu-mem {gb:.3f} | {'PASS' if passed else 'FAIL'} | {detail} |")
    return ok


def figures(
    model_dir: Path,
    budgets: list[tuple[str, float]],
    device: str,
    tokens: int,
    workdir: Path,
    links: dict[str, float | str],
) -> list[int]:
    """Prints a row per run; returns each run's ATen ops per token."""
    from mixtral_chat.engine.generate import decode_one, prefill
    from mixtral_chat.engine.offload.replay import install_routing_replay, synthetic_routing_trace
    from mixtral_chat.engine.offload.trace import write_routing_trace
    from mixtral_chat.engine.options import LoadOptions
    from mixtral_chat.engine.runtime import Engine

    columns = ["budget", "tok/s", "hit rate", "MB moved/token", "CPU experts/token", "H2D GB/s", "CPU GB/s"]
    columns += ["bound ms", "measured/bound", "syncs/token", "ops/token"]
    columns += ["stall ms/token", "host wait ms/token", "decode graphs", "captured while timed"]
    say("| " + " | ".join(columns) + " |")
    say("|" + "---|" * len(columns))
    ops_per_token = []
    # Each budget as the app runs it (CUDA graphs on a GPU), and the largest once more eagerly.
    runs = [(label, gb, True) for label, gb in budgets] + [
        (f"{budgets[-1][0]}, eager", budgets[-1][1], False)
    ]
    for label, gb, with_graphs in runs:
        options = LoadOptions(
            device=device,
            gpu_budget_gb=gb,
            offload=True,
            context_length=CONTEXT,
            cuda_graphs=with_graphs,
            **links,
        )
        engine = Engine.load(model_dir, options)
        plan = engine.offloader.plan
        args = engine.model.args
        trace = workdir / f"trace-L{args.num_hidden_layers}.jsonl"
        if not trace.exists():
            records = synthetic_routing_trace(
                args.num_hidden_layers, args.num_local_experts, args.num_experts_per_tok, 256
            )
            write_routing_trace(records, trace)
        install_routing_replay(engine.model, trace, prediction_recall=None)
        with torch.no_grad():
            logits = prefill(engine.model, [1], 0)
            position = 1
            for _ in range(WARMUP_TOKENS):  # the cache warmed, most graphs captured
                logits = decode_one(engine.model, int(logits.argmax()), position)
                position += 1
            before = engine.offloader.counters()
            before = type(before)(**vars(before))
            graphs = engine.model.decode_graphs
            captures = (graphs.captures, graphs.capture_s) if graphs is not None else (0, 0.0)
            with SyncCounter() as syncs:
                started = time.perf_counter()
                for _ in range(tokens):
                    logits = decode_one(engine.model, int(logits.argmax()), position)
                    position += 1
                synchronize(torch.device(device))  # the last token's work is done too
                seconds = time.perf_counter() - started
            after = engine.offloader.counters()  # read with the GPU idle: every wait's events reached
            if graphs is not None:  # graphs new in the timed tokens: their capture is in its time
                captures = (graphs.captures - captures[0], graphs.capture_s - captures[1])
            if graphs is not None:
                graphs.frozen = True  # nothing captured while a dispatch mode counts the ops
            with op_counter() as counted:  # one more token, counted op by op (slower: not timed)
                decode_one(engine.model, int(logits.argmax()), position)
            ops = sum(counted.ops.values())
        hits, misses = after.hits - before.hits, after.misses - before.misses
        moved = (after.bytes_moved - before.bytes_moved) / tokens / 1e6
        cpu_experts = (after.cpu_computed - before.cpu_computed) / tokens
        rates = plan.bandwidths
        bound_ms = plan.decode_bound_s * 1e3 if plan.decode_bound_s else float("nan")
        measured_ms = seconds / tokens * 1e3
        h2d = f"{rates.h2d_gbps:.1f}" if rates and rates.h2d_gbps else "-"
        say(
            f"| {label} | {tokens / seconds:.2f} | {hits / max(1, hits + misses):.3f} | {moved:.2f} | "
            f"{cpu_experts:.2f} | {h2d} | {rates.cpu_gbps:.1f} | {bound_ms:.2f} | "
            f"{measured_ms / bound_ms:.2f} | {syncs.count / tokens:.1f} | {ops} | "
            f"{(after.stall_s - before.stall_s) / tokens * 1e3:.2f} | "
            f"{(after.host_wait_s - before.host_wait_s) / tokens * 1e3:.2f} | "
            f"{engine.decode_graphs_state() or '-'} | {captures[0]} ({captures[1] * 1e3:.0f} ms) |"
        )
        ops_per_token.append(ops)
        engine.close()
    return ops_per_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a small model on the CPU: the same logic")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "gpu_check")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        say("gpu_check: no CUDA GPU (use --dry-run to run the same logic on the CPU)")
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    where = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    say(f"gpu_check on {where}, torch {torch.__version__}")
    small = fitted_to_the_tokenizer(SMALL)
    shape = small if args.dry_run else fitted_to_the_tokenizer(FULL)
    say(f"gpu_check: tokenizer {tokenizer_model()}, vocabulary {shape['vocab_size']}")
    # nf4, CUDA's default scheme (quant.default_scheme), where bitsandbytes runs; else int4.
    scheme = "int4" if without_bitsandbytes() else "nf4"
    say(f"gpu_check: the figures' model is {scheme}")
    say("| check | model | what | result | detail |")
    say("|---|---|---|---|---|")
    ok = correctness(args.workdir, small, device, args.dry_run)
    big = quantized_model(args.workdir, shape, scheme, torch.float32 if args.dry_run else torch.bfloat16)
    budgets = budgets_for(args.dry_run, big, scheme)
    links = link_flags(args.dry_run)
    ok &= end_to_end(big, budgets, device, links)
    costs = measure_launch_costs(
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_local_experts"],
        torch.device(device),
        say,
    )
    tokens = args.tokens if not args.dry_run else min(args.tokens, 8)
    ops = figures(big, budgets, device, tokens, args.workdir, links)
    say(launch_costs_per_token(costs, shape["num_hidden_layers"], shape["num_experts_per_tok"], ops[-1]))
    say("gpu_check: " + ("all checks passed" if ok else "SOME CHECKS FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
