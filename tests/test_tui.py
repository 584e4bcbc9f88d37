"""The chat TUI under Textual's Pilot with the real engine on a tiny random-weight Mixtral, real
SQLite in a temporary MIXTRAL_CHAT_HOME; and end to end in tmux with the installed command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

pytest.importorskip("textual")

from textual.pilot import Pilot
from textual.widgets import Button, Input, OptionList, Switch, TabbedContent

from mixtral_chat.app.chat_app import ChatApp
from mixtral_chat.app.screens.dialogs import ConfirmScreen, SearchScreen, TextInputScreen
from mixtral_chat.app.screens.settings import SettingsScreen
from mixtral_chat.app.settings import Settings, load_settings
from mixtral_chat.app.storage import Storage
from mixtral_chat.app.widgets.cache_panel import CELL_STYLES, cell_states
from mixtral_chat.app.widgets.message_view import MessageView, code_blocks
from mixtral_chat.engine.options import GenerationConfig

SIZE = (120, 40)


@pytest.fixture(scope="session")
def chat_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's tiny Mixtral with a 4096-token context, so answers can run long enough to be
    stopped. Same weights: the context length only sizes the KV cache and RoPE table."""
    directory = tmp_path_factory.mktemp("tui-tiny")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, directory / file.name)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture
def home(isolated_home: Path) -> Path:
    import torch

    torch.set_num_threads(1)
    return isolated_home


