"""Snapshot tests of the TUI (pytest-textual-snapshot): the chat screen with a stored
conversation, the settings screen (models and engine tabs) and the expert-cache panel.

The real app runs on the suite's tiny random-weight Mixtral, with real SQLite in a temporary
MIXTRAL_CHAT_HOME. What would change from run to run is pinned before the screenshot is taken:
the conversation is written to the database beforehand (no generation), its timestamps are set
to a fixed age, the model has finished loading (no spinner, no seconds), the "loaded in N s"
toast is cleared, the process' resident memory reads as a fixed figure, and the settings
screen's temporary paths and free-disk figures are replaced with fixed text.

Update the snapshots with `pytest tests/test_tui_snapshots.py --snapshot-update`, and look at
the SVGs under tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("textual")
pytest.importorskip("pytest_textual_snapshot")

from textual.pilot import Pilot
from textual.widgets import DataTable, Label, TabbedContent

from mixtral_chat.app.chat_app import ChatApp
from mixtral_chat.app.screens.settings import SettingsScreen
from mixtral_chat.app.settings import Settings
from mixtral_chat.app.storage import Storage, default_db_path
from mixtral_chat.app.widgets import status_bar
from mixtral_chat.engine.options import GenerationConfig
from mixtral_chat.engine.paths import assets_dir

SIZE = (120, 36)
FIXED_RSS_BYTES = 512 * 1024**2
# The stored chats are this old when the sidebar draws them: it shows "3 d" on every run.
CHAT_AGE_S = 3 * 86400 + 3600

ANSWER = """Here is a function that adds two numbers:

```python
def add(a: int, b: int) -> int:
    return a + b
```

Call it as `add(2, 3)`; it returns **5**."""


@pytest.fixture(scope="module")
def snapshot_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in a folder with a fixed name: the status bar shows the folder's name."""
    directory = tmp_path_factory.mktemp("snapshots") / "tiny-mixtral"
    shutil.copytree(tiny_model_dir, directory)
    return directory


@pytest.fixture
def home(isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # no downloads of the host's
    # Resident memory differs on every run: the status line reads a fixed figure instead.
    monkeypatch.setattr(status_bar, "process_rss_bytes", lambda: FIXED_RSS_BYTES)
    return isolated_home


def seed_conversations() -> None:
    """Two stored chats, the newer one a finished exchange with Markdown and code; their
    timestamps then set to a fixed age (Storage stamps rows with the current time)."""
    with Storage() as storage:
        older = storage.create_conversation("Packing list for a hike").id
        storage.add_message(older, "user", "What should I pack for a day hike?")
        storage.add_message(older, "assistant", "Water, food, a map, a rain jacket and a first-aid kit.")
        newer = storage.create_conversation("Adding numbers in Python").id
        storage.add_message(newer, "user", "Write a Python function that adds two numbers.")
        storage.add_message(newer, "assistant", ANSWER)
    stamp = time.time() - CHAT_AGE_S
    with sqlite3.connect(default_db_path()) as conn:
        # The newer chat stays first in the sidebar: it is a second younger.
        conn.execute(
            "UPDATE conversations SET created_at = ?, updated_at = ? WHERE id = ?", (stamp, stamp, older)
        )
        conn.execute(
            "UPDATE conversations SET created_at = ?, updated_at = ? WHERE id = ?",
            (stamp + 1, stamp + 1, newer),
        )
        conn.execute("UPDATE messages SET created_at = ?", (stamp,))
    conn.close()


def make_app(model_dir: Path, settings: Settings | None = None) -> ChatApp:
    settings = settings or Settings()
    settings.generation = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=8)
    settings.engine.device = "cpu"  # "auto" would draw "cuda" and GPU memory on a machine with one
    return ChatApp(Storage(), settings, model=str(model_dir))


async def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def settle(pilot: Pilot[Any]) -> None:
    """The model loaded, its toast gone, the memory figure drawn: nothing left that changes."""
    app = pilot.app
    assert isinstance(app, ChatApp)
    await wait_for(lambda: app.model_status.state in ("ready", "failed"), "the model to load")
    assert app.model_status.state == "ready", app.model_status
    await wait_for(lambda: not app.chat_screen.loading_bar.display, "the loading bar to go")
    # App.notify posts a message: the "loaded in N s" toast exists only once that is handled.
    await wait_for(
        lambda: any("loaded in" in n.message for n in app._notifications), "the model-loaded notification"
    )
    app.clear_notifications()
    app.chat_screen.status_bar.update_info(rss_bytes=FIXED_RSS_BYTES)
    # A blinking cursor would be on or off depending on when the screenshot is taken.
    app.chat_screen.prompt.cursor_blink = False
    await pilot.pause()


