"""Issue 17's details under Pilot: the real app on the real engine and real SQLite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("textual")

from textual.widgets import TextArea

from mixtral_chat.app.clipboard import copy_with_system_tool, system_clipboard_command
from mixtral_chat.app.screens.text_view import TextViewScreen
from mixtral_chat.app.settings import NEW_CHAT_GENERATION
from mixtral_chat.app.storage import Storage
from mixtral_chat.engine.models.catalog import demo_dir
from tests.test_tui import chat_model_dir, make_app, run, send, stored, wait_for, wait_ready

__all__ = ["chat_model_dir"]  # the fixture, shared with test_tui

LONG_TITLE = "What is a harbor and why do ships need one at all, in any weather?"


def test_a_long_chat_title_is_one_line_with_its_age_apart(isolated_home: Path, chat_model_dir: Path) -> None:
    storage = Storage()
    storage.create_conversation(LONG_TITLE)
    storage.create_conversation("Hi")
    storage.close()
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            assert not screen.query_one("#sidebar").display  # folded away at 80 columns
            await pilot.press("ctrl+b")  # opened over the chat
            await pilot.pause()
            listing = screen.conversation_list
            assert screen.query_one("#sidebar").display and listing.has_focus
            width = listing.content_region.width
            lines = [listing.render_line(y).text.rstrip() for y in range(listing.option_count)]
            # Newest first; each chat on exactly one line: title cut with an ellipsis, then the age.
            assert lines[0].strip().endswith("now") and lines[0].strip().startswith("Hi")
            assert "…" in lines[1] and lines[1].strip().endswith("now")
            assert lines[1].strip().startswith(LONG_TITLE[:10]) and len(lines[1]) <= width + 2

    run(scenario)


def notifications(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


def test_copy_says_what_it_did_and_v_shows_the_text_to_select(
    isolated_home: Path, chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)  # no desktop session: OSC 52 is the only way
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    answer = "A harbor is a sheltered body of water where ships can dock safely."
    with Storage() as storage:
        chat = storage.create_conversation("Harbors")
        storage.add_message(chat.id, "user", "What is a harbor?")
        storage.add_message(chat.id, "assistant", answer)
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_ready(pilot, app)
            view = app.chat_screen.message_list.views[-1]
            view.focus()
            await pilot.press("c")
            assert app.clipboard == answer
            said = notifications(app)[-1]
            assert "OSC 52" not in said and said.startswith(f"Copied the message ({len(answer)} characters).")
            assert "press v to select the text" in said
            await pilot.press("v")
            await wait_for(pilot, lambda: isinstance(app.screen, TextViewScreen), "the text view")
            area = app.screen.query_one(TextArea)
            assert area.read_only and area.text == answer and area.selected_text == answer
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, TextViewScreen), "the view to close")

    run(scenario)


def test_the_system_clipboard_tool_gets_the_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    received = tmp_path / "received.txt"
    tool = tmp_path / "bin" / "xclip"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\ncat > {received}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    assert system_clipboard_command({}, "linux") is None  # over ssh: no display, no tool
    command = system_clipboard_command({"DISPLAY": ":0"}, "linux")
    assert command == ("xclip", "-selection", "clipboard")
    assert copy_with_system_tool("fn main() {}", command) and received.read_text() == "fn main() {}"
    assert not copy_with_system_tool("x", ("/nonexistent/tool",))


def test_the_demo_keeps_the_first_turn_in_a_second_message(isolated_home: Path) -> None:
    app = make_app(demo_dir(), max_tokens=NEW_CHAT_GENERATION.max_tokens)  # 1024 > the demo's 512

    async def scenario() -> None:
        async with app.run_test(size=(120, 35)) as pilot:
            await wait_ready(pilot, app)
            await send(pilot, app, "What is a harbor?")
            await send(pilot, app, "What is a lighthouse?")
            assert not [n for n in notifications(app) if "dropped" in n]
            stats = app.storage.messages(app.chat_screen.conversation_id)[-1].stats
            assert stats is not None and stats["dropped_turns"] == 0
            assert stats["prompt_tokens"] > len(
                app.engine.tokenizer.encode_chat([{"role": "user", "content": "What is a lighthouse?"}])
            )

    run(scenario)


def test_the_demo_answers_in_real_words_in_the_app(isolated_home: Path) -> None:
    """Issue 17 item 13 where a new user meets it: the app on the bundled demo, its own generation
    settings, the question its greeting suggests; the stored answers are real words (the shipped
    WordNet lexicon of scripts/eval_demo.py) and the greeting introduces the demo."""
    from tests.test_demo_model import load_eval_demo

    eval_demo = load_eval_demo()
    lexicon = eval_demo.Lexicon.from_file(eval_demo.LEXICON_FILE)
    app = make_app(demo_dir(), max_tokens=NEW_CHAT_GENERATION.max_tokens)

    async def scenario() -> None:
        async with app.run_test(size=(120, 35)) as pilot:
            await wait_ready(pilot, app)
            answers = []
            # Each the first question of a new chat (ctrl+n): the demo saw at most two turns in
            # training, and a chat's history moves its answers (its card says so).
            for question in ("Hello", "What is a lighthouse?", "What is a volcano?"):
                if answers:
                    await pilot.press("ctrl+n")
                    await wait_for(pilot, lambda: app.chat_screen.conversation_id is None, "a new chat")
                await send(pilot, app, question)
                answers.append(stored(app)[-1][2])
            assert "demo model" in answers[0] and "lighthouse" in answers[0]
            _share, words, unreal = eval_demo.real_word_share(lexicon, answers[1:])
            assert words >= 20 and not unreal, (answers, unreal)
            assert "tower" in answers[1] and "light" in answers[1]

    run(scenario)


def test_theme_sidebar_and_cache_panel_are_kept_across_a_restart(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    from mixtral_chat.app.settings import load_settings

    first = make_app(chat_model_dir, settings=load_settings())

    async def change_them() -> None:
        async with first.run_test(size=(120, 35)) as pilot:
            await wait_ready(pilot, first)
            await pilot.press("ctrl+b")  # hide the sidebar
            await pilot.press("ctrl+g")  # show the cache panel
            first.theme = "nord"  # what the palette's theme picker does
            await pilot.pause()

    run(change_them)
    saved = load_settings()
    assert (saved.theme, saved.show_sidebar, saved.show_cache_panel) == ("nord", False, True)

    second = make_app(chat_model_dir, settings=load_settings())

    async def see_them() -> None:
        async with second.run_test(size=(120, 35)) as pilot:
            await wait_ready(pilot, second)
            screen = second.chat_screen
            assert second.theme == "nord"
            assert not screen.query_one("#sidebar").display and screen.cache_panel.display

    run(see_them)


def test_settings_screen_details(isolated_home: Path, chat_model_dir: Path) -> None:
    """Delete is off for a catalog model with nothing on disk; an empty context means the model's
    own; the theme lives under Appearance and applies and is saved at once."""
    from textual.widgets import Button, Input, Select, TabbedContent

    from mixtral_chat.app.screens.settings import SettingsScreen
    from mixtral_chat.app.settings import load_settings

    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=(120, 35)) as pilot:
            await wait_ready(pilot, app)
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            screen = app.screen
            assert isinstance(screen, SettingsScreen)
            table = screen.models_table
            mixtral = next(e for e in screen.entries.values() if e.status == "not downloaded")
            table.move_cursor(row=table.get_row_index(mixtral.name))
            await pilot.pause()
            assert screen.query_one("#delete-model", Button).disabled
            assert not screen.query_one("#download-model", Button).disabled

            screen.query_one(TabbedContent).active = "engine-tab"
            await pilot.pause()
            context = screen.query_one("#context-length", Input)
            assert context.value == ""
            assert context.placeholder == f"the model's own ({app.engine.info.context_length} now)"

            screen.query_one(TabbedContent).active = "appearance-tab"
            await pilot.pause()
            screen.query_one("#theme", Select).value = "gruvbox"
            await wait_for(pilot, lambda: app.theme == "gruvbox", "the theme to apply")
            assert load_settings().theme == "gruvbox"

    run(scenario)


def test_chat_options_refuse_what_the_engine_refuses(isolated_home: Path, chat_model_dir: Path) -> None:
    """The dialog checks sampling with GenerationConfig's bounds: the same line as the settings file."""
    from textual.widgets import Button, Input

    from mixtral_chat.app.screens.dialogs import ChatOptionsScreen

    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=(120, 35)) as pilot:
            await wait_ready(pilot, app)
            await send(pilot, app, "hello")
            await pilot.press("ctrl+o")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatOptionsScreen), "the chat options")
            dialog = app.screen
            for field, value, said in [
                ("temperature", "7", "temperature must be between 0 and 5, got 7.0"),
                ("top_p", "0", "top_p must be in (0, 1], got 0.0"),
                ("seed", str(2**64), f"seed must be between {-(2**63)} and {2**64 - 1}, got {2**64}"),
                ("max_tokens", "many", "max tokens: 'many' is not a whole number"),
            ]:
                before = dialog.query_one(f"#{field}", Input).value
                dialog.query_one(f"#{field}", Input).value = value
                dialog.query_one("#save", Button).press()  # a click could land on the last toast
                await pilot.pause()
                assert app.screen is dialog and notifications(app)[-1] == said
                dialog.query_one(f"#{field}", Input).value = before
            dialog.query_one("#save", Button).press()
            await wait_for(
                pilot, lambda: not isinstance(app.screen, ChatOptionsScreen), "the dialog to close"
            )

    run(scenario)


