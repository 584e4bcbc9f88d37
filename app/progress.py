"""The CLI's progress display (`quantize`, `models pull`, `ask`'s model load), on stderr only.

One row per phase (a pull's download, then its quantization; quantize's shards; a model load).
On a terminal the rows are a `rich.progress` display, redrawn in place; elsewhere (a log, a pipe,
CI, TERM=dumb) each row is a plain line, written at most once per `log_interval_s` and once more
when its phase ends, without ANSI codes or carriage returns. The cells are decided here, once, for
both forms: the label, the bar (terminal only), the percentage, done / total, speed, ETA, elapsed,
and a detail (the current file, tensors and shards); sizes and times as engine/units.py writes
them. On a narrow terminal `terminal_layout` lets the detail, the elapsed time and the speed give
way, in that order, and cuts the label last.

rich is imported only when a terminal display starts, never at CLI start-up.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from mixtral_chat.engine.units import format_bytes, format_count, format_duration

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

BYTES = "bytes"
REFRESH_PER_S = 5  # terminal redraws per second


@dataclass(frozen=True)
class Row:
    """What a phase's row shows now. `unit` is BYTES (sizes and speed read "1.2 GB", "45.0 MB/s"),
    the noun of a count ("tensors"), or "" for a step shown by its bar alone; `total` None when
    not known yet; `elapsed_s` None to count from the phase's first row."""

    label: str
    done: float
    total: float | None
    unit: str = BYTES
    speed: float | None = None  # units per second
    eta_s: float | None = None
    elapsed_s: float | None = None
    detail: str = ""


class _Phase:
    """One phase's row as drawn: the latest Row, and whether the phase has ended."""

    def __init__(self, row: Row) -> None:
        self.row = row
        self.started = time.monotonic()
        self.final = False
        self.final_elapsed_s: float | None = None
        self.task_id: TaskID | None = None  # its row on a terminal
        self.pending = False  # in a log: its latest row not written yet (throttled)

    def elapsed_s(self) -> float:
        if self.final_elapsed_s is not None:
            return self.final_elapsed_s
        if self.row.elapsed_s is not None:
            return self.row.elapsed_s
        return time.monotonic() - self.started

    def fraction(self) -> float | None:
        row = self.row
        if self.final:
            return 1.0
        return min(row.done / row.total, 1.0) if row.total else None


# The cells of a row, the same in both forms.
def _label_cell(phase: _Phase) -> str:
    return phase.row.label


def _percent_cell(phase: _Phase) -> str:
    fraction = phase.fraction()
    return "  ?  " if fraction is None else f"{100 * fraction:5.1f}%"


def _amount(count: float, unit: str) -> str:
    return format_bytes(count) if unit == BYTES else format_count(count)


def _amounts_cell(phase: _Phase) -> str:
    row = phase.row
    if not row.unit:
        return ""  # a step, not an amount
    total = "?" if row.total is None else _amount(row.total, row.unit)
    noun = "" if row.unit == BYTES else f" {row.unit}"
    return f"{_amount(row.done, row.unit)} / {total}{noun}"


def _speed_cell(phase: _Phase) -> str:
    speed = phase.row.speed
    if not speed:
        return ""
    return f"{format_bytes(speed)}/s" if phase.row.unit == BYTES else f"{speed:.1f} {phase.row.unit}/s"


def _eta_cell(phase: _Phase) -> str:
    if phase.final or not phase.row.unit:
        return ""  # over, or a step without amounts to time
    return f"ETA {format_duration(phase.row.eta_s)}"


def _elapsed_cell(phase: _Phase) -> str:
    return f"elapsed {format_duration(phase.elapsed_s())}"


def _detail_cell(phase: _Phase) -> str:
    return phase.row.detail


# The cells in their order; on a terminal the bar comes after the label.
CELLS: tuple[Callable[[_Phase], str], ...] = (
    _label_cell,
    _percent_cell,
    _amounts_cell,
    _speed_cell,
    _eta_cell,
    _elapsed_cell,
    _detail_cell,
)
LABEL, DETAIL = CELLS.index(_label_cell), CELLS.index(_detail_cell)
# On a narrow terminal these give way, in this order: the detail (cut with an ellipsis while
# DETAIL_MIN characters fit, else hidden), the elapsed time, the speed; the label is cut last.
GIVE_WAY = (DETAIL, CELLS.index(_elapsed_cell), CELLS.index(_speed_cell))
DETAIL_MIN = 12
BAR_MIN, BAR_MAX = 10, 40


def plain_line(phase: _Phase) -> str:
    return "  ".join(text for text in (cell(phase) for cell in CELLS) if text)


def terminal_layout(rows: list[list[str]], width: int) -> tuple[list[int], int]:
    """The terminal's columns for these rows (each a list of CELLS' texts) in `width` characters:
    each cell's width (0: hidden, as is a cell empty in every row) and the bar's. Cells are one
    space apart."""
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(len(CELLS))]
    widths[LABEL] = max(widths[LABEL], 1)  # the label's column is always there

    def room_left(bar: int) -> int:  # what is left after the bar and the shown cells
        return width - bar - sum(w + 1 for w in widths if w)

    for i in GIVE_WAY:
        if room_left(BAR_MIN) >= 0:
            break
        if i == DETAIL and widths[i] + room_left(BAR_MIN) >= DETAIL_MIN:
            widths[i] += room_left(BAR_MIN)  # cut, not hidden
        else:
            widths[i] = 0
    if room_left(BAR_MIN) < 0:
        widths[LABEL] = max(widths[LABEL] + room_left(BAR_MIN), 1)
    return widths, min(max(room_left(0), BAR_MIN), BAR_MAX)


