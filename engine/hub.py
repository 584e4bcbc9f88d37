"""Downloads from the Hugging Face hub into the standard hub cache: resumable, verified, no pickles.

Files land exactly where `huggingface_hub.hf_hub_download` puts them (`<cache>/models--org--name/
{blobs,snapshots,refs}`, blobs named by the hub's ETag), so a model that transformers already
fetched is reused and a model pulled here is reused by transformers.

Why not plain `hf_hub_download`: huggingface_hub 2.x downloads each file to a process-unique
temporary file and deletes it on any failure, so Ctrl+C or a reboot loses the partial file (a
5 GB shard). Here each blob's partial file has a stable name (`blobs/<etag>.incomplete`), survives
interruption, and the next pull resumes it with a Range request through huggingface_hub's own
`http_get` (which also retries and resumes dropped connections within one run). Every file is
checked against the size and checksum that the hub lists for it (LFS sha256, or the git blob id
for small files) while it streams.

huggingface_hub is imported inside the functions: the CLI imports this module lazily, and
`resolve_model` only needs the filesystem helpers at the top.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from mixtral_chat.engine.checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, read_weight_map
from mixtral_chat.engine.errors import CacheError, MixtralChatError, WeightsError
from mixtral_chat.engine.fileio import free_disk_bytes, write_atomic
from mixtral_chat.engine.units import format_bytes

DEFAULT_ENDPOINT = "https://huggingface.co"
SINGLE_WEIGHTS_FILE = SINGLE_FILE
TOKENIZER_FILE = "tokenizer.model"
# Fetched when the repo has them; never anything else (no .bin/.pt/.pth pickles, no consolidated.*).
OPTIONAL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
PARTIAL_SUFFIX = ".incomplete"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HASH_BLOCK = 8 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Errors: one line each, never containing the token.


class DownloadError(MixtralChatError):
    """A download failed; the message says why and what to do."""


class HubUnreachableError(DownloadError):
    """No connection to the hub (offline, DNS, refused, timeout, HF_HUB_OFFLINE)."""


class GatedRepoAccessError(DownloadError):
    """The repo is gated and the request had no token, or the token has no access."""


class HubAuthError(DownloadError):
    """The hub rejected the token itself."""


class RepoNotFoundError(DownloadError):
    """No such repo (or it is private and the token cannot see it)."""


class RevisionNotFoundError(DownloadError):
    """The repo exists, the revision (branch, tag or commit) does not."""


class ChecksumMismatchError(DownloadError):
    """A downloaded file does not match the size or checksum the hub lists for it."""


class DiskFullError(DownloadError):
    """The disk filled up during a download (ENOSPC)."""


class InsufficientDiskSpaceError(DownloadError):
    """The pull would not fit on the disk: refused before downloading."""


class DownloadCancelled(DownloadError):
    """The caller's cancel event was set; partial files are kept for the next pull."""


class UnsupportedRepoError(DownloadError):
    """The repo lacks what mixtral-chat needs (config.json, safetensors weights, tokenizer.model)."""


# ---------------------------------------------------------------------------------------------
# Where things are. Read from the environment at call time (huggingface_hub reads it at import),
# with the same precedence as huggingface_hub.constants.


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    default_home = os.path.join(os.path.expanduser("~"), ".cache")
    hf_home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", default_home), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(hf_home))) / "hub"


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID_RE.match(text))


def repo_storage_dir(repo_id: str, cache_dir: Path | None = None) -> Path:
    """`<cache>/models--org--name`, as huggingface_hub's `repo_folder_name` names it."""
    return (cache_dir or hub_cache_dir()) / "--".join(["models", *repo_id.split("/")])


# ---------------------------------------------------------------------------------------------
# The local cache, read without huggingface_hub.


def cached_commit(repo_id: str, revision: str, cache_dir: Path | None = None) -> str | None:
    """The commit a branch/tag last resolved to in the cache (or `revision` if it is a commit)."""
    if _COMMIT_RE.match(revision):
        return revision
    ref = repo_storage_dir(repo_id, cache_dir) / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if _COMMIT_RE.match(commit) else None


