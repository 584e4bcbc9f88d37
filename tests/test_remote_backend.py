"""`mixtral-chat ask --backend URL` against a real `mixtral-chat serve` subprocess over HTTP: the
same text as the local engine, the model list from /v1/models, and one line for each failure,
with the partial answer kept."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixtral_chat.engine.models.catalog import demo_dir
from mixtral_chat.engine.tokenizer import Tokenizer
from tests.conftest import run_cli, save_tiny_checkpoint
from tests.serve_process import ServeProcess

PROMPTS = ["What is a lighthouse?", "Hi"]
KEY_ENV = "TEST_BACKEND_KEY"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote-home")


@pytest.fixture(scope="module")
def api_key() -> str:
    return "sk-test-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def server(home: Path, api_key: str) -> Iterator[ServeProcess]:
    process = ServeProcess([], env={"MIXTRAL_CHAT_HOME": str(home), "MIXTRAL_CHAT_API_KEY": api_key})
    yield process
    process.stop()


def ask(home: Path, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"MIXTRAL_CHAT_HOME": str(home), **({KEY_ENV: key} if key else {})}
    return run_cli("ask", *args, env=env)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ask_backend_answers_as_the_local_engine_does(
    home: Path, server: ServeProcess, api_key: str, prompt: str
) -> None:
    local = ask(home, "--json", prompt)
    remote = ask(home, "--json", "--backend", server.base_url, "--api-key-env", KEY_ENV, prompt, key=api_key)
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    local_answer, remote_answer = json.loads(local.stdout), json.loads(remote.stdout)
    assert remote_answer["text"] == local_answer["text"] != ""
    assert remote_answer["usage"] == local_answer["usage"]  # the server's usage counts
    assert remote_answer["model"] == "demo" and remote_answer["backend"] == server.base_url
    assert remote_answer["finish_reason"] == "stop"
    # Stored as a chat of its own, as the local answer was: both say which.
    assert remote_answer["conversation_id"] == local_answer["conversation_id"] + 1

    streamed = ask(home, "--backend", server.base_url, "--api-key-env", KEY_ENV, prompt, key=api_key)
    assert streamed.stdout == local_answer["text"] + "\n"


def test_stats_are_measured_on_the_client(home: Path, server: ServeProcess, api_key: str) -> None:
    result = ask(home, "--stats", "--backend", server.base_url, "--api-key-env", KEY_ENV, "Hi", key=api_key)
    assert result.returncode == 0, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    # The served demo's own count of the chat prompt's tokens.
    tokenizer = Tokenizer(demo_dir() / "tokenizer.model")
    prompt_tokens = len(tokenizer.encode_chat([{"role": "user", "content": "Hi"}]))
    assert line.startswith(f"mixtral-chat: {prompt_tokens} prompt + ") and line.endswith(" tok/s, stop"), line


def test_the_backend_url_may_leave_out_v1_and_model_picks_a_served_one(
    home: Path, server: ServeProcess, api_key: str
) -> None:
    result = ask(
        home,
        "--backend",
        server.root_url + "/",
        "--model",
        "demo",
        "--api-key-env",
        KEY_ENV,
        "Hi",
        key=api_key,
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    return lines[-1]


def test_a_model_the_server_does_not_list_is_one_line_naming_what_it_serves(
    home: Path, server: ServeProcess, api_key: str
) -> None:
    result = ask(
        home, "--backend", server.base_url, "--model", "gpt-4o", "--api-key-env", KEY_ENV, "hi", key=api_key
    )
    assert (
        one_error_line(result)
        == f"mixtral-chat: error: {server.base_url} has no model 'gpt-4o' (it serves: demo)"
    )


def test_a_missing_or_wrong_key_is_one_401_line_without_the_key(home: Path, server: ServeProcess) -> None:
    for key in (None, "sk-wrong-key"):
        args = ["--backend", server.base_url, "hi"] + (["--api-key-env", KEY_ENV] if key else [])
        line = one_error_line(ask(home, *args, key=key))
        assert line.startswith(f"mixtral-chat: error: {server.base_url}: 401 ")
        assert "--api-key-env" in line and "sk-wrong-key" not in line


def test_an_unreachable_server_and_a_wrong_path_are_one_line_each(home: Path, server: ServeProcess) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    line = one_error_line(ask(home, "--backend", f"http://127.0.0.1:{port}/v1", "hi"))
    assert line == f"mixtral-chat: error: cannot reach http://127.0.0.1:{port}/v1: connection refused"
    line = one_error_line(ask(home, "--backend", server.root_url + "/api", "hi"))
    assert " 404 " in line and "an OpenAI-compatible API root, ending in /v1?" in line


def test_local_engine_flags_and_an_unset_key_variable_are_usage_errors(
    home: Path, server: ServeProcess
) -> None:
    line = one_error_line(ask(home, "--backend", server.base_url, "--quant", "int4", "hi"), code=2)
    assert (
        line == "mixtral-chat: error: --quant is for the local engine; the server at --backend decides that"
    )
    line = one_error_line(
        ask(home, "--backend", server.base_url, "--api-key-env", "NOT_SET_ANYWHERE", "hi"), code=2
    )
    assert "NOT_SET_ANYWHERE: that environment variable is not set" in line


def test_a_server_that_never_answers_is_a_time_out_line() -> None:
    """A real socket that accepts and stays silent; the client's read time-out, shortened."""
    from mixtral_chat.app.remote import RemoteBackend, RemoteError
    from mixtral_chat.engine.options import GenerationConfig

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        backend = RemoteBackend(url, read_timeout_s=0.3)
        with pytest.raises(RemoteError, match=r"/v1/models: no answer within 0.3 s \(time-out\)$"):
            backend.models()
        stream = backend.chat([{"role": "user", "content": "hi"}], GenerationConfig(), "any")
        with pytest.raises(RemoteError, match=r"/v1/chat/completions: no answer within 0.3 s"):
            list(stream)
        assert stream.stats is not None and stream.stats.finish_reason == "cancelled"


