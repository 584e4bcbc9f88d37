"""`mixtral-chat` with no subcommand: the chat TUI."""

from __future__ import annotations

import logging
import os
import sys

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


def run_tui(model: str | None = None) -> int:
    """Open the conversation database and the settings, then run the app until the user quits.

    A database that cannot be opened (or is newer than this version) raises before the screen
    changes, so the CLI prints it as one line. A broken config file does not stop the app: it
    starts with defaults, says why, and does not overwrite the file.
    """
    from mixtral_chat.app.settings import Settings, SettingsError, load_settings
    from mixtral_chat.app.storage import Storage

    storage = Storage()
    setup_logging()
    settings_writable = True
    notice = None
    try:
        settings = load_settings()
    except SettingsError as exc:
        settings, settings_writable = Settings(), False
        notice = f"{exc} (using the defaults until this is fixed)"

    from mixtral_chat.app.chat_app import ChatApp

    app = ChatApp(storage, settings, model=model, settings_writable=settings_writable, startup_notice=notice)
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