def snapshot_dir(repo_id: str, commit: str, cache_dir: Path | None = None) -> Path:
    return repo_storage_dir(repo_id, cache_dir) / "snapshots" / commit


def weight_files(model_dir: Path) -> list[str] | None:
    """The safetensors files a model directory needs (from its index), or None if it cannot say."""
    try:
        weight_map = read_weight_map(model_dir)
    except WeightsError:
        return None
    if weight_map is not None:
        return sorted(set(weight_map.values()))
    if (model_dir / SINGLE_WEIGHTS_FILE).exists():
        return [SINGLE_WEIGHTS_FILE]
    names = sorted(p.name for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    return names or None


def is_complete_model_dir(model_dir: Path) -> bool:
    """config.json, tokenizer.model and every weight shard present (symlinks resolving)."""
    if not (model_dir / CONFIG_FILE).is_file() or not (model_dir / TOKENIZER_FILE).is_file():
        return False
    shards = weight_files(model_dir)
    return bool(shards) and all((model_dir / name).is_file() for name in shards)


def find_cached_snapshot(repo_id: str, revision: str, cache_dir: Path | None = None) -> Path | None:
    """A complete snapshot of `repo_id@revision` already in the hub cache, or None."""
    commit = cached_commit(repo_id, revision, cache_dir)
    if commit is None:
        return None
    path = snapshot_dir(repo_id, commit, cache_dir)
    return path if is_complete_model_dir(path) else None


def directory_size(path: Path) -> int:
    """Bytes used by the files under `path`, following symlinks to blobs, each blob counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    if not path.exists():
        return 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:
                continue  # a dangling symlink
            key = (stat.st_dev, stat.st_ino)
            if key not in seen:
                seen.add(key)
                total += stat.st_size
    return total


def partial_bytes(repo_id: str, cache_dir: Path | None = None) -> int:
    """Bytes already fetched into resumable partial files for this repo."""
    blobs = repo_storage_dir(repo_id, cache_dir) / "blobs"
    total = 0
    for partial_file in blobs.glob(f"*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(OSError):
            total += partial_file.stat().st_size
    return total


def has_any_local_data(repo_id: str, cache_dir: Path | None = None) -> bool:
    blobs = repo_storage_dir(repo_id, cache_dir) / "blobs"
    return blobs.is_dir() and any(blobs.iterdir())


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


# ---------------------------------------------------------------------------------------------
# Progress.


@dataclass(frozen=True)
class DownloadProgress:
    bytes_done: int
    bytes_total: int
    speed: float  # bytes per second over the last few seconds of this run
    eta_s: float | None
    file: str | None


class _ProgressTracker:
    """Aggregates bytes over all files; speed from a sliding window of this run's bytes only."""

    WINDOW_S = 5.0

    def __init__(self, total: int, callback: Callable[[DownloadProgress], None] | None) -> None:
        self.total = total
        self.done = 0
        self.file: str | None = None
        self._callback = callback
        self._samples: deque[tuple[float, int]] = deque()
        self._fetched = 0  # bytes received in this run (resumed bytes excluded)
        self._lock = threading.Lock()

    def add_present(self, n: int) -> None:
        """Bytes that were already on disk (cached files, resumed partials): done, not speed."""
        with self._lock:
            self.done += n
        self._emit()

    def add_fetched(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.done += n
            self._fetched += n
            self._samples.append((now, self._fetched))
            while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW_S:
                self._samples.popleft()
        self._emit()

    def speed(self) -> float:
        with self._lock:
            if len(self._samples) < 2:
                return 0.0
            (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> DownloadProgress:
        speed = self.speed()
        remaining = max(self.total - self.done, 0)
        eta = remaining / speed if speed > 0 else (0.0 if remaining == 0 else None)
        return DownloadProgress(self.done, self.total, speed, eta, self.file)

    def _emit(self) -> None:
        if self._callback is not None:
            self._callback(self.snapshot())


class _ChunkSink:
    """What huggingface_hub's `http_get` takes as `tqdm_class`: counts bytes, honours cancel.

    `http_get` calls `update(len(chunk))` before writing each chunk, so raising here on cancel
    leaves the partial file holding only whole, correct chunks.
    """

    def __init__(
        self,
        *,
        tracker: _ProgressTracker,
        cancel: threading.Event | None,
        **_tqdm_kwargs: Any,  # desc, total, initial, unit, unit_scale: the tracker knows better
    ) -> None:
        self._tracker = tracker
        self._cancel = cancel

    def __enter__(self) -> _ChunkSink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int | float = 1) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise DownloadCancelled("download cancelled; the next pull resumes where it stopped")
        self._tracker.add_fetched(int(n))

    def close(self) -> None:
        return None


class _HashingWriter:
    """A file wrapper for `http_get`: hashes what is written, follows its seek+truncate reset."""

    def __init__(self, raw: BinaryIO, path: Path, hasher: Any, position: int) -> None:
        self._raw = raw
        self._path = path
        self.hasher = hasher
        self._position = position

    def write(self, data: bytes) -> int:
        self._raw.write(data)  # a BufferedWriter writes all of it or raises (ENOSPC)
        self.hasher.update(data)
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError("only absolute seeks are supported")
        self._position = offset
        return offset

    def truncate(self, size: int | None = None) -> int:
        # http_get rewinds and truncates when a server ignores Range and resends from byte 0.
        size = self._position if size is None else size
        self._raw.flush()
        self._raw.truncate(size)
        self.hasher = _hash_prefix(self._path, size, None)
        self._position = size
        return size

    def flush(self) -> None:
        self._raw.flush()


def _hash_prefix(path: Path, size: int, cancel: threading.Event | None) -> Any:
    hasher = hashlib.sha256()
    remaining = size
    if remaining <= 0:
        return hasher
    with open(path, "rb") as handle:
        while remaining > 0:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("download cancelled; the next pull resumes where it stopped")
            block = handle.read(min(_HASH_BLOCK, remaining))
            if not block:
                break
            hasher.update(block)
            remaining -= len(block)
    return hasher


def _git_blob_sha1(path: Path) -> str:
    size = path.stat().st_size
    hasher = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            hasher.update(block)
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------------
# Downloading.


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files: the content's sha256
    git_oid: str | None  # regular files: the git blob id (sha1 of "blob <size>\0" + content)


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    revision: str
    commit: str
    path: Path
    files: tuple[str, ...]
    total_bytes: int
    fetched_bytes: int  # bytes received from the network in this run
    from_cache_only: bool = False  # the hub was unreachable and a complete cached copy was used


def download_model_files(
    repo_id: str,
    revision: str = "main",
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[DownloadProgress], None] | None = None,
    cancel: threading.Event | None = None,
    before_weights: Callable[[dict[str, Any], int], None] | None = None,
) -> Snapshot:
    """Fetch what a Mixtral model directory needs from `repo_id@revision` into the hub cache.

    `before_weights(config, bytes_still_to_download)` runs after config.json arrived and before
    any weight byte is fetched: the caller validates the architecture and checks disk space there.
    `token=None` means huggingface_hub's usual token (HF_TOKEN or `hf auth login`).
    """
    from huggingface_hub import HfApi

    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if not is_repo_id(repo_id):
        raise RepoNotFoundError(f"'{repo_id}' is not a hub repo id (expected org/name)")
    try:
        info = HfApi(endpoint=endpoint).model_info(
            repo_id, revision=revision, files_metadata=True, token=token
        )
    except Exception as exc:
        error = translate_hub_error(exc, repo_id=repo_id, revision=revision, endpoint=endpoint, token=token)
        if isinstance(error, HubUnreachableError):
            cached = find_cached_snapshot(repo_id, revision, cache)
            if cached is not None:
                return _cached_result(repo_id, revision, cached, progress)
        raise error from None
    commit = info.sha
    if not commit or not _COMMIT_RE.match(commit):
        raise DownloadError(f"{endpoint} gave no commit for {repo_id}@{revision}: is HF_ENDPOINT a hub?")
    remote: dict[str, RemoteFile] = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        remote[sibling.rfilename] = RemoteFile(
            name=sibling.rfilename,
            size=(lfs.size if lfs else sibling.size),
            sha256=(lfs.sha256 if lfs else None),
            git_oid=(None if lfs else sibling.blob_id),
        )
    for required in (CONFIG_FILE, TOKENIZER_FILE):
        if required not in remote:
            raise UnsupportedRepoError(
                f"{repo_id}@{revision} has no {required}: mixtral-chat needs a Hugging Face layout "
                "Mixtral repo (config.json, safetensors weights, sentencepiece tokenizer.model)"
            )

    # Like huggingface_hub, record branch -> commit before fetching: an interrupted pull can then
    # be found (and removed) by revision.
    _write_ref(repo_storage_dir(repo_id, cache), revision, commit)
    fetcher = _Fetcher(repo_id, commit, endpoint=endpoint, cache=cache, token=token, cancel=cancel)
    # Small metadata first: the caller validates the config before 90 GB of weights move.
    config_path = fetcher.fetch(remote[CONFIG_FILE], tracker=None)
    config = _read_json(config_path, f"{repo_id}/{CONFIG_FILE}")
    if INDEX_FILE in remote:
        index_path = fetcher.fetch(remote[INDEX_FILE], tracker=None)
        index = _read_json(index_path, f"{repo_id}/{INDEX_FILE}")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UnsupportedRepoError(f"{repo_id}/{INDEX_FILE} has no weight_map")
        shards = sorted(set(map(str, weight_map.values())))
        odd = [
            n for n in shards if not n.endswith(".safetensors") or "/" in n or "\\" in n or n.startswith(".")
        ]
        if odd:  # the index names where files land in the cache: plain shard names only
            raise UnsupportedRepoError(f"{repo_id}/{INDEX_FILE} names an unexpected weight file {odd[0]!r}")
        missing = [name for name in shards if name not in remote]
        if missing:
            raise UnsupportedRepoError(f"{repo_id}@{revision}: {INDEX_FILE} names missing shard {missing[0]}")
    elif SINGLE_WEIGHTS_FILE in remote:
        shards = [SINGLE_WEIGHTS_FILE]
    else:
        shards = sorted(
            name
            for name in remote
            if name.endswith(".safetensors") and "/" not in name and not name.startswith("consolidated")
        )
    if not shards:
        raise UnsupportedRepoError(
            f"{repo_id}@{revision} has no safetensors weights "
            "(mixtral-chat never loads pickled .bin/.pt files)"
        )
    wanted = [remote[name] for name in (*shards, TOKENIZER_FILE)]
    wanted += [remote[name] for name in OPTIONAL_FILES if name in remote]
    metadata_files = [remote[CONFIG_FILE]] + ([remote[INDEX_FILE]] if INDEX_FILE in remote else [])

    metadata_bytes = sum(f.size or 0 for f in metadata_files)
    total = metadata_bytes + sum(f.size or 0 for f in wanted)
    to_download = 0
    for file in wanted:
        state = fetcher.local_state(file)
        if state != "complete":
            to_download += max((file.size or 0) - state, 0)
    if before_weights is not None:
        before_weights(config, to_download)

    tracker = _ProgressTracker(total, progress)
    tracker.add_present(metadata_bytes)  # each wanted file adds itself: cached, resumed or fetched
    for file in wanted:
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled("download cancelled; the next pull resumes where it stopped")
        fetcher.fetch(file, tracker=tracker)
    names = tuple(f.name for f in (*metadata_files, *wanted))
    return Snapshot(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        path=snapshot_dir(repo_id, commit, cache),
        files=names,
        total_bytes=total,
        fetched_bytes=fetcher.fetched_bytes,
    )


def _cached_result(
    repo_id: str, revision: str, path: Path, progress: Callable[[DownloadProgress], None] | None
) -> Snapshot:
    size = directory_size(path)
    if progress is not None:
        progress(DownloadProgress(size, size, 0.0, 0.0, None))
    return Snapshot(
        repo_id=repo_id,
        revision=revision,
        commit=path.name,
        path=path,
        files=tuple(sorted(p.name for p in path.iterdir())),
        total_bytes=size,
        fetched_bytes=0,
        from_cache_only=True,
    )


def _read_json(path: Path, label: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedRepoError(f"{label} is not valid JSON ({exc})") from None


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.exists() and ref.read_text(encoding="utf-8") == commit:
        return
    write_atomic(ref, commit)


class _Fetcher:
    """Fetches single files of one repo commit into the cache, resuming partial blobs."""

    def __init__(
        self,
        repo_id: str,
        commit: str,
        *,
        endpoint: str,
        cache: Path,
        token: str | None,
        cancel: threading.Event | None,
    ) -> None:
        self.repo_id = repo_id
        self.commit = commit
        self.endpoint = endpoint
        self.cache = cache
        self.storage = repo_storage_dir(repo_id, cache)
        self.token = token
        self.cancel = cancel
        self.fetched_bytes = 0

    def pointer(self, file: RemoteFile) -> Path:
        return self.storage / "snapshots" / self.commit / file.name

    def local_state(self, file: RemoteFile) -> str | int:
        """`"complete"` if the snapshot has it (or its blob is cached), else bytes in its partial."""
        if self.pointer(file).is_file():
            return "complete"
        for etag in filter(None, (file.sha256, file.git_oid)):
            if (self.storage / "blobs" / etag).is_file():
                return "complete"
            partial_file = self.storage / "blobs" / f"{etag}{PARTIAL_SUFFIX}"
            if partial_file.exists():
                return partial_file.stat().st_size
        return 0

    def fetch(self, file: RemoteFile, tracker: _ProgressTracker | None) -> Path:
        pointer = self.pointer(file)
        if pointer.is_file():  # already cached (by us, transformers, or any hub client)
            if tracker is not None:
                tracker.add_present(file.size or pointer.stat().st_size)
            return pointer
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        if tracker is not None:
            tracker.file = file.name
        url = hf_hub_url(self.repo_id, file.name, revision=self.commit, endpoint=self.endpoint)
        try:
            metadata = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
        except Exception as exc:
            raise translate_hub_error(
                exc, repo_id=self.repo_id, revision=self.commit, endpoint=self.endpoint, token=self.token
            ) from None
        etag = metadata.etag or file.sha256 or file.git_oid
        if not etag or "/" in etag or etag.startswith("."):
            raise DownloadError(f"{self.endpoint} gave no usable ETag for {self.repo_id}/{file.name}")
        size = file.size if file.size is not None else metadata.size
        blob = self.storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if not blob.is_file():
            self._download_blob(file, blob, metadata.location, url, size, tracker)
        elif tracker is not None:
            tracker.add_present(size or blob.stat().st_size)
        _link(blob, pointer)
        return pointer

    def _download_blob(
        self,
        file: RemoteFile,
        blob: Path,
        location: str,
        resolve_url: str,
        size: int | None,
        tracker: _ProgressTracker | None,
    ) -> None:
        from filelock import Timeout
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import WeakFileLock, build_hf_headers

        lock_path = self.cache / ".locks" / self.storage.name / f"{blob.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with WeakFileLock(lock_path, timeout=2.0):
                if blob.is_file():  # another process finished it while we waited
                    if tracker is not None:
                        tracker.add_present(size or blob.stat().st_size)
                    return
                partial_file = blob.with_name(blob.name + PARTIAL_SUFFIX)
                resume = partial_file.stat().st_size if partial_file.exists() else 0
                if size is not None and resume > size:  # not a prefix of this file
                    partial_file.unlink()
                    resume = 0
                hasher = _hash_prefix(partial_file, resume, self.cancel)
                local_tracker = tracker or _ProgressTracker(size or 0, None)
                local_tracker.add_present(resume)
                headers = build_hf_headers(token=self.token)
                headers["Accept-Encoding"] = "identity"  # exact bytes: sizes, ranges and hashes agree
                if _origin(location) != _origin(resolve_url):
                    headers.pop("authorization", None)  # a CDN's signed URL; the token stays on the hub
                sink = partial(_ChunkSink, tracker=local_tracker, cancel=self.cancel)
                before = local_tracker.done
                # Errors are translated outside the `with`: closing a file on a full disk can raise
                # again, and that second ENOSPC must not replace the message.
                try:
                    with open(partial_file, "ab") as raw:
                        writer = _HashingWriter(raw, partial_file, hasher, resume)
                        http_get(
                            location,
                            writer,  # type: ignore[arg-type]
                            resume_size=resume,
                            headers=headers,
                            expected_size=size,
                            displayed_filename=file.name,
                            tqdm_class=sink,  # type: ignore[arg-type]
                        )
                        raw.flush()
                        os.fsync(raw.fileno())
                except DownloadCancelled:
                    raise
                except OSError as exc:
                    raise self._translate_os_error(exc, file, partial_file) from None
                except Exception as exc:
                    raise translate_hub_error(
                        exc,
                        repo_id=self.repo_id,
                        revision=self.commit,
                        endpoint=self.endpoint,
                        token=self.token,
                    ) from None
                self.fetched_bytes += max(local_tracker.done - before, 0)
                self._verify(file, partial_file, writer.hasher.hexdigest(), size)
                os.chmod(partial_file, 0o644)
                os.replace(partial_file, blob)
        except Timeout:
            raise DownloadError(
                f"another process is downloading {self.repo_id}/{file.name} into {self.cache}; "
                "wait for it to finish, then pull again"
            ) from None

    def _translate_os_error(self, exc: OSError, file: RemoteFile, partial_file: Path) -> DownloadError:
        if exc.errno == errno.ENOSPC:
            return DiskFullError(
                f"disk full while downloading {self.repo_id}/{file.name} into {partial_file.parent} "
                f"({format_bytes(partial_bytes(self.repo_id, self.cache))} kept); free some space and pull "
                "again to resume"
            )
        if "Consistency check failed" in str(exc):
            partial_file.unlink(missing_ok=True)
            return ChecksumMismatchError(
                f"{self.repo_id}/{file.name}: the server sent a different number of bytes than announced; "
                "the partial file was deleted, pull again"
            )
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(exc, HfHubHTTPError):  # HfHubHTTPError is an OSError too
            return translate_hub_error(
                exc, repo_id=self.repo_id, revision=self.commit, endpoint=self.endpoint, token=self.token
            )
        where = f" ({exc.filename})" if exc.filename else ""
        return DownloadError(f"cannot write {self.repo_id}/{file.name}: {exc.strerror or exc}{where}")

    def _verify(self, file: RemoteFile, partial_file: Path, sha256: str, size: int | None) -> None:
        actual_size = partial_file.stat().st_size
        problem = None
        if size is not None and actual_size != size:
            problem = f"size {actual_size} instead of {size} bytes"
        elif file.sha256 and sha256 != file.sha256.lower():
            problem = f"sha256 {sha256[:12]}… instead of {file.sha256[:12]}…"
        elif file.git_oid and not file.sha256 and re.match(r"^[0-9a-f]{40}$", file.git_oid):
            oid = _git_blob_sha1(partial_file)
            if oid != file.git_oid:
                problem = f"git blob id {oid[:12]}… instead of {file.git_oid[:12]}…"
        if problem is not None:
            partial_file.unlink(missing_ok=True)  # bad bytes must not be resumed
            raise ChecksumMismatchError(
                f"checksum mismatch for {self.repo_id}/{file.name}: {problem}; "
                "the bad file was deleted, pull again"
            )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _link(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<etag> (relative, as huggingface_hub links); copy if
    the filesystem has no symlinks."""
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:
        shutil.copyfile(blob, pointer)


# ---------------------------------------------------------------------------------------------
# Errors from huggingface_hub / httpx, as one line a user can act on.


def _has_token(token: str | None) -> bool:
    if token:
        return True
    from huggingface_hub import get_token

    try:
        return bool(get_token())
    except Exception:
        return False


def translate_hub_error(
    exc: BaseException, *, repo_id: str, revision: str, endpoint: str, token: str | None
) -> DownloadError:
    """Map huggingface_hub/httpx errors to our one-line errors. Never echoes the token."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.errors import RevisionNotFoundError as HubRevisionNotFound

    if isinstance(exc, DownloadError):
        return exc
    page = f"{endpoint}/{repo_id}"
    if isinstance(exc, GatedRepoError):
        if not _has_token(token):
            return GatedRepoAccessError(
                f"{repo_id} is gated: accept its terms at {page} while logged in, then give mixtral-chat "
                "a token: set the HF_TOKEN environment variable or run `hf auth login`"
            )
        return GatedRepoAccessError(
            f"your Hugging Face token has no access to the gated repo {repo_id}: accept its terms at "
            f"{page} with the account the token belongs to (or use another token via HF_TOKEN)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if _has_token(token) else " (a private repo needs a token: HF_TOKEN or `hf auth login`)"
        return RepoNotFoundError(f"repository {repo_id} not found on {endpoint}{hint}")
    if isinstance(exc, HubRevisionNotFound):
        return RevisionNotFoundError(f"revision '{revision}' not found in {repo_id}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadError(
            f"a file listed for {repo_id}@{revision} is missing on {endpoint}; try again later"
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return HubUnreachableError(
            f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE) and it is not fully cached"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return HubAuthError(
                f"{endpoint} rejected the Hugging Face token (invalid credentials); set a valid one in "
                "HF_TOKEN or run `hf auth login`"
            )
        if status == 403:
            return HubAuthError(f"{endpoint} refused access to {repo_id} with this token (HTTP 403)")
        if status is not None and status >= 500:
            return HubUnreachableError(f"{endpoint} answered HTTP {status} for {repo_id}; try again later")
        return DownloadError(f"{endpoint} answered HTTP {status} for {repo_id}")
    if isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError)):
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return HubUnreachableError(
            f"cannot reach the Hugging Face hub at {endpoint} ({reason}); check your connection"
        )
    if isinstance(exc, (httpx2.RemoteProtocolError, httpx2.TransportError)):
        return HubUnreachableError(
            f"the connection to {endpoint} kept failing while downloading {repo_id}; pull again to resume"
        )
    reason = " ".join(str(exc).split())
    return DownloadError(f"downloading {repo_id} failed: {type(exc).__name__}: {reason}")


# ---------------------------------------------------------------------------------------------
# Disk space.


def check_disk_space(needs: Iterable[tuple[Path, int, str]]) -> None:
    """Refuse (with the numbers) when what each target needs exceeds the free space there.

    `needs`: (directory, bytes, label) triples; directories on one filesystem are summed.
    """
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for directory, amount, label in needs:
        if amount <= 0:
            continue
        probe = Path(directory)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        by_device.setdefault(probe.stat().st_dev, []).append((Path(directory), amount, label))
    for group in by_device.values():
        needed = sum(amount for _, amount, _ in group)
        free = free_disk_bytes(group[0][0])
        if needed > free:
            parts = " + ".join(f"{format_bytes(amount)} {label}" for _, amount, label in group)
            where = group[0][0]
            raise InsufficientDiskSpaceError(
                f"not enough disk space: this pull needs {format_bytes(needed)} ({parts}) but {where} has "
                f"{format_bytes(free)} free; free {format_bytes(needed - free)} or pull elsewhere (HF_HOME)"
            )