def snapshot(
    snap_compare: Callable[..., bool],
    app: ChatApp,
    run_before: Callable[[Pilot[Any]], Awaitable[None]],
    size: tuple[int, int] = SIZE,
) -> bool:
    return snap_compare(app, terminal_size=size, run_before=run_before)


def test_chat_screen_with_a_stored_conversation(
    home: Path, snapshot_model_dir: Path, snap_compare: Callable[..., bool]
) -> None:
    seed_conversations()
    app = make_app(snapshot_model_dir)

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        screen = app.chat_screen
        assert screen.conversation_id is not None
        assert app.storage.get_conversation(screen.conversation_id).title == "Adding numbers in Python"
        assert [view.role for view in screen.message_list.views] == ["user", "assistant"]

    assert snapshot(snap_compare, app, run_before)


def test_chat_screen_at_80x24(
    home: Path, snapshot_model_dir: Path, snap_compare: Callable[..., bool]
) -> None:
    """The smallest common terminal: the sidebar folded away, the essential keys first in the
    footer (Stop, Help, Quit, Settings), the status line whole."""
    seed_conversations()
    app = make_app(snapshot_model_dir)

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        screen = app.chat_screen
        assert screen.has_class("-narrow") and not screen.query_one("#sidebar").display
        assert [view.role for view in screen.message_list.views] == ["user", "assistant"]

    assert snapshot(snap_compare, app, run_before, size=(80, 24))


def test_settings_screen_models_tab(
    home: Path, snapshot_model_dir: Path, snap_compare: Callable[..., bool]
) -> None:
    app = make_app(snapshot_model_dir)

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("f3")
        await wait_for(lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
        screen = app.screen
        assert isinstance(screen, SettingsScreen)
        await pilot.pause()
        # Temporary folders and free disk differ per run and per machine: fixed text instead.
        disk = screen.query_one("#disk-free", Label)
        assert "Free disk" in str(disk.render())
        disk.update("Free disk: (masked in this snapshot)")
        table: DataTable[Any] = screen.models_table
        # Folders differ per checkout and per run: the model given by path, the bundled demo.
        # The column is re-measured from the fixed text (update_width), so neither its width nor
        # the scrollbar's thumb depends on how long the real paths were.
        folders = {str(snapshot_model_dir): "<model folder>", str(assets_dir() / "demo"): "<assets>/demo"}
        for row_key in list(table.rows):
            source = str(table.get_cell(row_key, "source"))
            if source in folders:
                table.update_cell(row_key, "source", folders.pop(source), update_width=True)
        assert not folders, f"not in the models table: {folders}"
        detail = screen.query_one("#model-detail", Label)
        detail.update(str(detail.render()).replace(str(home), "<home>"))
        await pilot.pause()

    assert snapshot(snap_compare, app, run_before)


def test_settings_screen_engine_tab(
    home: Path, snapshot_model_dir: Path, snap_compare: Callable[..., bool]
) -> None:
    settings = Settings()
    settings.engine.offload = True
    settings.engine.experts_per_layer = 2
    app = make_app(snapshot_model_dir, settings)

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("f3")
        await wait_for(lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
        screen = app.screen
        screen.query_one(TabbedContent).active = "engine-tab"
        await pilot.pause()
        assert "Offload plan: " in str(screen.query_one("#plan-note").render())

    # Tall enough for the whole engine grid and the plan note under it.
    assert snapshot(snap_compare, app, run_before, size=(120, 46))


def test_expert_cache_panel_with_offloading(
    home: Path, snapshot_model_dir: Path, snap_compare: Callable[..., bool]
) -> None:
    settings = Settings()
    settings.engine.offload = True
    settings.engine.experts_per_layer = 2  # 2 of 4 experts per layer on the device
    app = make_app(snapshot_model_dir, settings)

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("ctrl+g")
        panel = app.chat_screen.cache_panel
        assert panel.display
        await pilot.pause()
        text = str(panel.render())
        assert "layer" in text and "·" in text  # residency drawn: absent experts shown

    assert snapshot(snap_compare, app, run_before)


def test_expert_cache_panel_without_offloading(
    home: Path, snapshot_model_dir: Path, snap_compare: Callable[..., bool]
) -> None:
    app = make_app(snapshot_model_dir)

    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert "all experts resident" in str(app.chat_screen.cache_panel.render())

    assert snapshot(snap_compare, app, run_before)
