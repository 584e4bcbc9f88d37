"""`mixtral-chat quantize SRC DST`: turn a float safetensors model into a 4-bit model directory."""

from __future__ import annotations

import argparse
import os
import sys
import time

SCHEMES = ("int4", "nf4", "none")


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
        type=int,
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
        "--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mixtral_chat.quant import get_scheme, quantize_model_dir

    threads = args.threads or os.cpu_count() or 1
    if threads < 1:
        from mixtral_chat.app.cli import UsageError

        raise UsageError("--threads must be at least 1")
    torch.set_num_threads(threads)
    scheme = get_scheme(args.scheme, args.group_size, args.double_quant)  # bad options fail before any work
    line = _ProgressLine(sys.stderr)
    try:
        dst = quantize_model_dir(
            args.src, args.dst, args.scheme, args.group_size, double_quant=args.double_quant, progress=line
        )
    finally:
        line.close()
    print(f"quantized {args.src} -> {dst} ({scheme.describe()})")
    return 0


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class _ProgressLine:
    """One progress line on stderr: redrawn in place on a terminal, else a line every 10 s."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0
        self.width = 0

    def __call__(self, p) -> None:
        now = time.monotonic()
        final = p.phase in ("finishing", "done")
        if not final and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        bar_len = 24
        filled = int(bar_len * p.fraction)
        text = (
            f"[{'#' * filled}{'.' * (bar_len - filled)}] {p.tensors_done}/{p.tensors_total} tensors "
            f"{p.shards_done}/{p.shards_total} shards {p.bytes_per_s / 1e6:.0f} MB/s "
            f"ETA {_format_duration(p.eta_s)}"
        )
        if p.phase == "finishing":
            text += " writing index and config"
        if self.tty:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
