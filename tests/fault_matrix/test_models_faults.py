"""Fault rows for `mixtral-chat models` and the model registry (engine/models/).

- `models rm` deletes only what mixtral-chat made (registry entry, quantized copy); the Hugging Face
  cache copy, which transformers and other hub clients share, goes only with `--hf-cache` or a
  "y" on a terminal, and then through huggingface_hub's own `scan_cache_dir().delete_revisions()`,
  never removing a blob another cached repo's snapshot reads.
- A models.json entry of the wrong type is one line naming the file and the entry; a damaged
  models.json does not block `ask --model <dir>`.
- A default model whose quantized copy is gone is an error naming the command to redo it, not a
  silent run of the float original.

Real parts only: a local hub server (tests/hub_server.py) spoken to by huggingface_hub's own
`snapshot_download`, real files, the real CLI in a subprocess where the row is about CLI output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_models
from hub_server import HubServer
from test_models import cli_in_process, run_cli

from mixtral_chat.engine.models import hub_cache, pull, registry, registry_file, resolve
from mixtral_chat.engine.units import format_bytes

REPO = "org/tiny"
TWIN = "other/tiny-twin"  # the same files under another repo id: blobs two repos can share
SHARD1 = "model-00001-of-00002.safetensors"
REPO_ROOT = Path(__file__).resolve().parents[2]

# test_models' fixtures: an isolated mixtral-chat home and Hugging Face cache; the tiny repo's files.
env = test_models.env
tiny_files = test_models.tiny_files


@pytest.fixture
def server(env: dict[str, str], tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch):
    with HubServer() as srv:
        srv.add_repo(REPO, tiny_files)
        srv.add_repo(TWIN, tiny_files)
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        env["HF_ENDPOINT"] = srv.endpoint
        yield srv


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line, and nothing else on stderr (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixtral-chat: error: "), result.stderr
    return lines[0]


def hf_fetch(repo_id: str, endpoint: str) -> Path:
    """What transformers does: huggingface_hub's own snapshot_download into the standard cache."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, endpoint=endpoint, cache_dir=hub_cache.hub_cache_dir()))


def snapshot_bytes(snapshot: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(snapshot.iterdir())}


def assert_intact(snapshot: Path, expected: dict[str, bytes]) -> None:
    """Every file of another tool's snapshot still readable, byte for byte, through huggingface_hub."""
    from huggingface_hub import hf_hub_download

    assert snapshot_bytes(snapshot) == expected
    repo_id = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
    for name, data in expected.items():
        path = hf_hub_download(
            repo_id, name, revision=snapshot.name, cache_dir=hub_cache.hub_cache_dir(), local_files_only=True
        )
        assert Path(path).read_bytes() == data


def cached_repo_ids() -> set[str]:
    from huggingface_hub import scan_cache_dir

    return {repo.repo_id for repo in scan_cache_dir(hub_cache.hub_cache_dir()).repos if repo.revisions}


# ---------------------------------------------------------------------------------------------
# `models rm` and a repo huggingface_hub fetched itself.


def test_rm_keeps_the_hf_cache_copy_of_a_repo_huggingface_hub_fetched(server: HubServer, env, tiny_files):
    snapshot = hf_fetch(REPO, server.endpoint)
    before = snapshot_bytes(snapshot)
    assert before == tiny_files
    server.clear_log()

    pull_run = run_cli("models", "pull", REPO, "--no-quantize", env=env)
    assert pull_run.returncode == 0, pull_run.stderr
    assert server.gets() == []  # reused, not downloaded again

    removed = run_cli("models", "rm", REPO, env=env)
    assert removed.returncode == 0, removed.stderr
    assert removed.stderr == ""
    size = format_bytes(sum(len(data) for data in tiny_files.values()))
    assert removed.stdout.splitlines() == [
        f"removed {REPO}: 0 B freed",
        f"kept the Hugging Face cache copy at {snapshot} ({size}; transformers and other tools use it); "
        f"delete it with `mixtral-chat models rm {REPO} --hf-cache`",
    ]
    assert "Also delete" not in removed.stdout  # no terminal: nobody to ask, so keep
    assert_intact(snapshot, before)
    assert REPO in cached_repo_ids()
    assert REPO not in [e.name for e in registry.list_models()]

    both = run_cli("models", "rm", REPO, "--hf-cache", "--keep-hf-cache", env=env)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert_intact(snapshot, before)

    # Asked for by name: huggingface_hub's own deletion removes it.
    gone = run_cli("models", "rm", REPO, "--hf-cache", env=env)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.splitlines()[:2] == [
        f"removed {REPO}: {size} freed",
        f"  Hugging Face cache copy: {size}",
    ]
    assert REPO not in cached_repo_ids() and not hub_cache.repo_storage_dir(REPO).exists()
    again = run_cli("models", "rm", REPO, env=env)
    assert again.returncode == 1 and f"unknown model '{REPO}'" in error_line(again)


