"""`mixtral-chat quantize SRC DST`: turn a float safetensors model into a 4-bit model directory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mixtral_chat.app.argtypes import int_range, one_of
from mixtral_chat.app.errors import UsageError
from mixtral_chat.app.progress import PhaseProgress, Row
from mixtral_chat.engine.checkpoint import TOKENIZER_FILE, read_weight_map
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import QuantizationError, TokenizerError
from mixtral_chat.engine.tokenizer import Tokenizer
from mixtral_chat.quant.workdir import kept_shards, partial_dir

if TYPE_CHECKING:
    from mixtral_chat.quant.convert import QuantProgress

SCHEMES = ("int4", "nf4", "none")
# The group sizes quant/ supports (int4.INT4_GROUP_SIZES, nf4.NF4_BLOCKSIZES: the same four),
# restated here so that a bad one exits 2 before torch is imported; a test keeps them in step.
GROUP_SIZES = (32, 64, 128, 256)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a float model directory to 4 bits (int4 or nf4)",
        description=(
            "Quantize the attention and expert weights of a float safetensors Mixtral checkpoint. "
            "DST becomes a model directory that `ask --model DST` loads directly. An interrupted "
            "run resumes when started again with the same arguments."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="float model directory (safetensors + config.json)")
    parser.add_argument("dst", metavar="DST", help="new directory for the quantized model")
    parser.add_argument(
        "--scheme",
        choices=SCHEMES,
        default="int4",
        help="int4: fastest on CPU; nf4: bitsandbytes NF4; none: float copy (default: int4)",
    )
    parser.add_argument(
        "--group-size",
        type=one_of("--group-size", GROUP_SIZES),
        default=None,
        metavar="N",
        help="values per scale: int4 32/64/128/256, nf4 block size 32/64/128/256 (default: 64)",
    )
    parser.add_argument(
        "--double-quant",
        action="store_true",
        help="nf4: also quantize the block scales (~0.4 bit less per weight)",
    )
    parser.add_argument(
        "--threads",
        type=int_range("--threads", 1),
        default=None,
        metavar="N",
        help="CPU threads (default: all cores)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.double_quant and args.scheme != "nf4":
        raise UsageError("--double-quant applies to --scheme nf4 only")
    src, dst = Path(args.src), Path(args.dst)
    check_runnable_source(src)  # before torch, and before anything is written
    line = _QuantizeProgress(sys.stderr)
    try:
        import torch

        from mixtral_chat.quant import get_scheme, quantize_model_dir

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        scheme = get_scheme(args.scheme, args.group_size, args.double_quant)
        result = quantize_model_dir(
            src, dst, args.scheme, args.group_size, double_quant=args.double_quant, progress=line
        )
    except KeyboardInterrupt:
        line.close()
        print(f"mixtral-chat: error: {interrupted_message(dst, line.last_progress)}", file=sys.stderr)
        return 130
    finally:
        line.close()
    print(f"quantized {args.src} -> {result} ({scheme.describe()})")
    return 0


def check_runnable_source(src: Path) -> None:
    """What `ask` needs of a model directory, checked on the source: a quantized copy of a model
    that cannot run would only fail later, after the whole conversion. Reads no weights."""
    if not src.is_dir():
        raise QuantizationError(f"{src}: source model directory not found")
    args = ModelArgs.from_hf_config(src)  # valid JSON, a Mixtral, top-k <= experts, ...
    tokenizer_file = src / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise TokenizerError(
            f"{src}: no tokenizer.model (mixtral-chat needs the sentencepiece file to run the model)"
        )
    tokenizer = Tokenizer(tokenizer_file)
    if tokenizer.vocab_size > args.vocab_size:
        raise TokenizerError(
            f"{src}: tokenizer has {tokenizer.vocab_size} tokens, the model only {args.vocab_size}"
        )
    read_weight_map(src)  # a damaged index, said as such


def interrupted_message(dst: Path, progress: QuantProgress | None) -> str:
    """Ctrl+C: what was kept and how to go on (finished shards stay in the partial directory)."""
    partial = partial_dir(dst)
    if progress is not None and progress.phase == "done":
        return f"interrupted after the last step: {dst} is complete"
    if progress is None or not partial.exists():
        if partial.exists():
            return f"interrupted; earlier work is kept in {partial}: run the same command to resume"
        return "interrupted before anything was written"
    if progress.phase == "quantizing":
        kept = kept_shards(partial)
        done = f"{progress.shards_done if kept is None else kept} of {progress.shards_total} shards done"
    else:
        done = f"all {progress.shards_total} shards done"
    return f"interrupted with {done}, kept in {partial}: run the same command to resume"


class _QuantizeProgress:
    """`quantize_model_dir`'s progress callback: a row for the shards, then one for writing the
    index and config; plus the latest progress for the Ctrl+C message and a note when an earlier
    run is resumed."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.rows = PhaseProgress(stream, log_interval_s=10.0)
        self.last_progress: QuantProgress | None = None

    def __call__(self, p: QuantProgress) -> None:
        if self.last_progress is None and p.shards_done:
            self.stream.write(f"mixtral-chat: resuming: {p.shards_done} of {p.shards_total} shards done\n")
        self.last_progress = p
        shards = Row(
            "quantizing",
            p.bytes_done,
            p.bytes_total,
            speed=p.bytes_per_s,
            eta_s=p.eta_s,
            elapsed_s=p.elapsed_s,
            detail=f"{p.tensors_done}/{p.tensors_total} tensors, {p.shards_done}/{p.shards_total} shards",
        )
        if p.phase == "quantizing":
            self.rows.show("shards", shards)
            return
        self.rows.show("shards", shards, final=True)  # every shard written
        finishing = Row("writing index and config", int(p.phase == "done"), 1, unit="")
        self.rows.show("finishing", finishing, final=p.phase == "done")

    def close(self) -> None:
        self.rows.close()
