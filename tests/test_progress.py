"""The CLI's one progress line (app/progress.py), on a terminal and in a log."""

from __future__ import annotations

import io

from mixtral_chat.app.progress import ProgressLine


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_one_line_per_interval_and_every_final_line() -> None:
    log = io.StringIO()
    line = ProgressLine(log, log_interval_s=3600.0)
    line.show("download 10%", phase="download")
    line.show("download 20%", phase="download")  # throttled
    line.show("download 100%", phase="download", final=True)  # never throttled
    line.show("download 100%", phase="download", final=True)  # but drawn once
    line.show("quantize 0%", phase="quantize")  # a new phase is not throttled
    line.end()
    assert log.getvalue().splitlines() == ["download 10%", "download 100%", "quantize 0%"]


def test_terminal_redraws_in_place_blanks_leftovers_and_ends_phases() -> None:
    term = _Terminal()
    line = ProgressLine(term, log_interval_s=3600.0)
    line.interval_s = 0.0  # every redraw shows
    line.show("downloading 9.5%", phase="download")
    line.show("downloading 10%", phase="download")
    line.show("quantizing 1%", phase="quantize")
    line.end()
    line.end()  # a second end adds nothing
    assert term.getvalue() == "\rdownloading 9.5%\rdownloading 10% \n\rquantizing 1%\n"
