"""Writes that readers see whole or not at all, and the free-space probe (base layer)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part: a temp file
    in the same folder, fsynced, then renamed over `path`. The temp file goes on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    """`write_atomic` of indented JSON with a final newline."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path`, or its nearest existing parent."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
