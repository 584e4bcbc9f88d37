"""The Models tab's table: one row per registered model (marks, name, status, sizes, scheme,
source), plus the loaded model when it came from a directory outside the registry."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist

from mixtral_chat.app.widgets.cells import plain
from mixtral_chat.engine.options import UNQUANTIZED
from mixtral_chat.engine.units import format_size

if TYPE_CHECKING:
    from mixtral_chat.engine.models.entries import ModelEntry
    from mixtral_chat.engine.models.progress import PullProgress
    from mixtral_chat.engine.runtime import EngineInfo

ACTIVE_MARK = "●"
DEFAULT_MARK = "★"


def status_text(entry: ModelEntry, active: Path | None, progress: PullProgress | None = None) -> str:
    """The Status cell: the pull's progress while one runs for this entry, else its status."""
    if progress is not None:
        verb = "downloading" if progress.phase == "download" else "quantizing"
        return f"{verb} {progress.fraction * 100:.0f}%"
    status = entry.status
    if entry.status == "partial" and entry.partial_bytes:
        status = f"partial ({format_size(entry.partial_bytes)})"
    if _is_active(entry, active):
        status += ", active"
    return status


def _is_active(entry: ModelEntry, active: Path | None) -> bool:
    return active is not None and entry.path is not None and entry.path.resolve() == active


class ModelsTable(DataTable[Any]):
    """Row keys are model names (None for a loaded model that is not registered)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.add_column("", key="marks", width=2)
        self.add_column("Model", key="name")
        self.add_column("Status", key="status")
        self.add_column("On disk", key="size")
        self.add_column("Download", key="download")
        self.add_column("Scheme", key="scheme")
        self.add_column("Source", key="source")

    def show(
        self,
        entries: list[ModelEntry],
        loaded: EngineInfo | None,
        pulling: tuple[str, PullProgress] | None = None,
    ) -> None:
        """Refill the table, keeping the cursor on the model it was on."""
        selected = self.selected_name()
        active = loaded.path.resolve() if loaded is not None else None
        self.clear()
        for entry in entries:
            marks = (ACTIVE_MARK if _is_active(entry, active) else "") + (
                DEFAULT_MARK if entry.is_default else ""
            )
            progress = pulling[1] if pulling is not None and pulling[0] == entry.name else None
            self.add_row(
                *plain(
                    marks,
                    entry.name,
                    status_text(entry, active, progress),
                    format_size(entry.size_on_disk),
                    format_size(entry.download_bytes),
                    entry.scheme or "-",
                    entry.repo_id or (str(entry.path) if entry.path else entry.source),
                ),
                key=entry.name,
            )
        names = {entry.name for entry in entries}
        if loaded is not None and not any(_is_active(entry, active) for entry in entries):
            # Loaded from a directory given with --model, not in the registry.
            self.add_row(
                *plain(
                    ACTIVE_MARK,
                    loaded.name,
                    "active (not registered)",
                    "-",
                    "-",
                    loaded.scheme if loaded.scheme != UNQUANTIZED else "-",
                    str(active),
                ),
                key=None if loaded.name in names else loaded.name,
            )
        if selected in names:
            self.move_cursor(row=self.get_row_index(selected))

    def show_status(self, entry: ModelEntry, progress: PullProgress | None) -> None:
        # CellDoesNotExist: the row was refreshed away; the next refresh shows it again.
        with contextlib.suppress(CellDoesNotExist):
            self.update_cell(entry.name, "status", Text(status_text(entry, None, progress)))

    def selected_name(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return str(row_key.value) if row_key.value is not None else None