def test_rm_deletes_only_the_quantized_copy_mixtral_chat_made(server: HubServer, env, tiny_files):
    snapshot = hf_fetch(REPO, server.endpoint)
    before = snapshot_bytes(snapshot)
    entry = pull.pull_model(REPO, scheme="int4")
    quantized = entry.quantized_path
    assert quantized is not None and (quantized / "quant_config.json").is_file()
    quantized_size = hub_cache.directory_size(quantized)

    removed = run_cli("models", "rm", REPO, "--keep-hf-cache", env=env)
    assert removed.returncode == 0, removed.stderr
    lines = removed.stdout.splitlines()
    assert lines[:2] == [
        f"removed {REPO}: {format_bytes(quantized_size)} freed",
        f"  quantized copy: {format_bytes(quantized_size)}",
    ]
    assert lines[2].startswith(f"kept the Hugging Face cache copy at {snapshot} (")
    assert not quantized.exists()
    assert_intact(snapshot, before)
    assert REPO not in [e.name for e in registry.list_models()]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
@pytest.mark.parametrize(
    ("typed", "deleted"), [(b"\n", False), (b"\x04", False), (b"no\n", False), (b"y\n", True)]
)
def test_rm_asks_on_a_terminal_and_the_default_is_keep(
    server: HubServer, capfd, monkeypatch, typed: bytes, deleted: bool
):
    snapshot = hf_fetch(REPO, server.endpoint)
    before = snapshot_bytes(snapshot)
    pull.pull_model(REPO, quantize=False)
    controller, terminal = os.openpty()
    with os.fdopen(terminal, "r", encoding="utf-8") as tty_stdin:
        os.write(controller, typed)  # the user's answer, typed ahead (Ctrl+D: end of input)
        monkeypatch.setattr("sys.stdin", tty_stdin)
        removed = cli_in_process(capfd, "models", "rm", REPO)
    os.close(controller)
    assert removed.returncode == 0, removed.stderr
    size = format_bytes(sum(len(data) for data in before.values()))
    assert removed.stdout.startswith(
        f"Also delete the Hugging Face cache copy ({size}, shared with other tools) at {snapshot}? [y/N] "
    )
    assert REPO not in [e.name for e in registry.list_models()]
    if deleted:
        assert f"removed {REPO}: {size} freed" in removed.stdout
        assert not hub_cache.repo_storage_dir(REPO).exists()
    else:
        assert (
            f"removed {REPO}: 0 B freed" in removed.stdout and "kept the Hugging Face cache" in removed.stdout
        )
        assert_intact(snapshot, before)


# ---------------------------------------------------------------------------------------------
# Two repos sharing a blob.


def _share_blobs(cache: Path, *repo_ids: str) -> None:
    """Move every blob of these repos into huggingface_hub 2.4's cache-wide shared store, with
    huggingface_hub's own function (what it does after a Xet download): one payload per content,
    each repo's `blobs/<etag>` a symlink to it, listed in the payload's reference manifest."""
    from huggingface_hub.utils._shared_blobs import publish_blob_to_shared_store

    for repo_id in repo_ids:
        for blob in sorted((hub_cache.repo_storage_dir(repo_id, cache) / "blobs").iterdir()):
            content = blob.read_bytes()
            assert publish_blob_to_shared_store(
                blob_path=str(blob),
                xet_hash=hashlib.sha256(content).hexdigest(),
                cache_dir=cache,
                expected_size=len(content),
            )


def _unlisted_store_link(cache: Path, repo_id: str) -> None:
    """Point the repo's blobs at the shared store without a manifest entry (as a copy tool or
    another client may leave them): huggingface_hub's sweep would take the payload."""
    from huggingface_hub.utils._shared_blobs import shared_blob_path

    for blob in sorted((hub_cache.repo_storage_dir(repo_id, cache) / "blobs").iterdir()):
        store = shared_blob_path(cache, hashlib.sha256(blob.read_bytes()).hexdigest())
        assert store.is_file()
        blob.unlink()
        os.symlink(os.path.relpath(store, blob.parent), blob)


def _cross_repo_links(cache: Path, repo_id: str, into: str) -> None:
    """Make `repo_id`'s snapshot files symlinks to `into`'s blobs (a deduplicated cache)."""
    snapshot = hub_cache.find_cached_snapshot(repo_id, "main", cache)
    assert snapshot is not None
    for file in sorted(snapshot.iterdir()):
        target = Path(os.path.realpath(file))
        shared = hub_cache.repo_storage_dir(into, cache) / "blobs" / target.name
        assert shared.is_file()
        file.unlink()
        os.symlink(os.path.relpath(shared, file.parent), file)
    shutil.rmtree(hub_cache.repo_storage_dir(repo_id, cache) / "blobs")


