"""The CLI's progress display (`quantize`, `models pull`, `ask`'s model load), on stderr only.

One row per phase (a pull's download, then its quantization; quantize's shards; a model load).
On a terminal the rows are a `rich.progress` display, redrawn in place; elsewhere (a log, a pipe,
CI, TERM=dumb) each row is a plain line, written at most once per `log_interval_s` and once more
when its phase ends, without ANSI codes or carriage returns. The cells are decided here, once, for
both forms: the label, the bar (terminal only), the percentage, done / total, speed, ETA, elapsed,
and a detail (the current file, tensors and shards).

rich is imported only when a terminal display starts, never at CLI start-up.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
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


# The cells of a row, in order, both forms (the terminal adds the bar after the label).
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


CELLS_AFTER_BAR: tuple[Callable[[_Phase], str], ...] = (
    _percent_cell,
    _amounts_cell,
    _speed_cell,
    _eta_cell,
    _elapsed_cell,
    _detail_cell,
)


def plain_line(phase: _Phase) -> str:
    cells = [_label_cell(phase), *(cell(phase) for cell in CELLS_AFTER_BAR)]
    return "  ".join(cell for cell in cells if cell)


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
    """A rich.progress display on `stream` with this module's cells; rich is imported here.

    On a narrow terminal the elapsed time, the detail and a long label give way (hidden, or cut
    with an ellipsis) so that the bar, percentage, amounts, speed and ETA stay on one line."""
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.measure import Measurement
    from rich.progress import BarColumn, Progress, ProgressColumn, Task
    from rich.table import Column
    from rich.text import Text

    class _Fitted:
        """A cell that gives way: whole where it fits, cut to `min_shown` characters or more
        with an ellipsis, else blank."""

        def __init__(self, text: str, min_shown: int) -> None:
            self.text, self.min_shown = text, min_shown

        def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
            return Measurement(0, len(self.text))

        def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
            width = options.max_width
            if len(self.text) <= width:
                yield Text(self.text, no_wrap=True)
            elif width >= self.min_shown:
                yield Text(self.text, no_wrap=True, overflow="ellipsis")

    class _Cell(ProgressColumn):
        def __init__(self, cell: Callable[[_Phase], str], *, min_shown: int | None = None) -> None:
            super().__init__(table_column=Column(no_wrap=min_shown is None))
            self.cell, self.min_shown = cell, min_shown

        def render(self, task: Task) -> Text | _Fitted:
            text = self.cell(task.fields["phase"])
            if self.min_shown is None:
                return Text(text, no_wrap=True)
            return _Fitted(text, self.min_shown)

    console = Console(file=stream, force_terminal=True, highlight=False)
    giving_way = {_elapsed_cell: 1_000, _detail_cell: 10}  # elapsed: whole or hidden
    return Progress(
        _Cell(_label_cell, min_shown=10),
        BarColumn(bar_width=min(max(console.width - 80, 10), 40), table_column=Column(no_wrap=True)),
        *(_Cell(cell, min_shown=giving_way.get(cell)) for cell in CELLS_AFTER_BAR),
        console=console,
        refresh_per_second=REFRESH_PER_S,
        redirect_stdout=False,  # stdout is the command's output, never the display's
    )
