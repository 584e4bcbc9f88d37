"""Expert offloading benchmarks: decode speed vs experts cached per layer, prefetch, store tier and
thread settings on CPU; and the full-size GPU check that bench/gpu_offload.sh runs.

Random weights route unlike a trained model, so every timing replays a routing trace
(engine/offload/replay.py): decode steps use the trace's experts and gating weights, and the
speculative prefetcher gets a simulated predictor that is right for `--prediction-recall` of the
experts (0.85 by default, an assumption from the speculative-loading literature; the real router
on random weights would predict noise). The trace is `--replay-routing FILE`, by default
tests/data/demo_routing_trace.jsonl (recorded on the bundled demo model) when it exists, else a
synthetic trace calibrated to Mixtral's published LRU hit rates
(`replay.synthetic_routing_trace`), written to the work folder.

CPU sections (each in fresh processes; configurations alternate between rounds; tables show
medians). `link` and `disk` run with 2 torch threads and OMP_WAIT_POLICY=PASSIVE (`--threads`,
`--omp-wait-policy`), the fastest setting the `threads` section measured on this shared 2-core
machine: with the default (spinning) policy, 2 threads ran the all-resident model 2-14x slower.

- `threads`: 1 or 2 OpenMP compute threads next to the offloader's copy thread, with and without
  OMP_WAIT_POLICY=PASSIVE (read when torch starts, so each cell is a fresh process), on a
  smaller model built in memory.
- `link`: RAM store behind a simulated host-to-device link: each copy takes bytes / bandwidth
  in the copy thread (sleeping, so compute can overlap it). Scaling: what decides whether
  prefetch can hide a copy is the copy time of one expert relative to the compute time of one
  layer. Mixtral-8x7B at 4 bits on PCIe 4 x16 (~25 GB/s pinned): one ~99 MB expert takes ~4 ms,
  while one layer's all-resident decode step takes ~0.5 ms on a consumer GPU: ratio ~8. Here one
  44 MB float32 expert at the default 0.4 GB/s takes 110 ms, against 9-18 ms per layer measured
  here depending on the machine's load: ratio 6-12. The table prints the ratio the run actually
  had (`--link-ratio R` instead calibrates the link from the run's own resident time).
- `disk`: the disk store with a RAM cache of k experts per layer (each k a fresh process). With
  `--disk-scheme int4|nf4` (default int4) the checkpoint is quantized once and the store is the
  quantized shards themselves (`StoredExperts`: no expert is loaded at start-up); with `none`,
  the float checkpoint is loaded and packed into a pack file. Decode read cold (the store files'
  pages dropped from the page cache: fsync + posix_fadvise DONTNEED, which needs no root and
  leaves other files' cache alone) and warm; /proc/self/io read_bytes says how much really came
  from the disk; RSS next to the store's size.

GPU section (`gpu`): a full-size Mixtral-8x7B-shaped model with random weights at 4 bits (int4 on
PyTorch's tinygemm kernels; bitsandbytes is not needed) built on the device layer by layer,
all-resident decode time, then expert budgets of 12 and 20 GB with and without prefetch: tokens/s,
hit rate, bytes moved per token, the measured pinned host-to-device bandwidth, and the bound
max(bytes / bandwidth, all-resident time) per token. `--device cpu --small` runs the same code
on a small model (checks the logic without a GPU).

    python bench/bench_offload.py                    # threads + link + disk, ~5-7 minutes here
    python bench/bench_offload.py link --ks 2,3,4,6,8 --repeats 3
    python bench/bench_offload.py gpu --device cpu --small     # the GPU script's logic, on CPU
    bash bench/gpu_offload.sh                        # on a GPU machine
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TRACE = REPO_ROOT / "tests" / "data" / "demo_routing_trace.jsonl"


def _ensure_importable() -> None:
    """Make `mixtral_chat` importable from this checkout when it is not installed (GPU machine).

    pyproject maps engine/ -> mixtral_chat.engine etc.; without an install, a namespace folder of
    symlinks gives the same names, with nothing to build or download.
    """
    try:
        import mixtral_chat.engine.model  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="mixtral-chat-shim-")) / "mixtral_chat"
        shim.mkdir()
        for name in ("engine", "quant", "app", "assets"):
            if (REPO_ROOT / name).is_dir():
                (shim / name).symlink_to(REPO_ROOT / name)
        sys.path.insert(0, str(shim.parent))


_ensure_importable()

import torch  # noqa: E402  (after the import shim)

from mixtral_chat.engine.offload.replay import (  # noqa: E402
    DEFAULT_PREDICTION_RECALL,
    RoutingReplay,
    synthetic_routing_trace,
)
from mixtral_chat.engine.offload.slots import CacheCounters, LRUPolicy, SlotMap  # noqa: E402
from mixtral_chat.engine.offload.trace import read_routing_trace, write_routing_trace  # noqa: E402

# The CPU checkpoint: Mixtral's shape (8 experts, top-2, GQA 4:1, head_dim 128, intermediate 3.5x
# hidden) scaled down; experts are 91% of the weights (Mixtral: 96%), one float32 expert 44 MB.
CPU_CONFIG: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
)

# `threads`: 12 processes start in this section, so a model that builds in seconds (11 MB experts).
THREADS_CONFIG: dict[str, Any] = {
    **CPU_CONFIG,
    "hidden_size": 512,
    "intermediate_size": 1792,
    "num_attention_heads": 4,
}

MIXTRAL_CONFIG: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
)

# `gpu --small`: the same code path on a model that builds in seconds on a CPU.
SMALL_CONFIG: dict[str, Any] = {
    **MIXTRAL_CONFIG,
    "hidden_size": 256,
    "intermediate_size": 896,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
}

# Mixtral-8x7B at 4 bits (engine-facts): what `gpu --small` scales the budgets by.
MIXTRAL_INT4_EXPERT_BYTES = 99e6
# Round r of a CPU section replays the trace from token r x ROUND_STRIDE: the rounds cover
# different stretches of it, while the configurations within a round see the same tokens.
ROUND_STRIDE = 100
MIXTRAL_INT4_RESIDENT_BYTES = 1.3e9  # attention at 4 bits, embeddings and lm_head in bf16


# --------------------------------------------------------------------------------------------
# Checkpoint, random models, trace


def write_checkpoint(directory: Path, config: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> Path:
    """A random-weight Mixtral in the HF layout, one safetensors shard per layer (reused if present).

    Written one layer at a time; N(0, 0.02) weights as HF's init; Mixtral's real tokenizer.
    """
    from safetensors.torch import save_file

    marker = directory / "bench_checkpoint.json"
    want = {"config": config, "dtype": str(dtype), "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    c = config
    d, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = d // c["num_attention_heads"]

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    weight_map: dict[str, str] = {}
    total = 0

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        nonlocal total
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()

    save(
        {
            "model.embed_tokens.weight": normal(c["vocab_size"], d),
            "model.norm.weight": torch.ones(d, dtype=dtype),
            "lm_head.weight": normal(c["vocab_size"], d),
        },
        "model-embeddings.safetensors",
    )
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors = {
            f"{p}.input_layernorm.weight": torch.ones(d, dtype=dtype),
            f"{p}.post_attention_layernorm.weight": torch.ones(d, dtype=dtype),
            f"{p}.self_attn.q_proj.weight": normal(c["num_attention_heads"] * head_dim, d),
            f"{p}.self_attn.k_proj.weight": normal(c["num_key_value_heads"] * head_dim, d),
            f"{p}.self_attn.v_proj.weight": normal(c["num_key_value_heads"] * head_dim, d),
            f"{p}.self_attn.o_proj.weight": normal(d, c["num_attention_heads"] * head_dim),
            f"{p}.block_sparse_moe.gate.weight": normal(c["num_local_experts"], d),
        }
        for e in range(c["num_local_experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors[f"{q}.w1.weight"] = normal(inter, d)
            tensors[f"{q}.w2.weight"] = normal(d, inter)
            tensors[f"{q}.w3.weight"] = normal(inter, d)
        save(tensors, f"model-layer-{layer:03d}.safetensors")
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    hf_config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **config,
        "head_dim": head_dim,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=1))
    shutil.copy(tokenizer_model(), directory / "tokenizer.model")
    marker.write_text(json.dumps(want))
    return directory


def tokenizer_model() -> Path:
    """A sentencepiece model for a generated checkpoint: Mixtral's own (it ships with mistral-common,
    a test dependency; bench/gpu_carry.sh copies it for the GPU machines, whose image has no
    mistral-common), else the demo's 8192 pieces (a caller fits the vocabulary to them:
    bench/gpu_check.py)."""
    try:
        import mistral_common
    except ImportError:
        from mixtral_chat.engine import paths

        carry = os.environ.get("GPU_CARRY") or Path(__file__).resolve().parent.parent / ".gpu_carry"
        carried = Path(carry) / "tokenizer.model"
        return carried if carried.exists() else paths.assets_dir() / "demo" / "tokenizer.model"
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def build_random_model(
    config: dict[str, Any], device: torch.device, dtype: torch.dtype, scheme: str, seed: int
) -> Any:
    """Mixtral with random weights (std 0.02) made on `device` one layer at a time, each layer quantized
    (attention and experts, by `quant.quantize_model_in_memory`) before the next is made: the
    float model never exists whole (93 GB in bf16 at full size)."""
    from torch import nn

    from mixtral_chat.engine.config import ModelArgs
    from mixtral_chat.engine.model import RMSNorm
    from mixtral_chat.engine.weights import build_on_meta

    args = ModelArgs.from_dict({"model_type": "mixtral", **config})
    model = build_on_meta(args).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def materialize(module: nn.Module) -> None:
        module.to_empty(device=device)
        with torch.no_grad():
            for sub in module.modules():
                for param in sub.parameters(recurse=False):
                    if isinstance(sub, RMSNorm):
                        param.fill_(1.0)
                    else:  # std 0.02 as HF's init; uniform is twice as fast to draw as normal
                        param.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5, generator=gen)

    for name, child in model.named_children():
        if name != "layers":
            materialize(child)
    for layer in model.layers:
        materialize(layer)
        if scheme != "none":
            from mixtral_chat.quant import quantize_model_in_memory

            holder = nn.Module()
            holder.layers = nn.ModuleList([layer])  # names "layers.0.…", what is_quantizable matches
            quantize_model_in_memory(holder, scheme)
    model.requires_grad_(False)
    return model.eval()


def shell_copy(module: Any) -> Any:
    """A copy of a module tree that shares its tensors: moving the copy to meta leaves the original."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


