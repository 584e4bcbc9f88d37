"""Weights read with 2 MiB pages where Linux gives them on request (engine/heap.py): a GEMV streams
each weight once per token, and with 4 KiB pages the CPU's prefetchers stop at every boundary.

Checked in this process's own /proc/self/smaps: the mapping that holds a tensor read while loading
has anonymous huge pages. Skipped where transparent huge pages are off or absent.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixtral_chat.engine import heap
from mixtral_chat.engine.safetensors_io import read_header, read_tensor

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    if not sys.platform.startswith("linux") or not THP.exists():
        return None
    found = re.search(r"\[(\w+)\]", THP.read_text())
    return found[1] if found else None


def huge_bytes_over(address: int, nbytes: int) -> int:
    """AnonHugePages of the mappings over [address, address + nbytes), in bytes (madvise splits a
    mapping: the advised interior becomes one of its own)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head[1], 16) < address + nbytes and address < int(head[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_a_large_tensor_read_while_loading_gets_huge_pages(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    expected = torch.randn(1024, 4096)  # 16 MiB
    save_file({"w": expected}, str(path))
    header, data_start = read_header(path)
    with heap.loading(), open(path, "rb") as handle:
        tensor = read_tensor(handle, path, "w", header["w"], data_start)
        huge = huge_bytes_over(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    # 16 MiB hold at least 7 whole aligned huge pages; ask for most of them (the kernel may lack
    # some under fragmentation).
    assert huge >= 4 * heap.HUGE_PAGE, f"{huge} bytes in huge pages (THP {thp_mode()})"
    assert torch.equal(tensor, expected)
