"""ATen ops per decode token: the per-token overhead that dominates small models on CPU.

    python bench/bench_ops.py                       # the demo model and tiny models of 2..32 layers
    python bench/bench_ops.py --layers 32 --quant int4

Each op is one dispatch through PyTorch (and, on CPU, often one parallel region), whatever its
size: at small widths a decode step costs about the number of ops, not the bytes. Counted with
TorchDispatchMode over one decode forward (one token after a short prefill), so views and
in-place ops count too. tests/test_ops_per_token.py holds the bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "assets" / "demo"


def op_counter():
    """A TorchDispatchMode that counts the ATen ops run inside it by name (`.ops`), on the thread
    that entered it (a copy thread's ops are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def count_decode_ops(model_dir: Path, quant: str | None = None, prefill: int = 4) -> Counter[str]:
    """ATen ops (by name) in one decode forward of the model in `model_dir` (float32, CPU)."""
    import torch

    from mixtral_chat.engine.weights import load_model

    model = load_model(model_dir, quant=quant)
    model.setup_cache(prefill + 8)
    tokens = torch.arange(1, prefill + 2).view(1, -1)  # [1, prefill + 1]
    with torch.no_grad():
        model(tokens[:, :prefill], torch.arange(prefill))
        counter = op_counter()
        with counter:
            model(tokens[:, prefill:], torch.tensor([prefill]))
    return counter.ops


def tiny_model(directory: Path, layers: int) -> Path:
    """A random Mixtral of `layers` layers at the test suite's tiny widths (8 experts, top-2)."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import save_tiny_checkpoint

    return save_tiny_checkpoint(
        directory, num_hidden_layers=layers, num_local_experts=8, vocab_size=512, with_tokenizer=False
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 32])
    parser.add_argument("--quant", default=None, help="quantize in memory first: int4 or nf4")
    parser.add_argument(
        "--top", type=int, default=0, help="also list the N most frequent ops at the last size"
    )
    args = parser.parse_args()
    label = f" ({args.quant})" if args.quant else ""
    demo = count_decode_ops(DEMO_DIR, args.quant)
    print(f"demo model (4 layers){label}: {sum(demo.values())} ops per decode token")
    ops: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            ops = count_decode_ops(tiny_model(Path(tmp) / f"l{layers}", layers), args.quant)
            total = sum(ops.values())
            per_layer = f"{total / layers:.1f} per layer"
            print(f"tiny model, {layers} layers{label}: {total} ops per decode token, {per_layer}")
    for name, count in ops.most_common(args.top):
        print(f"  {name}: {count}")


if __name__ == "__main__":
    main()
