"""Where `quantize_model_dir` works before DST is complete (no torch: the CLI names it on Ctrl+C)."""

from __future__ import annotations

import json
from pathlib import Path

PROGRESS_FILE = "progress.json"


def partial_dir(dst: Path) -> Path:
    """`.<DST name>.partial` next to DST: finished shards and progress.json until the rename."""
    return dst.parent / f".{dst.name}.partial"


def kept_shards(partial: Path) -> int | None:
    """How many finished shards `partial`'s progress.json records; None if it cannot be read. This
    is what a resume keeps, so a Ctrl+C message counts from it (the progress line can lag a shard)."""
    try:
        done = json.loads((partial / PROGRESS_FILE).read_text(encoding="utf-8"))["done"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return len(done) if isinstance(done, dict) else None
