"""The Textual app: holds the storage, the settings and the loaded engine; the screens do the rest.

Start-up never imports torch or the engine's model code: the first screen is drawn, then the
model loads in a thread worker while the user can already type (a message sent before the model
is ready is saved and answered when it is).

Several apps may run on one data folder: each registers itself in the database, refreshes its
heartbeat, and every `sync_interval_s` looks whether another one committed something (PRAGMA
data_version); if so the chat screen re-reads the sidebar, the busy chats and the chat shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.reactive import reactive

from mixtral_chat.app.errors import error_line
from mixtral_chat.app.screens.chat import ChatScreen
from mixtral_chat.app.screens.lifecycle import DatabaseChanged, ModelLoad
from mixtral_chat.app.screens.palette import ChatCommands
from mixtral_chat.app.settings import Settings, SettingsError, save_settings
from mixtral_chat.app.storage import HEARTBEAT_S, Instance, Storage, StorageError

if TYPE_CHECKING:
    from textual.notifications import SeverityLevel

    from mixtral_chat.app.remote import RemoteEngine
    from mixtral_chat.engine.load_progress import LoadProgress
    from mixtral_chat.engine.runtime import Engine

# Set to a file path, the app appends the wall-clock times at which its first screen became
# interactive and the latest chat was shown to that file, then exits (bench/bench_startup.py).
STARTUP_REPORT_ENV = "MIXTRAL_CHAT_STARTUP_REPORT"

ModelState = Literal["idle", "loading", "ready", "failed"]
# How often the app looks for other instances' writes.
SYNC_INTERVAL_S = 1.0
# Signals that end the app as Ctrl+Q does (partial answer saved, terminal restored); the exit
# status is the shell's 128 + signal number.
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP) if hasattr(signal, "SIGHUP") else (signal.SIGTERM,)


@dataclass(frozen=True)
class ModelStatus:
    state: ModelState = "idle"
    name: str | None = None
    error: str | None = None


class ChatApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "mixtral-chat"
    COMMANDS: ClassVar = App.COMMANDS | {ChatCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
        Binding("f3", "settings", "Settings", id="app.settings"),
    ]

    model_status: reactive[ModelStatus] = reactive(ModelStatus, init=False)
    # False until on_mount has applied the saved theme: theme changes before that are not the user's.
    _theme_restored = False

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        *,
        model: str | None = None,
        settings_writable: bool = True,
        startup_notice: str | None = None,
        notices: Sequence[str] = (),
        handle_signals: bool = False,
        verify_search_index: bool = False,
        sync_interval_s: float = SYNC_INTERVAL_S,
    ) -> None:
        super().__init__()
        self.storage = storage
        self.settings = settings
        self.model_spec = model if model is not None else settings.model
        self.settings_writable = settings_writable
        self.startup_notice = startup_notice
        self.startup_notices = list(notices)
        self.handle_signals = handle_signals
        self.verify_search_index = verify_search_index
        self.sync_interval_s = sync_interval_s
        # Other apps on this database already told about (instance ids).
        self.known_instances: set[int] = set()
        self._data_version: int | None = None
        self._last_heartbeat = 0.0
        self._signals_installed: list[int] = []
        self.engine: Engine | RemoteEngine | None = None
        self.chat_screen = ChatScreen()
        self._startup_report = os.environ.get(STARTUP_REPORT_ENV)
        # Threads inside Engine.load: a cancelled worker's thread runs on until the load returns.
        self.loading_threads: set[threading.Thread] = set()
        # Which load is current: a superseded load that finishes late is dropped, not used.
        self._load_serial = 0
        self._default_once_loaded: tuple[int, str] | None = None  # (serial, model): see load_model
        self.load_progress: LoadProgress | None = None  # the weights read by the current load

    @property
    def model_name(self) -> str | None:
        return self.engine.info.name if self.engine is not None else None

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """Every notification as plain text, whatever a caller asks: they carry chat titles, paths,
        model names and error lines (an "[Errno 28]", a chat named "[/]"), never markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def on_mount(self) -> None:
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        self._theme_restored = True  # from now on a theme change is the user's, and is kept
        if self.settings.keymap:
            self.set_keymap(self.settings.keymap)
        self.push_screen(self.chat_screen)
        if self.startup_notice:
            self.notify(self.startup_notice, severity="error", timeout=15)
        for notice in self.startup_notices:
            self.notify(notice, severity="warning", timeout=15)
        self._register_instance()
        if self.handle_signals:
            self._install_signal_handlers()

    # -- other instances on this database ---------------------------------------------------------

    def _register_instance(self) -> None:
        try:
            self.storage.register_instance()
            others = [instance for instance in self.storage.other_instances() if instance.kind == "app"]
            self._data_version = self.storage.data_version()
        except StorageError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        self._last_heartbeat = time.monotonic()
        self.known_instances = {instance.id for instance in others}
        if others:
            pids = ", ".join(str(instance.pid) for instance in others)
            self.notify(
                f"Another mixtral-chat is running (pid {pids}) on this data folder: chats it is "
                "answering in are marked busy.",
                title="Another instance",
                severity="warning",
                timeout=10,
            )
        self.set_interval(self.sync_interval_s, self._sync_tick)

    def _sync_tick(self) -> None:
        """Heartbeat now and then; if another connection committed, the chat screen re-reads."""
        try:
            if time.monotonic() - self._last_heartbeat >= HEARTBEAT_S:
                self.storage.heartbeat()
                self._last_heartbeat = time.monotonic()
            version = self.storage.data_version()
        except StorageError:  # locked for longer than the busy timeout: try again next tick
            return
        if version != self._data_version:
            self._data_version = version
            self.chat_screen.post_message(DatabaseChanged())

    def instances_seen(self, others: list[Instance]) -> None:
        """The other instances as of the latest sync: say when a new app starts (an `ask` that
        stores its answer registers too, to claim its chat: its chat shows busy, nothing more)."""
        others = [instance for instance in others if instance.kind == "app"]
        new = [instance for instance in others if instance.id not in self.known_instances]
        self.known_instances = {instance.id for instance in others}
        for instance in new:
            self.notify(
                f"Another mixtral-chat started (pid {instance.pid}) on this data folder.",
                title="Another instance",
                severity="warning",
                timeout=8,
            )

    async def on_unmount(self) -> None:
        for signum in self._signals_installed:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signum)
        with contextlib.suppress(StorageError):
            self.storage.release_conversation()
            self.storage.unregister_instance()

    # -- signals ----------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in EXIT_SIGNALS:
            try:
                loop.add_signal_handler(signum, self._exit_on_signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):  # not on this platform/thread
                continue
            self._signals_installed.append(signum)

    def _exit_on_signal(self, signum: int) -> None:
        """SIGTERM/SIGHUP: stop the answer (what was written is saved, marked stopped) and exit
        through Textual, whose driver restores the terminal."""
        with contextlib.suppress(Exception):
            self.chat_screen.save_partial_answer()
        self.exit(128 + signum)

    def screen_interactive(self) -> None:
        """The chat screen is drawn and its prompt focused: typing works from here."""
        if self._startup_report:
            with open(self._startup_report, "a", encoding="utf-8") as report:
                report.write(f"interactive {time.time():.6f}\n")

    def history_shown(self) -> None:
        """The latest conversation is on screen: now the model may load."""
        if self._startup_report:
            with open(self._startup_report, "a", encoding="utf-8") as report:
                report.write(f"history {time.time():.6f}\n")
            self.exit(0)
            return
        self.load_model(self.model_spec)
        if self.verify_search_index:
            self._verify_search_index()

    @work(thread=True, exclusive=True, group="check-index", exit_on_error=False)
    def _verify_search_index(self) -> None:
        """Compare the search index with every message, on a connection of its own (the UI
        keeps running); a damaged index is rebuilt and the user told."""
        try:
            with Storage(self.storage.path) as storage:
                notices = storage.check_search_index()
        except StorageError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error", timeout=15)
            return
        for notice in notices:
            self.call_from_thread(self.notify, notice, severity="warning", timeout=10)

    # -- model loading ---------------------------------------------------------------------------

    def load_model(self, spec: str | None, *, make_default: bool = False) -> None:
        """Load `spec` (None: the default model) in a worker; `make_default`: it becomes the
        default model once it has loaded (a model that fails to load never does)."""
        if self.chat_screen.is_generating:
            self.notify("Stop the answer being written before loading another model.", severity="warning")
            return
        previous, self.engine = self.engine, None
        if previous is not None:
            previous.close()  # offload transfers and stores; the weights go with the last reference
        backend = self.settings.backend
        self.load_progress = None  # the new load's progress starts from nothing
        self.model_status = ModelStatus("loading", f"{backend} (remote)" if backend else spec)
        self._load_serial += 1
        self._default_once_loaded = (self._load_serial, spec) if make_default and spec else None
        self._load_model_worker(spec, self._load_serial)

    @work(thread=True, exclusive=True, group="load-model", exit_on_error=False)
    def _load_model_worker(self, spec: str | None, serial: int) -> None:
        started = time.monotonic()
        self.loading_threads.add(threading.current_thread())
        try:
            if self.settings.backend is not None:  # a remote server answers: nothing loads here
                engine = self._connect_backend(self.settings.backend)
                self.post_message(ModelLoad.Finished(serial, engine, time.monotonic() - started))
                return
            from mixtral_chat.engine.models.resolve import resolve_model
            from mixtral_chat.engine.runtime import Engine

            resolved = resolve_model(spec)
            self.call_from_thread(self._resolved, serial, resolved.name, resolved.is_demo)
            engine = Engine.load(
                resolved.path,
                self.settings.engine,
                name=resolved.name,
                progress=lambda progress: self.post_message(ModelLoad.Progress(serial, progress)),
            )
        except Exception as exc:  # shown as a notification; the chat stays usable
            self.post_message(ModelLoad.Failed(serial, spec, error_line(exc, "loading the model")))
            return
        finally:
            self.loading_threads.discard(threading.current_thread())
        self.post_message(ModelLoad.Finished(serial, engine, time.monotonic() - started))

    def _connect_backend(self, name: str) -> RemoteEngine:
        from mixtral_chat.app.remote import RemoteEngine

        endpoint = self.settings.endpoints[name]  # settings_from_dict checked that it exists
        return RemoteEngine.connect(endpoint.url, endpoint.key(), endpoint.model, label=name)

    def _resolved(self, serial: int, name: str, is_demo: bool) -> None:
        if serial != self._load_serial:
            return
        self.model_status = ModelStatus("loading", name)
        if is_demo and self.model_spec is None:
            self.notify(
                "Using the small bundled demo model. Download Mixtral in Settings (F3).",
                title="Demo model",
                timeout=8,
            )

    def on_model_load_progress(self, message: ModelLoad.Progress) -> None:
        if message.serial == self._load_serial:
            self.load_progress = message.progress
            self.chat_screen.loading_bar.show_progress(message.progress)

    def on_model_load_finished(self, message: ModelLoad.Finished) -> None:
        if message.serial != self._load_serial:
            message.engine.close()  # superseded by a later load
            return
        self.engine = message.engine
        if self._default_once_loaded is not None and self._default_once_loaded[0] == message.serial:
            self._make_default(self._default_once_loaded[1])
        self.model_status = ModelStatus("ready", message.engine.info.name)
        self.notify(f"{message.engine.info.name} loaded in {message.seconds:.1f} s.", timeout=3)

    def _make_default(self, name: str) -> None:
        from mixtral_chat.engine.errors import MixtralChatError
        from mixtral_chat.engine.models.registry import set_default

        try:
            set_default(name)
        except MixtralChatError as exc:
            self.notify(str(exc), severity="error")

    def on_model_load_failed(self, message: ModelLoad.Failed) -> None:
        if message.serial != self._load_serial:
            return
        self.engine = None
        self.model_status = ModelStatus("failed", message.spec, message.error)
        self.notify(message.error, title="The model did not load", severity="error", timeout=15)

    # -- settings --------------------------------------------------------------------------------

    def save_settings(self) -> bool:
        if not self.settings_writable:
            self.notify(
                "The config file has errors, so it is not overwritten: fix or delete it first.",
                severity="error",
            )
            return False
        try:
            save_settings(self.settings)
        except (OSError, SettingsError) as exc:
            self.notify(f"Could not save the settings: {exc}", severity="error")
            return False
        return True

    def remember_ui(self, **changes: object) -> None:
        """Keep a UI choice (theme, sidebar, cache panel) across restarts: saved at once. Quiet
        when the config file has errors: the choice still holds for this run."""
        for name, value in changes.items():
            setattr(self.settings, name, value)
        if self.settings_writable:
            self.save_settings()

    def watch_theme(self, theme: str) -> None:
        # From the palette's theme picker or the Appearance tab; the start-up restore is a no-op.
        if self._theme_restored and theme != self.settings.theme:
            self.remember_ui(theme=theme)

    def action_settings(self) -> None:
        from mixtral_chat.app.screens.settings import SettingsScreen

        if isinstance(self.screen, SettingsScreen):
            return
        if not self.is_screen_installed("settings"):
            # Installed, not just pushed: popping keeps it (and a running download) alive.
            self.install_screen(SettingsScreen(), "settings")
        self.push_screen("settings")

    async def action_quit(self) -> None:
        self.chat_screen.save_partial_answer()
        self.exit(0)
