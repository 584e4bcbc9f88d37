"""glibc's heap while weights load: a peak that is the model plus one tensor, every time.

glibc serves an allocation from its heap below a threshold and by its own mmap above it. The
threshold starts at 128 KiB and rises to the size of each large block freed (to 32 MiB at most),
so while weights load tensor by tensor, later tensors come from the heap, whose freed holes are
reused in whatever order frees happened: the same ~210 MB load peaked at 228 MB in 5 runs of 6
and at 287 MB in the sixth (tests/test_engine_errors.py, 2 cores under load). With a fixed 1 MiB
threshold while loading, every tensor is its own mapping, given back when freed: 222 MB in each
of 18 runs. After loading, the threshold is set where glibc's own rule leaves it after any
Mixtral-sized load (32 MiB, trim at twice that), so inference allocates as it did.

Where the libc is not glibc (no `mallopt`), these do nothing.

Weights are read with 2 MiB pages where Linux gives them on request (transparent huge pages in
"madvise" mode, the common default): `prefer_huge_pages` on a fresh buffer before it is filled.
A GEMV streams its weight once per token, and with 4 KiB pages the CPU's prefetchers stop at
every page boundary (docs/BENCHMARKS.md: 2026-12-07).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LOADING_MMAP_THRESHOLD = 1 << 20
RUNNING_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit hosts
RUNNING_TRIM_THRESHOLD = 2 * RUNNING_MMAP_THRESHOLD  # as glibc's dynamic rule sets it
MADV_HUGEPAGE = 14  # madvise's advice (linux/mman.h)
HUGE_PAGE = 2 << 20
HUGE_PAGES_FROM = 2 * HUGE_PAGE  # smaller buffers hold no whole aligned huge page worth asking for

_libc: ctypes.CDLL | bool | None = None  # False: looked, no usable libc


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    return _libc if _libc and hasattr(_libc, "mallopt") else None


def give_back_freed() -> None:
    """malloc_trim: return the heap's freed pages to the system."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@contextmanager
def loading() -> Iterator[None]:
    """Inside: every allocation of 1 MiB or more is a mapping of its own (see the module doc)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, RUNNING_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, RUNNING_TRIM_THRESHOLD)
            give_back_freed()


def prefer_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux for 2 MiB pages over the whole huge pages inside [address, address + nbytes):
    call it before the memory is first written (pages come at first touch). Elsewhere, or for
    small buffers, nothing; a refusal (THP "never") changes nothing either."""
    libc = _glibc()
    if libc is None or not sys.platform.startswith("linux") or nbytes < HUGE_PAGES_FROM:
        return
    start = (address + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)