def make_app(model_dir: Path | str, max_tokens: int = 12, settings: Settings | None = None) -> ChatApp:
    settings = settings or Settings()
    settings.generation = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    return ChatApp(Storage(), settings, model=str(model_dir))


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def wait_for(pilot: Pilot, condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            app = pilot.app
            assert isinstance(app, ChatApp)
            screen = app.chat_screen
            state = (
                f"model {app.model_status}, screen {app.screen!r}, focused {app.focused!r}, "
                f"prompt {screen.prompt.text!r}, chat {screen.conversation_id}, "
                f"stored {app.storage.messages(screen.conversation_id) if screen.conversation_id else []}"
            )
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; {state}")
        # A plain sleep: Pilot.pause also waits for the screen to drain its queue, which while an
        # answer streams can take longer than the whole answer.
        await asyncio.sleep(0.02)


async def wait_ready(pilot: Pilot, app: ChatApp) -> None:
    await wait_for(pilot, lambda: app.model_status.state in ("ready", "failed"), "the model to load")
    assert app.model_status.state == "ready", app.model_status


async def type_text(pilot: Pilot, text: str) -> None:
    await pilot.press(*["space" if ch == " " else ch for ch in text])


def answered(app: ChatApp, count: int) -> bool:
    """`count` messages are stored and the last answer is finished (UI included)."""
    screen = app.chat_screen
    if screen.conversation_id is None or screen.generation is not None:
        return False
    messages = app.storage.messages(screen.conversation_id)
    return len(messages) == count and messages[-1].role == "assistant" and messages[-1].status != "streaming"


async def send(pilot: Pilot, app: ChatApp, text: str) -> None:
    """Type a prompt, press Enter, wait for the whole answer."""
    screen = app.chat_screen
    before = len(app.storage.messages(screen.conversation_id)) if screen.conversation_id is not None else 0
    await type_text(pilot, text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: answered(app, before + 2), "the answer")


def stored(app: ChatApp) -> list[tuple[str, str, str]]:
    conversation_id = app.chat_screen.conversation_id
    assert conversation_id is not None
    return [(m.role, m.status, m.content) for m in app.storage.messages(conversation_id)]


def engine_answer(app: ChatApp, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The engine's own answer to the same messages (greedy): the oracle for what the UI shows."""
    assert app.engine is not None
    config = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    return "".join(app.engine.chat(messages, config))


def test_send_streams_the_answer_and_saves_it(
    home: Path, chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(chat_model_dir, max_tokens=120)
    # A spy on the real MessageView.append: what the view held after each streamed chunk, and
    # what the database held when the first chunk arrived.
    shown: list[str] = []
    stored_at_first_chunk: list[tuple[str, str, str]] = []
    original_append = MessageView.append

    async def recording_append(view: MessageView, text: str) -> None:
        await original_append(view, text)
        if not shown:
            stored_at_first_chunk.extend(stored(app))
        shown.append(view.text)

    monkeypatch.setattr(MessageView, "append", recording_append)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await type_text(pilot, "Hello there")
            await pilot.press("enter")
            await wait_for(pilot, lambda: answered(app, 2), "the answer")
            # Committed before any token: the prompt, and the answer row marked streaming.
            assert stored_at_first_chunk == [
                ("user", "complete", "Hello there"),
                ("assistant", "streaming", ""),
            ]
            view = screen.message_list.views[-1]
            rows = stored(app)
            assert [row[:2] for row in rows] == [("user", "complete"), ("assistant", "complete")]
            answer = rows[1][2]
            assert answer and view.text == answer and view.role == "assistant"
            assert not view.is_streaming and view.status == "complete"
            assert view.body.source == answer  # the final Markdown render holds the whole text
            # It streamed: several growing partial answers, each a prefix of the final one.
            assert len(shown) >= 2 and shown[-1] == answer
            assert all(answer.startswith(text) for text in shown)
            assert answer == engine_answer(app, [{"role": "user", "content": "Hello there"}], 120)
            stats = app.storage.messages(screen.conversation_id)[1].stats  # type: ignore[arg-type]
            assert stats is not None
            assert stats["completion_tokens"] == 120 and stats["finish_reason"] == "length"
            info = screen.status_bar.info
            assert info.model == chat_model_dir.name and info.context_total == 4096
            assert info.context_used == stats["prompt_tokens"] + 120
            assert info.tok_s and info.ttft_s is not None
            # Float weights show no scheme ("none" read as if something were missing): model · device dtype.
            assert screen.status_bar.render_info(info).plain.startswith(
                f"{chat_model_dir.name} · cpu float32"
            )
            assert app.storage.list_conversations()[0].title == "Hello there"

    run(scenario)


def test_escape_stops_the_answer_and_keeps_the_partial(home: Path, chat_model_dir: Path) -> None:
    app = make_app(chat_model_dir, max_tokens=3000)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await type_text(pilot, "Write a long story")
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.message_list.views[-1].text, "the first words of the answer")
            await pilot.press("escape")
            await wait_for(pilot, lambda: screen.generation is None, "the answer to stop")
            conversation_id = screen.conversation_id
            message = app.storage.messages(conversation_id)[-1]  # type: ignore[arg-type]
            assert message.role == "assistant" and message.status == "stopped"
            assert message.content and message.content == screen.message_list.views[-1].text
            assert message.stats is not None and message.stats["finish_reason"] == "cancelled"
            assert message.stats["completion_tokens"] < 3000
            view = screen.message_list.views[-1]
            assert view.status == "stopped" and "stopped" in str(view.header.render())
            assert view.has_class("-stopped")

            # Quitting mid-answer keeps the partial answer too, marked stopped.
            await type_text(pilot, "Another long one")
            await pilot.press("enter")
            await wait_for(pilot, lambda: len(stored(app)) == 4 and stored(app)[-1][2], "the second answer")
            await pilot.press("ctrl+q")
        # The app has exited; read the database afresh.
        with Storage() as storage:
            [chat] = storage.list_conversations()
            last = storage.messages(chat.id)[-1]
            assert last.role == "assistant" and last.status == "stopped" and last.content

    run(scenario)


def test_deleting_a_chat_while_its_answer_streams(home: Path, chat_model_dir: Path) -> None:
    app = make_app(chat_model_dir, max_tokens=3000)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await type_text(pilot, "Endless")
            await pilot.press("enter")
            await wait_for(
                pilot, lambda: len(stored(app)) == 2 and stored(app)[-1][2], "a saved partial answer"
            )
            await pilot.press("f8")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete confirmation")
            await pilot.press("y")
            await wait_for(pilot, lambda: screen.generation is None, "the answer to stop")
            assert app.storage.list_conversations() == [] and screen.conversation_id is None
            assert not [n for n in app._notifications if n.severity == "error"]
            # The engine is free again: a new chat gets its answer.
            await type_text(pilot, "Still works")
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.generation is not None, "the next answer to start")
            await pilot.press("escape")
            await wait_for(pilot, lambda: answered(app, 2), "the next answer to stop")
            assert stored(app)[1][1] == "stopped"

    run(scenario)


def test_regenerate_then_edit_an_earlier_prompt(home: Path, chat_model_dir: Path) -> None:
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await send(pilot, app, "one")
            first = app.storage.messages(screen.conversation_id)[-1]  # type: ignore[arg-type]
            # Regenerate: the last answer is replaced by a new one.
            await pilot.press("ctrl+r")
            await wait_for(
                pilot,
                lambda: answered(app, 2) and app.storage.messages(screen.conversation_id)[-1].id != first.id,
                "the regenerated answer",
            )
            messages = app.storage.messages(screen.conversation_id)  # type: ignore[arg-type]
            assert [m.role for m in messages] == ["user", "assistant"] and messages[1].status == "complete"
            assert messages[1].content == first.content  # greedy: the same answer again
            assert [v.message_id for v in screen.message_list.views] == [m.id for m in messages]

            # Edit the first prompt of a two-turn chat: everything after it is answered anew.
            await send(pilot, app, "two")
            assert [r[0] for r in stored(app)] == ["user", "assistant", "user", "assistant"]
            first_prompt = screen.message_list.views[0]
            first_prompt.focus()
            await pilot.press("e")
            assert screen.prompt.text == "one" and screen.editing_message_id == first_prompt.message_id
            await pilot.press("backspace", "backspace", "backspace")
            await type_text(pilot, "uno")
            await pilot.press("enter")
            await wait_for(
                pilot,
                lambda: answered(app, 2) and stored(app)[0][2] == "uno",
                "the answer to the edited prompt",
            )
            rows = stored(app)
            assert [r[0] for r in rows] == ["user", "assistant"]
            assert rows[1][2] == engine_answer(app, [{"role": "user", "content": "uno"}], 12)
            assert screen.editing_message_id is None

    run(scenario)


def test_new_export_rename_and_delete_chats(home: Path, chat_model_dir: Path) -> None:
    app = make_app(chat_model_dir, max_tokens=4)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await send(pilot, app, "alpha chat")
            first_id = screen.conversation_id

            # Export: the dialog offers a Markdown file in the data folder; Enter takes it.
            await pilot.press("f9")
            await wait_for(pilot, lambda: isinstance(app.screen, TextInputScreen), "the export dialog")
            exports = home / "data" / "exports"
            default = Path(app.screen.query_one(Input).value)
            assert default.parent == exports and default.suffix == ".md"
            await pilot.press("enter")
            await wait_for(pilot, lambda: default.exists(), "the Markdown export")
            markdown = default.read_text()
            toast = [n for n in app._notifications if n.title == "Exported"][-1]
            assert str(toast.message).splitlines() == [default.name, f"in {exports}"]
            # A name ending in .json, anywhere the user says, writes JSON.
            chosen = home / "elsewhere" / "alpha.json"
            await pilot.press("f9")
            await wait_for(pilot, lambda: isinstance(app.screen, TextInputScreen), "the export dialog")
            app.screen.query_one(Input).value = str(chosen)
            await pilot.press("enter")
            await wait_for(pilot, lambda: chosen.exists(), "the JSON export")
            exported = json.loads(chosen.read_text())
            answer = stored(app)[1][2]
            assert "## User\n\nalpha chat" in markdown and answer in markdown
            assert [(m["role"], m["content"]) for m in exported["messages"]] == [
                ("user", "alpha chat"),
                ("assistant", answer),
            ]

            # New chat from the command palette.
            await pilot.press("ctrl+p")
            await type_text(pilot, "new chat")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.conversation_id is None, "a new chat from the palette")
            assert screen.message_list.views == []
            await send(pilot, app, "beta chat")
            assert len(app.storage.list_conversations()) == 2
            assert screen.conversation_list.option_count == 2

            await pilot.press("f2")
            await wait_for(pilot, lambda: isinstance(app.screen, TextInputScreen), "the rename dialog")
            app.screen.query_one(Input).value = "Renamed chat"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not isinstance(app.screen, TextInputScreen), "the dialog to close")
            assert app.storage.get_conversation(screen.conversation_id).title == "Renamed chat"  # type: ignore[arg-type]

            await pilot.press("f8")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete confirmation")
            await pilot.press("n")  # declined: nothing is deleted
            await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the dialog to close")
            assert len(app.storage.list_conversations()) == 2
            await pilot.press("f8")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete confirmation")
            await pilot.press("y")
            await wait_for(
                pilot, lambda: len(app.storage.list_conversations()) == 1, "the chat to be deleted"
            )
            assert [c.id for c in app.storage.list_conversations()] == [first_id]
            await wait_for(pilot, lambda: screen.conversation_id == first_id, "the remaining chat to open")
            assert screen.conversation_list.option_count == 1

    run(scenario)


