"""What a user types or keeps that the TUI must take safely, under Pilot with the real engine and
real SQLite: titles and names that look like markup, engine settings out of their bounds, a model
that fails to load on Use, edits left unsaved, a narrow terminal, and switching chats while an
answer streams."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("textual")

from textual.widgets import Button, Input, Label, TabbedContent

from mixtral_chat.app.screens.dialogs import ConfirmScreen, TextInputScreen
from mixtral_chat.app.screens.settings import SettingsScreen
from mixtral_chat.app.settings import Endpoint, Settings, default_config_path
from mixtral_chat.app.storage import Storage
from mixtral_chat.app.widgets.endpoints_table import EndpointsTable
from mixtral_chat.engine.models.registry import add_model, list_models, set_default
from tests.test_tui import chat_model_dir, make_app, run, send, type_text, wait_for, wait_ready

__all__ = ["chat_model_dir"]  # the fixture, shared with test_tui

MARKUP_TITLE = "oops [/] title"  # "[/]" closes nothing: read as markup, it raises
BOLD_TITLE = "[bold]x[/bold] hi"  # read as markup, it shows as "x hi"
OLDER_TITLE = "[b]older[/b] [/]"


def text_of(widget: Label) -> str:
    return widget.render().plain  # type: ignore[union-attr]


def test_titles_and_names_that_look_like_markup_show_as_typed(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    storage = Storage()
    storage.create_conversation(OLDER_TITLE)
    storage.create_conversation(MARKUP_TITLE)  # the latest: the app opens it at start
    storage.close()
    settings = Settings(endpoints={"lab [/] box": Endpoint(url="http://127.0.0.1:9/v1")})
    app = make_app(chat_model_dir, settings=settings)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await wait_for(pilot, lambda: screen.conversation_id is not None, "the latest chat to open")
            assert text_of(screen.query_one("#chat-title", Label)) == MARKUP_TITLE

            await pilot.press("f2")
            await wait_for(pilot, lambda: isinstance(app.screen, TextInputScreen), "the rename dialog")
            app.screen.query_one(Input).value = BOLD_TITLE + " [/]"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not isinstance(app.screen, TextInputScreen), "the dialog to close")
            assert text_of(screen.query_one("#chat-title", Label)) == BOLD_TITLE + " [/]"

            # The palette finds it by its title and shows the title as it is.
            await pilot.press("ctrl+p")
            await type_text(pilot, "bold")
            await pilot.pause(0.5)
            hits = app.screen.query_one("CommandList")
            shown = [str(hits.get_option_at_index(i).prompt) for i in range(hits.option_count)]
            assert any(line.startswith("Open chat: [bold]x[/bold] hi [/]") for line in shown), shown
            await pilot.press("escape")
            await pilot.pause()

            await pilot.press("f8")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete confirmation")
            question = text_of(app.screen.query_one(".dialog-question", Label))
            assert question.startswith(f"Delete “{BOLD_TITLE} [/]”")
            await pilot.press("y")
            await wait_for(pilot, lambda: len(app.storage.list_conversations()) == 1, "the chat to go")
            deleted = [n for n in app._notifications if n.message.startswith("Deleted")][-1]
            assert deleted.message == f"Deleted “{BOLD_TITLE} [/]”." and not deleted.markup

            # An endpoint's name in its table, as typed.
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            app.screen.query_one(TabbedContent).active = "endpoints-tab"
            await pilot.pause()
            table = app.screen.query_one(EndpointsTable)
            assert table.get_cell("lab [/] box", "name").plain == "lab [/] box"

    run(scenario)
    # And the app starts again on the same chats (the markup title had made every start fail).
    again = make_app(chat_model_dir)

    async def restart() -> None:
        async with again.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, again)
            title = again.chat_screen.query_one("#chat-title", Label)
            await wait_for(pilot, lambda: text_of(title) == OLDER_TITLE, "the remaining chat's title")

    run(restart)


def test_engine_values_out_of_bounds_are_refused_and_unsaved_edits_are_discarded(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            settings_screen = app.screen
            settings_screen.query_one(TabbedContent).active = "engine-tab"
            await pilot.pause()
            budget = settings_screen.query_one("#gpu-budget", Input)
            for typed, message in [
                ("1e999", "gpu_budget_gb must be a finite number of GB >= 0, got inf"),
                ("-3", "gpu_budget_gb must be a finite number of GB >= 0, got -3.0"),
            ]:
                budget.value = typed
                settings_screen.query_one("#save-engine", Button).press()
                await wait_for(pilot, lambda m=message: m in [n.message for n in app._notifications], message)
                assert app.settings.engine.gpu_budget_gb is None  # nothing applied
            assert not default_config_path().exists()  # nor saved
            context = settings_screen.query_one("#context-length", Input)
            context.value = "8"
            settings_screen.query_one("#save-engine", Button).press()
            refused = "context_length must be at least 16, got 8"
            await wait_for(pilot, lambda: refused in [n.message for n in app._notifications], refused)

            # Left without saving: the edits are dropped, and said to be; shown again as in effect.
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is app.chat_screen, "the chat screen")
            assert any("not saved: they are discarded" in n.message for n in app._notifications)
            await pilot.press("ctrl+b")  # a setting saved at once still saves (the engine's are intact)
            await wait_for(pilot, default_config_path().exists, "the config file")
            assert "gpu_budget_gb" not in default_config_path().read_text()
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            await pilot.pause()
            assert app.screen.query_one("#gpu-budget", Input).value == ""
            assert app.screen.query_one("#context-length", Input).value == ""

    run(scenario)


def test_use_makes_a_model_the_default_only_once_it_loads(
    isolated_home: Path, chat_model_dir: Path, tmp_path: Path
) -> None:
    good = add_model(str(chat_model_dir)).name
    broken_dir = tmp_path / "broken-copy"
    shutil.copytree(chat_model_dir, broken_dir)
    weights = next(broken_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    broken = add_model(str(broken_dir)).name
    set_default(good)
    app = make_app(chat_model_dir)

    def default() -> str | None:
        return next((entry.name for entry in list_models() if entry.is_default), None)

    async def use(pilot, name: str) -> None:
        table = app.screen.models_table
        table.move_cursor(row=table.get_row_index(name))
        await pilot.pause()
        before = app._load_serial
        app.screen.query_one("#use-model", Button).press()
        # A broken model fails fast: the new load's end, not a "loading" state that may be missed.
        await wait_for(
            pilot,
            lambda: app._load_serial > before and app.model_status.state in ("ready", "failed"),
            f"{name} to load",
        )

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            await use(pilot, broken)
            assert app.model_status.state == "failed" and "truncated" in (app.model_status.error or "")
            assert default() == good  # unchanged: the next start loads what worked
            await use(pilot, good)
            assert app.model_status.state == "ready" and default() == good
            set_default(broken)  # (as `models use` could have) ...
            await use(pilot, good)  # ... and Use on one that loads makes it the default again
            assert default() == good

    run(scenario)


def test_a_narrow_terminal_wraps_notes_and_keeps_dialogs_inside(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    app = make_app(chat_model_dir, max_tokens=4)

    async def scenario() -> None:
        async with app.run_test(size=(60, 20)) as pilot:
            await wait_ready(pilot, app)
            await send(pilot, app, "hello there")
            await pilot.press("f8")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete confirmation")
            dialog = app.screen.query_one(".dialog")
            assert dialog.region.x >= 0 and dialog.region.right <= 60
            await pilot.press("n")
            await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the dialog to close")
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
            app.screen.query_one(TabbedContent).active = "endpoints-tab"
            await pilot.pause()
            note = app.screen.query_one("#endpoints-tab .settings-note", Label)
            assert note.region.right <= 60 and note.region.height > 1  # wrapped, not cut

    run(scenario)


def test_switching_chats_while_an_answer_streams_stops_the_old_views_stream(
    isolated_home: Path, chat_model_dir: Path
) -> None:
    storage = Storage()
    other = storage.create_conversation("another chat")
    storage.close()
    app = make_app(chat_model_dir, max_tokens=3000)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_ready(pilot, app)
            screen = app.chat_screen
            await pilot.press("ctrl+n")
            await type_text(pilot, "write a long answer")
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.message_list.views[-1].text, "the first words of the answer")
            assert screen.generation is not None and screen.generation.view is not None
            assert screen.generation.view.is_streaming
            streaming = screen.generation.view  # type: ignore[union-attr]
            await screen.open_conversation(other.id)
            assert not streaming.is_streaming and not streaming.is_attached
            await pilot.press("escape")  # stop the answer; it is kept
            await wait_for(pilot, lambda: screen.generation is None, "the answer to stop")

    run(scenario)
