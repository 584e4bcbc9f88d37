"""Deleting one revision from the Hugging Face hub cache without breaking what another tool cached:
huggingface_hub's own deletion, narrowed so that no file another cached snapshot reads is removed."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_chat.engine.errors import CacheError
from mixtral_chat.engine.models.hub_cache import PARTIAL_SUFFIX, hub_cache_dir, repo_storage_dir


@dataclass(frozen=True)
class CacheDeletion:
    """What deleting a revision from the hub cache did."""

    freed: int  # bytes no longer on disk
    spared: tuple[Path, ...] = ()  # kept because another cached snapshot links to them


def _canonical(path: Path) -> Path:
    """`path` with its parent folders' symlinks resolved, the last component kept as is."""
    return Path(os.path.realpath(path.parent)) / path.name


def _link_chain(path: Path) -> list[Path]:
    """`path`, then each symlink's target in turn, down to the real file."""
    chain = [_canonical(path)]
    for _ in range(40):  # a symlink loop is not a file anyone can read anyway
        current = chain[-1]
        if not current.is_symlink():
            break
        chain.append(_canonical(current.parent / os.readlink(current)))
    return chain


def _footprint(storage: Path, cache: Path) -> dict[Path, int]:
    """The files a repo folder occupies (refs excluded), with the shared-store payloads its blob
    symlinks lead to: what deleting it could free."""
    found: dict[Path, int] = {}
    for root, dirs, files in os.walk(storage):
        if Path(root) == storage and "refs" in dirs:
            dirs.remove("refs")
        for name in files:
            path = Path(root) / name
            with contextlib.suppress(OSError):
                if not path.is_symlink():
                    found[_canonical(path)] = path.stat().st_size
                    continue
                target = _link_chain(path)[-1]
                outside = storage.resolve() not in target.parents and cache.resolve() in target.parents
                if outside and target.is_file():
                    found[target] = target.stat().st_size
    return found


class _DeletionPlan:
    """huggingface_hub's DeleteCacheStrategy, narrowed so it removes nothing that a surviving
    snapshot (of any cached repo) still reads through: huggingface_hub keeps a shared-store blob
    only while its manifest lists a reference, and deletes a whole repo folder even when another
    repo's snapshot links into it."""

    def __init__(self, strategy: Any, info: Any, cache: Path) -> None:
        self.strategy = strategy
        self.info = info
        self.cache = cache
        self._entries: set[Path] = set()
        self._folders: list[Path] = []

    def _removed(self, path: Path) -> bool:
        if path in self._entries:
            return True
        return any(path == folder or folder in path.parents for folder in self._folders)

    def _refresh(self) -> None:
        self._entries = {_canonical(p) for p in (*self.strategy.blobs, *self.strategy.files)}
        self._folders = [Path(os.path.realpath(d)) for d in (*self.strategy.repos, *self.strategy.snapshots)]

    def _removed_entries(self) -> list[Path]:
        """Repo blob entries (files or symlinks) the strategy unlinks, directly or with a folder."""
        entries = list(self.strategy.blobs) + list(self.strategy.files)
        for repo in self.strategy.repos:
            blobs = Path(repo) / "blobs"
            if blobs.is_dir():
                entries += list(blobs.iterdir())
        return entries

    def _store_target(self, entry: Path) -> Path | None:
        from huggingface_hub.utils import _shared_blobs

        target = _shared_blobs.shared_blob_target(entry, self.cache)
        return _canonical(target) if target is not None else None

    def _swept_payloads(self) -> set[Path]:
        """Shared-store payloads huggingface_hub's sweep would delete after this strategy."""
        from huggingface_hub.utils import _shared_blobs

        if not _shared_blobs.is_shared_blobs_dir(_shared_blobs.shared_blobs_dir(self.cache)):
            return set()
        swept: set[Path] = set()
        for entry in self._removed_entries():
            store = self._store_target(entry)
            if store is None or store in swept:
                continue
            try:
                references = _shared_blobs._read_valid_manifest_references(store, self.cache)
            except AttributeError:  # another huggingface_hub: assume its sweep deletes it
                references = set()
            if references is None:
                continue  # an unreadable manifest: huggingface_hub keeps the payload
            if all(self._removed(_canonical(Path(ref))) for ref in references):
                swept.add(store)
        return swept

    def endangered(self, survivors: list[Path]) -> set[Path]:
        self._refresh()
        swept = self._swept_payloads()
        return {hop for file in survivors for hop in _link_chain(file) if hop in swept or self._removed(hop)}

    def _replace(self, **changes: Any) -> None:
        import dataclasses

        self.strategy = dataclasses.replace(self.strategy, **changes)

    def _split_repo(self, repo_path: Path) -> None:
        """Delete the repo's parts instead of its folder, so single entries can be kept."""
        repo = next(r for r in self.info.repos if Path(r.repo_path) == Path(repo_path))
        blobs = Path(repo.repo_path) / "blobs"
        refs = {Path(repo.repo_path) / "refs" / ref for rev in repo.revisions for ref in rev.refs}
        self._replace(
            repos=self.strategy.repos - {repo_path},
            snapshots=self.strategy.snapshots | {rev.snapshot_path for rev in repo.revisions},
            refs=self.strategy.refs | refs,
            blobs=self.strategy.blobs | (set(blobs.iterdir()) if blobs.is_dir() else set()),
        )

    def _split_snapshot(self, snapshot: Path) -> None:
        """Unlink the snapshot's entries one by one instead of removing its folder."""
        entries = {p for p in Path(snapshot).rglob("*") if p.is_symlink() or p.is_file()}
        self._replace(snapshots=self.strategy.snapshots - {snapshot}, files=self.strategy.files | entries)

    def protect(self, survivors: list[Path]) -> None:
        """Narrow the strategy until no surviving file loses a link of its chain."""
        for _ in range(10_000):
            endangered = self.endangered(survivors)
            if not endangered:
                return
            hop = min(endangered)
            folder = next(
                (
                    d
                    for d in (*self.strategy.repos, *self.strategy.snapshots)
                    if Path(os.path.realpath(d)) == hop or Path(os.path.realpath(d)) in hop.parents
                ),
                None,
            )
            if folder is None:
                # A payload huggingface_hub would sweep: keep the references that hold it, which
                # needs their repo deleted part by part.
                holders = [e for e in self._removed_entries() if self._store_target(e) == hop]
                folder = next(
                    (r for r in self.strategy.repos if any(Path(r) in e.parents for e in holders)), None
                )
            if folder is not None and folder in self.strategy.repos:
                self._split_repo(folder)
                continue
            if folder is not None:
                self._split_snapshot(folder)
                continue
            listed = (*self.strategy.blobs, *self.strategy.files)
            keep = {p for p in listed if _canonical(p) == hop or self._store_target(p) == hop}
            if not keep:
                raise CacheError(
                    f"cannot delete from {self.cache} without breaking {hop}; nothing was deleted"
                )
            self._replace(blobs=self.strategy.blobs - keep, files=self.strategy.files - keep)
        raise CacheError(f"cannot plan a safe deletion in {self.cache}; nothing was deleted")


