"""Downloads of a Mixtral model directory from the Hugging Face hub into the standard hub cache:
resumable, verified, no pickles.

Files land exactly where `huggingface_hub.hf_hub_download` puts them, so a model that transformers
already fetched is reused and a model pulled here is reused by transformers (see fetcher.py for why
the files are not fetched with `hf_hub_download` itself). huggingface_hub is imported inside the
functions: only a pull needs it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_chat.engine.checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILE
from mixtral_chat.engine.fileio import free_disk_bytes, write_atomic
from mixtral_chat.engine.models.errors import (
    DownloadCancelled,
    DownloadError,
    HubUnreachableError,
    InsufficientDiskSpaceError,
    RepoNotFoundError,
    UnsupportedRepoError,
)
from mixtral_chat.engine.models.fetcher import Fetcher, RemoteFile
from mixtral_chat.engine.models.hub_cache import (
    COMMIT_RE,
    directory_size,
    find_cached_snapshot,
    hub_cache_dir,
    hub_endpoint,
    is_repo_id,
    repo_storage_dir,
    snapshot_dir,
)
from mixtral_chat.engine.models.hub_errors import translate_hub_error
from mixtral_chat.engine.models.progress import DownloadProgress, ProgressTracker
from mixtral_chat.engine.units import format_bytes

# Fetched when the repo has them; never anything else (no .bin/.pt/.pth pickles, no consolidated.*).
OPTIONAL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


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
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if not is_repo_id(repo_id):
        raise RepoNotFoundError(f"'{repo_id}' is not a hub repo id (expected org/name)")
    try:
        commit, remote = _list_repo_files(repo_id, revision, endpoint=endpoint, token=token)
    except HubUnreachableError:
        cached = find_cached_snapshot(repo_id, revision, cache)
        if cached is None:
            raise
        return _cached_result(repo_id, revision, cached, progress)
    _check_required_files(remote, repo_id, revision)

    # Like huggingface_hub, record branch -> commit before fetching: an interrupted pull can then
    # be found (and removed) by revision.
    _write_ref(repo_storage_dir(repo_id, cache), revision, commit)
    fetcher = Fetcher(repo_id, commit, endpoint=endpoint, cache=cache, token=token, cancel=cancel)
    # Small metadata first: the caller validates the config before 90 GB of weights move.
    config = _read_json(fetcher.fetch(remote[CONFIG_FILE], tracker=None), f"{repo_id}/{CONFIG_FILE}")
    shards = _weight_shards(fetcher, remote, repo_id, revision)
    wanted = [remote[name] for name in (*shards, TOKENIZER_FILE)]
    wanted += [remote[name] for name in OPTIONAL_FILES if name in remote]
    metadata_files = [remote[CONFIG_FILE]] + ([remote[INDEX_FILE]] if INDEX_FILE in remote else [])
    if before_weights is not None:
        before_weights(config, _bytes_to_download(fetcher, wanted))

    metadata_bytes = sum(f.size or 0 for f in metadata_files)
    tracker = ProgressTracker(metadata_bytes + sum(f.size or 0 for f in wanted), progress)
    tracker.add_present(metadata_bytes)  # each wanted file adds itself: cached, resumed or fetched
    _fetch_all(fetcher, wanted, tracker, cancel)
    return Snapshot(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        path=snapshot_dir(repo_id, commit, cache),
        files=tuple(f.name for f in (*metadata_files, *wanted)),
        total_bytes=tracker.total,
        fetched_bytes=fetcher.fetched_bytes,
    )


def remote_download_bytes(
    repo_id: str, revision: str = "main", *, token: str | None = None, endpoint: str | None = None
) -> int:
    """About how many bytes a pull of `repo_id` fetches, from the repo's file listing alone
    (nothing is downloaded): its top-level safetensors files, the tokenizer and the metadata."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    _, remote = _list_repo_files(repo_id, revision, endpoint=endpoint, token=token)
    names = [
        name
        for name in remote
        if name.endswith(".safetensors") and "/" not in name and not name.startswith("consolidated")
    ]
    names += [name for name in (CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE, *OPTIONAL_FILES) if name in remote]
    return sum(remote[name].size or 0 for name in names)


def _list_repo_files(
    repo_id: str, revision: str, *, endpoint: str, token: str | None
) -> tuple[str, dict[str, RemoteFile]]:
    """The commit `revision` names, and the repo's files with their sizes and checksums."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).model_info(
            repo_id, revision=revision, files_metadata=True, token=token
        )
    except Exception as exc:
        raise translate_hub_error(
            exc, repo_id=repo_id, revision=revision, endpoint=endpoint, token=token
        ) from None
    commit = info.sha
    if not commit or not COMMIT_RE.match(commit):
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
    return commit, remote


def _check_required_files(remote: dict[str, RemoteFile], repo_id: str, revision: str) -> None:
    for required in (CONFIG_FILE, TOKENIZER_FILE):
        if required not in remote:
            raise UnsupportedRepoError(
                f"{repo_id}@{revision} has no {required}: mixtral-chat needs a Hugging Face layout "
                "Mixtral repo (config.json, safetensors weights, sentencepiece tokenizer.model)"
            )


def _weight_shards(fetcher: Fetcher, remote: dict[str, RemoteFile], repo_id: str, revision: str) -> list[str]:
    """The safetensors files to fetch: those the index names (the index is fetched and checked),
    else the single file, else every top-level safetensors file."""
    if INDEX_FILE in remote:
        shards = _indexed_shards(fetcher, remote, repo_id, revision)
    elif SINGLE_FILE in remote:
        shards = [SINGLE_FILE]
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
    return shards


def _indexed_shards(
    fetcher: Fetcher, remote: dict[str, RemoteFile], repo_id: str, revision: str
) -> list[str]:
    index = _read_json(fetcher.fetch(remote[INDEX_FILE], tracker=None), f"{repo_id}/{INDEX_FILE}")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnsupportedRepoError(f"{repo_id}/{INDEX_FILE} has no weight_map")
    shards = sorted(set(map(str, weight_map.values())))
    odd = [n for n in shards if not n.endswith(".safetensors") or "/" in n or "\\" in n or n.startswith(".")]
    if odd:  # the index names where files land in the cache: plain shard names only
        raise UnsupportedRepoError(f"{repo_id}/{INDEX_FILE} names an unexpected weight file {odd[0]!r}")
    missing = [name for name in shards if name not in remote]
    if missing:
        raise UnsupportedRepoError(f"{repo_id}@{revision}: {INDEX_FILE} names missing shard {missing[0]}")
    return shards


def _bytes_to_download(fetcher: Fetcher, wanted: list[RemoteFile]) -> int:
    """Bytes still to fetch: files neither cached nor (for that part) in a resumable partial."""
    to_download = 0
    for file in wanted:
        state = fetcher.local_state(file)
        if state != "complete":
            to_download += max((file.size or 0) - state, 0)
    return to_download


def _fetch_all(
    fetcher: Fetcher, wanted: list[RemoteFile], tracker: ProgressTracker, cancel: threading.Event | None
) -> None:
    for file in wanted:
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled("download cancelled; the next pull resumes where it stopped")
        fetcher.fetch(file, tracker=tracker)


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