class ReusableModel:
    """A loaded model that offloaders are made on and undone from, so each configuration costs an
    offloader (the store is packed again) but not a reload. ExpertOffloader moves the experts it
    is given to meta: it is given shell copies that share the saved experts' tensors."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.saved = [layer.block_sparse_moe.experts for layer in model.layers]
        self.hooks: list[Any] = []

    def offload(self, plan: Any, **options: Any) -> Any:
        from mixtral_chat.engine.offload import ExpertOffloader

        for layer, experts in zip(self.model.layers, self.saved, strict=True):
            layer.block_sparse_moe.experts = shell_copy(experts)
        offloader = ExpertOffloader(self.model, plan, prefetch=True, **options)
        self.hooks = [layer.block_sparse_moe.prefetch_hook for layer in self.model.layers]
        return offloader

    def set_prefetch(self, on: bool) -> None:
        """Speculative prefetch on or off for the current offloader (its hooks kept aside)."""
        for layer, hook in zip(self.model.layers, self.hooks, strict=True):
            layer.block_sparse_moe.prefetch_hook = hook if on else None

    def restore(self, offloader: Any) -> None:
        """Close the offloader; the layers compute their own (saved) experts again."""
        offloader.close()
        for layer, experts in zip(self.model.layers, self.saved, strict=True):
            moe = layer.block_sparse_moe
            moe.experts = experts
            moe.expert_source = moe._resident_experts
            moe.experts_per_call = len(experts)
            moe.prefetch_hook = None
        gc.collect()


@dataclass
class TraceChoice:
    path: Path
    description: str
    wrap_layers: bool


def choose_trace(
    requested: str | None, workdir: Path, num_layers: int, num_experts: int, top_k: int
) -> TraceChoice:
    """--replay-routing FILE, else the demo model's recorded trace, else a synthetic one."""
    path = Path(requested) if requested else DEMO_TRACE if DEMO_TRACE.exists() else None
    if path is None:
        path = workdir / f"synthetic-trace-L{num_layers}-E{num_experts}-K{top_k}.jsonl"
        if not path.exists():
            write_routing_trace(synthetic_routing_trace(num_layers, num_experts, top_k, 512, seed=0), path)
        return TraceChoice(path, f"synthetic, Mixtral-calibrated locality ({path})", False)
    trace = read_routing_trace(path)
    wrap = trace.num_layers < num_layers
    note = f"; its {trace.num_layers} layers reused cyclically for {num_layers}" if wrap else ""
    return TraceChoice(path, f"recorded ({path}: {trace.num_tokens} tokens{note})", wrap)