def stream_is_terminal(stream: TextIO) -> bool:
    """Whether `stream` gets the redrawn display: a terminal that is not TERM=dumb."""
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except ValueError:  # closed
        return False


class PhaseProgress:
    """The progress rows of one command on `stream` (stderr). `show` a phase's latest Row; a new
    phase starts a new row below the last one; `final=True` ends the phase (its 100% drawn once,
    never throttled; later rows for it are ignored). In a log a phase's latest row is written
    when the next phase starts or at `close`, so its last state is always there. `close` before
    the command's own output, and in a `finally`: on a terminal it stops the display and shows
    the cursor again (Ctrl+C too)."""

    def __init__(self, stream: TextIO, *, log_interval_s: float) -> None:
        self.stream = stream
        self.terminal = stream_is_terminal(stream)
        self.log_interval_s = log_interval_s
        self.phases: dict[str, _Phase] = {}
        self.current: _Phase | None = None  # the latest phase's row
        self.last_line_at = 0.0
        self._display: Progress | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def shown(self) -> bool:
        """Whether any row has been drawn or written."""
        return bool(self.phases)

    def show(self, phase_name: str, row: Row, *, final: bool = False) -> None:
        with self._lock:  # a download's chunks may be counted in more than one thread
            if self._closed:
                return
            phase = self.phases.get(phase_name)
            if phase is None:
                self._write_pending()  # the phase before ends with its latest row
                phase = self.phases[phase_name] = _Phase(row)
                self.current = phase
                unthrottled = True
            elif phase.final:
                return  # the phase's final row is already out
            else:
                unthrottled = final
            phase.row = row
            if final:
                phase.final_elapsed_s = phase.elapsed_s()
                phase.final = True
            if self.terminal:
                self._draw(phase)
            else:
                phase.pending = True
                self._write_line(phase, unthrottled=unthrottled)

    def close(self) -> None:
        """End the display (idempotent): on a terminal stop it, showing the cursor again; in a log
        write the current phase's latest row if it was throttled. Rows already out stay."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._write_pending()
            display, self._display = self._display, None
        if display is not None:
            display.stop()

    def _write_pending(self) -> None:
        if self.current is not None and self.current.pending:
            self._write_line(self.current, unthrottled=True)

    def _write_line(self, phase: _Phase, *, unthrottled: bool) -> None:
        now = time.monotonic()
        if not unthrottled and now - self.last_line_at < self.log_interval_s:
            return
        self.last_line_at = now
        phase.pending = False
        self.stream.write(plain_line(phase) + "\n")
        self.stream.flush()

    def _draw(self, phase: _Phase) -> None:
        display = self._display
        if display is None:
            display = self._display = _terminal_display(self.stream)
            display.start()
        total, completed = _bar_amounts(phase)
        if phase.task_id is None:
            phase.task_id = display.add_task(phase.row.label, total=total, completed=completed, phase=phase)
        else:
            display.update(phase.task_id, total=total, completed=completed)
        if phase.final:
            display.refresh()  # the 100% drawn now, whatever comes next


def _bar_amounts(phase: _Phase) -> tuple[float | None, float]:
    """The bar's (total, completed): full when the phase is final, pulsing while the total is unknown."""
    row = phase.row
    if phase.final:
        total = row.total or max(row.done, 1.0)
        return total, total
    return (row.total or None), row.done


def _terminal_display(stream: TextIO) -> Progress:
    """A rich.progress display on `stream`, its rows laid out by `terminal_layout`; rich is
    imported here."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, Task
    from rich.table import Table
    from rich.text import Text

    console = Console(file=stream, force_terminal=True, highlight=False)

    class _Rows(Progress):
        def make_tasks_table(self, tasks: Iterable[Task]) -> Table:
            shown = [task for task in tasks if task.visible]
            texts = [[cell(task.fields["phase"]) for cell in CELLS] for task in shown]
            widths, bar_width = terminal_layout(texts, console.width)  # (rich asks before .live is set)
            bar = BarColumn(bar_width=bar_width)
            table = Table.grid(padding=(0, 1))
            for width in widths[:1] + [bar_width] + [w for w in widths[1:] if w]:
                table.add_column(width=width, no_wrap=True)
            for task, row in zip(shown, texts, strict=True):
                cells = [
                    Text(text, no_wrap=True, overflow="ellipsis")
                    for text, w in zip(row, widths, strict=True)
                    if w
                ]
                table.add_row(cells[0], bar(task), *cells[1:])
            return table

    return _Rows(
        console=console,
        refresh_per_second=REFRESH_PER_S,
        redirect_stdout=False,  # stdout is the command's output, never the display's
    )