def test_search_opens_the_hit_and_copy_message_and_code(home: Path, chat_model_dir: Path) -> None:
    answer = "Two blocks:\n\n```rust\nfn main() {}\n```\n\nand\n\n```sh\necho two\n```\n"
    with Storage() as storage:
        target = storage.create_conversation("Rust lifetimes")
        storage.add_message(target.id, "user", "Explain borrow checker lifetimes please")
        storage.add_message(target.id, "assistant", answer)
        other = storage.create_conversation("Cooking")
        storage.add_message(other.id, "user", "How long do I boil an egg?")
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            screen = app.chat_screen
            assert screen.conversation_id == other.id  # the most recent chat opens first
            await pilot.press("ctrl+f")
            await wait_for(pilot, lambda: isinstance(app.screen, SearchScreen), "the search dialog")
            await type_text(pilot, "borrow")
            search = app.screen
            assert isinstance(search, SearchScreen)
            await wait_for(pilot, lambda: search.query_one(OptionList).option_count == 1, "one search hit")
            assert search.hits[0].conversation_id == target.id
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.conversation_id == target.id, "the hit's chat to open")
            focused = app.focused
            assert isinstance(focused, MessageView) and "borrow checker" in focused.text
            assert focused.has_class("-found")

            # Copy (OSC 52 through App.copy_to_clipboard): the whole answer, then each code block.
            await pilot.press("down")
            view = app.focused
            assert isinstance(view, MessageView) and view.role == "assistant"
            await pilot.press("c")
            assert app.clipboard == answer
            await pilot.press("b")
            assert app.clipboard == "fn main() {}"
            await pilot.press("b")
            assert app.clipboard == "echo two"
            assert code_blocks(answer) == ["fn main() {}", "echo two"]

    run(scenario)


