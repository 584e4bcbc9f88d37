"""The CLI's progress rows (app/progress.py) in their plain form, for a log or a pipe: one line
per interval, every phase's first and final line, the cells in their order, no terminal codes.
The terminal form (rich.progress in a real pseudo-terminal) is tested through the real CLI in
tests/test_progress_terminal.py."""

from __future__ import annotations

import io
import subprocess
import sys

from mixtral_chat.app.progress import BAR_MAX, BAR_MIN, DETAIL_MIN, PhaseProgress, Row, terminal_layout
from mixtral_chat.engine.units import format_bytes, format_duration


def test_log_gets_one_line_per_interval_and_every_final_line() -> None:
    log = io.StringIO()
    rows = PhaseProgress(log, log_interval_s=3600.0)
    rows.show("download", Row("downloading", 10, 100))
    rows.show("download", Row("downloading", 20, 100))  # throttled
    rows.show("download", Row("downloading", 100, 100), final=True)  # never throttled
    rows.show("download", Row("downloading", 100, 100), final=True)  # but written once
    rows.show("quantize", Row("quantizing", 0, 100))  # a new phase is not throttled
    rows.close()
    rows.show("quantize", Row("quantizing", 50, 100), final=True)  # closed: nothing more
    lines = log.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["downloading", "10.0%"],
        ["downloading", "100.0%"],
        ["quantizing", "0.0%"],
    ]
    assert not rows.terminal and "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_a_phase_s_latest_row_is_written_when_the_next_starts_and_at_close() -> None:
    log = io.StringIO()
    rows = PhaseProgress(log, log_interval_s=3600.0)
    rows.show("download", Row("downloading", 10, 100))
    rows.show("download", Row("downloading", 60, 100))  # throttled, never final (a wrong total)
    rows.show("quantize", Row("quantizing", 0, 100))
    rows.show("quantize", Row("quantizing", 30, 100))  # throttled, then interrupted
    rows.close()
    rows.close()  # a second close adds nothing
    lines = log.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["downloading", "10.0%"],
        ["downloading", "60.0%"],
        ["quantizing", "0.0%"],
        ["quantizing", "30.0%"],
    ]


def test_a_line_holds_the_cells_in_order_in_the_units_of_engine_units() -> None:
    log = io.StringIO()
    rows = PhaseProgress(log, log_interval_s=0.0)
    size = 93_400_000_000
    running = Row("downloading", size // 4, size, speed=125e6, eta_s=560.0, elapsed_s=187.0, detail="a.bin")
    rows.show("download", running)
    rows.show("download", Row("downloading", size, size, speed=125e6, elapsed_s=750.0), final=True)
    rows.show("shards", Row("quantizing", 3, 19, unit="shards"))
    rows.show("step", Row("writing index and config", 0, 1, unit=""))
    rows.show("load", Row("loading demo", 5, None))
    first, final, counted, step, unknown = log.getvalue().splitlines()
    assert first == (
        f"downloading   25.0%  {format_bytes(size / 4)} / {format_bytes(size)}  {format_bytes(125e6)}/s  "
        f"ETA {format_duration(560.0)}  elapsed {format_duration(187.0)}  a.bin"
    )
    # The 100% without an ETA; the time it took.
    assert final == (
        f"downloading  100.0%  {format_bytes(size)} / {format_bytes(size)}  {format_bytes(125e6)}/s  "
        f"elapsed {format_duration(750.0)}"
    )
    assert counted.startswith("quantizing   15.8%  3 / 19 shards  ETA ?  elapsed ")
    assert step.startswith("writing index and config    0.0%  elapsed ")  # a step: no amounts, no ETA
    assert unknown.startswith("loading demo    ?    5 B / ?  ETA ?")


def test_the_cli_does_not_import_rich_at_start_up_nor_for_a_plain_display() -> None:
    probe = (
        "import io, sys; import mixtral_chat.app.cli; "
        "from mixtral_chat.app.progress import PhaseProgress, Row; "
        "rows = PhaseProgress(io.StringIO(), log_interval_s=1.0); "
        "rows.show('p', Row('x', 1, 2), final=True); rows.close(); print('rich' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"


def test_a_narrow_terminal_hides_the_detail_then_elapsed_then_speed_and_cuts_the_label_last() -> None:
    # label, percent, amounts, speed, ETA, elapsed, detail
    row = [
        "downloading",
        " 70.0%",
        "65.4 GB / 93.4 GB",
        "120.0 MB/s",
        "ETA 3 min 30 s",
        "elapsed 1 s",
        "x" * 32,
    ]
    done = ["quantizing", "100.0%", "93.4 GB / 93.4 GB", "320.0 MB/s", "", "elapsed 9 s", "x" * 20]
    full = [11, 6, 17, 10, 14, 11, 32]  # the widest of each cell

    def used(widths: list[int], bar: int) -> int:  # cells one space apart
        return bar + sum(w + 1 for w in widths if w)

    def layout(width: int) -> tuple[list[int], int]:
        widths, bar = terminal_layout([row, done], width)
        assert used(widths, bar) <= width
        return widths, bar

    assert layout(300) == (full, BAR_MAX)
    assert layout(used(full, BAR_MIN) - 5) == ([*full[:6], 32 - 5], BAR_MIN)  # the detail cut first
    no_detail = used(full[:6], BAR_MIN)
    assert layout(no_detail + 1 + DETAIL_MIN) == ([*full[:6], DETAIL_MIN], BAR_MIN)  # cut to its least
    assert layout(no_detail + DETAIL_MIN) == ([*full[:6], 0], BAR_MIN + DETAIL_MIN)  # then hidden
    assert layout(no_detail - 1) == ([*full[:5], 0, 0], BAR_MIN + 11)  # then the elapsed time
    assert layout(used(full[:5], BAR_MIN) - 1) == ([*full[:3], 0, 14, 0, 0], BAR_MIN + 10)  # the speed
    widths, bar = layout(60)  # then the label is cut
    assert widths == [60 - used([0, *full[1:3], 0, 14], BAR_MIN) - 1, *full[1:3], 0, 14, 0, 0]
    assert bar == BAR_MIN and used(widths, bar) == 60
    # A cell empty in every row (the ETA once every phase is over) takes no column.
    assert terminal_layout([done], 300)[0][4] == 0
