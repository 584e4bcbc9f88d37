"""engine/models/ (the registry, pulls, removal) and `mixtral-chat models` against a local hub server
(real client, real CLI)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hub_server import HubServer, isolate_hf_env, llama_files, tiny_mixtral_files

from mixtral_chat.engine.errors import MixtralChatError, ModelNotFoundError
from mixtral_chat.engine.models import (
    catalog,
    download,
    entries,
    errors,
    hub_cache,
    progress,
    pull,
    registry,
    registry_file,
    removal,
    resolve,
)
from mixtral_chat.engine.units import format_bytes

REPO = "org/tiny"
SHARD1 = "model-00001-of-00002.safetensors"
CHUNK = 10 * 1024 * 1024  # huggingface_hub's download chunk: resumes start at a multiple of it
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return tiny_mixtral_files(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny_files: dict[str, bytes]) -> Path:
    directory = tmp_path_factory.mktemp("tiny-local")
    for name, data in tiny_files.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Isolated mixtral-chat home and Hugging Face cache, for this process and CLI subprocesses."""
    return isolate_hf_env(monkeypatch, tmp_path / "hf", MIXTRAL_CHAT_HOME=str(tmp_path / "home"))


@pytest.fixture
def server(env: dict[str, str], tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch):
    with HubServer() as srv:
        srv.add_repo(REPO, tiny_files)
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        env["HF_ENDPOINT"] = srv.endpoint
        yield srv