@pytest.mark.parametrize("layout", ["shared store", "shared store, unlisted reference", "cross-repo links"])
def test_rm_hf_cache_never_deletes_a_blob_another_repo_reads(server: HubServer, env, layout: str):
    cache = hub_cache.hub_cache_dir()
    pulled = pull.pull_model(REPO, quantize=False)  # ours
    twin = hf_fetch(TWIN, server.endpoint)  # another tool's, same contents
    ours = pulled.original_path
    assert ours is not None
    if layout == "shared store":
        _share_blobs(cache, REPO, TWIN)
    elif layout == "shared store, unlisted reference":
        _share_blobs(cache, REPO)
        _unlisted_store_link(cache, TWIN)
    else:
        _cross_repo_links(cache, TWIN, into=REPO)
    twin_files = snapshot_bytes(twin)
    assert twin_files == snapshot_bytes(ours)

    # What huggingface_hub's deletion alone does to the twin, on a copy of this cache.
    copy = Path(env["HF_HOME"]).parent / "hub-copy"
    shutil.copytree(cache, copy, symlinks=True)
    from huggingface_hub import scan_cache_dir

    scan_cache_dir(copy).delete_revisions(pulled.commit).execute()
    twin_copy = copy / twin.relative_to(cache)
    broken = [f.name for f in twin_copy.iterdir() if not f.is_file()]
    if layout == "shared store":
        assert broken == []  # huggingface_hub keeps a payload its manifest says the twin uses
    else:
        assert broken  # huggingface_hub would break the twin: mixtral-chat must not

    removed = run_cli("models", "rm", REPO, "--hf-cache", env=env)
    assert removed.returncode == 0, removed.stderr
    assert removed.stderr == ""
    assert_intact(twin, twin_files)
    assert TWIN in cached_repo_ids() and REPO not in cached_repo_ids()
    assert not ours.exists()
    kept_lines = [line for line in removed.stdout.splitlines() if "another cached repo links to it" in line]
    if layout == "shared store":
        assert kept_lines == []
        assert not hub_cache.repo_storage_dir(REPO).exists()
    else:
        assert len(kept_lines) == len(twin_files)
        assert all(Path(line.split()[1].rstrip(":")).is_file() for line in kept_lines)
    assert removed.stdout.startswith(f"removed {REPO}: ")


# ---------------------------------------------------------------------------------------------
# models.json problems.

REGISTRY_FAULTS = [
    ('{"version": 1, "models": {"mine": "oops"}}', "entry 'mine' must be a JSON object, not a string"),
    (
        '{"version": 1, "models": {"mine": {"source": "local", "path": 5}}}',
        "entry 'mine' has 'path' a number (5) where a string belongs",
    ),
    (
        '{"version": 1, "models": {"org/x": {"source": "hub", "repo_id": "org/x", "group_size": "64"}}}',
        "entry 'org/x' has 'group_size' a string ('64') where a number belongs",
    ),
    (
        '{"version": 1, "models": {"mine": {"source": "local"}}}',
        "entry 'mine' is a local model without a 'path'",
    ),
    ('{"version": 1, "default": ["mine"], "models": {}}', "'default' must be a model name, not a list"),
]


def write_registry(text: str) -> Path:
    path = registry_file.registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "message"), REGISTRY_FAULTS)
def test_a_registry_entry_of_the_wrong_type_is_one_line_naming_file_and_entry(env, text: str, message: str):
    path = write_registry(text)
    for command in (["models", "list"], ["models", "rm", "mine"], ["ask", "hi"]):
        result = run_cli(*command, env=env)
        assert result.returncode == 1, (command, result.stderr)
        line = error_line(result)
        assert line.startswith(f"mixtral-chat: error: {path}: {message}; fix or "), line
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert path.read_text(encoding="utf-8") == text  # left as it was for the user to fix


@pytest.mark.parametrize("text", ["{not json", REGISTRY_FAULTS[1][0]], ids=["not json", "wrong type"])
def test_a_damaged_registry_does_not_block_ask_with_a_model_directory(
    env, tiny_model_dir: Path, tmp_path: Path, text: str
):
    path = write_registry(text)
    model = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, model)
    files = snapshot_bytes(model)
    for spec, in_tmp in ((str(model), False), ("my-model", True)):  # a path; a bare directory name
        args = ["ask", "--model", spec, "hi", "--max-tokens", "3", "--device", "cpu", "--temperature", "0"]
        result = subprocess.run(
            [sys.executable, "-m", "mixtral_chat.app.cli", *args],
            input="",
            capture_output=True,
            text=True,
            env={**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, **env},
            timeout=180,
            cwd=tmp_path if in_tmp else REPO_ROOT,
        )
        assert result.returncode == 0, result.stderr
        assert "error" not in result.stderr and result.stdout.strip() != ""
    # A name still needs the registry: the same one line as before.
    named = run_cli("ask", "--model", "mine", "hi", env=env)
    assert named.returncode == 1 and str(path) in error_line(named)
    assert path.read_text(encoding="utf-8") == text
    assert snapshot_bytes(model) == files


