"""Weights read with 2 MiB pages where Linux gives them on request (engine/heap.py): a GEMV streams
each weight once per token, and with 4 KiB pages the CPU's prefetchers stop at every boundary.

Checked in this process's own /proc/self/smaps: the memory of a tensor read while loading is advised
for huge pages. Skipped where transparent huge pages are off or absent.
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


def advised_bytes_over(address: int, nbytes: int) -> tuple[int, int]:
    """Over [address, address + nbytes): bytes of the mappings advised for huge pages (VmFlags
    "hg"), and AnonHugePages (what the kernel gave; madvise splits a mapping, so the advised
    interior is one of its own)."""
    advised = huge = 0
    start = end = 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            start, end = int(head[1], 16), int(head[2], 16)
        elif start < address + nbytes and address < end:
            if line.startswith("AnonHugePages:"):
                huge += int(line.split()[1]) * 1024
            elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
                advised += min(end, address + nbytes) - max(start, address)
    return advised, huge


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_a_large_tensor_read_while_loading_gets_huge_pages(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    expected = torch.randn(1024, 4096)  # 16 MiB
    save_file({"w": expected}, str(path))
    header, data_start = read_header(path)
    with heap.loading(), open(path, "rb") as handle:
        tensor = read_tensor(handle, path, "w", header["w"], data_start)
        advised, huge = advised_bytes_over(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    # 16 MiB hold 7 whole aligned huge pages, all advised. Whether the kernel then gives them is
    # its business (it may lack free 2 MiB blocks when memory is fragmented): printed, not asserted.
    print(f"advised {advised / 2**20:.0f} MiB, huge pages given {huge / 2**20:.0f} MiB")
    assert advised >= 7 * heap.HUGE_PAGE, (advised, thp_mode())
    assert torch.equal(tensor, expected)
