"""Copying text: the terminal's clipboard (OSC 52, which works over ssh and tmux) and, where a
desktop session is there, the system clipboard tool too, since some terminals ignore OSC 52."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# (command, what it needs): tried in order, the first one installed is used.
SYSTEM_TOOLS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("pbcopy",), "darwin"),
    (("wl-copy",), "WAYLAND_DISPLAY"),
    (("xclip", "-selection", "clipboard"), "DISPLAY"),
    (("xsel", "--clipboard", "--input"), "DISPLAY"),
)


def system_clipboard_command(
    environ: dict[str, str] | None = None, platform: str | None = None
) -> tuple[str, ...] | None:
    """The system clipboard tool this session can use, or None (e.g. over ssh: OSC 52 only)."""
    environ = dict(os.environ) if environ is None else environ
    platform = sys.platform if platform is None else platform
    for command, needs in SYSTEM_TOOLS:
        available = platform == needs if needs == "darwin" else bool(environ.get(needs))
        if available and shutil.which(command[0]):
            return command
    return None


def copy_with_system_tool(text: str, command: tuple[str, ...] | None) -> bool:
    """Hand `text` to the system clipboard tool; False when there is none or it failed."""
    if command is None:
        return False
    try:
        subprocess.run(command, input=text.encode(), check=True, timeout=5, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True