# ---------------------------------------------------------------------------------------------
# The default model's quantized copy is missing.


def test_a_missing_quantized_copy_of_the_default_model_is_reported_not_replaced(server: HubServer, env):
    entry = pull.pull_model(REPO, scheme="int4")
    assert entry.is_default and entry.quantized_path is not None and entry.original_path is not None
    original = snapshot_bytes(entry.original_path)
    shutil.rmtree(entry.quantized_path)  # e.g. the user cleaned the data folder

    asked = run_cli("ask", "hi", "--max-tokens", "3", "--device", "cpu", env=env)
    assert asked.returncode == 1
    assert asked.stdout == ""  # the float original did not answer instead
    assert error_line(asked) == (
        f"mixtral-chat: error: model '{REPO}': its int4 quantized copy {entry.quantized_path} is missing; "
        f"run `mixtral-chat models pull {REPO} --scheme int4` to quantize it again "
        f"(or run the float original with `--model {entry.original_path}`)"
    )
    by_name = run_cli("ask", "--model", REPO, "hi", env=env)
    assert by_name.returncode == 1 and "quantized copy" in error_line(by_name)
    assert snapshot_bytes(entry.original_path) == original

    # The command it names redoes it.
    server.clear_log()
    redo = run_cli("models", "pull", REPO, "--scheme", "int4", env=env)
    assert redo.returncode == 0, redo.stderr
    assert server.gets() == []  # quantized again from the cached original
    assert resolve.resolve_model(None).path == entry.quantized_path


# ---------------------------------------------------------------------------------------------
# The settings screen's Delete follows the same rules.


def test_settings_delete_keeps_the_hf_cache_copy_unless_the_box_is_ticked(
    server: HubServer, tiny_model_dir: Path
):
    import asyncio
    import time

    pytest.importorskip("textual")
    from textual.widgets import Checkbox

    from mixtral_chat.app.chat_app import ChatApp
    from mixtral_chat.app.screens.dialogs import DeleteModelScreen
    from mixtral_chat.app.screens.settings import SettingsScreen
    from mixtral_chat.app.settings import Settings
    from mixtral_chat.app.storage import Storage

    snapshot = hf_fetch(REPO, server.endpoint)
    before = snapshot_bytes(snapshot)
    pull.pull_model(REPO, quantize=False)
    settings = Settings()
    settings.engine.device = "cpu"
    app = ChatApp(Storage(), settings, model=str(tiny_model_dir))

    async def wait_for(condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(lambda: app.model_status.state in ("ready", "failed"), "the model to load")
            await pilot.press("f3")
            await wait_for(lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            screen = app.screen
            assert isinstance(screen, SettingsScreen)

            async def open_delete() -> DeleteModelScreen:
                screen.refresh_models()
                screen.models_table.move_cursor(row=screen.models_table.get_row_index(REPO))
                await pilot.pause()
                await pilot.click("#delete-model")
                await wait_for(lambda: isinstance(app.screen, DeleteModelScreen), "the delete dialog")
                dialog = app.screen
                assert isinstance(dialog, DeleteModelScreen)
                question = str(dialog.query_one(".dialog-question").render())
                assert "frees about 0 B" in question and "is kept unless you tick the box" in question
                assert dialog.query_one("#delete-hf-cache", Checkbox).value is False
                return dialog

            # Enter: the focused button is Cancel; nothing changes.
            await open_delete()
            await pilot.press("enter")
            await wait_for(lambda: isinstance(app.screen, SettingsScreen), "the dialog to close")
            assert REPO in [e.name for e in registry.list_models()]

            # Delete without ticking the box: forgotten, the Hugging Face cache copy kept.
            await open_delete()
            await pilot.press("y")
            await wait_for(lambda: REPO not in screen.entries, "the model to be forgotten")
            assert any("Kept its Hugging Face cache copy" in n.message for n in app._notifications)
            assert_intact(snapshot, before)

            # Ticked: huggingface_hub's deletion removes the cache copy too.
            pull.pull_model(REPO, quantize=False)
            await open_delete()
            await pilot.click("#delete-hf-cache")
            await wait_for(lambda: app.screen.delete_hf_cache, "the box to be ticked")
            await pilot.press("y")
            await wait_for(lambda: not hub_cache.repo_storage_dir(REPO).exists(), "the cache copy to go")
            assert REPO not in cached_repo_ids() and REPO not in screen.entries

    asyncio.run(scenario())
