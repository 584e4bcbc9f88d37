"""The RAM left under this process's cgroup limits: cgroup trees written as the kernel lays them out
(v1 and v2, nested, a container's own root), read by the same code that reads /sys/fs/cgroup."""

from __future__ import annotations

from pathlib import Path

from mixtral_chat.engine.host_ram import available_ram_bytes, cgroup_ram_left

GB = 1 << 30


def write_cgroup(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text + "\n")


def v2(limit: str, current: int, file_cache: int) -> dict[str, str]:
    stat = f"anon {current - file_cache}\nfile {file_cache}\nkernel 4096"
    return {"memory.max": limit, "memory.current": str(current), "memory.stat": stat}


def v1(limit: int, usage: int, cache: int) -> dict[str, str]:
    stat = f"cache {cache}\nrss {usage - cache}\ntotal_cache {cache}\ntotal_rss {usage - cache}"
    return {
        "memory.limit_in_bytes": str(limit),
        "memory.usage_in_bytes": str(usage),
        "memory.stat": stat,
    }


def test_v2_the_limit_less_what_is_not_page_cache_and_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write_cgroup(root / "user.slice", v2(str(12 * GB), 9 * GB, 1 * GB))
    write_cgroup(root / "user.slice" / "app.scope", v2("max", 5 * GB, 3 * GB))
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/user.slice/app.scope\n")
    # app.scope has no limit; user.slice's 12 GB less its 8 GB that is not file cache.
    assert cgroup_ram_left(root, proc) == 4 * GB
    write_cgroup(root / "user.slice" / "app.scope", v2(str(6 * GB), 5 * GB, 3 * GB))
    assert cgroup_ram_left(root, proc) == 4 * GB  # 6 - 2 = 4 here too
    write_cgroup(root / "user.slice" / "app.scope", v2(str(3 * GB), 2 * GB, 1 * GB))
    assert cgroup_ram_left(root, proc) == 2 * GB  # the scope's own limit is the tighter


def test_v1_memory_hierarchy_and_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    unlimited = 9223372036854771712  # what v1 writes for no limit
    write_cgroup(root / "memory", v1(unlimited, 20 * GB, 10 * GB))
    write_cgroup(root / "memory" / "docker" / "abc", v1(16 * GB, 10 * GB, 6 * GB))
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n")
    assert cgroup_ram_left(root, proc) == 12 * GB  # 16 less the 4 GB that is not cache
    write_cgroup(root / "memory" / "docker" / "abc", v1(unlimited, 10 * GB, 6 * GB))
    assert cgroup_ram_left(root, proc) is None


def test_a_container_sees_its_own_cgroup_as_the_mount_root(tmp_path: Path) -> None:
    """Inside a container /proc/self/cgroup names the host's path, which the container's
    /sys/fs/cgroup does not have: the mount's root is the container's own cgroup."""
    root = tmp_path / "cgroup"
    write_cgroup(root, v2(str(8 * GB), 3 * GB, 1 * GB))
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/kubepods/pod123/container456\n")
    assert cgroup_ram_left(root, proc) == 6 * GB


def test_no_cgroup_filesystem_or_no_memory_controller(tmp_path: Path) -> None:
    assert cgroup_ram_left(tmp_path / "none", tmp_path / "no_such_file") is None
    proc = tmp_path / "proc_cgroup"
    proc.write_text("3:cpuset:/\n2:cpu:/\n")
    assert cgroup_ram_left(tmp_path / "cgroup", proc) is None


def test_this_host_reads_without_error() -> None:
    available = available_ram_bytes()
    assert available > 0
    left = cgroup_ram_left()
    assert left is None or available <= left