def run_cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "mixtral_chat.app.cli", *args],
        input="",
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def cli_in_process(capfd: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The same CLI entry point without a new interpreter, for commands that start no engine.

    The environment is this process's (the fixtures set it); mixtral-chat reads HF_HOME,
    HF_ENDPOINT and HF_TOKEN when a command runs, not at import.
    """
    from mixtral_chat.app.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("mixtral-chat: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def quant_available() -> bool:
    try:
        from mixtral_chat.quant import quantize_model_dir  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The CLI end to end.


def test_cli_pull_list_ask_rm(server: HubServer, env: dict[str, str], tiny_files, capfd):
    # Quantizing is covered in-process below (torch is already loaded there); this run stays light.
    pull_run = run_cli("models", "pull", REPO, "--no-quantize", env=env)
    assert pull_run.returncode == 0, pull_run.stderr
    # Not a terminal: plain lines without terminal codes; the download's last one is its 100%.
    assert "\r" not in pull_run.stderr and "\x1b" not in pull_run.stderr
    rows = [line for line in pull_run.stderr.splitlines() if line.startswith("downloading ")]
    assert rows and "ETA " in rows[0] and "elapsed " in rows[0]
    final = re.match(r"downloading  100\.0%  (\d.*? [kMG]?B) / (\d.*? [kMG]?B)  ", rows[-1])
    assert final and final[1] == final[2] and "ETA" not in rows[-1], rows
    assert {r.filename for r in server.gets()} >= {SHARD1, "tokenizer.model", "config.json"}

    listed = cli_in_process(capfd, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(e for e in json.loads(listed.stdout) if e["name"] == REPO)
    assert entry["is_default"] is True  # the first pulled model becomes the default
    assert entry["repo_id"] == REPO and entry["size_on_disk"] == sum(len(v) for v in tiny_files.values())
    snapshot = Path(entry["original_path"])
    assert (snapshot / SHARD1).read_bytes() == tiny_files[SHARD1]
    assert entry["status"] == "downloaded" and entry["path"] == entry["original_path"]

    table = cli_in_process(capfd, "models", "list")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if REPO in line)
    assert row.startswith("*") and entry["status"] in row

    ask = run_cli("ask", "--model", REPO, "hi", "--max-tokens", "4", env=env)
    assert ask.returncode == 0, ask.stderr

    info = cli_in_process(capfd, "models", "info", REPO)
    assert info.returncode == 0 and "2 layers, 4 experts (top-2)" in info.stdout
    use = cli_in_process(capfd, "models", "use", REPO)
    assert use.returncode == 0 and use.stdout.startswith(f"default model: {REPO} (")
    not_installed = cli_in_process(capfd, "models", "use", "mixtral-8x7b-instruct")
    assert not_installed.returncode == 1 and "models pull mixtral-8x7b-instruct" in error_line(not_installed)

    # rm forgets the model and deletes what mixtral-chat made (nothing here: no quantized copy); the
    # Hugging Face cache copy, which transformers shares, goes only with --hf-cache.
    size = entry["size_on_disk"]
    removed = cli_in_process(capfd, "models", "rm", REPO)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {REPO}: 0 B freed" in removed.stdout
    assert f"kept the Hugging Face cache copy at {snapshot} ({format_bytes(size)};" in removed.stdout
    assert (snapshot / SHARD1).read_bytes() == tiny_files[SHARD1]
    after = json.loads(cli_in_process(capfd, "models", "list", "--json").stdout)
    assert REPO not in [e["name"] for e in after]
    removed = cli_in_process(capfd, "models", "rm", REPO, "--hf-cache")
    assert removed.returncode == 0, removed.stderr
    assert f"{format_bytes(size)} freed" in removed.stdout
    assert not hub_cache.repo_storage_dir(REPO).exists()


def test_cli_errors_are_one_line_and_never_show_the_token(server: HubServer, tiny_files, capfd, monkeypatch):
    server.add_repo("gated/tiny", tiny_files, gated=True)
    server.valid_tokens.add("hf_valid_token_123")

    no_token = cli_in_process(capfd, "models", "pull", "gated/tiny", "--no-quantize")
    assert no_token.returncode == 1
    line = error_line(no_token)
    assert "gated" in line and "HF_TOKEN" in line and "hf auth login" in line

    monkeypatch.setenv("HF_TOKEN", "hf_secret_wrong_42")
    wrong = cli_in_process(capfd, "models", "pull", "gated/tiny", "--no-quantize")
    assert wrong.returncode == 1
    assert "token" in error_line(wrong)
    assert "hf_secret_wrong_42" not in wrong.stdout + wrong.stderr
    monkeypatch.delenv("HF_TOKEN")

    missing = cli_in_process(capfd, "models", "pull", "org/missing", "--no-quantize")
    assert missing.returncode == 1 and "repository org/missing not found" in error_line(missing)
    bad_rev = cli_in_process(capfd, "models", "pull", REPO, "--no-quantize", "--revision", "v2")
    assert bad_rev.returncode == 1 and "revision 'v2' not found" in error_line(bad_rev)
    demo = cli_in_process(capfd, "models", "rm", "demo")
    assert demo.returncode == 1 and "cannot be removed" in error_line(demo)
    assert server.gets() == []

    # A valid token works, and is not printed either.
    monkeypatch.setenv("HF_TOKEN", "hf_valid_token_123")
    good = cli_in_process(capfd, "models", "pull", "gated/tiny", "--no-quantize")
    assert good.returncode == 0, good.stderr
    assert "hf_valid_token_123" not in good.stdout + good.stderr


def test_cli_ctrl_c_stops_cleanly_and_the_next_pull_resumes(server: HubServer, env, tiny_files):
    release = server.stall(REPO, SHARD1, after_bytes=CHUNK + 1_000_000)
    full_env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    full_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixtral_chat.app.cli", "models", "pull", REPO, "--no-quantize"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    blobs = hub_cache.repo_storage_dir(REPO, Path(env["HF_HOME"]) / "hub") / "blobs"
    deadline = time.monotonic() + 60
    partial = None
    while time.monotonic() < deadline:
        found = [p for p in blobs.glob("*.incomplete")] if blobs.exists() else []
        if found and found[0].stat().st_size >= CHUNK:
            partial = found[0]
            break
        time.sleep(0.05)
    assert partial is not None, "the first 10 MB chunk never reached the disk"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    release.set()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "resume" in stderr
    assert partial.stat().st_size == CHUNK

    server.clear_log()
    again = run_cli("models", "pull", REPO, "--no-quantize", env=env)
    assert again.returncode == 0, again.stderr
    assert [g.range for g in server.gets(REPO, SHARD1)] == [f"bytes={CHUNK}-"]
    snapshot = hub_cache.find_cached_snapshot(REPO, "main", Path(env["HF_HOME"]) / "hub")
    assert snapshot is not None and (snapshot / SHARD1).read_bytes() == tiny_files[SHARD1]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_cli_ctrl_c_on_a_terminal_stops_the_bar_before_the_message(server: HubServer, env):
    from tests.terminal_session import ANSI, ERASE_LINE, PARTIAL_BAR, SHOW_CURSOR, run_on_a_terminal

    release = server.stall(REPO, SHARD1, after_bytes=CHUNK + 1_000_000)
    blobs = hub_cache.repo_storage_dir(REPO, Path(env["HF_HOME"]) / "hub") / "blobs"

    def a_chunk_is_on_disk_and_drawn(terminal: str) -> bool:
        found = list(blobs.glob("*.incomplete")) if blobs.exists() else []
        return bool(found) and found[0].stat().st_size >= CHUNK and "downloading" in terminal

    try:
        run = run_on_a_terminal(
            ["-m", "mixtral_chat.app.cli", "models", "pull", REPO, "--no-quantize"],
            env={**env, "HF_TOKEN": ""},
            interrupt_when=a_chunk_is_on_disk_and_drawn,
        )
    finally:
        release.set()
    assert run.returncode == 130, run.terminal
    said = f"mixtral-chat: interrupted; run `mixtral-chat models pull {REPO}` again to resume\r\n"
    assert run.terminal.endswith(said)
    before = run.terminal[: -len(said)]
    assert before.endswith(SHOW_CURSOR)  # the display stopped, the cursor shown, then the message
    last_row = ANSI.sub("", before.rsplit(ERASE_LINE, 1)[1]).strip()
    assert re.match(rf"downloading +{PARTIAL_BAR} +\d+\.\d% ", last_row) and "100.0%" not in last_row


# ---------------------------------------------------------------------------------------------
# The Python API the settings screen uses.


def test_pull_api_reports_progress_and_status_and_can_be_cancelled(server: HubServer, tiny_files):
    release = server.stall(REPO, SHARD1, after_bytes=CHUNK + 1_000_000)
    cancel = threading.Event()
    reports: list[progress.PullProgress] = []
    outcome: list[BaseException] = []

    def worker() -> None:
        try:
            pull.pull_model(REPO, quantize=False, progress=reports.append, cancel=cancel)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(r.bytes_done >= CHUNK for r in reports):
        time.sleep(0.05)
    assert registry.get_model(REPO).status == entries.DOWNLOADING
    cancel.set()
    release.set()
    thread.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], errors.DownloadCancelled)
    assert all(r.phase == "download" and r.bytes_total == reports[0].bytes_total for r in reports)

    entry = registry.get_model(REPO)
    assert entry.status == entries.PARTIAL and entry.partial_bytes >= CHUNK
    with pytest.raises(ModelNotFoundError, match="interrupted; pulling resumes it"):
        resolve.resolve_model(REPO)

    reports.clear()
    entry = pull.pull_model(REPO, quantize=False, progress=reports.append)
    assert entry.status == entries.DOWNLOADED and entry.is_default
    assert reports[-1].bytes_done == reports[-1].bytes_total and reports[-1].eta_s == 0.0
    resolved = resolve.resolve_model(None)
    assert resolved.name == REPO and not resolved.is_demo
    assert (resolved.path / SHARD1).read_bytes() == tiny_files[SHARD1]
    assert resolve.resolve_model(REPO.upper()).path == resolved.path  # repo ids are case-insensitive


@pytest.mark.skipif(not quant_available(), reason="mixtral_chat.quant.quantize_model_dir not available")
def test_pull_quantizes_and_can_drop_the_original(server: HubServer, capfd, monkeypatch):
    reports: list[progress.PullProgress] = []
    entry = pull.pull_model(REPO, scheme="int4", keep_original=False, progress=reports.append)
    assert entry.status == entries.QUANTIZED and entry.scheme == "int4" and entry.group_size == 64
    assert entry.original_path is None and entry.path == entry.quantized_path
    assert entry.path == registry_file.models_dir() / "org--tiny-int4"
    assert (entry.path / "quant_config.json").is_file()
    assert {r.phase for r in reports} == {"download", "quantize"}
    assert reports[-1].phase == "quantize" and reports[-1].bytes_done == reports[-1].bytes_total
    assert hub_cache.find_cached_snapshot(REPO, "main") is None  # the bf16 original was deleted
    assert resolve.resolve_model(REPO).path == entry.path

    listed = cli_in_process(capfd, "models", "list")
    row = next(line for line in listed.stdout.splitlines() if REPO in line)
    assert row.split()[:4] == ["*", REPO, "quantized", format_bytes(entry.size_on_disk).split()[0]]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `ask` reads piped stdin
    ask = cli_in_process(capfd, "ask", "--model", REPO, "hi", "--max-tokens", "4", "--device", "cpu")
    assert ask.returncode == 0, ask.stderr

    # Pulling again changes nothing: the quantized model is there, the original is not needed.
    server.clear_log()
    again = pull.pull_model(REPO)
    assert again.path == entry.path and again.status == entries.QUANTIZED
    assert server.requests == []


@pytest.mark.skipif(
    not quant_available() or not hasattr(os, "openpty"), reason="needs the quantizer and a pty"
)
def test_cli_pull_draws_a_rich_row_per_phase_on_a_terminal(server: HubServer, env: dict[str, str]):
    from tests.terminal_session import BAR, SHOW_CURSOR, run_on_a_terminal

    run = run_on_a_terminal(
        ["-m", "mixtral_chat.app.cli", "models", "pull", REPO, "--scheme", "int4"], env=env
    )
    assert run.returncode == 0, run.terminal
    assert f"{REPO}: int4 model at " in run.stdout and "\x1b" not in run.stdout  # stdout: no display
    assert run.terminal.rstrip("\r\n").endswith(SHOW_CURSOR)
    downloading, quantizing = run.final_frame()  # the download's row stays above the quantizing one
    for row, label in ((downloading, "downloading"), (quantizing, "quantizing")):
        final = re.match(rf"{label} +{BAR}+ 100\.0% (\d.*? [kMG]?B) / (\d.*? [kMG]?B) ", row)
        assert final and final[1] == final[2] and "ETA" not in row and "elapsed " in row, row


@pytest.mark.skipif(
    not quant_available() or not hasattr(os, "openpty"), reason="needs the quantizer and a pty"
)
def test_cli_pull_offers_to_delete_the_originals_on_a_terminal(server: HubServer, capfd, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal: no question, originals kept
    piped = cli_in_process(capfd, "models", "pull", REPO, "--scheme", "int4")
    assert piped.returncode == 0, piped.stderr
    assert "Delete" not in piped.stdout and "quantizing" in piped.stderr
    assert registry.get_model(REPO).original_path is not None

    controller, terminal = os.openpty()
    with os.fdopen(terminal, "r", encoding="utf-8") as tty_stdin:
        os.write(controller, b"\x04")  # Ctrl+D at the question: end of input means no
        monkeypatch.setattr("sys.stdin", tty_stdin)
        ended = cli_in_process(capfd, "models", "pull", REPO, "--scheme", "int4")
    os.close(controller)
    assert ended.returncode == 0, ended.stderr
    assert "Delete the bf16 originals" in ended.stdout and "EOFError" not in ended.stderr
    assert registry.get_model(REPO).original_path is not None

    controller, terminal = os.openpty()
    with os.fdopen(terminal, "r", encoding="utf-8") as tty_stdin:
        os.write(controller, b"y\n")  # the user's answer, typed ahead
        monkeypatch.setattr("sys.stdin", tty_stdin)
        pulled = cli_in_process(capfd, "models", "pull", REPO, "--scheme", "int4")
    os.close(controller)
    assert pulled.returncode == 0, pulled.stderr
    assert "Delete the bf16 originals" in pulled.stdout and "deleted the originals:" in pulled.stdout
    entry = registry.get_model(REPO)
    assert entry.status == entries.QUANTIZED and entry.original_path is None
    assert hub_cache.find_cached_snapshot(REPO, "main") is None


def test_disk_space_refusal_counts_download_and_quantized_copy(server: HubServer, tiny_files, monkeypatch):
    download_size = sum(len(data) for data in tiny_files.values())
    free = download_size + 1_000_000  # the download fits, download + 4-bit copy does not
    monkeypatch.setattr(download, "free_disk_bytes", lambda path: free)
    if quant_available():
        with pytest.raises(errors.InsufficientDiskSpaceError) as info:
            pull.pull_model(REPO, scheme="int4")
        message = str(info.value)
        weights = (
            download_size - len(tiny_files["config.json"]) - len(tiny_files["model.safetensors.index.json"])
        )
        assert f"{format_bytes(weights)} to download" in message and "for the 4-bit copy" in message
        assert f"{format_bytes(free)} free" in message
        assert {r.filename for r in server.gets()} == {"config.json", "model.safetensors.index.json"}
        assert REPO not in [e.name for e in registry.list_models()]
    entry = pull.pull_model(REPO, quantize=False)
    assert entry.status == entries.DOWNLOADED


def test_unsupported_architecture_is_refused_before_the_weights(server: HubServer, tmp_path: Path):
    server.add_repo("org/llama", llama_files())
    with pytest.raises(errors.UnsupportedArchitectureError, match="unsupported architecture 'llama'"):
        pull.pull_model("org/llama", quantize=False)
    assert server.gets("org/llama", "model.safetensors") == []
    assert "org/llama" not in [e.name for e in registry.list_models()]

    local = tmp_path / "llama"
    local.mkdir()
    for name, data in llama_files().items():
        (local / name).write_bytes(data)
    with pytest.raises(errors.UnsupportedArchitectureError):
        registry.add_model(str(local))
    with pytest.raises(errors.UnsupportedArchitectureError):
        resolve.resolve_model(str(local))


def test_rm_of_an_interrupted_pull_frees_the_partial_files(server: HubServer):
    cancel = threading.Event()

    def on_progress(p: progress.PullProgress) -> None:
        if p.bytes_done > CHUNK:
            cancel.set()

    with pytest.raises(errors.DownloadCancelled):
        pull.pull_model(REPO, quantize=False, progress=on_progress, cancel=cancel)
    entry = registry.get_model(REPO)
    assert entry.status == entries.PARTIAL and entry.size_on_disk >= CHUNK
    kept = removal.remove_model(REPO)  # the partial files are in the Hugging Face cache: kept
    assert kept.freed == 0 and kept.hf_cache_kept is not None
    assert (
        kept.hf_cache_kept.size == entry.size_on_disk and hub_cache.partial_bytes(REPO) == entry.partial_bytes
    )
    assert removal.remove_model(REPO, delete_hf_cache=True).freed == entry.size_on_disk
    assert not hub_cache.repo_storage_dir(REPO).exists()
    assert REPO not in [e.name for e in registry.list_models()]


def test_hub_repos_can_be_added_before_pulling(server: HubServer):
    server.add_repo("org/llama", llama_files())
    with pytest.raises(errors.UnsupportedArchitectureError):
        registry.add_model("org/llama")
    entry = registry.add_model(REPO, name="tiny")
    assert entry.status == entries.NOT_DOWNLOADED and entry.repo_id == REPO and entry.source == "hub"
    assert {r.filename for r in server.gets()} == {"config.json"}
    assert not hub_cache.repo_storage_dir(REPO).exists()  # validating the config left nothing in the cache
    with pytest.raises(errors.RegistryError, match="already known as 'tiny'"):
        registry.add_model(REPO)
    assert pull.pull_model("tiny", quantize=False).status == entries.DOWNLOADED
    assert resolve.resolve_model(REPO).name == "tiny"


# ---------------------------------------------------------------------------------------------
# Resolving names, local models, the registry file.


def test_resolve_model_specs(server: HubServer, tiny_dir: Path):
    demo = catalog.demo_dir()
    if (demo / "config.json").is_file():
        assert resolve.resolve_model(None).is_demo
    else:
        with pytest.raises(ModelNotFoundError, match="no model is installed"):
            resolve.resolve_model(None)
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        resolve.resolve_model("nope")
    with pytest.raises(ModelNotFoundError, match=r"run `mixtral-chat models pull mixtral-8x7b-instruct`"):
        resolve.resolve_model("mixtral-8x7b-instruct")
    with pytest.raises(
        ModelNotFoundError, match=r"'org/tiny' is not installed; run `mixtral-chat models pull"
    ):
        resolve.resolve_model(REPO)

    local = resolve.resolve_model(str(tiny_dir))
    assert local.path == tiny_dir.resolve() and not local.is_demo and local.source == "local"

    # A model some other tool put in the hub cache resolves by repo id without a pull.
    download.download_model_files(REPO)
    cached = resolve.resolve_model(REPO)
    assert cached.path == hub_cache.find_cached_snapshot(REPO, "main")
    assert REPO not in [e.name for e in registry.list_models()]  # not registered...
    assert registry.set_default(REPO).is_default  # ...until chosen as the default
    assert resolve.resolve_model(None).path == cached.path
    with pytest.raises(MixtralChatError, match="not installed"):
        registry.set_default("mixtral-8x7b")


def test_local_models_are_added_used_and_forgotten_but_never_deleted(env, tiny_dir: Path, capfd):
    added = cli_in_process(capfd, "models", "add", str(tiny_dir), "--name", "my-tiny")
    assert added.returncode == 0 and added.stdout.strip() == f"added my-tiny: {tiny_dir.resolve()}"
    entry = registry.get_model("my-tiny")
    assert entry.status == entries.LOCAL and entry.path == tiny_dir.resolve()
    with pytest.raises(errors.RegistryError, match="already registered as 'my-tiny'"):
        registry.add_model(str(tiny_dir), name="other")
    with pytest.raises(errors.RegistryError, match="invalid model name"):
        registry.add_model(str(tiny_dir), name="bad/name")

    assert registry.set_default("my-tiny").is_default
    assert resolve.resolve_model(None).path == tiny_dir.resolve()
    assert registry.model_info("my-tiny").architecture["experts"] == 4

    removed = cli_in_process(capfd, "models", "rm", "my-tiny")
    assert removed.returncode == 0 and "were left in place" in removed.stdout
    assert (tiny_dir / SHARD1).is_file()  # the user's files stay
    assert "my-tiny" not in [e.name for e in registry.list_models()]

    with pytest.raises(errors.RegistryError, match="cannot be removed"):
        removal.remove_model("demo")
    with pytest.raises(errors.RegistryError, match="nothing to download"):
        pull.pull_model("demo")


def test_corrupt_registry_file_is_reported_and_left_alone(env, capfd):
    path = registry_file.registry_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(errors.RegistryError, match=r"models\.json is unreadable"):
        registry.list_models()
    result = cli_in_process(capfd, "models", "list")
    assert result.returncode == 1 and "models.json is unreadable" in error_line(result)
    assert path.read_text(encoding="utf-8") == "{not json"


def test_a_prequantized_bitsandbytes_repo_is_used_as_it_is(server: HubServer, tiny_dir: Path, tmp_path: Path):
    """A repo transformers saved 4-bit: pulled, never re-quantized, loaded and answered from."""
    import torch
    from transformers import BitsAndBytesConfig, MixtralForCausalLM

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = MixtralForCausalLM.from_pretrained(tiny_dir, quantization_config=config, device_map="cpu")
    saved = tmp_path / "bnb"
    model.save_pretrained(saved)
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    files["tokenizer.model"] = (tiny_dir / "tokenizer.model").read_bytes()
    server.add_repo("org/tiny-bnb-4bit", files)

    entry = pull.pull_model("org/tiny-bnb-4bit")
    assert entry.quantized_path is None and entry.path == entry.original_path
    assert entry.scheme == "nf4 (bitsandbytes)"
    assert not (registry_file.models_dir() / "org--tiny-bnb-4bit-int4").exists()
    from mixtral_chat.engine.options import GenerationConfig, LoadOptions
    from mixtral_chat.engine.runtime import Engine

    (saved / "tokenizer.model").write_bytes(files["tokenizer.model"])
    messages, config = [{"role": "user", "content": "hi"}], GenerationConfig(max_tokens=6)
    engine = Engine.load(entry.path, LoadOptions(device="cpu"))
    assert engine.info.scheme == "nf4 (bitsandbytes)"
    stream = engine.chat(messages, config)
    answer = "".join(stream)
    assert stream.stats is not None and stream.stats.completion_tokens > 0
    assert answer == "".join(Engine.load(saved, LoadOptions(device="cpu")).chat(messages, config))
