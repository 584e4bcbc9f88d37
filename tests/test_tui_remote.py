"""The TUI answering from a remote endpoint (settings' [endpoints.NAME], `backend = NAME`) under
Textual's Pilot, against a real `mixtral-chat serve` subprocess of the demo over HTTP; and the
endpoints' round trip through config.toml, a stored key in a 0600 file."""

from __future__ import annotations

import json
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("textual")

from mixtral_chat.app.chat_app import ChatApp
from mixtral_chat.app.settings import Endpoint, Settings, SettingsError, load_settings, save_settings
from mixtral_chat.app.storage import Storage
from mixtral_chat.engine.options import GenerationConfig
from tests.conftest import run_cli, save_tiny_checkpoint
from tests.serve_process import ServeProcess
from tests.test_tui import SIZE, run, send, stored, type_text, wait_for, wait_ready

PROMPT = "What is a lighthouse?"


@pytest.fixture(scope="module")
def serve_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def api_key() -> str:
    return "sk-test-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def server(serve_home: Path, api_key: str) -> Iterator[ServeProcess]:
    process = ServeProcess([], env={"MIXTRAL_CHAT_HOME": str(serve_home), "MIXTRAL_CHAT_API_KEY": api_key})
    yield process
    process.stop()


def remote_app(server: ServeProcess, endpoint: Endpoint) -> ChatApp:
    settings = Settings(endpoints={"lab": endpoint}, backend="lab")
    settings.generation = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=512)  # ask's
    return ChatApp(Storage(), settings)


def test_the_tui_answers_from_a_remote_endpoint_and_says_so(
    isolated_home: Path, serve_home: Path, server: ServeProcess, api_key: str
) -> None:
    expected = json.loads(run_cli("ask", "--json", PROMPT, env={"MIXTRAL_CHAT_HOME": str(serve_home)}).stdout)
    app = remote_app(server, Endpoint(url=server.base_url, api_key=api_key))

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            await send(pilot, app, PROMPT)
            assert stored(app) == [("user", "complete", PROMPT), ("assistant", "complete", expected["text"])]
            info = app.chat_screen.status_bar.info
            assert info.model == "demo" and info.device == "remote: lab"
            assert app.chat_screen.status_bar.render_info(info).plain.startswith("demo · remote: lab")
            assert info.tok_s and info.ttft_s is not None  # measured on this side
            answer = app.storage.messages(app.chat_screen.conversation_id)[1]  # type: ignore[arg-type]
            assert answer.stats is not None
            assert answer.stats["completion_tokens"] == expected["usage"]["completion_tokens"]

    run(scenario)


def test_escape_closes_the_remote_stream_and_keeps_the_partial_answer(
    isolated_home: Path, serve_home: Path, tmp_path: Path
) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny-long", max_position_embeddings=8192)  # runs to max_tokens
    long_server = ServeProcess(["--model", str(model)], env={"MIXTRAL_CHAT_HOME": str(serve_home)})
    app = remote_app(long_server, Endpoint(url=long_server.base_url))
    app.settings.generation = GenerationConfig(temperature=0.0, max_tokens=6000)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await type_text(pilot, "Write a long story")
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.message_list.views[-1].text, "the first words of the answer")
            await pilot.press("escape")
            await wait_for(pilot, lambda: screen.generation is None, "the answer to stop")
            message = app.storage.messages(screen.conversation_id)[-1]  # type: ignore[arg-type]
            assert message.status == "stopped" and message.content
            assert message.content == screen.message_list.views[-1].text
            assert message.stats is not None and message.stats["finish_reason"] == "cancelled"

    try:
        run(scenario)
        # The server saw the connection close and stopped generating long before max_tokens.
        line = long_server.wait_for_line(lambda line: line.endswith("cancelled: the client went away"))
        assert int(line.split(" prompt + ")[1].split()[0]) < 6000
    finally:
        long_server.stop()


def test_a_wrong_key_fails_the_connection_with_one_line(
    isolated_home: Path, server: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAB_KEY", "sk-wrong")
    app = remote_app(server, Endpoint(url=server.base_url, api_key_env="LAB_KEY"))

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.model_status.state == "failed", "the connection to fail")
            error = app.model_status.error or ""
            assert error.startswith(f"{server.base_url}: 401 ") and "sk-wrong" not in error
            await type_text(pilot, "hi")  # the chat stays usable; the message is kept
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.chat_screen.conversation_id is not None, "the message saved")
            assert stored(app)[0] == ("user", "complete", "hi")

    run(scenario)


def test_endpoints_round_trip_through_the_config_and_a_stored_key_is_private(tmp_path: Path) -> None:
    settings = Settings(
        endpoints={
            "gpu box": Endpoint(url="http://10.0.0.5:8000/v1", api_key="sk-stored"),
            "ollama": Endpoint(
                url="http://127.0.0.1:11434/v1", model="mixtral:8x7b", api_key_env="OLLAMA_KEY"
            ),
        },
        backend="ollama",
    )
    path = save_settings(settings, tmp_path / "config.toml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_settings(path)
    assert again.endpoints == settings.endpoints and again.backend == "ollama"
    assert "sk-stored" not in repr(again)  # a logged Settings never shows the key

    path.write_text(path.read_text().replace('backend = "ollama"', 'backend = "nowhere"'))
    with pytest.raises(SettingsError, match="backend 'nowhere' is not one of"):
        load_settings(path)


def test_the_settings_endpoints_tab_adds_uses_and_leaves_an_endpoint(
    isolated_home: Path, server: ServeProcess, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textual.widgets import Input, TabbedContent

    from mixtral_chat.app.screens.settings import SettingsScreen

    monkeypatch.setenv("LAB_KEY", api_key)
    settings = Settings()
    settings.engine.device = "cpu"
    app = ChatApp(Storage(), settings, model="demo")

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            assert app.engine is not None and app.engine.model is not None  # the local demo
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            screen = app.screen
            screen.query_one(TabbedContent).active = "endpoints-tab"
            await pilot.pause()
            for field_id, value in [
                ("endpoint-name", "lab"),
                ("endpoint-url", server.base_url),
                ("endpoint-key-env", "LAB_KEY"),
            ]:
                screen.query_one(f"#{field_id}", Input).value = value
            screen.query_one("#add-endpoint").press()
            await wait_for(pilot, lambda: "lab" in load_settings().endpoints, "the saved endpoint")
            saved = load_settings().endpoints["lab"]
            assert (saved.url, saved.api_key_env, saved.api_key) == (server.base_url, "LAB_KEY", None)
            assert str(screen.query_one("#endpoints-table").get_cell("lab", "key")) == "$LAB_KEY"

            screen.query_one("#use-endpoint").press()  # the only row is selected
            await wait_for(pilot, lambda: app.engine is not None and app.engine.model is None, "the remote")
            assert load_settings().backend == "lab"
            screen.query_one("#remove-endpoint").press()  # refused: it answers now
            await pilot.pause()
            assert "lab" in load_settings().endpoints

            screen.query_one("#use-local").press()
            await wait_for(
                pilot, lambda: app.engine is not None and app.engine.model is not None, "the local engine"
            )
            assert load_settings().backend is None
            screen.query_one("#remove-endpoint").press()
            await wait_for(pilot, lambda: "lab" not in load_settings().endpoints, "the endpoint removed")

    run(scenario)
