"""engine/models/ (hub cache, downloads, cache deletion) against a local hub server speaking
huggingface_hub's HTTP API (no mocks of the client)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest
from hub_server import JUNK_FILES, HubServer, isolate_hf_env, llama_files, tiny_mixtral_files

from mixtral_chat.engine.models import download, errors, hub_cache, progress
from mixtral_chat.engine.units import format_bytes

REPO = "org/tiny"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: resumes happen at chunk boundaries
WANTED = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    SHARD1,
    SHARD2,
    "tokenizer.model",
    "tokenizer_config.json",
}
NEVER = {"pytorch_model.bin", "consolidated.00.pt", "README.md"}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return {**tiny_mixtral_files(tmp_path_factory.getbasetemp()), **JUNK_FILES}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    isolate_hf_env(monkeypatch, tmp_path / "hf", MIXTRAL_CHAT_HOME=str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def server(env: Path, tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch):
    with HubServer() as srv:
        srv.add_repo(REPO, tiny_files)
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        yield srv


def cache_blob(repo_id: str, name: str) -> Path:
    return hub_cache.repo_storage_dir(repo_id) / "blobs" / hashlib.sha256(name.encode()).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pull_fetches_only_needed_files_into_the_standard_hub_cache(server: HubServer, tiny_files, env):
    seen: list[progress.DownloadProgress] = []
    snap = download.download_model_files(REPO, progress=seen.append)

    repo = server.repos[REPO]
    assert snap.commit == repo.commit
    assert snap.path == env / "hf" / "hub" / "models--org--tiny" / "snapshots" / repo.commit
    assert set(snap.files) == WANTED
    assert {p.name for p in snap.path.iterdir()} == WANTED
    for name in WANTED:
        assert (snap.path / name).read_bytes() == tiny_files[name]
    # LFS files are stored under their sha256, regular files under their git blob id (as the hub's ETags say).
    blob_of_shard = Path(os.path.realpath(snap.path / SHARD1))
    assert blob_of_shard.name == sha256(tiny_files[SHARD1])
    assert Path(os.path.realpath(snap.path / "config.json")).name == repo.files["config.json"].git_oid
    assert (snap.path.parent.parent / "refs" / "main").read_text() == repo.commit

    fetched = {r.filename for r in server.gets(REPO)}
    assert fetched == WANTED
    assert not fetched & NEVER
    assert all(len(server.gets(REPO, name)) == 1 for name in WANTED)
    assert snap.fetched_bytes == snap.total_bytes == sum(len(tiny_files[n]) for n in WANTED)
    assert seen[-1].bytes_done == seen[-1].bytes_total == snap.total_bytes
    assert [p.bytes_done for p in seen] == sorted(p.bytes_done for p in seen)

    # huggingface_hub itself (what transformers calls) finds the files we cached: no new transfer.
    from huggingface_hub import hf_hub_download

    server.clear_log()
    path = hf_hub_download(REPO, SHARD1, endpoint=server.endpoint, cache_dir=hub_cache.hub_cache_dir())
    assert Path(path) == snap.path / SHARD1
    assert server.gets() == []

    # Hub unreachable: one clear error, unless the cache holds a complete copy (as here).
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    offline = download.download_model_files(REPO, endpoint=dead)
    assert offline.from_cache_only and offline.path == snap.path
    with pytest.raises(errors.HubUnreachableError, match=f"cannot reach the Hugging Face hub at {dead}"):
        download.download_model_files("org/other", endpoint=dead)


def test_model_already_in_the_hub_cache_is_not_downloaded_again(server: HubServer, tiny_files):
    from huggingface_hub import snapshot_download

    # Another tool (transformers, `hf download`) fetched the model first.
    snapshot_download(
        REPO, endpoint=server.endpoint, allow_patterns=sorted(WANTED), cache_dir=hub_cache.hub_cache_dir()
    )
    server.clear_log()

    snap = download.download_model_files(REPO)
    assert server.gets() == []
    assert snap.fetched_bytes == 0
    assert [r.kind for r in server.requests] == ["api"]  # one listing call, no HEAD per file
    assert (snap.path / SHARD2).read_bytes() == tiny_files[SHARD2]

    server.clear_log()
    download.download_model_files(REPO)  # and again: still nothing transferred
    assert server.gets() == []


def test_dropped_connection_is_resumed_with_a_range_request(
    server: HubServer, tiny_files, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
):
    server.drop_once(REPO, SHARD1, after_bytes=CHUNK + 1_500_000)
    with caplog.at_level("INFO"):
        snap = download.download_model_files(REPO)
    # huggingface_hub's own resume warning (with the file's URL) is not shown; one line of ours is logged.
    shown = capfd.readouterr()
    assert "Error while downloading" not in shown.err + shown.out and server.endpoint not in shown.err
    assert not [r for r in caplog.records if "Error while downloading" in r.getMessage()]
    assert any("connection dropped" in r.getMessage() for r in caplog.records)

    gets = server.gets(REPO, SHARD1)
    assert [g.range for g in gets] == [None, f"bytes={CHUNK}-"]
    assert [g.status for g in gets] == [200, 206]
    assert (snap.path / SHARD1).read_bytes() == tiny_files[SHARD1]
    assert not list(hub_cache.repo_storage_dir(REPO).glob("blobs/*.incomplete"))


def test_cancel_keeps_the_partial_file_and_the_next_pull_resumes_it(server: HubServer, tiny_files):
    cancel = threading.Event()

    def on_progress(p: progress.DownloadProgress) -> None:
        if p.file == SHARD1 and p.bytes_done > CHUNK:
            cancel.set()

    with pytest.raises(errors.DownloadCancelled):
        download.download_model_files(REPO, progress=on_progress, cancel=cancel)
    partial = hub_cache.repo_storage_dir(REPO) / "blobs" / (sha256(tiny_files[SHARD1]) + ".incomplete")
    assert partial.stat().st_size == CHUNK
    assert hub_cache.partial_bytes(REPO) == CHUNK
    assert hub_cache.find_cached_snapshot(REPO, "main") is None

    server.clear_log()
    seen: list[progress.DownloadProgress] = []
    snap = download.download_model_files(REPO, progress=seen.append)
    assert [g.range for g in server.gets(REPO, SHARD1)] == [f"bytes={CHUNK}-"]
    assert (snap.path / SHARD1).read_bytes() == tiny_files[SHARD1]
    assert snap.fetched_bytes == snap.total_bytes - CHUNK - len(tiny_files["config.json"]) - len(
        tiny_files["model.safetensors.index.json"]
    )
    assert not partial.exists()


def test_corrupted_file_is_detected_and_not_kept(server: HubServer, tiny_files):
    server.corrupt(REPO, SHARD2)
    with pytest.raises(errors.ChecksumMismatchError) as info:
        download.download_model_files(REPO)
    message = str(info.value)
    assert "checksum mismatch" in message and SHARD2 in message and "\n" not in message
    blobs = hub_cache.repo_storage_dir(REPO) / "blobs"
    assert not (blobs / sha256(tiny_files[SHARD2])).exists()
    assert not list(blobs.glob("*.incomplete"))

    server.corrupt(REPO, SHARD2, enabled=False)
    server.clear_log()
    snap = download.download_model_files(REPO)
    assert (snap.path / SHARD2).read_bytes() == tiny_files[SHARD2]
    assert {r.filename for r in server.gets()} == {
        SHARD2,
        "tokenizer.model",
        "generation_config.json",
        "tokenizer_config.json",
    }


def test_gated_repo_needs_a_token(server: HubServer, tiny_files):
    server.add_repo("gated/tiny", tiny_files, gated=True)
    server.valid_tokens.add("hf_good_token")

    with pytest.raises(errors.GatedRepoAccessError) as info:
        download.download_model_files("gated/tiny")
    assert "HF_TOKEN" in str(info.value) and "hf auth login" in str(info.value)
    assert server.gets("gated/tiny") == []

    with pytest.raises(errors.HubAuthError) as info:
        download.download_model_files("gated/tiny", token="hf_wrong_token")
    assert "hf_wrong_token" not in str(info.value)

    server.repos["gated/tiny"].allowed_tokens = {"hf_someone_else"}
    with pytest.raises(errors.GatedRepoAccessError) as info:
        download.download_model_files("gated/tiny", token="hf_good_token")
    assert "no access" in str(info.value) and "hf_good_token" not in str(info.value)

    server.repos["gated/tiny"].allowed_tokens = None
    server.clear_log()
    snap = download.download_model_files("gated/tiny", token="hf_good_token")
    assert (snap.path / SHARD1).read_bytes() == tiny_files[SHARD1]
    resolves = [r for r in server.requests if r.kind == "resolve"]
    cdn = [r for r in server.requests if r.kind == "cdn"]
    assert resolves and all(r.authorized for r in resolves)
    assert cdn and not any(r.authorized for r in cdn)  # the token never leaves the hub for the CDN


def test_missing_repo_and_revision(server: HubServer):
    with pytest.raises(errors.RepoNotFoundError, match="repository org/nope not found"):
        download.download_model_files("org/nope")
    with pytest.raises(errors.RevisionNotFoundError, match="revision 'v9' not found in org/tiny"):
        download.download_model_files(REPO, "v9")
    with pytest.raises(errors.RepoNotFoundError, match="not a hub repo id"):
        download.download_model_files("no-slash")


def test_full_disk_mid_download_is_reported(server: HubServer, tiny_files):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to produce a real ENOSPC")
    blobs = hub_cache.repo_storage_dir(REPO) / "blobs"
    blobs.mkdir(parents=True)
    partial = blobs / (sha256(tiny_files[SHARD1]) + ".incomplete")
    partial.symlink_to("/dev/full")  # every write to the partial file fails with ENOSPC
    with pytest.raises(errors.DiskFullError, match="disk full while downloading org/tiny/" + SHARD1):
        download.download_model_files(REPO)
    partial.unlink()


def test_disk_space_is_checked_before_weights_move(server: HubServer, tiny_files, monkeypatch):
    monkeypatch.setattr(download, "free_disk_bytes", lambda path: 5_000_000)

    def check(config: dict, to_download: int) -> None:
        download.check_disk_space([(hub_cache.hub_cache_dir(), to_download, "to download")])

    with pytest.raises(errors.InsufficientDiskSpaceError) as info:
        download.download_model_files(REPO, before_weights=check)
    message = str(info.value)
    weights = sum(len(tiny_files[name]) for name in WANTED - {"config.json", "model.safetensors.index.json"})
    assert f"needs {format_bytes(weights)}" in message and "5.0 MB free" in message
    assert {r.filename for r in server.gets()} == {"config.json", "model.safetensors.index.json"}


def test_repos_without_what_mixtral_chat_needs_are_refused(server: HubServer, tiny_files):
    pickles_only = {
        k: v for k, v in tiny_files.items() if not k.endswith(".safetensors") and "index" not in k
    }
    server.add_repo("org/pickles", pickles_only)
    with pytest.raises(errors.UnsupportedRepoError, match="no safetensors weights"):
        download.download_model_files("org/pickles")
    assert not {r.filename for r in server.gets("org/pickles")} & NEVER

    no_tokenizer = {k: v for k, v in tiny_files.items() if k != "tokenizer.model"}
    server.add_repo("org/no-tokenizer", no_tokenizer)
    with pytest.raises(errors.UnsupportedRepoError, match=r"has no tokenizer\.model"):
        download.download_model_files("org/no-tokenizer")
    assert server.gets("org/no-tokenizer") == []

    # The caller's check runs on the config before any weight byte moves.
    server.add_repo("org/llama", llama_files())

    def refuse(config: dict, to_download: int) -> None:
        raise errors.UnsupportedRepoError(f"not a Mixtral: {config['model_type']}, {to_download} bytes")

    weights = len(llama_files()["model.safetensors"]) + len(llama_files()["tokenizer.model"])
    with pytest.raises(errors.UnsupportedRepoError, match=f"not a Mixtral: llama, {weights} bytes"):
        download.download_model_files("org/llama", before_weights=refuse)
    assert {r.filename for r in server.gets("org/llama")} == {"config.json"}