def install_replay(model: Any, trace: TraceChoice, recall: float | None) -> RoutingReplay:
    data = read_routing_trace(trace.path)
    return RoutingReplay(model, data, prediction_recall=recall, wrap_layers=trace.wrap_layers).install()


def trace_lru_hit_rates(path: Path, num_layers: int, ks: list[int]) -> dict[int, float]:
    """The cache simulator (the engine's SlotMap, LRU) on the whole trace, per k."""
    trace = read_routing_trace(path)
    rates = {}
    for k in ks:
        hits = misses = 0
        for layer in range(num_layers):
            slots = SlotMap(k, LRUPolicy())
            for token in trace.experts:
                slots.access(token[layer % trace.num_layers])
            hits, misses = hits + slots.counters.hits, misses + slots.counters.misses
        rates[k] = hits / (hits + misses)
    return rates


# --------------------------------------------------------------------------------------------
# One decode measurement


@dataclass
class Measurement:
    tokens: int
    seconds: float
    counters: CacheCounters | None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def s_per_token(self) -> float:
        return self.seconds / self.tokens

    def per_token(self, name: str) -> float:
        return getattr(self.counters, name) / self.tokens if self.counters else 0.0

    def to_json(self) -> dict[str, Any]:
        counters = dataclasses.asdict(self.counters) if self.counters else None
        return {"tokens": self.tokens, "seconds": self.seconds, "counters": counters, "extra": self.extra}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Measurement:
        counters = CacheCounters(**raw["counters"]) if raw["counters"] else None
        return cls(raw["tokens"], raw["seconds"], counters, raw["extra"])


def counters_delta(after: CacheCounters, before: CacheCounters) -> CacheCounters:
    return CacheCounters(
        **{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)}
    )


def decode(
    model: Any,
    offloader: Any,
    replay: RoutingReplay,
    warmup: int,
    tokens: int,
    between: Callable[[], None] | None = None,
    start: int = 0,
) -> Measurement:
    """Greedy decode from a one-token prompt (routed like a decode step), replaying the trace from
    token `start`: `warmup` untimed steps, then `tokens` timed ones; the counters are the timed
    steps'. `between` runs untimed after the warm-up."""
    from mixtral_chat.engine.generate import decode_one, prefill

    replay.step = start
    logits = prefill(model, [1], 0)
    pos = 1
    for _ in range(warmup):
        logits = decode_one(model, int(torch.argmax(logits)), pos)
        pos += 1
    if between is not None:
        between()
    before = offloader.counters() if offloader else None
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decode_one(model, int(torch.argmax(logits)), pos)  # int() waits for the device
        pos += 1
    seconds = time.perf_counter() - start
    counters = counters_delta(offloader.counters(), before) if offloader and before else None
    return Measurement(tokens, seconds, counters)


