"""The RAM a new allocation can get on this host: the kernel's MemAvailable, capped by the memory
limit of this process's cgroup (a container's `--memory`, a systemd `MemoryMax`), which
/proc/meminfo does not see: in a 16 GB container on a 64 GB host, a model sized by MemAvailable
alone is killed by the OOM killer instead of offloaded (base layer: no torch).

A cgroup's usage counts its page cache, which the kernel reclaims before it kills anything, so
what is left under a limit is the limit less the usage that is not file cache (as MemAvailable
counts the host's page cache as available). Every ancestor's limit binds too: the tightest wins.
Both hierarchies: v2 (`memory.max`, `memory.current`, `memory.stat` "file") and v1
(`memory.limit_in_bytes`, `memory.usage_in_bytes`, `memory.stat` "total_cache").
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
UNLIMITED_FROM = 1 << 60  # v1 writes "no limit" as a page-rounded 2**63 - 1


def available_ram_bytes() -> int:
    """RAM a new allocation can get: MemAvailable (which counts the page cache the kernel can drop,
    unlike free pages), at most what this process's cgroups leave."""
    available = _mem_available()
    left = cgroup_ram_left()
    return available if left is None else min(available, left)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cgroup_ram_left(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """What the tightest memory limit on this process's cgroup and its ancestors leaves; None
    where no limit applies or none can be read (not Linux, no cgroup filesystem)."""
    try:
        lines = proc_cgroup.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    left: list[int] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            left += _limits_left(root, path, _v2_left)
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            left += _limits_left(root / "memory", path, _v1_left)
    return min(left) if left else None


def _limits_left(mount: Path, path: str, read_one) -> list[int]:
    """The cgroup at `path` under `mount` and each ancestor up to the mount (a container often sees
    its own cgroup as the mount's root, under a path that does not exist inside it)."""
    found = []
    directory = mount / path.lstrip("/")
    if not directory.is_dir():
        directory = mount
    while True:
        value = read_one(directory)
        if value is not None:
            found.append(value)
        if directory == mount or mount not in directory.parents:
            return found
        directory = directory.parent


def _v2_left(directory: Path) -> int | None:
    limit = _read_int(directory / "memory.max")
    if limit is None:  # "max", or no such file (the root has none)
        return None
    usage = _read_int(directory / "memory.current") or 0
    return max(0, limit - max(0, usage - _stat(directory, "file")))


def _v1_left(directory: Path) -> int | None:
    limit = _read_int(directory / "memory.limit_in_bytes")
    if limit is None or limit >= UNLIMITED_FROM:
        return None
    usage = _read_int(directory / "memory.usage_in_bytes") or 0
    return max(0, limit - max(0, usage - _stat(directory, "total_cache")))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _stat(directory: Path, key: str) -> int:
    try:
        for line in (directory / "memory.stat").read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
