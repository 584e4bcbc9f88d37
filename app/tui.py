"""`mixtral-chat` with no subcommand: the chat TUI."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from mixtral_chat.app.errors import setup_logging
from mixtral_chat.app.settings import Settings, SettingsError, load_settings
from mixtral_chat.app.storage import DamagedDatabaseError, Storage, default_db_path, move_aside
from mixtral_chat.app.terminal import ask_yes_no, has_terminal

NEEDS_TERMINAL = (
    "mixtral-chat: error: the chat app needs a terminal; use 'mixtral-chat ask \"...\"' for one answer"
)


def open_storage(ask: Callable[[str], bool] = ask_yes_no) -> tuple[Storage, list[str]] | None:
    """The conversation database, checked for damage, and notices for the app to show. A
    damaged file is one line on stderr and an offer to move it aside (never deleted) and start
    with a fresh database; None if the offer is declined."""
    path = default_db_path()
    try:
        return Storage.checked(path)
    except DamagedDatabaseError as exc:
        damaged = exc
    print(f"mixtral-chat: error: {damaged}", file=sys.stderr)
    if not ask(f"Move it aside to {path.name}.damaged-<date> and start with a fresh database? [y/N] "):
        return None
    moved = move_aside(path)
    print(f"mixtral-chat: moved the damaged database to {moved}", file=sys.stderr)
    return Storage(path), [f"Started with a fresh conversation database; the damaged one is kept as {moved}."]


def run_tui(model: str | None = None) -> int:
    """Open the conversation database and the settings, then run the app until the user quits.

    Without a terminal it says so and returns 2 (Textual would draw into a pipe forever). A
    database that cannot be opened (or is newer than this version) raises before the screen
    changes, so the CLI prints it as one line; a damaged one is offered to be moved aside. A
    broken config file does not stop the app: it starts with defaults, says why, and does not
    overwrite the file. SIGTERM and SIGHUP end the app like Ctrl+Q: the answer being written is
    saved and the terminal restored.
    """
    if not has_terminal():
        print(NEEDS_TERMINAL, file=sys.stderr)
        return 2
    opened = open_storage()
    if opened is None:
        return 1
    storage, notices = opened
    setup_logging()
    settings_writable = True
    notice = None
    try:
        settings = load_settings()
    except SettingsError as exc:
        settings, settings_writable = Settings(), False
        notice = f"{exc} (using the defaults until this is fixed)"

    from mixtral_chat.app.chat_app import ChatApp  # Textual: only once there is a terminal

    app = ChatApp(
        storage,
        settings,
        model=model,
        settings_writable=settings_writable,
        startup_notice=notice,
        notices=notices,
        handle_signals=True,
        verify_search_index=True,
    )
    try:
        result = app.run()
    finally:
        storage.close()
    code = int(result or 0) if app.return_code in (None, 0) else int(app.return_code)
    if app.loading_threads:
        # A model still loading (torch import, gigabytes of weights) cannot be interrupted, and the
        # interpreter would wait for its thread at exit. Everything the user typed is committed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