def test_prompt_newline_history_and_keymap(home: Path, chat_model_dir: Path) -> None:
    settings = Settings()
    settings.keymap = {"prompt.send": "ctrl+s"}
    app = make_app(chat_model_dir, max_tokens=4, settings=settings)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            prompt = screen.prompt
            await type_text(pilot, "line one")
            await pilot.press("ctrl+j")
            await type_text(pilot, "two")
            await pilot.press("enter")  # remapped away from send: a plain newline now
            assert prompt.text == "line one\ntwo\n" and screen.conversation_id is None
            await pilot.press("backspace", "ctrl+s")
            await wait_for(pilot, lambda: answered(app, 2), "the answer")
            assert stored(app)[0][2] == "line one\ntwo" and prompt.text == ""
            await pilot.press("up")
            assert prompt.text == "line one\ntwo"
            await pilot.press("down")
            assert prompt.text == ""

    run(scenario)


def test_a_prompt_sent_while_the_model_loads_is_saved_then_answered(home: Path, chat_model_dir: Path) -> None:
    app = make_app(chat_model_dir, max_tokens=5)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await type_text(pilot, "early")
            await pilot.press("enter")
            if app.model_status.state == "loading":
                assert stored(app) == [("user", "complete", "early")]  # committed at once
            await wait_for(pilot, lambda: answered(app, 2), "the answer")
            assert stored(app)[1][:2] == ("assistant", "complete")

    run(scenario)


def test_a_model_that_fails_to_load_is_a_notification(home: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    app = make_app(broken)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.model_status.state == "failed", "the load to fail")
            assert app.model_status.error and "\n" not in app.model_status.error
            await type_text(pilot, "still here")
            await pilot.press("enter")
            assert stored(app) == [("user", "complete", "still here")]  # kept, not answered
            assert app.is_running

    run(scenario)


def test_expert_cache_panel_shows_residency(home: Path, chat_model_dir: Path) -> None:
    settings = Settings()
    settings.engine.offload = True
    settings.engine.experts_per_layer = 2  # 2 of 4 experts per layer on the device
    app = make_app(chat_model_dir, max_tokens=8, settings=settings)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            panel = screen.cache_panel
            assert not panel.display
            await pilot.press("ctrl+g")
            assert panel.display
            await send(pilot, app, "experts")
            stats = panel.last_stats
            assert stats is not None and len(stats["layers"]) == 2
            text = str(panel.render())
            assert "hit rate" in text and stats["plan"] in text
            assert screen.status_bar.info.cache_hit_rate == pytest.approx(stats["hit_rate"])
            # Each grid row draws that layer's state: 2 resident experts of 4, a miss of the last
            # step (computed on the CPU: on a CPU-only host AUTO keeps the slots fixed), the rest
            # absent.
            rows = [line.split()[1] for line in text.splitlines() if line.strip()[:1].isdigit()]
            expected = [
                "".join(CELL_STYLES[state][0] for state in cell_states(layer, 4)) for layer in stats["layers"]
            ]
            assert rows == expected
            for layer, row in zip(stats["layers"], rows, strict=True):
                drawn = set(layer["resident"]) | set(layer["misses"])
                assert len(layer["resident"]) == 2 and row.count("·") == 4 - len(drawn)

            # The settings screen shows the planner's numbers and saves engine options to the config.
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            settings_screen = app.screen
            assert "Offload plan: " in str(settings_screen.query_one("#plan-note").render())
            settings_screen.query_one(TabbedContent).active = "engine-tab"
            await pilot.pause()
            settings_screen.query_one("#context-length", Input).value = "2048"
            graphs = settings_screen.query_one("#cuda-graphs", Switch)
            assert graphs.value  # on by default
            graphs.value = False
            await pilot.click("#save-engine")
            await wait_for(
                pilot, lambda: load_settings().engine.context_length == 2048, "the saved engine options"
            )
            saved = load_settings()
            assert saved.engine.context_length == 2048 and saved.engine.offload
            assert saved.engine.experts_per_layer == 2 and not saved.engine.cuda_graphs

    run(scenario)


