"""The host's bandwidths for the placement cost model: measured once per host and device, cached next
to the native kernel build (`quant.native.native_dir()/bandwidths.json`), each overridable.

- CPU memory: a large host copy (read + write traffic / time), what a 4-bit CPU GEMV can stream.
- H2D: a pinned host buffer copied to the device (what a slot copy moves at).
- device memory: a device-to-device copy (what a resident expert's GEMV reads at).
- disk, for a store on disk: the store's files read past the page cache (O_DIRECT, read only), on
  the filesystem they are on; where it cannot be read so (a filesystem without O_DIRECT, files
  too small) the rate is assumed (ASSUMED_DISK_GBPS) and the output says so.

Without a GPU here, planning for one (`mixtral-chat plan --gpu-mem`) takes the GPU-side rates from
a profile (ASSUMED_GPU) unless flags give them; the output says which rates were assumed.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from mixtral_chat.engine.fileio import write_json_atomic
from mixtral_chat.engine.offload.placement import Bandwidths
from mixtral_chat.quant.native import native_dir

PROBE_BYTES = 256 << 20
CACHE_FILE = "bandwidths.json"

# Simulated hosts (GB/s achievable, not peak): the GPU's memory, its PCIe 4.0 x16 link and the
# host's dual-channel RAM. The CPU benchmarks and `plan` without a GPU use them.
PROFILES: dict[str, Bandwidths] = {
    # RTX 3060 12 GB (360 GB/s peak), PCIe 4.0 x16 (~25 of 32 GB/s), DDR4-3200 x2 (~40 of 51 GB/s).
    "3060-ddr4": Bandwidths(h2d_gbps=25.0, cpu_gbps=40.0, device_gbps=330.0, source="profile 3060-ddr4"),
    # RTX 4090 24 GB (1008 GB/s peak), PCIe 4.0 x16, DDR5-5600 x2 (~70 of 90 GB/s).
    "4090-ddr5": Bandwidths(h2d_gbps=25.0, cpu_gbps=70.0, device_gbps=900.0, source="profile 4090-ddr5"),
}
ASSUMED_GPU = PROFILES["3060-ddr4"]
# A PCIe 3.0 NVMe SSD's sustained read (SATA SSDs read ~0.5 GB/s, hard disks ~0.15).
ASSUMED_DISK_GBPS = 2.0
DISK_PROBE_BYTES = 128 << 20
DISK_CHUNK = 8 << 20


def host_key(device: torch.device) -> str:
    """What the cached figures belong to: this CPU and, for a GPU, its name."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        return f"{cpu} | {torch.cuda.get_device_name(device)}"
    return cpu


def _median_seconds(run, repeats: int) -> float:
    run()  # warm: page faults, allocator, lazy CUDA init
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_cpu_gbps(nbytes: int = PROBE_BYTES) -> float:
    source = torch.ones(nbytes, dtype=torch.uint8)
    target = torch.empty_like(source)
    seconds = _median_seconds(lambda: target.copy_(source), 5)
    return 2 * nbytes / seconds / 1e9  # read + write


def measure_h2d_gbps(device: torch.device, nbytes: int = PROBE_BYTES) -> float:
    source = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def run() -> None:
        target.copy_(source, non_blocking=True)
        torch.cuda.synchronize(device)

    return nbytes / _median_seconds(run, 5) / 1e9


def measure_device_gbps(device: torch.device, nbytes: int = PROBE_BYTES) -> float:
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)

    def run() -> None:
        target.copy_(source)
        torch.cuda.synchronize(device)

    return 2 * nbytes / _median_seconds(run, 5) / 1e9


