"""The app's error lines, in one place: what the CLI prints after "mixtral-chat: error:" and what
the TUI shows in a notification, and the log file that keeps the tracebacks behind the latter.

Imported by the CLI at start-up: nothing heavy here (engine.errors is plain Python).
"""

from __future__ import annotations

import logging

from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.paths import log_dir

LOG_FILENAME = "tui.log"
logger = logging.getLogger("mixtral_chat.tui")


class UsageError(Exception):
    """Bad command-line usage: exit code 2."""


def one_line_error(exc: BaseException) -> str:
    """The message of a user-facing error; for anything else, its type and message on one line."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MixtralChatError):
        return text
    if isinstance(exc, MemoryError):
        return "out of memory: try a smaller model, 4-bit quantization, or fewer experts per layer"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    name = type(exc).__name__
    return f"{name}: {text} (run with --debug for details)" if text else name


def error_line(exc: BaseException, what: str) -> str:
    """The one line the UI shows for an error from a worker. A MixtralChatError is the user's to
    fix and says all; anything else is a bug, logged with its traceback."""
    if isinstance(exc, (MixtralChatError, MemoryError, OSError)):
        return one_line_error(exc)
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    logger.error("%s failed", what, exc_info=exc)
    handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    return f"{line} (details in {handlers[0].baseFilename})" if handlers else line


def setup_logging() -> None:
    """Unexpected errors go with their traceback to tui.log in the log folder (the file is
    created on the first error)."""
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / LOG_FILENAME, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