def test_f1_lists_every_key_and_a_dialog_footer_shows_its_own(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    from textual.widgets import Footer, Static

    from mixtral_chat.app.screens.dialogs import ConfirmScreen
    from mixtral_chat.app.screens.help import HelpScreen
    from mixtral_chat.app.settings import Settings

    settings = Settings()
    settings.keymap = {"chat.rename": "f6"}  # a user's rebinding shows in the help
    app = make_app(chat_model_dir, settings=settings)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_ready(pilot, app)
            await send(pilot, app, "hello")
            await pilot.press("f1")
            await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
            help_screen = app.screen
            assert isinstance(help_screen, HelpScreen) and help_screen.query(Static)
            rows = help_screen.rows()
            # The keys the footer hides, and the message actions only shown once a message has focus.
            for key, action in [
                ("F6", "Rename"),
                ("F8", "Delete"),
                ("F9", "Export"),
                ("Ctrl+B", "Sidebar"),
                ("Ctrl+G", "Experts"),
                ("C", "Copy"),
                ("B", "Copy code"),
                ("E", "Edit"),
                ("V", "Select text"),
                ("Ctrl+Q", "Quit"),
                ("Ctrl+P", "command palette"),
            ]:
                assert any(keys.split(", ")[0] == key and action in what for _, keys, what in rows), key
            assert not any("F2" in keys for _, keys, _ in rows)  # rebound to F6
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), "the help to close")

            await pilot.press("f8")  # delete this chat? the dialog's footer says y / n
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
            footer_keys = [key.description for key in app.screen.query_one(Footer).query("FooterKey")]
            assert footer_keys[:2] == ["Yes", "No"]
            await pilot.press("n")
            await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the question to close")
            assert app.storage.list_conversations()  # nothing deleted

    run(scenario)


