"""Fetching single files of one repo commit into the hub cache, exactly where huggingface_hub puts
them (blobs named by the hub's ETag, snapshot symlinks), resuming partial blobs.

Why not plain `hf_hub_download`: huggingface_hub 2.x downloads each file to a process-unique
temporary file and deletes it on any failure, so Ctrl+C or a reboot loses the partial file (a
5 GB shard). Here each blob's partial file has a stable name (`blobs/<etag>.incomplete`), survives
interruption, and the next pull resumes it with a Range request through huggingface_hub's own
`http_get` (which also retries and resumes dropped connections within one run). Every file is
checked against the size and checksum that the hub lists for it (LFS sha256, or the git blob id
for small files) while it streams.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from mixtral_chat.engine.models.errors import (
    ChecksumMismatchError,
    DiskFullError,
    DownloadCancelled,
    DownloadError,
)
from mixtral_chat.engine.models.hub_cache import PARTIAL_SUFFIX, partial_bytes, repo_storage_dir
from mixtral_chat.engine.models.hub_errors import translate_hub_error
from mixtral_chat.engine.models.progress import ChunkSink, ProgressTracker
from mixtral_chat.engine.units import format_bytes

_HASH_BLOCK = 8 * 1024 * 1024
_log = logging.getLogger(__name__)


class _QuietResumeWarnings(logging.Filter):
    """huggingface_hub's `http_get` warns "Error while downloading from <url>" when it resumes a
    dropped connection. On a terminal that line breaks the progress line, and the URL is a CDN's
    signed one. The resume itself goes on; this drops the line and logs one without the URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.WARNING and "Error while downloading" in str(record.msg):
            _log.info("a download connection dropped; huggingface_hub resumes it")
            return False
        return True


def _quiet_hub_resume_warnings() -> None:
    hub_logger = logging.getLogger("huggingface_hub.file_download")
    if not any(isinstance(item, _QuietResumeWarnings) for item in hub_logger.filters):
        hub_logger.addFilter(_QuietResumeWarnings())


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
        self.hasher = hash_prefix(self._path, size, None)
        self._position = size
        return size

    def flush(self) -> None:
        self._raw.flush()


def hash_prefix(path: Path, size: int, cancel: threading.Event | None) -> Any:
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


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files: the content's sha256
    git_oid: str | None  # regular files: the git blob id (sha1 of "blob <size>\0" + content)


class Fetcher:
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

    def fetch(self, file: RemoteFile, tracker: ProgressTracker | None) -> Path:
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
        tracker: ProgressTracker | None,
    ) -> None:
        from filelock import Timeout
        from huggingface_hub.utils import WeakFileLock

        lock_path = self.cache / ".locks" / self.storage.name / f"{blob.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with WeakFileLock(lock_path, timeout=2.0):
                if blob.is_file():  # another process finished it while we waited
                    if tracker is not None:
                        tracker.add_present(size or blob.stat().st_size)
                    return
                self._resume_into_blob(file, blob, location, resolve_url, size, tracker)
        except Timeout:
            raise DownloadError(
                f"another process is downloading {self.repo_id}/{file.name} into {self.cache}; "
                "wait for it to finish, then pull again"
            ) from None

    def _resume_into_blob(
        self,
        file: RemoteFile,
        blob: Path,
        location: str,
        resolve_url: str,
        size: int | None,
        tracker: ProgressTracker | None,
    ) -> None:
        """Continue the blob's partial file from where it stopped, verify it, then rename it."""
        partial_file = blob.with_name(blob.name + PARTIAL_SUFFIX)
        resume = partial_file.stat().st_size if partial_file.exists() else 0
        if size is not None and resume > size:  # not a prefix of this file
            partial_file.unlink()
            resume = 0
        hasher = hash_prefix(partial_file, resume, self.cancel)
        local_tracker = tracker or ProgressTracker(size or 0, None)
        local_tracker.add_present(resume)
        before = local_tracker.done
        writer = self._stream(
            file,
            location,
            self._headers(location, resolve_url),
            partial_file,
            hasher,
            resume,
            size,
            local_tracker,
        )
        self.fetched_bytes += max(local_tracker.done - before, 0)
        self._verify(file, partial_file, writer.hasher.hexdigest(), size)
        os.chmod(partial_file, 0o644)
        os.replace(partial_file, blob)

    def _headers(self, location: str, resolve_url: str) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers(token=self.token)
        headers["Accept-Encoding"] = "identity"  # exact bytes: sizes, ranges and hashes agree
        if _origin(location) != _origin(resolve_url):
            headers.pop("authorization", None)  # a CDN's signed URL; the token stays on the hub
        return headers

    def _stream(
        self,
        file: RemoteFile,
        location: str,
        headers: dict[str, str],
        partial_file: Path,
        hasher: Any,
        resume: int,
        size: int | None,
        tracker: ProgressTracker,
    ) -> _HashingWriter:
        """Append the rest of the file to `partial_file` with huggingface_hub's `http_get`."""
        from huggingface_hub.file_download import http_get

        _quiet_hub_resume_warnings()
        sink = partial(ChunkSink, tracker=tracker, cancel=self.cancel)
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
                exc, repo_id=self.repo_id, revision=self.commit, endpoint=self.endpoint, token=self.token
            ) from None
        return writer

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