def run_child(spec: dict[str, Any], omp_wait_policy: str) -> Any:
    """This script in a fresh process (`_child SPEC`), its progress lines echoed; returns the JSON
    it printed after RESULT. OMP_WAIT_POLICY is set for it ("default": left unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    command = [sys.executable, __file__, "_child", json.dumps(spec)]
    result = None
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line.removeprefix("RESULT "))
            else:
                print(line, end="", flush=True)
        errors = proc.stderr.read()
    if proc.returncode or result is None:
        raise SystemExit(f"child {spec['kind']} failed (exit {proc.returncode}):\n{errors[-3000:]}")
    return result


# --------------------------------------------------------------------------------------------
# Formatting


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e6:.2f} MB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def describe_config(c: dict[str, Any]) -> str:
    return (
        f"hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, {c['num_hidden_layers']} "
        f"layers, {c['num_local_experts']} experts top-{c['num_experts_per_tok']}, vocab {c['vocab_size']}"
    )


def expert_nbytes(config: dict[str, Any], dtype: torch.dtype) -> int:
    return 3 * config["hidden_size"] * config["intermediate_size"] * dtype.itemsize


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def onoff(flag: bool) -> str:
    return "on" if flag else "off"


# --------------------------------------------------------------------------------------------
# threads


def threads_child(spec: dict[str, Any]) -> dict[str, Any]:
    from mixtral_chat.engine.offload import plan_offload

    torch.set_num_threads(spec["threads"])
    model = build_random_model(THREADS_CONFIG, torch.device("cpu"), torch.float32, "none", seed=0)
    plan = plan_offload(model, 64, experts_per_layer=spec["k"])
    model.setup_cache(64)
    replay = install_replay(model, TraceChoice(Path(spec["trace"]), "", spec["wrap_layers"]), spec["recall"])
    reusable = ReusableModel(model)
    resident = decode(model, None, replay, spec["warmup"], spec["tokens"], start=spec["start"])
    offloader = reusable.offload(plan)
    offloaded = decode(model, offloader, replay, spec["warmup"], spec["tokens"], start=spec["start"])
    reusable.restore(offloader)
    return {"resident": resident.to_json(), "offloaded": offloaded.to_json()}


def run_threads(args: argparse.Namespace, trace: TraceChoice) -> None:
    cells = [(threads, policy) for threads in (1, 2) for policy in ("default", "PASSIVE")]
    results: dict[tuple[int, str], list[dict[str, Measurement]]] = {}
    print(f"\n## threads: OpenMP threads next to the copy thread ({args.repeats} rounds)\n", flush=True)
    for rnd in range(args.repeats):
        for threads, policy in cells if rnd % 2 == 0 else cells[::-1]:
            spec = {
                "kind": "threads",
                "threads": threads,
                "k": args.threads_k,
                "trace": str(trace.path),
                "wrap_layers": trace.wrap_layers,
                "recall": args.prediction_recall,
                "warmup": args.warmup,
                "tokens": args.threads_tokens,
                "start": rnd * ROUND_STRIDE,
            }
            raw = run_child(spec, policy)
            got = {name: Measurement.from_json(m) for name, m in raw.items()}
            results.setdefault((threads, policy), []).append(got)
            print(
                f"  round {rnd + 1} threads={threads} OMP_WAIT_POLICY={policy}: resident "
                f"{got['resident'].tok_s:.2f} tok/s, offloaded {got['offloaded'].tok_s:.2f} tok/s",
                flush=True,
            )
    rows = []
    for threads, policy in cells:
        rs = results[(threads, policy)]
        rows.append(
            [
                str(threads),
                policy,
                f"{median([r['resident'].tok_s for r in rs]):.2f}",
                f"{median([r['offloaded'].tok_s for r in rs]):.2f}",
                f"{median([r['offloaded'].per_token('stall_s') for r in rs]) * 1e3:.0f}",
                " / ".join(f"{r['resident'].tok_s:.2f}" for r in rs),
                " / ".join(f"{r['offloaded'].tok_s:.2f}" for r in rs),
            ]
        )
    print(
        f"\nModel: {describe_config(THREADS_CONFIG)}, float32, built in memory; offloaded = RAM store, "
        f"k={args.threads_k} experts/layer, prefetch on, no simulated link (the copy thread really "
        f"copies, {fmt_bytes(expert_nbytes(THREADS_CONFIG, torch.float32))} per expert). "
        f"{args.threads_tokens} timed tokens after {args.warmup}; each cell a fresh process (resident "
        f"measured first, then offloaded); median of {args.repeats}.\n"
    )
    header = ["torch threads", "OMP_WAIT_POLICY", "resident tok/s", "offloaded tok/s", "stall ms/token"]
    print(table([*header, "resident, each round", "offloaded, each round"], rows), flush=True)


# --------------------------------------------------------------------------------------------
# link: RAM store behind a simulated link


def link_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load once; per round: all resident, then for each k an offloader, prefetch off and on."""
    from mixtral_chat.engine.offload import plan_offload
    from mixtral_chat.engine.weights import load_model

    torch.set_num_threads(spec["threads"])
    layers = CPU_CONFIG["num_hidden_layers"]
    ebytes = expert_nbytes(CPU_CONFIG, torch_dtype(spec["dtype"]))
    ks: list[int] = spec["ks"]
    t0 = time.perf_counter()
    model = load_model(spec["model_dir"], "cpu", torch_dtype(spec["dtype"]))
    plans = {k: plan_offload(model, 64, experts_per_layer=k) for k in ks}
    model.setup_cache(64)
    replay = install_replay(model, TraceChoice(Path(spec["trace"]), "", spec["wrap_layers"]), spec["recall"])
    reusable = ReusableModel(model)
    print(f"  loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    link_gbps: float | None = spec["link_gbps"]
    results: dict[str, list[dict[str, Any]]] = {}
    setup_s: list[float] = []
    for rnd in range(spec["repeats"]):
        start = rnd * ROUND_STRIDE  # each round replays other tokens; configurations share them
        m = decode(model, None, replay, spec["warmup"], spec["tokens"], start=start)
        results.setdefault("resident", []).append(m.to_json())
        print(f"  round {rnd + 1} all resident: {m.tok_s:.2f} tok/s", flush=True)
        if link_gbps is None:
            # --link-ratio: one expert copy = R x the all-resident time of one layer, measured now.
            link_gbps = ebytes / (spec["link_ratio"] * m.s_per_token / layers) / 1e9
            print(f"  link calibrated to {link_gbps:.3f} GB/s", flush=True)
        for k in ks if rnd % 2 == 0 else ks[::-1]:
            t1 = time.perf_counter()
            offloader = reusable.offload(plans[k], simulate_link_gbps=link_gbps)
            setup_s.append(time.perf_counter() - t1)
            for prefetch in (False, True) if (rnd + k) % 2 == 0 else (True, False):
                reusable.set_prefetch(prefetch)
                m = decode(model, offloader, replay, spec["warmup"], spec["tokens"], start=start)
                results.setdefault(f"{k}-{onoff(prefetch)}", []).append(m.to_json())
                print(
                    f"  round {rnd + 1} k={k} prefetch {onoff(prefetch):3s}: {m.tok_s:.2f} tok/s", flush=True
                )
            reusable.restore(offloader)
    return {"results": results, "link_gbps": link_gbps, "setup_s": setup_s}


def run_link(args: argparse.Namespace, model_dir: Path, trace: TraceChoice) -> None:
    config = CPU_CONFIG
    layers = config["num_hidden_layers"]
    ebytes = expert_nbytes(config, torch_dtype(args.dtype))
    ks = [int(k) for k in args.ks.split(",")]
    print(f"\n## link: RAM store + simulated link ({args.repeats} rounds)\n", flush=True)
    spec = {
        "kind": "link",
        "threads": args.threads,
        "ks": ks,
        "model_dir": str(model_dir),
        "dtype": args.dtype,
        "trace": str(trace.path),
        "wrap_layers": trace.wrap_layers,
        "recall": args.prediction_recall,
        "warmup": args.warmup,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "link_gbps": args.simulate_link_gbps,
        "link_ratio": args.link_ratio,
    }
    raw = run_child(spec, args.omp_wait_policy)
    link_gbps: float = raw["link_gbps"]
    setup_s: list[float] = raw["setup_s"]
    results = {
        (0, False) if key == "resident" else (int(key.split("-")[0]), key.endswith("-on")): [
            Measurement.from_json(m) for m in ms
        ]
        for key, ms in raw["results"].items()
    }
    assert link_gbps is not None
    resident = median([m.s_per_token for m in results[(0, False)]])
    copy_s = ebytes / (link_gbps * 1e9)
    rates = trace_lru_hit_rates(trace.path, layers, ks)
    rows = [["all resident (no offloader)", "-", f"{1 / resident:.2f}", "1.00"] + ["-"] * 7]
    for k in ks:
        for prefetch in (False, True):
            ms = results[(k, prefetch)]
            counters = [m.counters for m in ms if m.counters]
            rows.append(
                [
                    str(k),
                    onoff(prefetch),
                    f"{median([m.tok_s for m in ms]):.2f}",
                    f"{median([m.s_per_token for m in ms]) / resident:.2f}",
                    f"{median([c.hit_rate for c in counters]):.1%}",
                    f"{rates[k]:.1%}",
                    f"{median([c.prefetch_recall for c in counters]):.1%}" if prefetch else "-",
                    fmt_bytes(median([m.per_token("bytes_moved") for m in ms])),
                    f"{median([m.per_token('prefetch_wasted') for m in ms]):.1f}" if prefetch else "-",
                    f"{median([m.per_token('stall_s') for m in ms]) * 1e3:.0f}",
                    " / ".join(f"{m.tok_s:.2f}" for m in ms),
                ]
            )
    print(
        f"\nModel: {describe_config(config)}, {args.dtype}; expert {fmt_bytes(ebytes)}. "
        f"{args.tokens} timed tokens after {args.warmup} warm-up, median of {args.repeats} rounds; "
        f"torch threads {args.threads}, OMP_WAIT_POLICY {args.omp_wait_policy}. "
        f"Simulated link {link_gbps:.3f} GB/s: one expert copy "
        f"{copy_s * 1e3:.0f} ms = {copy_s / (resident / layers):.1f}x this run's all-resident time per "
        f"layer ({resident / layers * 1e3:.1f} ms; Mixtral 4-bit on PCIe 4: ~8x). Routing: "
        f"{trace.description}; prefetch predictor recall {args.prediction_recall}. Offloader set-up "
        f"(packing the RAM store): median {median(setup_s):.1f} s.\n"
    )
    header = ["experts/layer", "prefetch", "tok/s", "time/token vs resident", "hit rate"]
    header += ["trace LRU hit rate (simulator, whole trace)", "prefetch recall", "bytes moved/token"]
    header += ["wasted prefetches/token", "stall ms/token", "tok/s, each round"]
    print(table(header, rows), flush=True)


# --------------------------------------------------------------------------------------------
# disk: the quantized shards (or a pack file) as the store, a RAM cache of k experts per layer


def proc_status(name: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def proc_read_bytes() -> int:
    """Bytes this process caused to be read from storage (page-cache hits not counted)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def drop_file_cache(path: Path) -> None:
    """Drop one file's pages from the page cache (no root needed; other files' cache untouched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_whole_file(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def disk_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Engine.load with store="disk" (the product path), then decode cold and warm, prefetch off/on."""
    from mixtral_chat.engine.options import LoadOptions
    from mixtral_chat.engine.runtime import Engine

    torch.set_num_threads(spec["threads"])
    os.environ["MIXTRAL_CHAT_HOME"] = spec["home"]  # a pack file goes under it
    options = LoadOptions(
        device="cpu",
        dtype=spec["dtype"],
        context_length=64,
        offload=True,
        experts_per_layer=spec["k"],
        prefetch=True,
        offload_store="disk",
    )
    t0 = time.perf_counter()
    engine = Engine.load(spec["model_dir"], options)
    load_s = time.perf_counter() - t0
    model, offloader = engine.model, engine.offloader
    # The store's open files: the quantized shards, or the pack file (unlinked at once).
    files = [Path(f"/proc/self/fd/{fd}") for fd in offloader.store.fds]
    store_bytes = offloader.store.layout.nbytes * offloader.store.num_layers * offloader.store.num_experts
    replay = install_replay(model, TraceChoice(Path(spec["trace"]), "", spec["wrap_layers"]), spec["recall"])
    hooks = [layer.block_sparse_moe.prefetch_hook for layer in model.layers]
    # The load's peak: read now, before clear_refs resets it. VmHWM, not getrusage's ru_maxrss:
    # Linux keeps ru_maxrss across execve, so a child started by a parent that had written and
    # quantized gigabytes would report the parent's peak.
    load_peak = proc_status("VmHWM")
    out: dict[str, Any] = {
        "load_s": load_s,
        "load_peak": load_peak,
        "store_bytes": store_bytes,
        "from_files": offloader.from_files,
    }
    for prefetch in spec["order"]:
        for layer, hook in zip(model.layers, hooks, strict=True):
            layer.block_sparse_moe.prefetch_hook = hook if prefetch else None
        for phase in ("cold", "warm"):
            io_start, rss = [0], [0]

            def prepare(phase: str = phase, io_start: list[int] = io_start, rss: list[int] = rss) -> None:
                for file in files:
                    if phase == "cold":
                        drop_file_cache(file)
                    else:
                        read_whole_file(file)
                rss[0] = proc_status("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: peak from here on
                io_start[0] = proc_read_bytes()

            m = decode(model, offloader, replay, spec["warmup"], spec["tokens"], prepare, spec["start"])
            m.extra = {
                "read_bytes": proc_read_bytes() - io_start[0],
                "hwm": proc_status("VmHWM"),
                "rss": rss[0],
            }
            out[f"{onoff(prefetch)}-{phase}"] = m.to_json()
    engine.close()
    return out


def run_disk(args: argparse.Namespace, model_dir: Path, trace: TraceChoice, workdir: Path) -> None:
    intermediate = args.disk_intermediate_size or CPU_CONFIG["intermediate_size"]
    config = {**CPU_CONFIG, "intermediate_size": intermediate}
    ks = [int(k) for k in args.disk_ks.split(",")]
    if args.disk_scheme != "none":
        from mixtral_chat.quant import quantize_model_dir

        quantized = workdir / f"{model_dir.name}-{args.disk_scheme}"
        if not quantized.exists():
            t0 = time.perf_counter()
            quantize_model_dir(model_dir, quantized, args.disk_scheme)
            print(f"quantized to {quantized} in {time.perf_counter() - t0:.0f} s", flush=True)
        model_dir = quantized
    what = "the quantized shards" if args.disk_scheme != "none" else "a pack file"
    print(
        f"\n## disk: {what} as the store, RAM cache of k experts/layer ({args.disk_repeats} rounds)\n",
        flush=True,
    )
    results: dict[int, list[dict[str, Any]]] = {}
    for rnd in range(args.disk_repeats):
        for k in ks if rnd % 2 == 0 else ks[::-1]:
            spec = {
                "kind": "disk",
                "k": k,
                "threads": args.threads,
                "home": str(workdir / "home"),
                "model_dir": str(model_dir),
                "dtype": args.dtype,
                "trace": str(trace.path),
                "wrap_layers": trace.wrap_layers,
                "recall": args.prediction_recall,
                "warmup": args.warmup,
                "tokens": args.tokens,
                "order": [False, True] if (rnd + k) % 2 == 0 else [True, False],
                "start": rnd * ROUND_STRIDE,
            }
            raw = run_child(spec, args.omp_wait_policy)
            results.setdefault(k, []).append(raw)
            summary = ", ".join(
                f"{key} {Measurement.from_json(raw[key]).tok_s:.2f}"
                for key in ("off-cold", "off-warm", "on-cold", "on-warm")
            )
            print(f"  round {rnd + 1} k={k}: load {raw['load_s']:.0f} s; tok/s {summary}", flush=True)
    rows = []
    for k in ks:
        raws = results[k]
        for prefetch in (False, True):
            for phase in ("cold", "warm"):
                ms = [Measurement.from_json(r[f"{onoff(prefetch)}-{phase}"]) for r in raws]
                moved = median([m.per_token("bytes_moved") for m in ms])
                disk = median([m.extra["read_bytes"] / m.tokens for m in ms])
                rows.append(
                    [
                        str(k),
                        onoff(prefetch),
                        phase,
                        f"{median([m.tok_s for m in ms]):.2f}",
                        f"{median([m.counters.hit_rate for m in ms if m.counters]):.1%}",
                        fmt_bytes(moved),
                        f"{fmt_bytes(disk)} ({disk / moved:.0%})" if moved else fmt_bytes(disk),
                        f"{median([m.per_token('stall_s') for m in ms]) * 1e3:.0f}",
                        fmt_bytes(median([m.extra["rss"] for m in ms])),
                        fmt_bytes(median([m.extra["hwm"] for m in ms])),
                        fmt_bytes(median([r["load_peak"] for r in raws])),
                    ]
                )
    first = results[ks[0]][0]
    store = first["store_bytes"]
    ebytes = store // (config["num_hidden_layers"] * config["num_local_experts"])
    source = f"the {args.disk_scheme} shards" if first["from_files"] else "a pack file"
    print(
        f"\nModel: {describe_config(config)}, {args.dtype}, experts {args.disk_scheme}. Expert store "
        f"({source}): {fmt_bytes(store)}; "
        f"RAM cache: k x {config['num_hidden_layers']} layers x {fmt_bytes(ebytes)}. "
        f"{args.tokens} timed tokens after {args.warmup} warm-up, median of {args.disk_repeats}; torch "
        f"threads {args.threads}, OMP_WAIT_POLICY {args.omp_wait_policy}. "
        f"cold: the store files' pages dropped from the page cache after the "
        f"warm-up; warm: the whole file read first. 'read from disk' is /proc/self/io read_bytes "
        f"(storage reads, not page-cache hits), as a share of the expert bytes the cache loaded. "
        f"RSS: VmRSS before the timed tokens; peak while decoding: VmHWM, reset (/proc/self/clear_refs) "
        f"before the timed tokens; peak while loading: VmHWM after Engine.load.\n"
    )
    header = ["experts/layer", "prefetch", "page cache", "tok/s", "hit rate", "expert bytes/token"]
    header += ["read from disk/token", "stall ms/token", "RSS", "peak RSS decoding"]
    print(table([*header, "peak RSS loading"], rows), flush=True)
    print_disk_cost_check(results, ks, model_dir)


def print_disk_cost_check(results: dict[int, list[dict[str, Any]]], ks: list[int], model_dir: Path) -> None:
    """The planner's disk term against the runs: what a cold token's storage reads cost at the rate
    `bandwidth.measure_disk_gbps` finds on the store's shards (as the engine times a disk store),
    next to the measured difference between a cold and a warm token (prefetch off)."""
    from mixtral_chat.engine.offload.bandwidth import measure_disk_gbps

    shards = sorted(model_dir.glob("*.safetensors"), key=lambda path: path.stat().st_size)
    rates = [rate for rate in (measure_disk_gbps(shards[-1]) for _ in range(3)) if rate] if shards else []
    if not rates:
        print("\n(no O_DIRECT read of the shards here: the disk term is not checked)", flush=True)
        return
    gbps = median(rates)
    rows = []
    for k in ks:
        cold = [Measurement.from_json(r["off-cold"]) for r in results[k]]
        warm = [Measurement.from_json(r["off-warm"]) for r in results[k]]
        read = median([m.extra["read_bytes"] / m.tokens for m in cold])
        predicted_ms = read / (gbps * 1e9) * 1e3
        measured_ms = (1 / median([m.tok_s for m in cold]) - 1 / median([m.tok_s for m in warm])) * 1e3
        rows.append(
            [
                str(k),
                fmt_bytes(read),
                f"{predicted_ms:.1f}",
                f"{measured_ms:.1f}",
                f"{measured_ms / predicted_ms:.2f}",
            ]
        )
    print(
        f"\nThe cost model's disk term: read from disk per cold token / {gbps:.2f} GB/s (O_DIRECT reads of "
        f"{shards[-1].name}, median of 3), against cold - warm ms/token (prefetch off).\n"
    )
    header = ["experts/layer", "read from disk/token", "predicted ms/token", "cold - warm ms/token"]
    print(table([*header, "measured/predicted"], rows), flush=True)


# --------------------------------------------------------------------------------------------
# gpu: full-size Mixtral-shaped model at 4 bits, expert budgets


def measure_link_gbps(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Pinned host -> device copy bandwidth (CUDA); on CPU, a memory copy (what CPU Transfers do)."""
    if device.type == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dev.copy_(host, non_blocking=True)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
        del host, dev
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        begin = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - begin
    return nbytes * repeats / seconds / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_gpu(args: argparse.Namespace) -> None:
    from mixtral_chat.engine.offload import plan_offload
    from mixtral_chat.quant.blob import ExpertBlobLayout

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu: --device cuda, but torch sees no CUDA device")
    config = SMALL_CONFIG if args.small else MIXTRAL_CONFIG
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    t0 = time.perf_counter()
    model = build_random_model(config, device, dtype, args.scheme, seed=0)
    sync(device)
    build_s = time.perf_counter() - t0
    layers, experts = model.args.num_hidden_layers, model.args.num_local_experts
    layout = ExpertBlobLayout.of_module(model.layers[0].block_sparse_moe.experts[0])
    all_experts = layout.nbytes * layers * experts
    print(
        f"built {describe_config(config)} ({args.scheme}, rest {dtype}) on {name} in {build_s:.0f} s; "
        f"expert {fmt_bytes(layout.nbytes)}, all experts {fmt_bytes(all_experts)}",
        flush=True,
    )
    if device.type == "cuda":
        print(f"device memory allocated: {fmt_bytes(torch.cuda.memory_allocated(device))}", flush=True)
    link = measure_link_gbps(device, 1 << 26 if args.small else 1 << 30)
    link_expert = measure_link_gbps(device, layout.nbytes, repeats=10)
    print(f"host->device: {link:.1f} GB/s (1 GiB copies), {link_expert:.1f} GB/s (expert-sized)", flush=True)
    budgets = [float(b) for b in args.budgets_gb.split(",")]
    labels = [f"{b:g} GB" for b in budgets]
    context = args.context
    if args.small:
        # Each full-size budget's share of Mixtral's experts (after ~1.3 GB of resident weights and
        # the KV cache), applied to the small model.
        probe = plan_offload(model, context, experts_per_layer=model.args.num_experts_per_tok)
        full = (
            MIXTRAL_CONFIG["num_hidden_layers"]
            * MIXTRAL_CONFIG["num_local_experts"]
            * MIXTRAL_INT4_EXPERT_BYTES
        )
        full_kv = 2 * 32 * 8 * 128 * context * 2  # Mixtral's KV cache in bf16
        shares = [(b * 1e9 - MIXTRAL_INT4_RESIDENT_BYTES - full_kv) / full for b in budgets]
        budgets = [(probe.resident_bytes + probe.kv_cache_bytes + s * all_experts) / 1e9 for s in shares]
        labels = [f"{label} scaled: {b * 1e3:.1f} MB" for label, b in zip(labels, budgets, strict=True)]
    trace = choose_trace(
        args.replay_routing, Path(args.workdir), layers, experts, model.args.num_experts_per_tok
    )
    print(f"routing: {trace.description}; prefetch predictor recall {args.prediction_recall}", flush=True)
    # Plans before setup_cache: plan_offload counts every non-expert buffer as resident weights,
    # the KV cache's too once it exists (and adds the KV cache separately).
    plans = {b: plan_offload(model, context, budget_bytes=int(b * 1e9)) for b in budgets}
    model.setup_cache(context)
    replay = install_replay(model, trace, args.prediction_recall)
    reusable = ReusableModel(model)
    results: list[tuple[str, bool | None, Measurement, dict[str, Any]]] = []

    def resident_run(label: str) -> None:
        m = decode(model, None, replay, args.warmup, args.tokens)
        results.append((label, None, m, {}))
        print(f"  {label}: {m.tok_s:.2f} tok/s ({m.s_per_token * 1e3:.1f} ms/token)", flush=True)

    resident_run("all resident")
    for budget, label in zip(budgets, labels, strict=True):
        plan = plans[budget]
        t1 = time.perf_counter()
        offloader = reusable.offload(plan)
        sync(device)
        info: dict[str, Any] = {"k": plan.experts_per_layer, "setup_s": time.perf_counter() - t1}
        print(f"  budget {label}: {plan.describe()} (set-up {info['setup_s']:.0f} s)", flush=True)
        for prefetch in (True, False):
            reusable.set_prefetch(prefetch)
            m = decode(model, offloader, replay, args.warmup, args.tokens)
            results.append((label, prefetch, m, info))
            print(
                f"    prefetch {onoff(prefetch)}: {m.tok_s:.2f} tok/s, hit {m.counters.hit_rate:.1%}, "
                f"{fmt_bytes(m.per_token('bytes_moved'))}/token, "
                f"stall {m.per_token('stall_s') * 1e3:.1f} ms/token",
                flush=True,
            )
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            print(f"    peak device memory so far: {fmt_bytes(peak)}", flush=True)
        reusable.restore(offloader)
        del offloader  # its slot buffers go before the next budget's are made
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    resident_run("all resident, again")
    resident_s = median([m.s_per_token for _, p, m, _ in results if p is None])
    rows = []
    for label, prefetch, m, info in results:
        if prefetch is None:
            rows.append(
                [label, "-", f"{experts} (all)", f"{m.tok_s:.2f}", f"{m.s_per_token * 1e3:.1f}", *["-"] * 6]
            )
            continue
        moved = m.per_token("bytes_moved")
        bound = max(moved / (link * 1e9), resident_s)
        rows.append(
            [
                label,
                onoff(prefetch),
                str(info["k"]),
                f"{m.tok_s:.2f}",
                f"{m.s_per_token * 1e3:.1f}",
                f"{m.counters.hit_rate:.1%}",
                f"{m.counters.prefetch_recall:.1%}" if prefetch else "-",
                fmt_bytes(moved),
                f"{m.per_token('stall_s') * 1e3:.1f}",
                f"{bound * 1e3:.1f}",
                f"{m.s_per_token / bound:.2f}",
            ]
        )
    print(
        f"\nModel: {describe_config(config)}; {args.scheme} attention and experts, {dtype} embeddings, "
        f"random weights; {name}. Expert {fmt_bytes(layout.nbytes)}, all experts {fmt_bytes(all_experts)} "
        f"in pinned host RAM. {args.tokens} timed tokens after {args.warmup} warm-up. Routing: "
        f"{trace.description}; predictor recall {args.prediction_recall}. Link (pinned host->device, "
        f"measured): {link:.1f} GB/s. Bound per token = max(bytes moved / link, all-resident "
        f"{resident_s * 1e3:.1f} ms).\n"
    )
    header = ["expert budget", "prefetch", "experts/layer", "tok/s", "ms/token", "hit rate"]
    header += ["prefetch recall", "bytes moved/token", "stall ms/token", "bound ms/token"]
    print(table([*header, "measured/bound (goal <= 1.25)"], rows), flush=True)
    if device.type == "cuda":
        try:
            stats = {k: v for k, v in torch.cuda.host_memory_stats().items() if "bytes" in k}
            print(f"\npinned host allocator: {json.dumps(stats)[:800]}")
        except (AttributeError, RuntimeError) as exc:
            print(f"\npinned host allocator stats unavailable ({exc})")
    print(f"process peak RSS: {fmt_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "section", nargs="?", default="all", choices=["all", "threads", "link", "disk", "gpu"]
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for link/disk/gpu")
    parser.add_argument(
        "--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY for link/disk ('default': unset)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="CPU checkpoint")
    parser.add_argument("--ks", default="2,4,6,8", help="link: experts per layer")
    parser.add_argument("--disk-ks", default="2,4", help="disk: experts per layer")
    parser.add_argument(
        "--disk-intermediate-size", type=int, default=None, help="disk: bigger experts than the CPU model's"
    )
    parser.add_argument(
        "--disk-scheme", default="int4", choices=["int4", "nf4", "none"], help="disk: experts quantized as"
    )
    parser.add_argument("--threads-k", type=int, default=4, help="threads: experts per layer")
    parser.add_argument("--tokens", type=int, default=None, help="timed tokens (CPU 6, gpu 64)")
    parser.add_argument("--threads-tokens", type=int, default=6, help="threads: timed tokens")
    parser.add_argument("--warmup", type=int, default=None, help="untimed tokens first (CPU 2, gpu 4)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of link and threads")
    parser.add_argument("--disk-repeats", type=int, default=1, help="rounds of disk")
    parser.add_argument("--simulate-link-gbps", type=float, default=0.4, help="link bandwidth (GB/s)")
    parser.add_argument("--link-ratio", type=float, default=None, help="calibrate: copy = R x layer time")
    parser.add_argument("--replay-routing", default=None, help="routing trace (JSON lines) to replay")
    parser.add_argument("--prediction-recall", type=float, default=DEFAULT_PREDICTION_RECALL)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mixtral-chat-bench-offload"))
    parser.add_argument("--device", default="cuda", help="gpu: cuda or cpu")
    parser.add_argument("--small", action="store_true", help="gpu: a small model (CPU check of the logic)")
    parser.add_argument("--scheme", default="int4", choices=["int4", "nf4", "none"], help="gpu: quantization")
    parser.add_argument("--budgets-gb", default="12,20", help="gpu: expert budgets in GB")
    parser.add_argument("--context", type=int, default=4096, help="gpu: context the planner reserves KV for")
    args = parser.parse_args(argv)
    gpu = args.section == "gpu"
    args.tokens = args.tokens if args.tokens is not None else (64 if gpu else 6)
    args.warmup = args.warmup if args.warmup is not None else (4 if gpu else 2)
    if args.link_ratio is not None:
        args.simulate_link_gbps = None
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        spec = json.loads(argv[1])
        children = {"threads": threads_child, "link": link_child, "disk": disk_child}
        result = children[spec["kind"]](spec)
        print("RESULT " + json.dumps(result), flush=True)
        return
    args = parse_args(argv)
    print(f"$ python {shlex.join(['bench/bench_offload.py', *argv])}", flush=True)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True
    )
    started = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.section == "gpu":
        run_gpu(args)
    else:
        c = CPU_CONFIG
        trace = choose_trace(
            args.replay_routing,
            workdir,
            c["num_hidden_layers"],
            c["num_local_experts"],
            c["num_experts_per_tok"],
        )
        print(f"routing: {trace.description}", flush=True)
        sections = ["threads", "link", "disk"] if args.section == "all" else [args.section]
        model_dir = disk_dir = None
        if "link" in sections or "disk" in sections:
            t0 = time.perf_counter()
            model_dir = write_checkpoint(workdir / f"ckpt-{args.dtype}", CPU_CONFIG, torch_dtype(args.dtype))
            print(f"checkpoint {model_dir} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.disk_intermediate_size and "disk" in sections:
            # Bigger experts for the disk section only: an expert store larger than what the
            # process holds (torch itself and the resident weights are ~0.6 GB here).
            big = {**CPU_CONFIG, "intermediate_size": args.disk_intermediate_size}
            t0 = time.perf_counter()
            disk_dir = write_checkpoint(
                workdir / f"ckpt-{args.dtype}-i{args.disk_intermediate_size}", big, torch_dtype(args.dtype)
            )
            print(f"checkpoint {disk_dir} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for section in sections:
            section_start = time.perf_counter()
            if section == "threads":
                run_threads(args, trace)
            elif section == "link":
                assert model_dir is not None
                run_link(args, model_dir, trace)
            else:
                assert model_dir is not None
                run_disk(args, disk_dir or model_dir, trace, workdir)
            print(f"\n({section}: {time.perf_counter() - section_start:.0f} s)", flush=True)
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
