"""Quantization benchmarks: 4-bit GEMV speed per scheme, and `quantize` throughput / peak memory.

    python bench/bench_quant.py --mode gemv --threads 2            # CPU GEMV table
    python bench/bench_quant.py --mode gemv --device cuda          # the same on a GPU
    python bench/bench_quant.py --mode gemv --variants "int4 native g64"   # one scheme's rows
    python bench/bench_quant.py --mode gemv --variants "int4 native g64" --isas avx2 avx512-vnni
    python bench/bench_quant.py --mode quantize --size-gb 2.2      # quantize a synthetic checkpoint

GEMV: y = W x for Mixtral's expert shapes (14336x4096 = w1/w3, 4096x14336 = w2), batch 1 and
8, per scheme: float32, bfloat16 (F.linear), int4 group 32/64/128 on PyTorch's packed int4
kernels ("int4 aten") and, on CPU, on the native kernel ("int4 native", `quant/native.py`; "int4
native f32" is its float variant, for comparison), nf4 on bitsandbytes' `matmul_4bit` ("nf4
bnb") and, on CPU, on the native kernel's code-book path ("nf4 native").
GB/s = bytes of stored weight (codes + scales) read per call / median wall time per call, next
to this machine's memory bandwidth measured in the same run (before and after, best of two): a
large tensor copy (read + write bytes) and a large sum (read bytes). "% of copy BW" pairs each
row with the copy: five rounds of (a 256 MB copy, then the GEMV), the median of the per-round
ratios, so that a shared machine's load, which slows both alike, cancels out of the ratio. Each
call uses the next of several copies of the layer, enough to read `--working-set-mb` (128) in
turn, so the weights come from memory as in the model (each expert matrix once per token), not
from a last-level cache that holds one 4-bit matrix (32 MB here: without the copies, int4 g128's
31 MB ran at 110% of the memory bandwidth). "CPU ms/call" is the process's CPU time per call
(all threads): on a shared machine it shows the work a call costs when wall time is inflated by
waiting for cores. "build s" is the time to turn stored parts into the runtime layer (int4 aten:
packing to the kernel layout, paid once per matrix at load time; int4 native: none, it computes
on the stored parts).

Quantize: writes a Mixtral-shaped bf16 checkpoint of the given size, then runs
`quantize_model_dir` for int4 and nf4, each in a fresh process whose peak RSS (VmHWM, reset
after the imports) is reported against the largest source shard.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# As the app does (app/cli.py), before torch loads OpenMP: its threads, spinning after a parallel
# op (here converting a batch's bf16 activations), took the cores from the native kernel's own
# threads: batch 8 ran 1.6x slower through the layer than the bare kernel.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

SHAPES = [(14336, 4096), (4096, 14336)]  # (out_features, in_features): w1/w3, w2
PAIRED_ROUNDS = 5  # rounds of (copy, GEMV) per row: "% of copy BW" is the median ratio
PAIRED_COPY_BYTES = 256 << 20  # 8x this machine's last-level cache


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], object], device: torch.device, min_time: float = 0.5, min_reps: int = 5
) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) per call, after warm-up.

    On a shared machine the wall time includes waiting for a core; the CPU time does not.
    """
    for _ in range(2):
        fn()
    sync(device)
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(wall) < min_reps or time.perf_counter() - start < min_time:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if len(wall) >= 200:
            break
    return statistics.median(wall), statistics.median(cpu)


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> tuple[float, float]:
    """(copy GB/s counting read + write, sum GB/s counting read) on a `nbytes` float32 tensor."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device)[0]
    read = time_call(lambda: src.sum(), device)[0]
    return 2 * nbytes / copy / 1e9, nbytes / read / 1e9


def stored_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class NativeF32Variant(torch.nn.Module):
    """The native kernel's float variant (codes converted to float, FMA), for comparison."""

    def __init__(self, parts: dict[str, torch.Tensor], group_size: int) -> None:
        super().__init__()
        from mixtral_chat.quant.native import int4_kernel

        self.kernel = int4_kernel()
        self.group_size = group_size
        for name in ("qweight", "scales", "zeros"):
            self.register_buffer(name, parts[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mixtral_chat.quant.native import VARIANT_F32

        x2 = x.float().contiguous()
        y = torch.empty(x2.shape[0], self.qweight.shape[0])
        self.kernel.linear(self.qweight, self.scales, self.zeros, x2, y, self.group_size, variant=VARIANT_F32)
        return y.to(x.dtype)


def build_on_backend(
    handler, parts, out_features, in_features, device, dtype, backend: str
) -> torch.nn.Module:
    """A 4-bit layer on the given backend: int4 "aten", nf4 "bnb" (the native kernel disabled),
    "native", int4 "native f32"."""
    from mixtral_chat.quant.native import NO_NATIVE_ENV

    if backend == "native f32":
        return NativeF32Variant(parts, handler.group_size)
    saved = os.environ.get(NO_NATIVE_ENV)
    os.environ[NO_NATIVE_ENV] = "0" if backend == "native" else "1"
    try:
        layer = handler.build_linear(parts, out_features, in_features, device, dtype)
    finally:
        if saved is None:
            del os.environ[NO_NATIVE_ENV]
        else:
            os.environ[NO_NATIVE_ENV] = saved
    if getattr(layer, "backend", backend) != backend:
        raise RuntimeError(f"{handler.name} {backend} layer requested, got {layer.backend}")
    return layer


def build_layer(label, handler, weight, parts, device, dtype) -> torch.nn.Module:
    """A runtime layer of its own memory (parts are copied) for a row of the GEMV table."""
    out_features, in_features = weight.shape
    if handler.name == "none":
        layer = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        layer.weight.data.copy_(weight)
        return layer.requires_grad_(False)
    parts = {name: tensor.clone() for name, tensor in parts.items()}
    backend = label.split(" ", 1)[1].rsplit(" ", 1)[0]  # "int4 native f32 g64" -> "native f32"
    return build_on_backend(handler, parts, out_features, in_features, device, dtype, backend)


def gemv_rows(
    device: torch.device,
    batches: list[int],
    working_set: int,
    only: list[str] | None = None,
    isas: list[str] | None = None,
) -> list[dict]:
    from mixtral_chat.quant import get_scheme
    from mixtral_chat.quant.native import int4_kernel, native_unavailable_reason

    native = device.type == "cpu" and int4_kernel() is not None
    if device.type == "cpu" and not native:
        print(f"native int4 kernel unavailable: {native_unavailable_reason()}", file=sys.stderr)
    variants = [
        ("float32", "none", None, torch.float32),
        ("bfloat16", "none", None, torch.bfloat16),
        ("int4 aten g32", "int4", 32, torch.bfloat16),
        ("int4 aten g64", "int4", 64, torch.bfloat16),
        ("int4 aten g128", "int4", 128, torch.bfloat16),
    ]
    if native:
        variants += [
            ("int4 native g32", "int4", 32, torch.bfloat16),
            ("int4 native g64", "int4", 64, torch.bfloat16),
            ("int4 native g128", "int4", 128, torch.bfloat16),
            ("int4 native f32 g64", "int4", 64, torch.bfloat16),
        ]
    variants.append(("nf4 bnb b64", "nf4", 64, torch.bfloat16))
    if native:
        variants.append(("nf4 native b64", "nf4", 64, torch.bfloat16))
    if only:
        variants = [v for v in variants if v[0] in only]
    kernel = int4_kernel() if native else None
    default_isa = kernel.isa if kernel is not None else None
    # (label, scheme, group, dtype, instruction set of the native int4 path or None)
    runs = []
    for label, scheme, group, dtype in variants:
        native_int4 = label.startswith("int4 native") and "f32" not in label
        for isa in (isas or [default_isa]) if native_int4 else [None]:
            runs.append((label, scheme, group, dtype, isa))
    copy_src = torch.ones(PAIRED_COPY_BYTES // 4, device=device)
    copy_dst = torch.empty_like(copy_src)

    def copy_probe() -> float:
        """Copy GB/s (read + write) now, for the GEMV measured right after it."""
        seconds = time_call(lambda: copy_dst.copy_(copy_src), device, min_time=0.1)[0]
        return 2 * PAIRED_COPY_BYTES / seconds / 1e9

    rows = []
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.02
        for label, scheme, group, dtype, isa in runs:
            if isa is not None:
                kernel.use_isa(isa)
            handler = get_scheme(scheme, group)
            parts = None if scheme == "none" else handler.quantize_weight(weight)

            def build(label=label, handler=handler, weight=weight, parts=parts, dtype=dtype):
                return build_layer(label, handler, weight, parts, device, dtype)

            t0 = time.perf_counter()
            layers = [build()]
            sync(device)
            build_s = 0.0 if scheme == "none" else time.perf_counter() - t0
            nbytes = stored_bytes(layers[0])
            # Copies of the layer, called in turn, so that the weights come from memory, not
            # from a last-level cache that holds one matrix (32 MB here).
            layers += [build() for _ in range(-(-working_set // nbytes) - 1)]
            for batch in batches:
                x = torch.randn(batch, in_features, device=device, dtype=dtype)
                calls = itertools.cycle(layers)
                walls, cpus, ratios = [], [], []
                with torch.no_grad():
                    for _ in range(PAIRED_ROUNDS):
                        copy_gbps = copy_probe()
                        wall, cpu = time_call(lambda x=x, calls=calls: next(calls)(x), device, min_time=0.1)
                        walls.append(wall)
                        cpus.append(cpu)
                        ratios.append(nbytes / wall / 1e9 / copy_gbps)
                seconds, cpu_seconds = statistics.median(walls), statistics.median(cpus)
                rows.append(
                    {
                        "shape": f"{out_features}x{in_features}",
                        "scheme": label if isa is None else f"{label} [{isa}]",
                        "batch": batch,
                        "weight_mb": nbytes / 1e6,
                        "copies": len(layers),
                        "ms": seconds * 1e3,
                        "cpu_ms": cpu_seconds * 1e3,
                        "gbps": nbytes / seconds / 1e9,
                        "pct_copy": 100 * statistics.median(ratios),
                        "build_s": build_s,
                    }
                )
            del layers, parts
            if kernel is not None:
                kernel.use_isa(default_isa)
    # Sanity: the quantized kernels compute what F.linear computes with the dequantized weight
    # (the native kernel rounds x to int8: ~0.6% relative error for int4, ~1.3% for nf4 whose
    # code book it rounds too; the others round x to bf16: ~0.3%).
    check = torch.randn(256, 512) * 0.02
    x = torch.randn(3, 512)
    checks = [("int4", "aten", 1e-2), ("nf4", "bnb", 1e-2)]
    if native:
        checks += [("int4", "native", 2e-2), ("nf4", "native", 3e-2)]
    for scheme, backend, bound in checks:
        handler = get_scheme(scheme)
        parts = handler.quantize_weight(check)
        layer = build_on_backend(handler, parts, 256, 512, device, torch.float32, backend)
        y = layer(x.to(device)).cpu()
        ref = F.linear(x, handler.dequantize_weight(parts, 256, 512))
        assert float((y - ref).norm() / ref.norm()) < bound, (scheme, backend)
    return rows


def run_gemv(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    copy_gbps, read_gbps = memory_bandwidth(device)
    rows = gemv_rows(device, args.batch, int(args.working_set_mb * 1e6), args.variants, args.isas)
    copy_again, read_again = memory_bandwidth(device)  # the machine is shared: bracket the run
    copy_gbps, read_gbps = max(copy_gbps, copy_again), max(read_gbps, read_again)
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"\nGEMV on {name} (torch {torch.__version__})\n")
    print(f"memory bandwidth: copy {copy_gbps:.1f} GB/s (read+write), sum {read_gbps:.1f} GB/s (read)\n")
    print("| shape | scheme | batch | weight MB | ms/call | GB/s | % of copy BW | CPU ms/call | build s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['shape']} | {r['scheme']} | {r['batch']} | {r['weight_mb']:.1f} | {r['ms']:.2f} | "
            f"{r['gbps']:.2f} | {r['pct_copy']:.0f}% | {r['cpu_ms']:.1f} | {r['build_s']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"copy_gbps": copy_gbps, "read_gbps": read_gbps, "rows": rows}))


def write_synthetic_checkpoint(directory: Path, size_gb: float, shard_gb: float = 1.0) -> None:
    """Mixtral-shaped bf16 tensors (hidden 4096, intermediate 14336, 8 experts per layer) in
    shards of about `shard_gb`, as many layers as fit in `size_gb`."""
    hidden, intermediate, experts = 4096, 14336, 8
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors: list[tuple[str, tuple[int, int]]] = [("model.embed_tokens.weight", (32000, hidden))]
    total = 32000 * hidden * 2
    layer = 0
    while total < size_gb * 1e9:
        p = f"model.layers.{layer}"
        for name in ("q_proj", "o_proj"):
            tensors.append((f"{p}.self_attn.{name}.weight", (hidden, hidden)))
        for name in ("k_proj", "v_proj"):
            tensors.append((f"{p}.self_attn.{name}.weight", (1024, hidden)))
        tensors.append((f"{p}.block_sparse_moe.gate.weight", (experts, hidden)))
        for e in range(experts):
            shapes = {
                "w1": (intermediate, hidden),
                "w2": (hidden, intermediate),
                "w3": (intermediate, hidden),
            }
            for w, shape in shapes.items():
                tensors.append((f"{p}.block_sparse_moe.experts.{e}.{w}.weight", shape))
                total += shape[0] * shape[1] * 2
                if total >= size_gb * 1e9:
                    break
            if total >= size_gb * 1e9:
                break
        layer += 1
    # An expert cut short by the size limit would be incomplete: drop its partial weights.
    last = tensors[-1][0]
    if ".experts." in last and not last.endswith("w3.weight"):
        prefix = last.rsplit(".", 2)[0]
        tensors = [t for t in tensors if not t[0].startswith(prefix + ".")]
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    names: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)
        shard, shard_bytes = {}, 0

    for key, shape in tensors:
        shard[key] = (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard_bytes += shape[0] * shape[1] * 2
        if shard_bytes >= shard_gb * 1e9:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": hidden}))


_QUANTIZE_SCRIPT = """
import sys, time, torch
from pathlib import Path
from mixtral_chat.quant import quantize_model_dir
torch.set_num_threads(int(sys.argv[4]))
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
if sys.argv[3] == 'nf4':
    from mixtral_chat.quant.bnb import bitsandbytes
    bitsandbytes()  # imported before the baseline, like torch
base = status('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset VmHWM to the current RSS
start = time.perf_counter()
quantize_model_dir(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], 64)
print(base, status('VmHWM'), time.perf_counter() - start)
"""


def run_quantize(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-quant-"))
    src = workdir / "synthetic"
    try:
        if not src.exists():
            t0 = time.perf_counter()
            write_synthetic_checkpoint(src, args.size_gb)
            print(f"wrote {src} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        files = list(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        largest = max(f.stat().st_size for f in files)
        rows = []
        for scheme in args.schemes:
            dst = workdir / f"out-{scheme}"
            shutil.rmtree(dst, ignore_errors=True)
            result = subprocess.run(
                [sys.executable, "-c", _QUANTIZE_SCRIPT, str(src), str(dst), scheme, str(args.threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            base, peak, seconds = result.stdout.split()
            out_bytes = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
            rows.append((scheme, seconds, base, peak, out_bytes))
            shutil.rmtree(dst)
        print(
            f"\nquantize: synthetic checkpoint {total / 1e9:.2f} GB in {len(files)} shards "
            f"(largest {largest / 1e6:.0f} MB), {args.threads} threads\n"
        )
        print(
            "| scheme | seconds | MB/s (source) | output GB | peak RSS growth MB | growth / largest shard |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for scheme, seconds, base, peak, out_bytes in rows:
            growth = int(peak) - int(base)
            print(
                f"| {scheme} g64 | {float(seconds):.1f} | {total / float(seconds) / 1e6:.1f} | "
                f"{out_bytes / 1e9:.2f} | {growth / 1e6:.0f} | {growth / largest:.2f}x |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["gemv", "quantize"], default="gemv")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size-gb", type=float, default=2.2, help="quantize mode: synthetic checkpoint size")
    parser.add_argument("--schemes", nargs="+", default=["int4", "nf4"], help="quantize mode: schemes")
    parser.add_argument("--workdir", help="quantize mode: where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="quantize mode: keep the synthetic checkpoint")
    parser.add_argument("--json", help="gemv mode: also write the numbers here")
    parser.add_argument(
        "--variants", nargs="+", help='gemv mode: only these rows, by label (e.g. "int4 native g64")'
    )
    parser.add_argument(
        "--isas",
        nargs="+",
        help="gemv mode: native int4 rows once per instruction set (avx2 avx512 avx512-vnni; default: "
        "the one this CPU gets)",
    )
    parser.add_argument(
        "--working-set-mb",
        type=float,
        default=128,
        help="gemv mode: call enough copies of each layer to read this many MB in turn (defeats caches)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.mode == "gemv":
        run_gemv(args)
    else:
        run_quantize(args)


if __name__ == "__main__":
    main()