def test_the_model_list_has_its_own_short_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connecting (the TUI's "loading" of a remote model) asks for the model list: a port that
    accepts and stays silent fails in LIST_TIMEOUT_S, not in an answer's READ_TIMEOUT_S."""
    from mixtral_chat.app import remote

    monkeypatch.setattr(remote, "LIST_TIMEOUT_S", 0.3)  # 20 s as shipped
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        backend = remote.RemoteBackend(f"http://127.0.0.1:{silent.getsockname()[1]}/v1")
        assert backend._read_timeout_s == remote.READ_TIMEOUT_S == 600
        with pytest.raises(remote.RemoteError, match=r"/v1/models: no answer within 0.3 s \(time-out\)$"):
            backend.models()


# -- an answer cut short -----------------------------------------------------------------------------


@pytest.fixture
def long_server(tmp_path: Path, home: Path) -> Iterator[ServeProcess]:
    """A tiny random model whose greedy answers run to max_tokens: long enough to cut."""
    model = save_tiny_checkpoint(tmp_path / "tiny-long", max_position_embeddings=8192)
    process = ServeProcess(["--model", str(model)], env={"MIXTRAL_CHAT_HOME": str(home)})
    yield process
    process.stop()


def start_long_ask(home: Path, server: ServeProcess) -> tuple[subprocess.Popen[bytes], bytes]:
    """`ask --backend` in a subprocess, once it has printed part of its answer."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mixtral_chat.app.cli",
            "ask",
            "--backend",
            server.base_url,
            "--max-tokens",
            "6000",
            "go",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MIXTRAL_CHAT_HOME": str(home), "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    printed = os.read(process.stdout.fileno(), 4096)  # the first pieces
    assert printed
    return process, printed


def test_ctrl_c_closes_the_stream_keeps_the_partial_answer_and_the_server_stops(
    home: Path, long_server: ServeProcess
) -> None:
    process, printed = start_long_ask(home, long_server)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=60)
    assert process.returncode == 130, errors
    assert (printed + rest).strip() and b"Traceback" not in errors
    line = long_server.wait_for_line(
        lambda line: line.endswith("cancelled: the client went away"), timeout=30
    )
    assert int(line.split(" prompt + ")[1].split()[0]) < 6000


def test_a_server_that_dies_mid_answer_is_one_line_and_the_partial_answer_stays(
    home: Path, long_server: ServeProcess
) -> None:
    process, printed = start_long_ask(home, long_server)
    long_server.process.kill()
    rest, errors = process.communicate(timeout=60)
    assert process.returncode == 1
    assert (printed + rest).strip()
    line = errors.decode().strip().splitlines()[-1]
    assert line.startswith(f"mixtral-chat: error: {long_server.base_url}: the connection broke"), errors


def test_a_remote_answer_is_stored_and_continued_like_a_local_one(
    server: ServeProcess, api_key: str, tmp_path: Path
) -> None:
    client_home = tmp_path / "client"
    remote = ["--backend", server.base_url, "--api-key-env", KEY_ENV]
    first = ask(client_home, "--json", *remote, "What is a lighthouse?", key=api_key)
    assert first.returncode == 0, first.stderr
    listed = json.loads(
        run_cli("history", "list", "--json", env={"MIXTRAL_CHAT_HOME": str(client_home)}).stdout
    )
    assert len(listed) == 1
    shown = run_cli(
        "history", "show", str(listed[0]["id"]), env={"MIXTRAL_CHAT_HOME": str(client_home)}
    ).stdout
    assert "What is a lighthouse?" in shown and json.loads(first.stdout)["text"].strip()[:20] in shown

    # -c sends the stored turns to the server: the prompt is longer than the new question alone.
    alone = ask(client_home, "--json", "--no-log", *remote, "And a harbor?", key=api_key)
    again = ask(client_home, "--json", "-c", *remote, "And a harbor?", key=api_key)
    assert alone.returncode == 0 and again.returncode == 0, alone.stderr + again.stderr
    assert (
        json.loads(again.stdout)["usage"]["prompt_tokens"]
        > json.loads(alone.stdout)["usage"]["prompt_tokens"]
    )
    listed = json.loads(
        run_cli("history", "list", "--json", env={"MIXTRAL_CHAT_HOME": str(client_home)}).stdout
    )
    assert len(listed) == 1 and listed[0]["messages"] == 4