def test_expert_cache_panel_without_offloading(home: Path, chat_model_dir: Path) -> None:
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            await pilot.press("ctrl+g")
            text = str(app.chat_screen.cache_panel.render())
            assert "no offloading" in text and "all experts resident" in text
            rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
            assert rows == [["0", "■■■■"], ["1", "■■■■"]]  # 2 layers x 4 experts, all resident

    run(scenario)


@pytest.fixture
def local_hub(home: Path, tmp_path: Path, chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A local hub (tests/hub_server.py) serving the tiny model as org/tiny; a private HF cache."""
    from hub_server import HubServer, isolate_hf_env

    isolate_hf_env(monkeypatch, tmp_path / "hf")
    with HubServer() as server:
        server.add_repo("org/tiny", chat_model_dir)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def test_settings_add_download_cancel_resume_use_and_delete(local_hub, chat_model_dir: Path) -> None:
    weights = "model.safetensors"
    release = local_hub.stall("org/tiny", weights, after_bytes=1_000_000)
    app = make_app(chat_model_dir, max_tokens=4)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot, app)
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            settings = app.screen
            assert isinstance(settings, SettingsScreen)

            def status(name: str) -> str:
                table = settings.models_table
                return str(table.get_cell(name, "status"))

            # The catalog, the model loaded from a path, and the free disk space.
            assert {"mixtral-8x7b-instruct", "mixtral-8x7b", "demo"} <= set(settings.entries)
            assert status(chat_model_dir.name) == "active (not registered)"
            assert "Free disk" in str(settings.query_one("#disk-free").render())

            settings.query_one("#add-model-input", Input).focus()
            await type_text(pilot, "org/tiny")
            await pilot.press("enter")
            await wait_for(pilot, lambda: "org/tiny" in settings.entries, "the added model")
            assert status("org/tiny") == "not downloaded"
            settings.models_table.move_cursor(row=settings.models_table.get_row_index("org/tiny"))
            await pilot.pause()

            # Download: a confirmation with the free disk space, then live progress; cancel keeps
            # the partial file.
            await pilot.click("#download-model")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the download confirmation")
            question = str(app.screen.query_one(".dialog-question").render())
            # The size comes from the hub's listing (a repo added by id is not in the catalog).
            assert "Free disk space" in question and "and quantize it to 4 bits" in question
            assert re.search(r"\(about [\d.]+ MB\)", question), question
            await pilot.press("y")
            label = settings.query_one("#download-label")
            await wait_for(pilot, lambda: "Downloading org/tiny" in str(label.render()), "download progress")
            assert " of " in str(label.render()) and status("org/tiny").startswith("downloading")
            # The server holds the file after 1 MB: the line says the transfer is stalled.
            settings.stall_after_s = 0.5
            await wait_for(pilot, lambda: "stalled: no data for" in str(label.render()), "the stall notice")
            await pilot.click("#cancel-pull")
            release.set()
            await wait_for(pilot, lambda: settings.pulling is None, "the cancelled download to end")
            assert status("org/tiny").startswith("partial")
            local_hub.faults.stall_after.clear()

            # Download again: it finishes (resuming is engine/models/'s, tested in test_hub.py).
            await pilot.click("#download-model")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the download confirmation")
            await pilot.press("y")
            await wait_for(pilot, lambda: settings.pulling is None, "the download to finish", timeout=120)
            # Downloaded and quantized, as `models pull` does; not made the default (that is Use).
            assert status("org/tiny") == "quantized", [str(n.message) for n in app._notifications]
            assert settings.entries["org/tiny"].size_on_disk > 8_000_000
            assert not settings.entries["org/tiny"].is_default

            # Use it: it loads and answers. The finished download hid its row and raised a toast:
            # click once the layout has settled and nothing lies over the button (clicked at once,
            # 3 of 20 runs here left the focus on the scroll area and loaded nothing).
            app.clear_notifications()
            await pilot.pause()
            use = settings.query_one("#use-model", Button)
            await wait_for(pilot, lambda: not use.disabled, "the Use button enabled")
            await pilot.pause()
            await pilot.click("#use-model")
            await wait_for(
                pilot,
                lambda: app.engine is not None and app.engine.info.name == "org/tiny",
                "org/tiny to load",
            )
            assert "active" in status("org/tiny")

            # The loaded model cannot be deleted; after loading another, it can, freeing its size.
            await pilot.click("#delete-model")
            await pilot.pause()
            assert not isinstance(app.screen, ConfirmScreen)
            app.load_model(str(chat_model_dir))
            await wait_ready(pilot, app)
            settings.models_table.move_cursor(row=settings.models_table.get_row_index("org/tiny"))
            await pilot.pause()  # let the table refresh that the model change started settle
            await pilot.click("#delete-model")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete confirmation")
            assert "frees about" in str(app.screen.query_one(".dialog-question").render())
            await pilot.press("y")
            await wait_for(pilot, lambda: "org/tiny" not in settings.entries, "the model to be removed")
            assert any("freed" in n.message for n in app._notifications)

    run(scenario)


def test_end_to_end_in_tmux(home: Path, chat_model_dir: Path, tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    command = shutil.which("mixtral-chat", path=str(Path(sys.executable).parent)) or shutil.which(
        "mixtral-chat"
    )
    if tmux is None or command is None:
        pytest.skip("tmux or the installed mixtral-chat command is not available")
    session = f"mixtral-chat-test-{os.getpid()}"
    tmux_server = [tmux, "-S", str(tmp_path / "tmux.sock")]  # its own server: the default may be ending
    # Short greedy answers, through the real config file.
    (home / "config").mkdir(parents=True)
    (home / "config" / "config.toml").write_text("[generation]\ntemperature = 0.0\nmax_tokens = 24\n")
    env_prefix = f"MIXTRAL_CHAT_HOME={home} OMP_NUM_THREADS=1"
    subprocess.run(
        [
            *tmux_server,
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "110",
            "-y",
            "30",
            f"{env_prefix} {command} --model {chat_model_dir}",
        ],
        check=True,
    )

    def screen_text() -> str:
        return subprocess.run(
            [*tmux_server, "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=False
        ).stdout

    def wait_screen(condition: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = screen_text()
            if condition(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{text}")
            time.sleep(0.2)

    try:
        wait_screen(lambda text: "Ask anything" in text, "the prompt")
        subprocess.run(
            [*tmux_server, "send-keys", "-t", session, "What is a mixture of experts?", "Enter"], check=True
        )
        db = home / "data" / "conversations.db"

        def answer() -> tuple[str, str] | None:
            if not db.exists():
                return None
            with Storage(db) as storage:
                for conversation in storage.list_conversations():
                    for message in storage.messages(conversation.id):
                        if message.role == "assistant" and message.status == "complete":
                            return message.content, message.status
            return None

        deadline = time.monotonic() + 60
        while answer() is None:
            assert time.monotonic() < deadline, screen_text()
            time.sleep(0.2)
        content, _ = answer()  # type: ignore[misc]
        # Plain words of the (random) answer: Markdown may restyle the punctuation around them.
        words = [word for word in content.split() if word.isalpha() and len(word) >= 4][:3]
        assert words, content
        text = wait_screen(
            lambda text: all(word in text for word in words), "the answer on screen", timeout=10
        )
        assert "What is a mixture of experts?" in text
        subprocess.run([*tmux_server, "send-keys", "-t", session, "C-q"], check=True)
        deadline = time.monotonic() + 10
        while (
            subprocess.run([*tmux_server, "has-session", "-t", session], capture_output=True).returncode == 0
        ):
            if time.monotonic() > deadline:
                raise AssertionError("the app did not quit on Ctrl+Q")
            time.sleep(0.2)
    finally:
        subprocess.run([*tmux_server, "kill-server"], capture_output=True, check=False)