def measure_disk_gbps(path: Path, nbytes: int = DISK_PROBE_BYTES) -> float | None:
    """Reads up to `nbytes` of the file at `path` with O_DIRECT (past the page cache: what a miss
    the cache does not hold costs); None where the file or its filesystem cannot be read so."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    try:
        total = min(nbytes, size) // DISK_CHUNK * DISK_CHUNK
        if total == 0:
            return None
        with mmap.mmap(-1, DISK_CHUNK) as buffer:  # page-aligned, as O_DIRECT needs
            view = memoryview(buffer)
            started = time.perf_counter()
            for offset in range(0, total, DISK_CHUNK):
                if os.preadv(fd, [view], offset) != DISK_CHUNK:
                    return None
            seconds = time.perf_counter() - started
            view.release()
        return total / seconds / 1e9
    except OSError:  # EINVAL: a filesystem without O_DIRECT (tmpfs)
        return None
    finally:
        os.close(fd)


def with_disk(base: Bandwidths, files: list[Path], cache_dir: Path | None = None) -> Bandwidths:
    """`base` with the disk's rate: measured on the largest of `files` (cached per host and
    filesystem), else assumed."""
    existing = [path for path in files if path.is_file()]
    if not existing:
        return replace(base, disk_gbps=ASSUMED_DISK_GBPS, source=f"{base.source}, disk assumed")
    largest = max(existing, key=lambda path: path.stat().st_size)
    key = f"{host_key(torch.device('cpu'))} | disk {largest.stat().st_dev}"
    path = (cache_dir or native_dir()) / CACHE_FILE
    cached = _read_cache(path)
    entry = cached.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("disk_gbps"), (int, float)):
        return replace(base, disk_gbps=float(entry["disk_gbps"]))
    found = measure_disk_gbps(largest)
    if found is None:
        return replace(base, disk_gbps=ASSUMED_DISK_GBPS, source=f"{base.source}, disk assumed")
    cached[key] = {"disk_gbps": found}
    with contextlib.suppress(OSError):
        write_json_atomic(path, cached)
    return replace(base, disk_gbps=found)


def _read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def measured(device: torch.device, cache_dir: Path | None = None) -> Bandwidths:
    """This host's rates for `device`, from the cache or measured now (a second or so) and cached."""
    path = (cache_dir or native_dir()) / CACHE_FILE
    key = host_key(device)
    cached = _read_cache(path)
    entry = cached.get(key)
    if isinstance(entry, dict) and {"cpu_gbps", "device_gbps"} <= entry.keys():
        return Bandwidths(entry.get("h2d_gbps"), entry["cpu_gbps"], entry["device_gbps"], "measured")
    cpu = measure_cpu_gbps()
    if device.type == "cuda":
        found = Bandwidths(measure_h2d_gbps(device), cpu, measure_device_gbps(device), "measured")
    else:
        found = Bandwidths(None, cpu, cpu, "measured")
    cached[key] = {"h2d_gbps": found.h2d_gbps, "cpu_gbps": found.cpu_gbps, "device_gbps": found.device_gbps}
    with contextlib.suppress(OSError):  # a read-only cache: measure again next time
        write_json_atomic(path, cached)
    return found


def with_overrides(
    base: Bandwidths,
    *,
    h2d_gbps: float | None = None,
    cpu_gbps: float | None = None,
    device_gbps: float | None = None,
    disk_gbps: float | None = None,
) -> Bandwidths:
    """`base` with the rates the user gave; `source` says which came from flags."""
    rates = (
        ("h2d_gbps", h2d_gbps),
        ("cpu_gbps", cpu_gbps),
        ("device_gbps", device_gbps),
        ("disk_gbps", disk_gbps),
    )
    given = {name: value for name, value in rates if value is not None}
    if not given:
        return base
    result = replace(base, **given)
    held = {name for name, _ in rates if getattr(result, name) is not None}
    source = "flags" if held <= given.keys() else f"{base.source} + flags ({', '.join(sorted(given))})"
    return replace(result, source=source)


def for_planned_gpu(cpu: Bandwidths) -> Bandwidths:
    """No GPU here: this CPU's measured rate with the assumed GPU's link and memory."""
    return Bandwidths(
        ASSUMED_GPU.h2d_gbps,
        cpu.cpu_gbps,
        ASSUMED_GPU.device_gbps,
        f"CPU {cpu.source}, GPU side assumed ({ASSUMED_GPU.source})",
    )
