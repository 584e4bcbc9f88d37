"""What an int4 repack costs on this CPU (issue 14, defect 1): one Mixtral-8x7B expert's three matrices
(w1, w3 [14336, 4096], w2 [4096, 14336], g64) packed from the stored parts into ATen's CPU form
(`runtime_tensors`, what an offload slot would run after each copy on a CPU without the native
kernel), and read back from it (`aten_cpu_stored_parts`, what `.to()` runs to move such a layer).

    OMP_NUM_THREADS=1 python bench/bench_repack.py [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mixtral_chat.quant.int4_forms import aten_cpu_stored_parts, runtime_tensors

SHAPES = {"w1": (14336, 4096), "w2": (4096, 14336), "w3": (14336, 4096)}
GROUP = 64


def stored_parts(n: int, k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random stored parts of the right shapes (the cost does not depend on the values)."""
    return {
        "qweight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator),
        "scales": torch.rand(n, k // GROUP, generator=generator).bfloat16(),
        "zeros": torch.rand(n, k // GROUP, generator=generator).bfloat16(),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    experts = {name: stored_parts(n, k, generator) for name, (n, k) in SHAPES.items()}
    cpu = torch.device("cpu")
    print(
        f"{cpu_model()}, ATen capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s)"
    )
    for round_ in range(args.rounds):
        pack = read_back = 0.0
        for name, parts in experts.items():
            began = time.perf_counter()
            form = runtime_tensors(parts, SHAPES[name][0], cpu, "aten")
            pack += time.perf_counter() - began
            began = time.perf_counter()
            back = aten_cpu_stored_parts(form["weight_packed"], form["scales_and_zeros"], SHAPES[name][0])
            read_back += time.perf_counter() - began
            assert torch.equal(back["qweight"], parts["qweight"])
        print(f"round {round_ + 1}: pack {pack:.2f} s per expert, read back {read_back:.2f} s per expert")


if __name__ == "__main__":
    main()
