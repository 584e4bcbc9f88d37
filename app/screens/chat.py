"""The chat screen: sidebar of conversations, the messages, the prompt, the live status line and
the expert-cache panel. What the engine is asked and how its pieces are batched is
app/chat_session.py; this screen runs that in a thread worker, which talks to the UI only through
`Generation.*` messages (post_message is thread-safe).

Another app may run on the same database. The screen remembers the version of every message of
the chat it shows (`shown`), and each write it makes on the user's behalf (send, regenerate, edit,
delete) is checked against the database in the same transaction: if the chat changed elsewhere
it is reloaded and nothing is written; if another app is answering in it, it is marked busy and
the write is refused. When another app commits, the screen re-reads what it shows."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, OptionList

from mixtral_chat.app.chat_session import (
    AnswerChunk,
    AnswerProgress,
    generation_config,
    generation_values,
    prompt_messages,
    stream_answer,
)
from mixtral_chat.app.screens.lifecycle import DatabaseChanged, Generation
from mixtral_chat.app.screens.text_view import TextViewScreen
from mixtral_chat.app.storage import (
    DEFAULT_TITLE,
    Conversation,
    ConversationBusy,
    ConversationChanged,
    PartialAnswerSaver,
    SearchHit,
    Storage,
    StorageError,
    StoredMessage,
    title_from_text,
)
from mixtral_chat.app.widgets.cache_panel import ExpertCachePanel
from mixtral_chat.app.widgets.message_view import MessageList, MessageView
from mixtral_chat.app.widgets.prompt import PromptInput
from mixtral_chat.app.widgets.sidebar import ConversationList, ModelLoadingBar
from mixtral_chat.app.widgets.status_bar import StatusBar
from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.options import GenerationConfig

if TYPE_CHECKING:
    from mixtral_chat.app.chat_app import ChatApp, ModelStatus
    from mixtral_chat.app.remote import RemoteEngine
    from mixtral_chat.app.screens.dialogs import ChatOptions
    from mixtral_chat.engine.runtime import Engine

# A streaming answer is saved at least this often, so a crash loses at most this much text.
SAVE_INTERVAL_S = 1.0


def shows_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """A storage or engine error in a UI handler becomes a notification, never a crash (what
    the user typed stays in the prompt: it is cleared only after it is saved)."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(self: Screen[Any], *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(self, *args, **kwargs)
            except MixtralChatError as exc:
                self.notify(str(exc), severity="error", timeout=10)
                return None

        return async_wrapper

    @functools.wraps(method)
    def wrapper(self: Screen[Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except MixtralChatError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return None

    return wrapper


@dataclass
class ActiveGeneration:
    """The answer being written right now (at most one: the engine runs one at a time)."""

    conversation_id: int
    message_id: int
    saver: PartialAnswerSaver
    stop_event: threading.Event
    view: MessageView | None
    progress: AnswerProgress
    chat_deleted: bool = False  # the user deleted its chat: nothing left to save into
    save_error_shown: bool = False

    @property
    def pieces(self) -> int:
        return self.progress.pieces


class ChatScreen(Screen[None]):
    # The footer shows the everyday keys (every footer key is widgets to lay out at start-up);
    # the command palette (Ctrl+P) lists every action with its key.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+n", "new_chat", "New chat", id="chat.new"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="chat.regenerate"),
        Binding("ctrl+f", "search", "Search", id="chat.search"),
        Binding("ctrl+o", "options", "Options", id="chat.options"),
        Binding("f2", "rename", "Rename", id="chat.rename", show=False),
        Binding("f8", "delete_chat", "Delete", id="chat.delete", show=False),
        Binding("f9", "export", "Export", id="chat.export", show=False),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar", id="chat.toggle_sidebar", show=False),
        Binding("ctrl+g", "toggle_cache_panel", "Experts", id="chat.toggle_cache_panel", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="chat-screen")
        self.conversation_id: int | None = None
        self.generation: ActiveGeneration | None = None
        self.editing_message_id: int | None = None
        # A conversation whose answer waits for the model to finish loading.
        self.pending_conversation_id: int | None = None
        # The messages of the chat shown, as this app last read or wrote them: id -> version
        # (None: the answer this app is writing, whose version moves with every save).
        self.shown: dict[int, int | None] = {}
        # Chats another app is answering in: conversation id -> its pid.
        self.busy: dict[int, int] = {}
        self._conversations_signature: tuple[object, ...] | None = None

    # -- typed access ----------------------------------------------------------------------------

    @property
    def chat_app(self) -> ChatApp:
        return self.app  # type: ignore[return-value]

    @property
    def storage(self) -> Storage:
        return self.chat_app.storage

    @property
    def message_list(self) -> MessageList:
        return self.query_one("#messages", MessageList)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    @property
    def conversation_list(self) -> ConversationList:
        return self.query_one("#conversations", ConversationList)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one("#status-bar", StatusBar)

    @property
    def cache_panel(self) -> ExpertCachePanel:
        return self.query_one("#cache-panel", ExpertCachePanel)

    @property
    def loading_bar(self) -> ModelLoadingBar:
        return self.query_one("#loading", ModelLoadingBar)

    @property
    def is_generating(self) -> bool:
        return self.generation is not None

    # -- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label("Chats", classes="sidebar-title")
                yield ConversationList(id="conversations")
            with Vertical(id="chat-column"):
                yield Label(DEFAULT_TITLE, id="chat-title")
                yield MessageList(id="messages")
                yield ModelLoadingBar(id="loading")
                yield PromptInput(self.storage.recent_user_prompts(), id="prompt")
                yield StatusBar(id="status-bar")
            yield ExpertCachePanel(id="cache-panel")
        yield Footer()

    def on_mount(self) -> None:
        settings = self.chat_app.settings
        self.query_one("#sidebar").display = settings.show_sidebar
        self.cache_panel.display = settings.show_cache_panel
        self.loading_bar.display = False
        self.prompt.focus()
        self.watch(self.chat_app, "model_status", self._model_status_changed)
        self.call_after_refresh(self._first_frame_drawn)

    @shows_errors
    async def _first_frame_drawn(self) -> None:
        """The empty screen is drawn and the prompt takes keys. Then the latest chat is shown
        (a prompt sent meanwhile waits in this screen's queue, so it lands in that chat), and
        then the model starts loading, so its imports do not slow the first frames."""
        self.chat_app.screen_interactive()
        conversations = self.storage.list_conversations()
        if conversations:
            await self.open_conversation(conversations[0].id)
        else:
            await self.new_chat()
        self.call_after_refresh(self.chat_app.history_shown)

    # -- conversations ---------------------------------------------------------------------------

    def refresh_sidebar(self) -> None:
        self.busy = self.storage.busy_conversations()
        self._conversations_signature = self.storage.conversations_signature()
        self.conversation_list.show(self.storage.list_conversations(), self.conversation_id, self.busy)
        self._show_busy()

    def _show_busy(self) -> None:
        pid = self.busy.get(self.conversation_id) if self.conversation_id is not None else None
        self.status_bar.update_info(busy_pid=pid)

    def _remember(self, messages: list[StoredMessage]) -> None:
        streaming_id = self.generation.message_id if self.generation is not None else None
        self.shown = {m.id: (None if m.id == streaming_id else m.version) for m in messages}

    def _other_streaming_id(self, conversation_id: int, messages: list[StoredMessage]) -> int | None:
        """The answer another live app is writing in this chat (shown as being written, not as
        interrupted)."""
        if conversation_id not in self.busy:
            return None
        return next((m.id for m in reversed(messages) if m.status == "streaming"), None)

    def _set_title(self, title: str) -> None:
        self.query_one("#chat-title", Label).update(title)

    async def new_chat(self) -> None:
        self._cancel_edit()
        self.conversation_id = None
        self.shown = {}
        if self.generation is not None:
            self.generation.view = None  # still written to storage, no longer shown
        await self.message_list.show([])
        self._set_title(DEFAULT_TITLE)
        self.status_bar.update_info(context_used=None, tok_s=None, ttft_s=None)
        self.refresh_sidebar()

    async def open_conversation(self, conversation_id: int, *, include_id: int | None = None) -> None:
        try:
            conversation = self.storage.get_conversation(conversation_id)
        except StorageError as exc:
            self.notify(str(exc), severity="error")
            self.refresh_sidebar()
            return
        self._cancel_edit()
        self.conversation_id = conversation.id
        generation = self.generation
        streaming_id = (
            generation.message_id if generation and generation.conversation_id == conversation.id else None
        )
        if generation is not None:
            generation.view = None  # its view is about to be replaced
        messages = self.storage.messages(conversation.id)
        self._remember(messages)
        self.busy = self.storage.busy_conversations()
        await self.message_list.show(
            messages,
            streaming_id=streaming_id or self._other_streaming_id(conversation.id, messages),
            include_id=include_id,
        )
        if generation is not None and streaming_id is not None:
            # Back to the chat whose answer is still being written: stream into the new view.
            view = self.message_list.view_for(streaming_id)
            if view is not None:
                await view.start_stream(generation.saver.text)
                generation.view = view
        self._set_title(conversation.title)
        # Context in use as of the last answer (its prompt plus what it wrote).
        last_stats = next((m.stats for m in reversed(messages) if m.stats), None)
        used = (
            last_stats.get("prompt_tokens", 0) + last_stats.get("completion_tokens", 0)
            if last_stats
            else None
        )
        self.status_bar.update_info(context_used=used)
        self.refresh_sidebar()

    def current_conversation(self) -> Conversation | None:
        if self.conversation_id is None:
            return None
        try:
            return self.storage.get_conversation(self.conversation_id)
        except StorageError:
            return None

    def _ensure_conversation(self, first_prompt: str) -> int:
        if self.conversation_id is None:
            conversation = self.storage.create_conversation(
                title_from_text(first_prompt), model=self.chat_app.model_name
            )
            self.conversation_id = conversation.id
            self.shown = {}
            self._set_title(conversation.title)
        return self.conversation_id

    # -- other instances -------------------------------------------------------------------------

    def _refuse_busy(self, exc: ConversationBusy, what: str) -> None:
        self.notify(
            f"Another mixtral-chat (pid {exc.pid}) is writing an answer in this chat: {what}",
            title="Chat busy",
            severity="warning",
            timeout=8,
        )
        self.refresh_sidebar()

    async def _reload_changed(self, exc: ConversationChanged, what: str) -> None:
        """The chat differs in the database from what is shown: show the database's."""
        if exc.deleted:
            self.notify(
                f"This chat was deleted in another mixtral-chat: {what}", severity="warning", timeout=10
            )
            await self._open_latest()
            return
        self.notify(
            f"This chat was changed in another mixtral-chat and has been reloaded: {what}",
            title="Chat reloaded",
            severity="warning",
            timeout=10,
        )
        await self.open_conversation(exc.conversation_id)

    async def _open_latest(self) -> None:
        remaining = self.storage.list_conversations()
        if remaining:
            await self.open_conversation(remaining[0].id)
        else:
            await self.new_chat()

    @shows_errors
    async def on_database_changed(self, message: DatabaseChanged) -> None:
        """Another app committed: re-read the sidebar (titles, busy chats) and the chat shown."""
        others = self.storage.other_instances()
        self.chat_app.instances_seen(others)
        busy = {i.generating_in: i.pid for i in others if i.generating_in is not None}
        if busy != self.busy or self.storage.conversations_signature() != self._conversations_signature:
            self.refresh_sidebar()
        conversation_id = self.conversation_id
        if conversation_id is None:
            return
        generation = self.generation
        if generation is not None and generation.conversation_id == conversation_id:
            return  # this app holds the chat: nobody else writes in it
        versions = self.storage.message_versions(conversation_id)
        if versions is None:
            self.notify("The chat shown was deleted in another mixtral-chat.", severity="warning", timeout=8)
            await self._open_latest()
            return
        if versions == self.shown:
            return
        if versions.keys() == self.shown.keys():
            await self._update_changed_views(conversation_id, versions)
            return
        editing = self.editing_message_id is not None
        await self.open_conversation(conversation_id)
        if editing:
            self.notify(
                "This chat was changed in another mixtral-chat: the edit was cancelled (your text "
                "is still in the prompt).",
                severity="warning",
                timeout=10,
            )

    async def _update_changed_views(self, conversation_id: int, versions: dict[int, int]) -> None:
        """Same messages, some rewritten elsewhere (an answer being written): update those views."""
        for message in self.storage.messages(conversation_id):
            if self.shown.get(message.id) == versions.get(message.id):
                continue
            self.shown[message.id] = message.version
            view = self.message_list.view_for(message.id)
            if view is not None and view.is_attached and not view.is_streaming:
                status = message.status
                if status == "streaming" and conversation_id not in self.busy:
                    status = "interrupted"  # its app is gone
                await view.finish(message.content, status)

    @on(OptionList.OptionSelected, "#conversations")
    @shows_errors
    async def _conversation_chosen(self, event: OptionList.OptionSelected) -> None:
        conversation_id = ConversationList.conversation_id(event.option)
        if conversation_id != self.conversation_id:
            await self.open_conversation(conversation_id)
        self.prompt.focus()

    # -- sending ---------------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    @shows_errors
    async def _prompt_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if self.is_generating:
            self.notify("An answer is still being written: press Esc to stop it first.", severity="warning")
            return
        if self.editing_message_id is not None:
            await self._resend_edited(self.editing_message_id, text)
            return
        await self.send(text)

    async def send(self, text: str) -> None:
        """Commit the prompt, show it, and start the answer. The prompt is appended only after
        the messages shown, and only while no other app is answering in the chat."""
        conversation_id = self._ensure_conversation(text)
        try:
            # Committed before generating, with this app's lease on the chat.
            stored = self.storage.add_message(conversation_id, "user", text, expected=self.shown, claim=True)
        except ConversationBusy as exc:
            self._refuse_busy(exc, "your message is kept in the prompt; send it when it is done.")
            return
        except ConversationChanged as exc:
            await self._reload_changed(exc, "your message is not sent yet; press Enter to send it.")
            return
        self.shown[stored.id] = stored.version
        self.prompt.clear()
        self.prompt.remember(text)
        await self.message_list.add(stored)
        self.refresh_sidebar()
        await self.start_generation()

    async def start_generation(self) -> None:
        """Answer the current conversation as it is stored."""
        conversation = self.current_conversation()
        if conversation is None:
            return
        engine = self.chat_app.engine
        if engine is None:
            state = self.chat_app.model_status.state
            if state in ("idle", "loading"):  # idle: the load starts right after the first frames
                self.pending_conversation_id = conversation.id
                self.notify("The model is still loading; the answer starts as soon as it is ready.")
            else:
                self._release_lease()
                self.notify(
                    "No model is loaded: choose one in Settings (F3). Your message is saved.",
                    severity="error",
                )
            return
        try:
            config = generation_config(self.chat_app.settings.generation, conversation)
        except (MixtralChatError, TypeError, ValueError) as exc:  # bad per-chat settings: say so
            self._release_lease()
            self.notify(f"Invalid generation settings: {exc}", severity="error")
            return
        try:
            # The history as stored (what another app wrote included) and the answer's row, both
            # under this app's lease: a chat another app is answering in is refused.
            answer = self.storage.add_message(
                conversation.id, "assistant", "", status="streaming", claim=True
            )
        except ConversationBusy as exc:
            self._refuse_busy(exc, "this one does not answer now.")
            return
        messages = prompt_messages(self.storage, conversation, answer.id)
        if self.conversation_id == conversation.id:
            self.shown[answer.id] = None
        view = await self.message_list.add(answer)
        await view.start_stream()
        self.generation = ActiveGeneration(
            conversation_id=conversation.id,
            message_id=answer.id,
            saver=PartialAnswerSaver(self.storage, answer.id, interval_s=SAVE_INTERVAL_S),
            stop_event=threading.Event(),
            view=view,
            progress=AnswerProgress(started=time.monotonic()),
        )
        self.status_bar.update_info(generating=True, tok_s=None, ttft_s=None)
        self.refresh_bindings()
        self.generate(engine, messages, config, answer.id, self.generation.stop_event)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(
        self,
        engine: Engine | RemoteEngine,
        messages: list[dict[str, str]],
        config: GenerationConfig,
        message_id: int,
        stop_event: threading.Event,
    ) -> None:
        """The answer, off the UI thread: the session's loop, its batches posted to this screen."""
        self.post_message(Generation.Started(message_id))

        def post_chunk(chunk: AnswerChunk) -> None:
            self.post_message(Generation.Chunk(message_id, chunk.text, chunk.pieces, chunk.cache_stats))

        outcome = stream_answer(engine, messages, config, stop_event, post_chunk)
        if outcome.error is not None:
            self.post_message(Generation.Failed(message_id, outcome.error))
        else:
            self.post_message(
                Generation.Finished(message_id, outcome.stats, outcome.notices, outcome.cache_stats)
            )

    @shows_errors
    async def on_generation_chunk(self, message: Generation.Chunk) -> None:
        generation = self.generation
        if generation is None or generation.message_id != message.message_id:
            return
        now = time.monotonic()
        progress = generation.progress
        first = progress.first_piece_at is None
        progress.add(message.pieces, now)
        if first:
            self.status_bar.update_info(ttft_s=progress.ttft_s)
        try:
            generation.saver.append(message.text)
        except StorageError as exc:
            # Keep streaming (the text stays in memory for the final save); say so once.
            if not generation.chat_deleted and not generation.save_error_shown:
                generation.save_error_shown = True
                self.notify(str(exc), title="The answer could not be saved yet", severity="error")
        if generation.view is not None and generation.view.is_attached:
            await generation.view.append(message.text)
        tok_s = progress.pieces_per_s(now)
        if tok_s is not None:
            self.status_bar.update_info(tok_s=tok_s)
        self._show_cache_stats(message.cache_stats)

    @shows_errors
    async def on_generation_finished(self, message: Generation.Finished) -> None:
        stats = message.stats
        status = "stopped" if stats is not None and stats.finish_reason == "cancelled" else "complete"
        await self._end_generation(message.message_id, status, asdict(stats) if stats else None)
        for notice in message.notices:
            self.notify(notice, title="Context")
        if stats is not None:
            self.status_bar.update_info(
                tok_s=stats.decode_tok_s or None,
                ttft_s=stats.ttft_s,
                context_used=stats.prompt_tokens + stats.completion_tokens,
            )
            if stats.finish_reason == "length":
                self.notify(
                    "The answer reached the max tokens limit (Chat options: Ctrl+O).", severity="warning"
                )
        self._show_cache_stats(message.cache_stats)

    @shows_errors
    async def on_generation_failed(self, message: Generation.Failed) -> None:
        await self._end_generation(message.message_id, "error", None)
        self.notify(message.error, title="Generation failed", severity="error", timeout=10)

    async def _end_generation(self, message_id: int, status: str, stats: dict[str, Any] | None) -> None:
        generation = self.generation
        if generation is None or generation.message_id != message_id:
            return
        # StorageError: the chat was deleted while the answer was being written.
        with contextlib.suppress(StorageError):
            generation.saver.finish(status, stats)
        if self.conversation_id == generation.conversation_id and generation.message_id in self.shown:
            self.shown[generation.message_id] = generation.saver.version
        if generation.view is not None and generation.view.is_attached:
            await generation.view.finish(generation.saver.text, status)
        self.generation = None
        self._release_lease()
        self.status_bar.update_info(generating=False)
        self.refresh_bindings()
        self.refresh_sidebar()

    def save_partial_answer(self) -> None:
        """On exit: stop the engine and keep what was written, marked stopped."""
        generation = self.generation
        if generation is None:
            return
        generation.stop_event.set()
        with contextlib.suppress(StorageError):
            generation.saver.finish("stopped")

    def _release_lease(self) -> None:
        """This app no longer answers in a chat: other apps may write in it again."""
        if self.generation is not None or self.pending_conversation_id is not None:
            return
        with contextlib.suppress(StorageError):
            self.storage.release_conversation()

    def _show_cache_stats(self, stats: dict[str, Any] | None) -> None:
        if stats is None:
            return
        if stats.get("hit_rate") is not None:
            self.status_bar.update_info(cache_hit_rate=float(stats["hit_rate"]))
        if self.cache_panel.display:
            self.cache_panel.show_stats(stats)

    # -- model -----------------------------------------------------------------------------------

    @shows_errors
    async def _model_status_changed(self, status: ModelStatus) -> None:
        if status.state == "loading":
            self.loading_bar.begin(status.name or "the default model")
            self.status_bar.update_info(model=status.name or "model", loading=True, scheme="", device="")
            return
        self.loading_bar.end()
        engine = self.chat_app.engine
        if status.state == "ready" and engine is not None:
            info = engine.info
            self.status_bar.update_info(
                model=info.name,
                loading=False,
                scheme=info.scheme,
                device=f"{info.device} {info.dtype}".strip(),  # a remote one: "remote: NAME"
                context_total=info.context_length or None,
            )
            if engine.model is not None:  # a remote model has no expert cache here
                args = engine.model.args
                self.cache_panel.set_model_shape(args.num_hidden_layers, args.num_local_experts)
            self._show_cache_stats(engine.cache_stats())
            pending, self.pending_conversation_id = self.pending_conversation_id, None
            if pending is not None and pending == self.conversation_id and not self.is_generating:
                await self.start_generation()
            else:
                self._release_lease()
        else:
            self.status_bar.update_info(
                model="no model", loading=False, scheme="", device="", context_total=None
            )
            if status.state == "failed" and self.pending_conversation_id is not None:
                self.pending_conversation_id = None
                self._release_lease()
                self.notify(
                    "The model did not load, so the saved message was not answered.", severity="warning"
                )

    # -- actions ---------------------------------------------------------------------------------

    def _guarded(self, callback: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """A dialog's result callback whose storage errors become notifications."""

        async def run(result: Any) -> None:
            try:
                value = callback(result)
                if inspect.isawaitable(value):
                    await value
            except MixtralChatError as exc:
                self.notify(str(exc), severity="error", timeout=10)

        return run

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Greyed out (None) in the footer when they cannot run now.
        if action == "regenerate":
            return None if self.is_generating or self.conversation_id is None else True
        if action in ("rename", "delete_chat", "export"):
            return None if self.conversation_id is None else True
        return True

    def action_stop(self) -> None:
        if self.generation is not None:
            self.generation.stop_event.set()
            self.notify("Stopping: the answer so far is kept.", timeout=2)
        elif self.editing_message_id is not None:
            self._cancel_edit()
            self.prompt.clear()
        else:
            self.prompt.focus()

    @shows_errors
    async def action_new_chat(self) -> None:
        await self.new_chat()
        self.prompt.focus()

    @shows_errors
    async def action_regenerate(self) -> None:
        if self.is_generating:
            self.notify("An answer is still being written: press Esc to stop it first.", severity="warning")
            return
        if self.conversation_id is None:
            return
        conversation_id = self.conversation_id
        # The messages this app shows, as the database still has them (checked again below).
        messages = [m for m in self.storage.messages(conversation_id) if m.id in self.shown]
        last_user = next((m for m in reversed(messages) if m.role == "user"), None)
        if last_user is None:
            self.notify("Nothing to answer yet.", severity="warning")
            return
        try:
            deleted = self.storage.delete_messages_from(
                conversation_id, last_user.id + 1, expected=self.shown, claim=True
            )
        except ConversationBusy as exc:
            self._refuse_busy(exc, "regenerate when it is done.")
            return
        except ConversationChanged as exc:
            await self._reload_changed(exc, "nothing was deleted; press Ctrl+R again to regenerate.")
            return
        if deleted:
            await self.open_conversation(conversation_id)
        await self.start_generation()

    @on(MessageView.EditRequested)
    @shows_errors
    def _edit_requested(self, event: MessageView.EditRequested) -> None:
        if self.is_generating:
            self.notify("An answer is still being written: press Esc to stop it first.", severity="warning")
            return
        self.editing_message_id = event.view.message_id
        self.prompt.set_text(event.view.text)
        self.prompt.border_title = "Editing an earlier message: Enter answers again from there, Esc cancels"
        self.prompt.add_class("-editing")
        self.prompt.focus()

    @on(MessageView.ViewTextRequested)
    def _view_text_requested(self, event: MessageView.ViewTextRequested) -> None:
        self.app.push_screen(
            TextViewScreen("Select with the mouse or Shift+arrows; Esc closes", event.view.text)
        )

    def _cancel_edit(self) -> None:
        if self.editing_message_id is not None:
            self.editing_message_id = None
            self.prompt.border_title = None
            self.prompt.remove_class("-editing")

    async def _resend_edited(self, message_id: int, text: str) -> None:
        """Replace an earlier prompt, drop everything after it, and answer again."""
        self._cancel_edit()
        conversation_id = self.conversation_id
        if conversation_id is None or message_id not in self.shown:
            self.notify("The message being edited is no longer shown.", severity="warning")
            return
        try:
            self.storage.edit_message(conversation_id, message_id, text, expected=self.shown, claim=True)
        except ConversationBusy as exc:
            self._refuse_busy(exc, "your edit is kept in the prompt.")
            return
        except ConversationChanged as exc:
            await self._reload_changed(exc, "nothing was changed; your edit is kept in the prompt.")
            return
        edited = self.storage.get_message(message_id)
        self.prompt.clear()
        self.prompt.remember(text)
        await self.open_conversation(edited.conversation_id)
        await self.start_generation()

    @shows_errors
    def action_search(self) -> None:
        from mixtral_chat.app.screens.dialogs import SearchScreen  # dialogs load on first use

        async def opened(hit: SearchHit | None) -> None:
            if hit is not None:
                await self._show_hit(hit)

        self.app.push_screen(SearchScreen(self.storage), self._guarded(opened))

    async def _show_hit(self, hit: SearchHit) -> None:
        await self.open_conversation(hit.conversation_id, include_id=hit.message_id)
        view = self.message_list.view_for(hit.message_id)
        if view is not None:
            self.message_list.release_anchor()
            view.add_class("-found")
            view.focus()
            self.message_list.scroll_to_widget(view, animate=False, top=True)

    @shows_errors
    def action_rename(self) -> None:
        from mixtral_chat.app.screens.dialogs import TextInputScreen

        conversation = self.current_conversation()
        if conversation is None:
            return

        def renamed(title: str | None) -> None:
            if title is not None and title.strip():
                self.storage.rename_conversation(conversation.id, title)
                if self.conversation_id == conversation.id:
                    self._set_title(self.storage.get_conversation(conversation.id).title)
                self.refresh_sidebar()

        self.app.push_screen(TextInputScreen("Rename this chat", conversation.title), self._guarded(renamed))

    @shows_errors
    def action_delete_chat(self) -> None:
        from mixtral_chat.app.screens.dialogs import ConfirmScreen

        conversation = self.current_conversation()
        if conversation is None:
            return
        count = len(self.storage.messages(conversation.id))
        expected = dict(self.shown)  # what the question is about: the messages shown now

        async def answered(confirmed: bool | None) -> None:
            if not confirmed:
                return
            try:
                self.storage.delete_conversation(conversation.id, expected=expected)
            except ConversationBusy as exc:
                self._refuse_busy(exc, "nothing was deleted.")
                return
            except ConversationChanged as exc:
                await self._reload_changed(exc, "nothing was deleted.")
                return
            if self.generation is not None and self.generation.conversation_id == conversation.id:
                self.generation.stop_event.set()
                self.generation.chat_deleted = True
            self.notify(f"Deleted “{conversation.title}”.")
            await self._open_latest()

        self.app.push_screen(
            ConfirmScreen(f"Delete “{conversation.title}” and its {count} messages? This cannot be undone."),
            self._guarded(answered),
        )

    @shows_errors
    def action_export(self) -> None:
        if self.conversation_id is None:
            return
        from mixtral_chat.engine.paths import data_dir

        try:
            paths = self.storage.export(self.conversation_id, data_dir() / "exports")
        except OSError as exc:
            self.notify(f"Export failed: {exc.strerror or exc}", severity="error")
            return
        self.notify("Exported to\n" + "\n".join(str(path) for path in paths), title="Export", timeout=8)

    @shows_errors
    def action_options(self) -> None:
        from mixtral_chat.app.screens.dialogs import ChatOptions, ChatOptionsScreen

        settings = self.chat_app.settings
        conversation = self.current_conversation()
        generation = generation_values(settings.generation, conversation)
        options = ChatOptions(
            system_prompt=conversation.system_prompt if conversation else "",
            persona=conversation.persona if conversation else None,
            generation=generation,
        )

        def saved(result: ChatOptions | None) -> None:
            if result is None:
                return
            conversation_id = self.conversation_id
            if conversation_id is None:
                conversation_id = self.storage.create_conversation(model=self.chat_app.model_name).id
                self.conversation_id = conversation_id
            self.storage.update_conversation_settings(
                conversation_id,
                system_prompt=result.system_prompt,
                persona=result.persona,
                generation=result.generation,
            )
            if result.save_persona_as:
                settings.personas[result.save_persona_as] = result.system_prompt
                self.chat_app.save_settings()
            self.refresh_sidebar()
            self.notify("Chat options saved.")

        self.app.push_screen(ChatOptionsScreen(options, dict(settings.personas)), self._guarded(saved))

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display

    def action_toggle_cache_panel(self) -> None:
        panel = self.cache_panel
        panel.display = not panel.display
        if panel.display:
            engine = self.chat_app.engine
            panel.show_stats(engine.cache_stats() if engine is not None else None)

    def last_answer(self) -> StoredMessage | None:
        if self.conversation_id is None:
            return None
        return next(
            (m for m in reversed(self.storage.messages(self.conversation_id)) if m.role == "assistant"), None
        )

    @shows_errors
    def action_copy_last_answer(self) -> None:
        answer = self.last_answer()
        if answer is None:
            self.notify("No answer to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(answer.content)
        self.notify(f"Copied the last answer ({len(answer.content)} characters).")

    @shows_errors
    def action_copy_last_code_block(self) -> None:
        views = [view for view in self.message_list.views if view.role == "assistant"]
        if not views:
            self.notify("No answer to copy from yet.", severity="warning")
            return
        views[-1].action_copy_code()

    async def on_unmount(self) -> None:
        self.save_partial_answer()