def test_a_narrow_screen_folds_the_sidebar_and_lays_the_cache_panel_over_the_chat(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    with Storage() as storage:
        storage.create_conversation("First")
        second = storage.create_conversation("Second")
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            column = screen.query_one("#chat-column")
            assert not screen.query_one("#sidebar").display and column.size.width == 80
            await pilot.press("ctrl+g")
            await pilot.pause()
            assert screen.cache_panel.display and column.size.width == 80  # over it, not squeezing it
            await pilot.press("ctrl+g")
            await pilot.press("ctrl+b")
            await pilot.pause()
            assert screen.query_one("#sidebar").display and column.size.width == 80
            await pilot.press("escape")  # closes the folded sidebar
            await pilot.pause()
            assert not screen.query_one("#sidebar").display and screen.prompt.has_focus
            await pilot.press("ctrl+b", "down", "enter")  # open it, choose the other chat
            await wait_for(pilot, lambda: screen.conversation_id != second.id, "the other chat")
            assert not screen.query_one("#sidebar").display and screen.prompt.has_focus
        # Opening the folded sidebar is for the moment: the saved choice (shown) is untouched.
        from mixtral_chat.app.settings import load_settings

        assert load_settings().show_sidebar

    run(scenario)


def test_the_screenshot_script_draws_every_screen(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = tmp_path / "shots"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "screenshots.py"),
            "--sizes",
            "80x24",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(path.name for path in out.glob("*.svg"))
    for screen in ("chat", "help", "chat-options", "search", "export", "settings-models", "settings-engine"):
        assert f"{screen}-80x24.svg" in names
    assert all((out / name).read_text().startswith("<svg") for name in names)


def test_switching_the_model_in_a_chat_and_the_chat_remembering_it(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    from mixtral_chat.engine.models.registry import add_model

    add_model(str(chat_model_dir), name="tiny")
    app = make_app("demo")

    async def scenario() -> None:
        async with app.run_test(size=(120, 35)) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await send(pilot, app, "first chat")
            first = screen.conversation_id
            assert app.storage.get_conversation(first).model == "demo"
            # The palette offers the other installed model; choosing it answers this chat with it.
            await pilot.press("ctrl+p")
            await pilot.press(*"switch model")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.model_name == "tiny", "the tiny model", timeout=60)
            assert app.storage.get_conversation(first).model == "tiny"
            # A new chat on the demo again, then back to the first one: it loads its model.
            await pilot.press("ctrl+n")
            screen.switch_model("demo")
            await wait_for(pilot, lambda: app.model_name == "demo", "the demo again", timeout=60)
            await send(pilot, app, "second chat")
            await screen.open_conversation(first, follow_model=True)
            await wait_for(pilot, lambda: app.model_name == "tiny", "the first chat's model", timeout=60)
            assert any("This chat uses tiny" in text for text in notifications(app))

    run(scenario)


def test_the_cache_panel_shows_how_often_consecutive_tokens_repeat_their_experts(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    app = make_app(chat_model_dir, max_tokens=12)

    async def scenario() -> None:
        async with app.run_test(size=(200, 50)) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await pilot.press("ctrl+g")
            await send(pilot, app, "tell me about harbors")
            await wait_for(pilot, lambda: not screen.is_generating, "the answer")
            repeats = screen.repeats
            assert repeats is not None
            summary = repeats.summary()
            answer = app.storage.messages(screen.conversation_id)[-1]
            # The first token comes from the prefill and the last is not fed back: N - 1 decode steps,
            # each but the first compared with the one before it, in each layer.
            assert summary["tokens"] == answer.stats["completion_tokens"] - 2 >= 1
            assert all(counts.tokens == summary["tokens"] for counts in repeats.layers)
            text = str(screen.cache_panel.render())
            assert "same experts as the token before: first choice" in text and "(chance 25.0%)" in text
            assert text.splitlines()[3].split()[0] == "layer" and "repeat" in text.splitlines()[3]

    run(scenario)


def test_the_loading_line_has_a_real_progress_bar(isolated_home: Path, chat_model_dir: Path) -> None:
    from textual.widgets import ProgressBar

    from mixtral_chat.engine.load_progress import weight_bytes

    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=(120, 35)) as pilot:
            await wait_ready(pilot, app)
            bar = app.chat_screen.loading_bar
            await wait_for(pilot, lambda: not bar.display, "the loading line to go")  # once ready
            progress = app.load_progress
            assert progress is not None and progress.finished, progress

            assert progress.bytes_total == weight_bytes(chat_model_dir) and progress.bytes_done > 0
            # The bar drew it (a late "loading" status may redraw the bar after this: not read).
            assert bar.query_one(ProgressBar).total == progress.bytes_total

    run(scenario)
