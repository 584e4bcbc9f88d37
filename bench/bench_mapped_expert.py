"""One expert's decode step (x [1, D], one token) three ways, on a quantized directory's experts:
bound to a RAM store's buffer, bound to a copy-on-write mapping of the shard (the page cache, what
a CPU-computed miss of a file store runs on), and read with pread into a buffer and then computed
(what it ran before). Every expert of the directory in turn, the median of `--repeats` passes.

    python bench/bench_mapped_expert.py build/bench_peer/real-2l-int4 --repeats 5

Everything is in the page cache (the RAM store is filled from the files first): this measures
the copy a pread adds, not the disk (bench_ram_short.py does that).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_chat.engine.offload.store import RamStore, StoredExperts
from tests.conftest import host_line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path, help="a directory made by `mixtral-chat quantize`")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stored = StoredExperts.open(args.model_dir, torch.device("cpu"), torch.float32)
    if stored is None:
        raise SystemExit("error: these experts do not compute on their stored blobs here")
    experts = stored.reader.experts()
    num_layers = 1 + max(layer for layer, _ in experts)
    num_experts = 1 + max(expert for _, expert in experts)
    files = stored.file_store(num_layers, num_experts)
    ram = RamStore(stored.layout, num_layers, num_experts, pin=False)
    ram.fill_from(files)
    nbytes = stored.layout.nbytes

    def bound(blob: torch.Tensor) -> torch.nn.Module:
        module = copy.deepcopy(stored.template)
        stored.layout.bind(module, blob)
        return module

    in_ram = [bound(ram.blob(*e)) for e in experts]
    mapped = [bound(files.blob(*e)) for e in experts]
    scratch = torch.empty(nbytes, dtype=torch.uint8)
    on_scratch = bound(scratch)

    def read_then_compute(i: int, x: torch.Tensor) -> torch.Tensor:
        files.copy_into(*experts[i], scratch, 0, nbytes, False)
        return on_scratch(x)

    ways = {
        "RAM store": lambda i, x: in_ram[i](x),
        "mapped file": lambda i, x: mapped[i](x),
        "pread, then compute": read_then_compute,
    }
    x = torch.randn(1, mapped[0].w1.in_features)
    reference = ways["RAM store"](0, x)
    assert all(torch.equal(way(0, x), reference) for way in ways.values())
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                for i in range(len(experts)):
                    way(i, x)
                times[name].append((time.perf_counter() - start) / len(experts))
    print(host_line())
    print(
        f"\n{len(experts)} experts of {nbytes / 1e6:.1f} MB, {args.threads} threads, {args.repeats} passes\n"
    )
    print("| expert computed on | ms per expert (median) | GB/s of blob | vs RAM store |")
    print("| --- | ---: | ---: | ---: |")
    base = statistics.median(times["RAM store"])
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
