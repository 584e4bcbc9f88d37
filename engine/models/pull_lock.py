"""Pull locks: one pull per model at a time; a held lock means "downloading"."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from mixtral_chat.engine import paths
from mixtral_chat.engine.models.errors import RegistryError


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-") or "model"


def pull_lock_path(name: str) -> Path:
    return paths.data_dir() / "locks" / f"{safe_name(name)}.pull.lock"


def pull_running(name: str) -> bool:
    from filelock import FileLock, Timeout

    lock_path = pull_lock_path(name)
    if not lock_path.exists():
        return False
    lock = FileLock(lock_path, timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


@contextlib.contextmanager
def hold_pull_lock(name: str) -> Iterator[None]:
    """Hold `name`'s pull lock for the block; RegistryError when another pull holds it."""
    from filelock import FileLock, Timeout

    lock_path = pull_lock_path(name)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        raise RegistryError(f"a pull of '{name}' is already running") from None
    try:
        yield
    finally:
        lock.release()
