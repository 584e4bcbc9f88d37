"""The Endpoints tab's table: the remote OpenAI-compatible servers named in the settings, and
which one answers (none: the local engine). A key is never shown, only where it comes from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from textual.widgets import DataTable

from mixtral_chat.app.settings import Endpoint
from mixtral_chat.app.widgets.cells import plain


def key_source(endpoint: Endpoint) -> str:
    if endpoint.api_key:
        return "stored (0600 config)"
    if endpoint.api_key_env:
        return f"${endpoint.api_key_env}"
    return "none"


class EndpointsTable(DataTable[Any]):
    """Row keys are endpoint names."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.add_column("", key="mark", width=2)
        self.add_column("Name", key="name")
        self.add_column("URL", key="url")
        self.add_column("Model", key="model")
        self.add_column("Key", key="key")

    def show(self, endpoints: Mapping[str, Endpoint], in_use: str | None) -> None:
        self.clear()
        for name, endpoint in endpoints.items():
            mark = "●" if name == in_use else ""
            self.add_row(
                *plain(mark, name, endpoint.url, endpoint.model or "first listed", key_source(endpoint)),
                key=name,
            )

    def selected_name(self) -> str | None:
        if self.row_count == 0:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return str(row_key.value) if row_key.value is not None else None
