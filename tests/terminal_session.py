"""A real program with its stderr on a real pseudo-terminal (python's `pty`): what the terminal
receives, escape codes and all, for the tests of the CLI's rich.progress display."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.conftest import REPO_ROOT

COLUMNS = 160  # wide enough for every cell of a row
ERASE_LINE = "\x1b[2K"  # rich erases the display's lines before each redraw
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = "━"  # rich's bar (a UTF-8 terminal): its full cells
PARTIAL_BAR = "[━╸╺]+"  # its cells with a half cell where the filled part ends


@dataclass
class TerminalRun:
    returncode: int
    stdout: str
    terminal: str  # stderr as the terminal received it, escape codes and all

    def final_frame(self) -> list[str]:
        """The rows of the display's last frame, without escape codes."""
        assert ERASE_LINE in self.terminal, self.terminal
        frame = ANSI.sub("", self.terminal.rsplit(ERASE_LINE, 1)[1])
        return [line.strip() for line in frame.replace("\r", "").splitlines() if line.strip()]


def run_on_a_terminal(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    interrupt_when: Callable[[str], bool] | None = None,
    timeout_s: float = 120,
) -> TerminalRun:
    """`python args...` with stderr on a pseudo-terminal of COLUMNS x 40 (stdout a pipe, stdin
    empty); SIGINT once `interrupt_when(what the terminal got so far)` holds."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
    process = subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONIOENCODING": "utf-8",
            "TERM": "xterm-256color",
            "COLUMNS": str(COLUMNS),
            **(env or {}),
        },
    )
    os.close(terminal)
    received = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                received += chunk
            if interrupt_when is not None and interrupt_when(received.decode("utf-8", "replace")):
                assert process.poll() is None, "it finished before it could be interrupted"
                process.send_signal(signal.SIGINT)
                interrupt_when = None
        stdout = process.communicate(timeout=60)[0]
    finally:
        process.kill()
        os.close(controller)
    return TerminalRun(process.returncode, stdout.decode(), received.decode())
