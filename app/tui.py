"""`mixtral-chat` with no subcommand: the chat TUI."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from mixtral_chat.app.terminal import ask_yes_no, has_terminal

if TYPE_CHECKING:
    from mixtral_chat.app.storage import Storage

LOG_FILENAME = "tui.log"
logger = logging.getLogger("mixtral_chat.tui")


def setup_logging() -> None:
    """Unexpected errors go with their traceback to tui.log in the log folder (the file is
    created on the first error)."""
    from mixtral_chat.engine.paths import log_dir

    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / LOG_FILENAME, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def error_line(exc: BaseException, what: str) -> str:
    """The one line the UI shows for an error from a worker. A MixtralChatError is the user's to
    fix and says all; anything else is a bug, logged with its traceback."""
    from mixtral_chat.app.cli import one_line_error
    from mixtral_chat.engine.errors import MixtralChatError

    if isinstance(exc, (MixtralChatError, MemoryError, OSError)):
        return one_line_error(exc)
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    logger.error("%s failed", what, exc_info=exc)
    handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    return f"{line} (details in {handlers[0].baseFilename})" if handlers else line


NEEDS_TERMINAL = (
    "mixtral-chat: error: the chat app needs a terminal; use 'mixtral-chat ask \"...\"' for one answer"
)


def open_storage(ask: Callable[[str], bool] = ask_yes_no) -> tuple[Storage, list[str]] | None:
    """The conversation database, checked for damage, and notices for the app to show. A
    damaged file is one line on stderr and an offer to move it aside (never deleted) and start
    with a fresh database; None if the offer is declined."""
    from mixtral_chat.app.storage import DamagedDatabaseError, Storage, default_db_path, move_aside

    path = default_db_path()
    try:
        storage = Storage(path)
    except DamagedDatabaseError as exc:
        damaged = exc
    else:
        try:
            return storage, storage.check()
        except DamagedDatabaseError as exc:
            storage.close()
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
    from mixtral_chat.app.settings import Settings, SettingsError, load_settings

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

    from mixtral_chat.app.chat_app import ChatApp

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
