"""Model-load progress (issue 17 item 9): Engine.load reports the weight bytes read, `ask` draws
a line on a terminal's stderr when loading takes over a second, and the TUI shows a bar."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_chat.engine.load_progress import LoadProgress, weight_bytes
from mixtral_chat.engine.models.catalog import demo_dir
from mixtral_chat.engine.options import LoadOptions
from mixtral_chat.engine.units import format_size
from tests.conftest import REPO_ROOT


def test_engine_load_reports_the_weight_bytes_read(tiny_model_dir: Path) -> None:
    from mixtral_chat.engine.runtime import Engine

    seen: list[LoadProgress] = []
    Engine.load(tiny_model_dir, LoadOptions(device="cpu"), progress=seen.append)
    total = weight_bytes(tiny_model_dir)
    assert seen and all(p.bytes_total == total for p in seen)
    done = [p.bytes_done for p in seen]
    assert done == sorted(done) and 0 < done[-1] <= total
    last = seen[-1]
    assert last.finished and last.fraction == 1.0 and last.eta_s == 0.0 and last.tensors > 0
    # A resident float model reads every tensor of its files (the headers are the rest).
    assert done[-1] > 0.99 * total


def test_engine_load_reports_while_offloading_from_a_disk_store(tiny_model_dir: Path) -> None:
    from mixtral_chat.engine.runtime import Engine

    seen: list[LoadProgress] = []
    options = LoadOptions(device="cpu", offload=True, experts_per_layer=2, offload_store="disk")
    Engine.load(tiny_model_dir, options, progress=seen.append)
    assert seen[-1].finished and seen[-1].bytes_done > 0


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_ask_draws_a_load_line_on_a_terminal_only(isolated_home: Path) -> None:
    # The demo loads in well under the one second after which the line appears: lower it.
    program = (
        "import sys; from mixtral_chat.app.commands import ask; ask.LOAD_QUIET_S = 0.0; "
        "from mixtral_chat.app.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = [sys.executable, "-c", program, "ask", "--max-tokens", "2", "hi"]
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=terminal, stdin=subprocess.DEVNULL, cwd=REPO_ROOT
    )
    os.close(terminal)
    stderr = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        stderr += chunk
    process.wait(timeout=60)
    os.close(controller)
    assert process.returncode == 0, stderr
    text = stderr.decode()
    total = format_size(weight_bytes(demo_dir()))
    # Redrawn in place, ending with everything read.
    assert "loading demo: " in text and "\r" in text
    assert f"loading demo: {total} of {total}" in text

    # Piped (not a terminal): no progress line.
    piped = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert piped.returncode == 0 and "loading demo" not in piped.stderr
