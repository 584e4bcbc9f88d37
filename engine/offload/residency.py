"""Which pages of a file mapping are in memory now: mincore(2), for a file store to decide whether a
missed expert is computed on its mapping or read into a buffer first (offload/cpu_experts.py).
Pure ctypes over libc; where mincore cannot be called, every page counts as in memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from functools import cache


@cache
def _mincore():  # -> the libc function, or None
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    function = libc.mincore
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def address(mapping: mmap.mmap) -> int:
    """Where a (writable: ACCESS_COPY) mapping starts in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


def share(base: int, start: int, pages: int) -> float:
    """Of `pages` pages from byte `start` (page-aligned) of the mapping at `base`, the share
    resident."""
    mincore = _mincore()
    if mincore is None or pages <= 0:
        return 1.0
    vector = ctypes.create_string_buffer(pages)
    if mincore(ctypes.c_void_p(base + start), ctypes.c_size_t(pages * mmap.PAGESIZE), vector) != 0:
        return 1.0
    # Bit 0 of each byte: the page is resident. Other bits are reserved (0 on Linux).
    return 1.0 - vector.raw.count(b"\x00") / pages
