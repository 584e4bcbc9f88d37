"""The settings screen: models (download, quantize, delete, use) and engine options.

The download and quantize backends are `engine.models` (resumable, verified pulls into the
Hugging Face cache; quantization into the data folder); this screen runs them in a thread worker
and shows their progress. The screen is installed once, so a download keeps running (and its
progress keeps counting) while the user is back in the chat.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Input,
    Label,
    ProgressBar,
    Select,
    TabbedContent,
    TabPane,
)

from mixtral_chat.app.errors import error_line
from mixtral_chat.app.screens.dialogs import ConfirmScreen, DeleteModelScreen
from mixtral_chat.app.widgets.endpoints_table import EndpointsTable
from mixtral_chat.app.widgets.engine_form import EngineForm
from mixtral_chat.app.widgets.models_table import ModelsTable
from mixtral_chat.engine.fileio import free_disk_bytes
from mixtral_chat.engine.options import UNQUANTIZED
from mixtral_chat.engine.units import format_duration, format_size

if TYPE_CHECKING:
    from mixtral_chat.app.chat_app import ChatApp, ModelStatus
    from mixtral_chat.engine.models.entries import ModelEntry
    from mixtral_chat.engine.models.progress import PullProgress

PROGRESS_INTERVAL_S = 0.2  # progress messages per second from a pull: at most 5
# No new byte for this long and the progress line says the transfer is stalled (huggingface_hub's
# http_get meanwhile times the connection out and resumes it with a Range request).
STALL_AFTER_S = 15.0


class Pull:
    """Messages from the pull (download / quantize) worker."""

    @dataclass(eq=False)
    class Progress(Message):
        name: str
        progress: PullProgress

    @dataclass(eq=False)
    class Done(Message):
        name: str
        action: str  # "download" | "quantize"
        error: str | None  # None: success
        cancelled: bool = False


class SettingsScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Back to chat", id="settings.close"),
        Binding("f3", "close", "Back to chat", id="settings.toggle", show=False),
        Binding("ctrl+r", "refresh_models", "Refresh", id="settings.refresh"),
    ]

    def __init__(self) -> None:
        super().__init__(id="settings-screen")
        self.entries: dict[str, ModelEntry] = {}
        self.pulling: str | None = None  # model name being downloaded / quantized
        self.pull_action = ""
        self.pull_cancel: threading.Event | None = None
        self.last_progress: PullProgress | None = None
        self._last_progress_post = 0.0
        self.stall_after_s = STALL_AFTER_S
        self._bytes_seen_at = 0.0  # when the pull's byte count last moved
        self._stall_timer: Timer | None = None

    @property
    def chat_app(self) -> ChatApp:
        return self.app  # type: ignore[return-value]

    @property
    def models_table(self) -> ModelsTable:
        return self.query_one("#models-table", ModelsTable)

    def _context_hint(self) -> str:
        engine = self.chat_app.engine
        if engine is not None:
            return f"the model's own ({engine.info.context_length} now)"
        return "the model's own, shortened if memory is short"

    # -- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        settings = self.chat_app.settings
        yield Label("Settings", id="settings-title")
        with TabbedContent(initial="models-tab"):
            with TabPane("Models", id="models-tab"), VerticalScroll():
                yield Label("", id="disk-free", classes="settings-note", markup=False)
                yield ModelsTable(id="models-table")
                yield Label("", id="model-detail", classes="settings-note", markup=False)
                with Horizontal(classes="settings-buttons"):
                    yield Button("Use", id="use-model", variant="primary")
                    yield Button("Download", id="download-model")
                    yield Button("Quantize", id="quantize-model")
                    yield Button("Delete", id="delete-model", variant="error")
                    yield Button("Cancel", id="cancel-pull", disabled=True)
                with Horizontal(id="download-row"):
                    yield ProgressBar(id="download-progress", show_eta=False)
                    yield Label("", id="download-label", markup=False)
                with Horizontal(id="add-model-row"):
                    yield Input(
                        placeholder="Add a hub repo id (org/name) or a model directory", id="add-model-input"
                    )
                    yield Button("Add", id="add-model")
            with TabPane("Engine", id="engine-tab"), VerticalScroll():
                yield EngineForm(settings.engine, self._context_hint(), id="engine-form")
                yield Label("", id="plan-note", classes="settings-note", markup=False)
                with Horizontal(classes="settings-buttons"):
                    yield Button("Save", id="save-engine", variant="primary")
                    yield Button("Save and reload the model", id="save-reload")
            with TabPane("Endpoints", id="endpoints-tab"), VerticalScroll():
                yield Label(
                    "Remote OpenAI-compatible servers (vLLM, llama-server, Ollama's /v1, "
                    "mixtral-chat serve). The one in use (●) answers instead of the local engine.",
                    classes="settings-note",
                )
                yield EndpointsTable(id="endpoints-table")
                with Horizontal(classes="settings-buttons"):
                    yield Button("Use", id="use-endpoint", variant="primary")
                    yield Button("Use the local engine", id="use-local")
                    yield Button("Remove", id="remove-endpoint", variant="error")
                with Grid(classes="engine-grid"):
                    yield Label("Name")
                    yield Input(placeholder="gpu-box", id="endpoint-name")
                    yield Label("URL")
                    yield Input(placeholder="http://HOST:8000/v1", id="endpoint-url")
                    yield Label("Model (optional)")
                    yield Input(placeholder="the first /v1/models lists", id="endpoint-model")
                    yield Label("Key's environment variable (optional)")
                    yield Input(
                        placeholder="VLLM_KEY (the key itself is never typed here)", id="endpoint-key-env"
                    )
                with Horizontal(classes="settings-buttons"):
                    yield Button("Add endpoint", id="add-endpoint")
            with TabPane("Appearance", id="appearance-tab"), VerticalScroll():
                with Grid(classes="engine-grid"):
                    yield Label("Theme")
                    yield Select(
                        [(name, name) for name in sorted(self.app.available_themes)],
                        value=self.app.theme,
                        allow_blank=False,
                        id="theme",
                    )
                yield Label("A theme applies and is saved at once.", classes="settings-note")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#download-row").display = False
        self.refresh_models()
        self.refresh_endpoints()
        self.watch(self.chat_app, "model_status", self._model_status_changed)

    # -- endpoints -------------------------------------------------------------------------------

    def refresh_endpoints(self) -> None:
        settings = self.chat_app.settings
        self.query_one("#endpoints-table", EndpointsTable).show(settings.endpoints, settings.backend)

    @on(Button.Pressed, "#add-endpoint")
    def _add_endpoint(self) -> None:
        from mixtral_chat.app.settings import Endpoint

        name = self.query_one("#endpoint-name", Input).value.strip()
        url = self.query_one("#endpoint-url", Input).value.strip()
        model = self.query_one("#endpoint-model", Input).value.strip() or None
        key_env = self.query_one("#endpoint-key-env", Input).value.strip() or None
        if not name or not url.startswith(("http://", "https://")):
            self.notify("An endpoint needs a name and an http(s):// URL.", severity="error")
            return
        self.chat_app.settings.endpoints[name] = Endpoint(url=url, model=model, api_key_env=key_env)
        if self.chat_app.save_settings():
            for field_id in ("endpoint-name", "endpoint-url", "endpoint-model", "endpoint-key-env"):
                self.query_one(f"#{field_id}", Input).value = ""
            self.notify(f"Added {name}; Use makes it answer.")
        self.refresh_endpoints()

    @on(Button.Pressed, "#use-endpoint")
    def _use_endpoint(self) -> None:
        name = self.query_one("#endpoints-table", EndpointsTable).selected_name()
        if name is not None:
            self._switch_backend(name)

    @on(Button.Pressed, "#use-local")
    def _use_local(self) -> None:
        self._switch_backend(None)

    def _switch_backend(self, name: str | None) -> None:
        settings = self.chat_app.settings
        settings.backend = name
        if self.chat_app.save_settings():
            self.chat_app.load_model(self.chat_app.model_spec)  # connects, or loads the local model
        self.refresh_endpoints()

    @on(Button.Pressed, "#remove-endpoint")
    def _remove_endpoint(self) -> None:
        settings = self.chat_app.settings
        name = self.query_one("#endpoints-table", EndpointsTable).selected_name()
        if name is None:
            return
        if name == settings.backend:
            self.notify(
                "This endpoint answers now: use another one or the local engine first.", severity="warning"
            )
            return
        del settings.endpoints[name]
        self.chat_app.save_settings()
        self.refresh_endpoints()

    def on_screen_resume(self) -> None:
        self.refresh_models()

    # -- models ----------------------------------------------------------------------------------

    def refresh_models(self) -> None:
        from mixtral_chat.engine import paths
        from mixtral_chat.engine.errors import MixtralChatError
        from mixtral_chat.engine.models.hub_cache import hub_cache_dir
        from mixtral_chat.engine.models.registry import list_models

        try:
            entries = list_models()
        except MixtralChatError as exc:
            self.notify(str(exc), severity="error")
            entries = []
        self.entries = {entry.name: entry for entry in entries}
        engine = self.chat_app.engine
        pulling = (self.pulling, self.last_progress) if self.pulling and self.last_progress else None
        self.models_table.show(entries, engine.info if engine is not None else None, pulling)
        cache = hub_cache_dir()
        data = _existing(paths.data_dir())
        parts = [
            f"Free disk: {format_size(free_disk_bytes(_existing(cache)))} for downloads ({cache})",
            f"Free disk: {format_size(free_disk_bytes(data))} for quantized copies ({data})",
        ]
        self.query_one("#disk-free", Label).update("\n".join(parts))
        self._show_detail()

    def selected_name(self) -> str | None:
        return self.models_table.selected_name()

    def selected_entry(self) -> ModelEntry | None:
        name = self.selected_name()
        return self.entries.get(name) if name else None

    @on(DataTable.RowHighlighted, "#models-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def _show_detail(self) -> None:
        entry = self.selected_entry()
        label = self.query_one("#model-detail", Label)
        if entry is None:
            label.update("")
            return
        lines = []
        if entry.catalog is not None and entry.catalog.description:
            lines.append(str(entry.catalog.description))
        if entry.path is not None:
            lines.append(f"loads from {entry.path}")
        if entry.original_path is not None and entry.original_path != entry.path:
            lines.append(f"original in {entry.original_path}")
        label.update("\n".join(lines))
        busy = self.pulling is not None
        downloadable = entry.source in ("catalog", "hub")
        self.query_one("#use-model", Button).disabled = not entry.installed
        self.query_one("#download-model", Button).disabled = busy or not downloadable or entry.installed
        self.query_one("#quantize-model", Button).disabled = (
            busy or not downloadable or entry.status not in ("downloaded", "quantized")
        )
        # A catalog model with nothing on disk has nothing to delete (the catalog keeps listing it).
        nothing_here = (
            entry.source == "catalog" and entry.status == "not downloaded" and not entry.partial_bytes
        )
        self.query_one("#delete-model", Button).disabled = busy or entry.source == "bundled" or nothing_here

    def action_refresh_models(self) -> None:
        self.refresh_models()

    @on(Button.Pressed, "#use-model")
    def _use(self) -> None:
        entry = self.selected_entry()
        if entry is None:
            return
        if not entry.installed:  # the model in use stays loaded
            self.notify(f"{entry.name} is not installed ({entry.status}).", severity="warning")
            return
        self.chat_app.model_spec = entry.name
        # The default once it has loaded: one that fails to load leaves the default as it was.
        self.chat_app.load_model(entry.name, make_default=True)
        self.refresh_models()

    @on(Button.Pressed, "#download-model")
    def _download(self) -> None:
        entry = self.selected_entry()
        if entry is None:
            return
        if entry.download_bytes or entry.repo_id is None:
            self._confirm_download(entry, entry.download_bytes)
        else:  # a repo added by id: its size is in the hub's file listing (no download yet)
            self.query_one("#model-detail", Label).update(f"Asking the hub how big {entry.name} is…")
            self._size_worker(entry)

    @work(thread=True, exclusive=True, group="download-size", exit_on_error=False)
    def _size_worker(self, entry: ModelEntry) -> None:
        from mixtral_chat.engine.models.download import remote_download_bytes

        try:
            size: int | None = remote_download_bytes(entry.repo_id or entry.name, entry.revision or "main")
        except Exception:  # unreachable hub, no such repo: the pull itself will say which
            size = None
        self.app.call_from_thread(self._confirm_download, entry, size)

    def _confirm_download(self, entry: ModelEntry, size_bytes: int | None) -> None:
        from mixtral_chat.engine.models.hub_cache import hub_cache_dir

        self._show_detail()
        free = free_disk_bytes(_existing(hub_cache_dir()))
        needed = (size_bytes or 0) - entry.partial_bytes
        size = f"about {format_size(size_bytes)}" if size_bytes else "size unknown"
        resume = f", resuming {format_size(entry.partial_bytes)} already here" if entry.partial_bytes else ""
        question = (
            f"Download {entry.name} ({size}{resume}) and quantize it to 4 bits?\n"
            f"Free disk space: {format_size(free)}."
        )
        if needed > free:
            question += " That is not enough: the download will stop before it starts."

        def answered(confirmed: bool | None) -> None:
            if confirmed:
                self._start_pull(entry.name, "download")

        self.app.push_screen(ConfirmScreen(question, "Download", danger=False), answered)

    @on(Button.Pressed, "#quantize-model")
    def _quantize(self) -> None:
        entry = self.selected_entry()
        if entry is not None:
            self._start_pull(entry.name, "quantize")

    def _start_pull(self, name: str, action: str) -> None:
        self.pulling = name
        self.pull_action = action
        self.pull_cancel = threading.Event()
        self.last_progress = None
        self.query_one("#download-row").display = True
        self.query_one("#download-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#download-label", Label).update(f"{action}ing {name}: starting…")
        self.query_one("#cancel-pull", Button).disabled = False
        self._show_detail()
        self._bytes_seen_at = time.monotonic()
        self._stall_timer = self.set_interval(1.0, self._say_if_stalled)
        scheme = self.chat_app.settings.engine.quant
        self._pull_worker(name, action, self.pull_cancel, scheme if scheme in ("int4", "nf4") else None)

    @work(thread=True, exclusive=True, group="pull", exit_on_error=False)
    def _pull_worker(self, name: str, action: str, cancel: threading.Event, scheme: str | None) -> None:
        from mixtral_chat.engine.models.errors import DownloadCancelled
        from mixtral_chat.engine.models.pull import pull_model

        def progress(update: PullProgress) -> None:
            now = time.monotonic()
            if (
                now - self._last_progress_post >= PROGRESS_INTERVAL_S
                or update.bytes_done >= update.bytes_total
            ):
                self._last_progress_post = now
                self.post_message(Pull.Progress(name, update))

        try:
            # A download quantizes too, as `models pull` does; choosing the model is the Use button's.
            pull_model(name, scheme=scheme, progress=progress, cancel=cancel, make_default=False)
        except Exception as exc:
            # DownloadCancelled, or the quantizer's own QuantizationCancelled: either way the
            # user asked for it, and the next pull resumes.
            if cancel.is_set() or isinstance(exc, DownloadCancelled):
                self.post_message(Pull.Done(name, action, None, cancelled=True))
            else:
                self.post_message(Pull.Done(name, action, error_line(exc, action)))
            return
        self.post_message(Pull.Done(name, action, None))

    def _say_if_stalled(self) -> None:
        quiet_s = time.monotonic() - self._bytes_seen_at
        if self.pulling is None or quiet_s < self.stall_after_s:
            return
        self.query_one("#download-label", Label).update(
            f"{self._progress_text()} - stalled: no data for {format_duration(quiet_s)}; "
            "retrying (Cancel keeps what is here)"
        )

    def _progress_text(self) -> str:
        update = self.last_progress
        if update is None or self.pulling is None:
            return f"{self.pull_action.capitalize()}ing {self.pulling}: starting"
        verb = "Downloading" if update.phase == "download" else "Quantizing"
        text = f"{verb} {self.pulling}: {format_size(update.bytes_done)} of {format_size(update.bytes_total)}"
        if update.speed:
            text += f" at {format_size(update.speed)}/s, {format_duration(update.eta_s)} left"
        if update.file:
            text += f" ({update.file})"
        return text

    def on_pull_progress(self, message: Pull.Progress) -> None:
        update = message.progress
        previous = self.last_progress
        if previous is None or (update.phase, update.bytes_done) != (previous.phase, previous.bytes_done):
            self._bytes_seen_at = time.monotonic()
        self.last_progress = update
        bar = self.query_one("#download-progress", ProgressBar)
        bar.update(total=update.bytes_total or None, progress=update.bytes_done)
        self.query_one("#download-label", Label).update(self._progress_text())
        if message.name in self.entries:
            self.models_table.show_status(self.entries[message.name], update)

    def on_pull_done(self, message: Pull.Done) -> None:
        if self._stall_timer is not None:
            self._stall_timer.stop()
            self._stall_timer = None
        self.pulling = None
        self.pull_cancel = None
        self.last_progress = None
        self.query_one("#cancel-pull", Button).disabled = True
        self.query_one("#download-row").display = False
        if message.cancelled:
            self.notify(
                f"{message.action.capitalize()} of {message.name} cancelled; the next one resumes it."
            )
        elif message.error:
            self.notify(
                message.error, title=f"{message.action.capitalize()} failed", severity="error", timeout=12
            )
        else:
            self.notify(f"{message.name}: {message.action} finished.")
        self.refresh_models()

    @on(Button.Pressed, "#cancel-pull")
    def _cancel_pull(self) -> None:
        if self.pull_cancel is not None:
            self.pull_cancel.set()
            self.query_one("#download-label", Label).update("Cancelling… (the partial download is kept)")

    @on(Button.Pressed, "#delete-model")
    def _delete(self) -> None:
        entry = self.selected_entry()
        if entry is None:
            return
        engine = self.chat_app.engine
        if (
            engine is not None
            and entry.path is not None
            and entry.path.resolve() == engine.info.path.resolve()
        ):
            self.notify("This model is loaded: use another one before deleting it.", severity="warning")
            return
        from mixtral_chat.engine.errors import MixtralChatError
        from mixtral_chat.engine.models.removal import hf_cache_copy

        if entry.source == "local":
            question = f"Forget {entry.name}? Its directory {entry.path} is not deleted."
            copy = None
        else:
            try:
                copy = hf_cache_copy(entry.name)
            except MixtralChatError as exc:
                self.notify(str(exc), severity="error")
                return
            ours = entry.quantized_path is not None and entry.quantized_path.exists()
            ours_size = _quantized_size(entry) if ours else 0
            question = (
                f"Delete {entry.name}? This frees about {format_size(ours_size) if ours_size else '0 B'}"
                + (" (its quantized copy)." if ours else " (mixtral-chat made no copy of its own).")
            )
            if copy is not None:
                question += (
                    f"\nIts Hugging Face cache copy ({format_size(copy.size)}, shared with other tools "
                    "such as transformers) is kept unless you tick the box."
                )
        hf_label = (
            f"Also delete the Hugging Face cache copy ({format_size(copy.size)})"
            if copy is not None
            else None
        )
        dialog = (
            ConfirmScreen(question, "Forget")
            if entry.source == "local"
            else DeleteModelScreen(question, hf_label)
        )

        def answered(confirmed: bool | None) -> None:
            if not confirmed:
                return
            from mixtral_chat.engine.models.removal import remove_model

            delete_hf = isinstance(dialog, DeleteModelScreen) and dialog.delete_hf_cache
            try:
                removal = remove_model(entry.name, delete_hf_cache=delete_hf)
            except MixtralChatError as exc:
                self.notify(str(exc), severity="error")
                return
            message = (
                f"Removed {entry.name}; freed {format_size(removal.freed) if removal.freed else 'nothing'}."
            )
            if removal.hf_cache_kept is not None:
                message += f" Kept its Hugging Face cache copy ({format_size(removal.hf_cache_kept.size)})."
            if removal.spared:
                message += f" Kept {len(removal.spared)} file(s) another cached repo links to."
            self.notify(message)
            self.refresh_models()

        self.app.push_screen(dialog, answered)

    @on(Button.Pressed, "#add-model")
    @on(Input.Submitted, "#add-model-input")
    def _add(self) -> None:
        source = self.query_one("#add-model-input", Input).value.strip()
        if source:
            self._add_worker(source)

    @work(thread=True, exclusive=True, group="add-model", exit_on_error=False)
    def _add_worker(self, source: str) -> None:
        from mixtral_chat.engine.models.registry import add_model

        try:
            entry = add_model(source)
        except Exception as exc:
            self.app.call_from_thread(self.notify, error_line(exc, "adding a model"), severity="error")
            return
        self.app.call_from_thread(self._added, entry.name)

    def _added(self, name: str) -> None:
        self.query_one("#add-model-input", Input).value = ""
        self.notify(f"Added {name}.")
        self.refresh_models()

    def _model_status_changed(self, status: ModelStatus) -> None:
        engine = self.chat_app.engine
        plan = engine.info.offload_plan if engine is not None else None
        note = ""
        if engine is not None:
            info = engine.info
            weights = info.scheme if info.scheme != UNQUANTIZED else info.dtype
            note = f"Loaded: {info.name} on {info.device} ({weights})"
        if plan:
            note += f"\nOffload plan: {plan}"
        elif engine is not None:
            note += "; all experts resident (no offloading)"
        if status.state == "loading":
            note = f"Loading {status.name or 'the default model'}…"
        elif status.state == "failed":
            note = f"The model did not load: {status.error}"
        self.query_one("#plan-note", Label).update(note)
        if self.is_mounted:
            self.refresh_models()

    # -- engine ----------------------------------------------------------------------------------

    def _save_engine_settings(self) -> bool:
        """The form's options into the settings and the config file; on any failure neither
        changes (the form keeps what was typed, to correct)."""
        engine = self.chat_app.settings.engine
        saved = replace(engine)
        try:
            self.query_one("#engine-form", EngineForm).apply_to(engine)
        except ValueError as exc:
            self.notify(str(exc), severity="error")
            return False
        if not self.chat_app.save_settings():
            for item in fields(saved):
                setattr(engine, item.name, getattr(saved, item.name))
            return False
        return True

    @on(Select.Changed, "#theme")
    def _theme_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value in self.app.available_themes:
            self.app.theme = event.value  # the app saves it (ChatApp.watch_theme)

    @on(Button.Pressed, "#save-engine")
    def _save(self) -> None:
        if self._save_engine_settings():
            self.notify("Saved. Engine options apply when a model is next loaded.")

    @on(Button.Pressed, "#save-reload")
    def _save_reload(self) -> None:
        if self._save_engine_settings():
            self.chat_app.load_model(self.chat_app.model_spec)

    def action_close(self) -> None:
        form = self.query_one("#engine-form", EngineForm)
        if form.edited(self.chat_app.settings.engine):  # shown again as they are in effect
            form.show(self.chat_app.settings.engine)
            self.notify("The Engine tab's changes were not saved: they are discarded.")
        self.app.pop_screen()


def _quantized_size(entry: ModelEntry) -> int:
    from mixtral_chat.engine.models.hub_cache import directory_size

    return directory_size(entry.quantized_path) if entry.quantized_path is not None else 0


def _existing(path: Path) -> Path:
    """The nearest existing folder (free space is asked of a folder that may not exist yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