def delete_cached_revision(repo_id: str, commit: str | None, cache_dir: Path | None = None) -> CacheDeletion:
    """Delete one revision of a repo from the hub cache, its partial downloads, and the repo
    folder when nothing is left in it.

    The deletion is huggingface_hub's own (`scan_cache_dir(cache).delete_revisions(commit)`),
    narrowed so that no file that another cached snapshot reads (a blob two repos share through
    the shared store, or a symlink into this repo's folder) is removed.
    """
    from huggingface_hub import scan_cache_dir

    cache = cache_dir or hub_cache_dir()
    storage = repo_storage_dir(repo_id, cache)
    if not storage.exists():
        return CacheDeletion(0)
    before = _footprint(storage, cache)
    info = scan_cache_dir(cache)
    real_storage = storage.resolve()
    repo = next((r for r in info.repos if Path(r.repo_path).resolve() == real_storage), None)
    revision = None
    if repo is not None and commit is not None:
        revision = next((rev for rev in repo.revisions if rev.commit_hash == commit), None)
    survivors = [
        file.file_path
        for cached in info.repos
        for rev in cached.revisions
        if rev is not revision
        for file in rev.files
    ]
    spared: set[Path] = set()
    if revision is not None:
        plan = _DeletionPlan(info.delete_revisions(revision.commit_hash), info, Path(info.cache_dir or cache))
        spared = plan.endangered(survivors)  # what huggingface_hub's plan alone would break
        plan.protect(survivors)
        plan.strategy.execute()
    # Partial downloads, and (with no snapshot left) blobs that nothing links: an interrupted pull's.
    needed = {hop for file in survivors for hop in _link_chain(file) if real_storage in hop.parents}
    snapshots = storage / "snapshots"
    no_snapshot = not (snapshots.is_dir() and any(snapshots.iterdir()))
    blobs = storage / "blobs"
    if blobs.is_dir():
        for blob in list(blobs.iterdir()):
            if _canonical(blob) in needed:
                continue
            if blob.name.endswith(PARTIAL_SUFFIX) or (no_snapshot and not blob.is_dir()):
                blob.unlink(missing_ok=True)
    if no_snapshot and storage.exists() and not any(real_storage in p.parents for p in needed):
        shutil.rmtree(storage, ignore_errors=True)
    freed = sum(size for path, size in before.items() if not os.path.lexists(path))
    return CacheDeletion(freed, tuple(sorted(spared)))
