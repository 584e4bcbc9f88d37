"""The controlling terminal, for the CLI and the TUI's start-up: is there one, and a [y/N] question."""

from __future__ import annotations

import sys


def has_terminal() -> bool:
    """Both stdin and stdout are a terminal (what a full-screen app needs)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def ask_yes_no(question: str) -> bool:
    """A [y/N] question on a terminal: only y or yes is yes; no terminal, end of input (a new line
    is printed then) or anything else is no."""
    if not sys.stdin.isatty():
        return False
    try:
        answer = input(question)
    except EOFError:
        print()
        return False
    return answer.strip().lower() in ("y", "yes")
