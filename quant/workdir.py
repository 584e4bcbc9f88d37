"""Where `quantize_model_dir` works before DST is complete (no torch: the CLI names it on Ctrl+C)."""

from __future__ import annotations

from pathlib import Path

PROGRESS_FILE = "progress.json"


def partial_dir(dst: Path) -> Path:
    """`.<DST name>.partial` next to DST: finished shards and progress.json until the rename."""
    return dst.parent / f".{dst.name}.partial"
