"""The CLI's progress display on a terminal: the real `mixtral-chat` in a subprocess whose stderr
is a real pseudo-terminal (tests/terminal_session.py), drawn by rich.progress. The final frame is
what rich drew after its last erase of the display. (`models pull`: tests/test_models.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_chat.engine.load_progress import weight_bytes
from mixtral_chat.engine.models.catalog import demo_dir
from mixtral_chat.engine.units import format_bytes
from tests.conftest import REPO_ROOT, save_tiny_checkpoint
from tests.terminal_session import (
    ANSI,
    BAR,
    ERASE_LINE,
    HIDE_CURSOR,
    PARTIAL_BAR,
    SHOW_CURSOR,
    run_on_a_terminal,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")


def cli(*args: str) -> list[str]:
    return ["-m", "mixtral_chat.app.cli", *args]


def test_quantize_draws_a_rich_bar_per_phase_that_ends_at_100_percent(tmp_path: Path) -> None:
    src = save_tiny_checkpoint(tmp_path / "tiny", max_shard_size="100KB")
    dst = tmp_path / "tiny-int4"
    run = run_on_a_terminal(cli("quantize", str(src), str(dst), "--threads", "1"))
    assert run.returncode == 0, run.terminal
    # stdout is the command's output alone; the display is on stderr.
    assert run.stdout == f"quantized {src} -> {dst} (int4 (group size 64))\n"
    assert BAR in run.terminal and run.terminal.index(HIDE_CURSOR) < run.terminal.rindex(SHOW_CURSOR)
    assert run.terminal.rstrip("\r\n").endswith(SHOW_CURSOR)  # the cursor is back at the end
    shards = len(list(src.glob("*.safetensors")))
    source = sum(path.stat().st_size for path in src.glob("*.safetensors"))
    quantizing, finishing = run.final_frame()
    assert re.match(rf"quantizing +{BAR}+ 100\.0% ", quantizing), quantizing  # the bar full
    assert f"{format_bytes(source)} / " in quantizing  # the source's bytes, fewer than its files'
    assert f"{shards}/{shards} shards" in quantizing and "ETA" not in quantizing
    assert re.match(rf"writing index and config +{BAR}+ 100\.0% +elapsed ", finishing), finishing


def test_ctrl_c_mid_quantize_stops_the_bar_shows_the_cursor_then_says_how_to_resume(tmp_path: Path) -> None:
    # Big enough that nf4 on one thread takes seconds: the signal lands after the first shard.
    src = save_tiny_checkpoint(
        tmp_path / "mid", max_shard_size="4MB", hidden_size=128, intermediate_size=512, num_hidden_layers=8
    )
    dst = tmp_path / "models" / "out"
    partial = tmp_path / "models" / ".out.partial"

    def a_shard_is_done_and_drawn(terminal: str) -> bool:
        try:
            done = json.loads((partial / "progress.json").read_text())["done"]
        except (OSError, ValueError):
            return False
        return bool(done) and BAR in terminal

    run = run_on_a_terminal(
        cli("quantize", str(src), str(dst), "--scheme", "nf4", "--threads", "1"),
        interrupt_when=a_shard_is_done_and_drawn,
    )
    assert run.returncode == 130 and run.stdout == ""
    message = re.search(
        r"mixtral-chat: error: interrupted with \d+ of \d+ shards done, kept in ", run.terminal
    )
    assert message, run.terminal
    # The display stopped (the cursor shown again) before the message, and nothing drew after it.
    assert run.terminal.rindex(SHOW_CURSOR) < message.start()
    assert ERASE_LINE not in run.terminal[message.start() :]
    assert HIDE_CURSOR not in run.terminal[message.start() :]
    assert "to resume\r\n" in run.terminal[message.start() :]
    last_row = ANSI.sub("", run.terminal[: message.start()].rsplit(ERASE_LINE, 1)[1]).strip()
    assert re.match(rf"quantizing +{PARTIAL_BAR} +\d+\.\d% ", last_row) and "100.0%" not in last_row


def test_ask_draws_the_model_load_on_a_terminal_only(isolated_home: Path) -> None:
    # The demo loads in well under the one second after which the row appears: lower it.
    program = (
        "import sys; from mixtral_chat.app.commands import ask; ask.LOAD_QUIET_S = 0.0; "
        "from mixtral_chat.app.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["-c", program, "ask", "--max-tokens", "2", "hi"]
    run = run_on_a_terminal(args)
    assert run.returncode == 0, run.terminal
    assert run.stdout and "\x1b" not in run.stdout  # the answer alone
    total = format_bytes(weight_bytes(demo_dir()))
    (loaded,) = run.final_frame()
    assert re.match(rf"loading demo +{BAR}+ 100\.0% ", loaded), loaded
    assert f"/ {total} " in loaded and "tensors" in loaded and "ETA" not in loaded
    # The display ended before the answer's stats or anything else on stderr.
    assert run.terminal.rstrip("\r\n").endswith(SHOW_CURSOR)

    # TERM=dumb: no display, its first and final rows as plain lines (the terminal adds the \r).
    dumb = run_on_a_terminal(args, env={"TERM": "dumb"})
    assert (
        dumb.returncode == 0 and "\x1b" not in dumb.terminal and "\r" not in dumb.terminal.replace("\r\n", "")
    )
    first, final = [line for line in dumb.terminal.splitlines() if line.startswith("loading demo")]
    assert "ETA" in first and final.startswith("loading demo  100.0%  ") and f"/ {total}  " in final

    # --json: the answer as one object, no display even on a terminal.
    as_json = run_on_a_terminal([*args, "--json"])
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["model"] == "demo"
    assert BAR not in as_json.terminal and "loading demo" not in as_json.terminal

    # Piped (not a terminal): no progress rows.
    piped = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert piped.returncode == 0 and "loading demo" not in piped.stderr
