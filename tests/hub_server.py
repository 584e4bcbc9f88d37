"""A local Hugging Face hub for tests: the HTTP API that huggingface_hub's download calls use.

Speaks, on 127.0.0.1 (random port):
- `GET /api/models/{org}/{name}[/revision/{rev}]` (`?blobs=true`): repo info with `sha`, `gated`
  and `siblings` (`rfilename`, `size`, `blobId`, `lfs: {size, sha256, pointerSize}`), as
  `HfApi.model_info(files_metadata=True)` reads it.
- `HEAD|GET /{org}/{name}/resolve/{rev}/{file}`: regular files answer 200 with `ETag` (the git
  blob id), `X-Repo-Commit`, `Content-Length`; LFS files answer 302 to a "CDN" URL on another host
  name (`localhost`) with `X-Linked-Etag` (sha256), `X-Linked-Size`, `X-Repo-Commit`, exactly the
  headers `get_hf_file_metadata` reads, so the client drops the Authorization header on the way
  to the CDN as it does with the real hub.
- Ranged GETs (`Range: bytes=N-`) answer 206 with `Content-Range`.
- Errors carry the `X-Error-Code` / `X-Error-Message` headers that `hf_raise_for_status` maps:
  `RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo` (401 without a token, 403 with
  a token that has no access), 401 "Invalid credentials in Authorization header".

Fault knobs: drop the connection mid-file (`drop_once`), stall mid-file until released (`stall`),
serve corrupted bytes under the right checksum (`corrupt`). Every request is recorded
(`requests`, `gets`) so tests can prove what was and was not downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf")
_BODY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ServedFile:
    name: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        """The git blob id: what the hub lists as blobId and sends as ETag for regular files."""
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()

    @property
    def pointer_oid(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.pointer) + self.pointer).hexdigest()


@dataclass
class ServedRepo:
    repo_id: str
    files: dict[str, ServedFile]
    commit: str
    branches: dict[str, str]
    gated: bool = False
    # Tokens that were granted access to this gated repo (all valid tokens when None).
    allowed_tokens: set[str] | None = None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    repo_id: str | None
    filename: str | None
    kind: str  # "api", "resolve", "cdn", "other"
    range: str | None
    authorized: bool
    status: int


@dataclass
class _Faults:
    drop_after: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    stall_after: dict[tuple[str, str], tuple[int, threading.Event]] = field(default_factory=dict)
    corrupt: set[tuple[str, str]] = field(default_factory=set)


class HubServer:
    """Start with `with HubServer() as hub:`; point huggingface_hub at `hub.endpoint`."""

    def __init__(self, cdn_host: str = "localhost") -> None:
        self.repos: dict[str, ServedRepo] = {}
        self.valid_tokens: set[str] = set()
        self.requests: list[RequestRecord] = []
        self.faults = _Faults()
        self.cdn_host = cdn_host
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        for _, event in self.faults.stall_after.values():
            event.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- content --------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | Path,
        *,
        gated: bool = False,
        branch: str = "main",
    ) -> ServedRepo:
        """Serve `files` (name -> bytes, or every file of a directory) as `repo_id@branch`."""
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        served = {
            name: ServedFile(name, data, lfs=name.endswith(LFS_SUFFIXES) or len(data) > 1_000_000)
            for name, data in files.items()
        }
        commit_hash = hashlib.sha1(repo_id.encode())
        for name in sorted(served):
            commit_hash.update(name.encode() + served[name].sha256.encode())
        commit = commit_hash.hexdigest()
        repo = ServedRepo(repo_id, served, commit, {branch: commit}, gated=gated)
        with self._lock:
            self.repos[repo_id] = repo
        return repo

    # -- faults ---------------------------------------------------------------------------------

    def drop_once(self, repo_id: str, filename: str, after_bytes: int) -> None:
        """The next GET of this file closes the connection after `after_bytes` of the file."""
        self.faults.drop_after.setdefault((repo_id, filename), []).append(after_bytes)

    def stall(self, repo_id: str, filename: str, after_bytes: int) -> threading.Event:
        """GETs of this file pause after `after_bytes` until the returned event is set."""
        event = threading.Event()
        self.faults.stall_after[(repo_id, filename)] = (after_bytes, event)
        return event

    def corrupt(self, repo_id: str, filename: str, enabled: bool = True) -> None:
        """Serve this file with one byte flipped, under its correct size and checksum."""
        key = (repo_id, filename)
        if enabled:
            self.faults.corrupt.add(key)
        else:
            self.faults.corrupt.discard(key)

    # -- inspection -----------------------------------------------------------------------------

    def record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def gets(self, repo_id: str | None = None, filename: str | None = None) -> list[RequestRecord]:
        """GETs that transferred file bytes (CDN or direct resolve), optionally for one file."""
        with self._lock:
            records = list(self.requests)
        return [
            r
            for r in records
            if r.method == "GET"
            and r.status in (200, 206)
            and r.kind in ("resolve", "cdn")
            and (repo_id is None or r.repo_id == repo_id)
            and (filename is None or r.filename == filename)
        ]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()


_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$")
_TREE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)/?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN_RE = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<sha>[0-9a-f]{64})/(?P<file>.+)$")


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the real hub and httpx use

    def log_message(self, format: str, *args: object) -> None:
        return None  # quiet: the records are the log

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_GET(self) -> None:
        self._handle("GET")

    # -- routing --------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        token = self._token()
        self._method = method
        self._record_base = {"method": method, "path": path, "range": self.headers.get("Range")}
        self._record_base["authorized"] = token is not None
        if match := _CDN_RE.match(split.path):
            return self._cdn(unquote(match["repo"]), match["sha"], unquote(match["file"]))
        if token is not None and token not in self.hub.valid_tokens:
            return self._error(401, None, "Invalid credentials in Authorization header", kind="other")
        if match := _TREE_RE.match(split.path):
            return self._tree(unquote(match["repo"]), unquote(match["rev"]))
        if match := _API_RE.match(split.path):
            rev = unquote(match["rev"]) if match["rev"] else "main"
            return self._api(unquote(match["repo"]), rev, "blobs" in query)
        if match := _RESOLVE_RE.match(split.path):
            return self._resolve(unquote(match["repo"]), unquote(match["rev"]), unquote(match["file"]), token)
        self._error(404, None, "Not found", kind="other")

    def _token(self) -> str | None:
        header = self.headers.get("Authorization")
        if header and header.lower().startswith("bearer "):
            return header[7:].strip()
        return None

    def _repo_commit(
        self, repo_id: str, rev: str, kind: str, filename: str | None
    ) -> tuple[ServedRepo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(
                404, "RepoNotFound", "Repository not found", kind=kind, repo_id=repo_id, filename=filename
            )
            return None
        commit = repo.branches.get(rev) or (rev if rev == repo.commit else None)
        if commit is None:
            self._error(
                404,
                "RevisionNotFound",
                f"Invalid rev id: {rev}",
                kind=kind,
                repo_id=repo_id,
                filename=filename,
            )
            return None
        return repo, commit

    # -- endpoints ------------------------------------------------------------------------------

    def _api(self, repo_id: str, rev: str, blobs: bool) -> None:
        found = self._repo_commit(repo_id, rev, "api", None)
        if found is None:
            return
        repo, commit = found
        siblings = []
        for name, file in sorted(repo.files.items()):
            sibling: dict[str, object] = {"rfilename": name}
            if blobs:
                if file.lfs:
                    sibling.update(
                        size=len(file.data),
                        blobId=file.pointer_oid,
                        lfs={"size": len(file.data), "sha256": file.sha256, "pointerSize": len(file.pointer)},
                    )
                else:
                    sibling.update(size=len(file.data), blobId=file.git_oid)
            siblings.append(sibling)
        body = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "private": False,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "tags": ["transformers", "safetensors", "mixtral"],
            "library_name": "transformers",
            "siblings": siblings,
        }
        self._send_json(body, repo_id)

    def _tree(self, repo_id: str, rev: str) -> None:
        """`list_repo_tree` (what `snapshot_download` lists with): one page, files only."""
        found = self._repo_commit(repo_id, rev, "api", None)
        if found is None:
            return
        repo, _commit = found
        entries = []
        for name, file in sorted(repo.files.items()):
            entry: dict[str, object] = {"type": "file", "path": name, "size": len(file.data)}
            if file.lfs:
                entry["oid"] = file.pointer_oid
                entry["lfs"] = {"oid": file.sha256, "size": len(file.data), "pointerSize": len(file.pointer)}
            else:
                entry["oid"] = file.git_oid
            entries.append(entry)
        self._send_json(entries, repo_id)

    def _send_json(self, body: object, repo_id: str) -> None:
        data = json.dumps(body).encode()
        self._record(200, "api", repo_id, None)
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self._method == "GET":
            self.wfile.write(data)

    def _resolve(self, repo_id: str, rev: str, filename: str, token: str | None) -> None:
        found = self._repo_commit(repo_id, rev, "resolve", filename)
        if found is None:
            return
        repo, commit = found
        if repo.gated:
            if token is None:
                return self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                    kind="resolve",
                    repo_id=repo_id,
                    filename=filename,
                )
            if repo.allowed_tokens is not None and token not in repo.allowed_tokens:
                return self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo_id} to ask for access.",
                    kind="resolve",
                    repo_id=repo_id,
                    filename=filename,
                )
        file = repo.files.get(filename)
        if file is None:
            return self._error(
                404,
                "EntryNotFound",
                f"{filename} does not exist",
                kind="resolve",
                repo_id=repo_id,
                filename=filename,
                commit=commit,
            )
        if file.lfs:
            location = f"http://{self.hub.cdn_host}:{self.hub.port}/cdn/{repo_id}/{file.sha256}/{filename}"
            location += "?X-Amz-Signature=local-test"
            self._record(302, "resolve", repo_id, filename)
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{file.pointer_oid}"')
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(len(file.data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_bytes(repo, filename, file, etag=file.git_oid, commit=commit, kind="resolve")

    def _cdn(self, repo_id: str, sha256: str, filename: str) -> None:
        repo = self.hub.repos.get(repo_id)
        file = repo.files.get(filename) if repo is not None else None
        if repo is None or file is None or file.sha256 != sha256:
            return self._error(404, None, "NoSuchKey", kind="cdn", repo_id=repo_id, filename=filename)
        self._send_bytes(repo, filename, file, etag=file.sha256, commit=None, kind="cdn")

    # -- bodies ---------------------------------------------------------------------------------

    def _send_bytes(
        self, repo: ServedRepo, filename: str, file: ServedFile, *, etag: str, commit: str | None, kind: str
    ) -> None:
        key = (repo.repo_id, filename)
        data = file.data
        if key in self.hub.faults.corrupt and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        total = len(data)
        start = 0
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if match is None or int(match[1]) >= max(total, 1):
                self._record(416, kind, repo.repo_id, filename)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(match[1])
            end = int(match[2]) + 1 if match[2] else total
            data = data[start:end]
            status = 206
        self._record(status, kind, repo.repo_id, filename)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{total}")
        self.end_headers()
        if self._method == "HEAD":
            return
        drop_at = None
        drops = self.hub.faults.drop_after.get(key)
        if drops:
            drop_at = drops.pop(0) - start
        stall = self.hub.faults.stall_after.get(key)
        stall_at = stall[0] - start if stall is not None else None
        try:
            sent = 0
            while sent < len(data):
                limit = len(data)
                if drop_at is not None and drop_at > sent:
                    limit = min(limit, drop_at)
                if stall_at is not None and stall_at > sent:
                    limit = min(limit, stall_at)
                piece = data[sent : min(sent + _BODY_CHUNK, limit)]
                self.wfile.write(piece)
                sent += len(piece)
                if drop_at is not None and sent >= drop_at:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the client sees a truncated body
                    self.close_connection = True
                    return
                if stall_at is not None and sent == stall_at and stall is not None:
                    self.wfile.flush()
                    stall[1].wait(timeout=30)
                    stall_at = None
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _record(self, status: int, kind: str, repo_id: str | None, filename: str | None) -> None:
        self.hub.record(
            RequestRecord(
                method=self._record_base["method"],  # type: ignore[arg-type]
                path=self._record_base["path"],  # type: ignore[arg-type]
                repo_id=repo_id,
                filename=filename,
                kind=kind,
                range=self._record_base["range"],  # type: ignore[arg-type]
                authorized=bool(self._record_base["authorized"]),
                status=status,
            )
        )

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        kind: str,
        repo_id: str | None = None,
        filename: str | None = None,
        commit: str | None = None,
    ) -> None:
        self._record(status, kind, repo_id, filename)
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self._method == "GET":
            self.wfile.write(data)


# ---------------------------------------------------------------------------------------------
# A tiny Mixtral checkpoint in the real Hugging Face layout.


# What could point huggingface_hub at the user's own cache, token or offline switch.
_USER_HF_VARIABLES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
)


def isolate_hf_env(monkeypatch, hf_home: Path, **extra: str) -> dict[str, str]:
    """A private Hugging Face cache and no user token, for this process and CLI subprocesses.

    `extra` variables (e.g. MIXTRAL_CHAT_HOME) are set too; returns everything that was set.
    """
    for name in _USER_HF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    values = {"HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def tokenizer_model_path() -> Path:
    """mistral-common's bundled Mixtral v1 sentencepiece model (32000 pieces)."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def make_tiny_mixtral(dest: Path, *, seed: int = 0, with_junk: bool = True) -> Path:
    """transformers' MixtralForCausalLM with random weights, saved as an index and two shards.

    The first shard is larger than huggingface_hub's 10 MB download chunk, so a connection dropped
    after the first chunk resumes with a Range request. `with_junk` adds files a pull must never fetch
    (pickles, consolidated weights, a README).
    """
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # one 16.4 MB embedding instead of two: less to serve per test
    )
    model = MixtralForCausalLM(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, max_shard_size="17MB")  # shards of 16.9 MB (the embedding) and 3.0 MB
    shutil.copyfile(tokenizer_model_path(), dest / "tokenizer.model")
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}), encoding="utf-8"
    )
    if with_junk:
        for name, data in JUNK_FILES.items():
            (dest / name).write_bytes(data)
    return dest


_TINY_FILES: dict[str, bytes] = {}


def tiny_mixtral_files(tmp_root: Path) -> dict[str, bytes]:
    """The files of `make_tiny_mixtral` (without junk), built once per test session under `tmp_root`."""
    if not _TINY_FILES:
        directory = make_tiny_mixtral(tmp_root / "tiny-mixtral-hub", with_junk=False)
        _TINY_FILES.update({p.name: p.read_bytes() for p in directory.iterdir()})
    return dict(_TINY_FILES)


JUNK_FILES = {
    "pytorch_model.bin": b"\x80\x04pickle-must-not-be-fetched" * 100,
    "consolidated.00.pt": b"\x80\x04consolidated-must-not-be-fetched" * 100,
    "README.md": b"# tiny mixtral\n",
}


def llama_files() -> dict[str, bytes]:
    """A repo with a non-Mixtral config (and a shard that must not be fetched)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 32000,
    }
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": b"\0" * 2048,
        "tokenizer.model": tokenizer_model_path().read_bytes(),
    }
