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

from typing import TYPE_CHECKING, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Label, OptionList

from mixtral_chat.app.storage import (
    DEFAULT_TITLE,
    Conversation,
    StorageError,
    StoredMessage,
    title_from_text,
)
from mixtral_chat.app.widgets.cache_panel import ExpertCachePanel
from mixtral_chat.app.widgets.message_view import MessageList
from mixtral_chat.app.widgets.prompt import PromptInput
from mixtral_chat.app.widgets.sidebar import ConversationList, ModelLoadingBar
from mixtral_chat.app.widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from mixtral_chat.app.chat_app import ModelStatus

from mixtral_chat.app.screens.chat_actions import ChatActions
from mixtral_chat.app.screens.chat_answer import ChatAnswering
from mixtral_chat.app.screens.chat_base import ActiveGeneration, shows_errors
from mixtral_chat.app.screens.chat_sync import ChatSync

__all__ = ["ActiveGeneration", "ChatScreen"]


# Columns at which the layout changes (see HORIZONTAL_BREAKPOINTS).
NORMAL_WIDTH = 100
WIDE_WIDTH = 160


class ChatScreen(ChatActions, ChatAnswering, ChatSync):
    # The footer shows the everyday keys (every footer key is widgets to lay out at start-up);
    # the command palette (Ctrl+P) lists every action with its key.
    BINDINGS: ClassVar[list[BindingType]] = [
        # The footer shows keys in this order and cuts the rest on a narrow screen: the essential
        # ones first (Quit and Settings are the app's, repeated here to be placed first).
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("f1", "help", "Help", id="chat.help"),
        Binding("ctrl+q", "app.quit", "Quit", id="chat.quit"),
        Binding("f3", "app.settings", "Settings", id="chat.settings"),
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

    # Narrow: the sidebar is folded away (Ctrl+B opens it over the chat) and the cache panel lies
    # over the chat; normal: the sidebar beside it, the panel over it; wide: both beside it.
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [
        (0, "-narrow"),
        (NORMAL_WIDTH, "-normal"),
        (WIDE_WIDTH, "-wide"),
    ]

    # -- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label("Chats", classes="sidebar-title")
                yield ConversationList(id="conversations")
            with Vertical(id="chat-column"):
                yield Label(DEFAULT_TITLE, id="chat-title", markup=False)
                yield MessageList(id="messages")
                yield ModelLoadingBar(id="loading")
                yield PromptInput(self.storage.recent_user_prompts(), id="prompt")
                yield StatusBar(id="status-bar")
            yield ExpertCachePanel(id="cache-panel")
        yield Footer()

    def on_mount(self) -> None:
        settings = self.chat_app.settings
        # Classes, not `display`: the stylesheet decides per width (app.tcss, the breakpoints).
        self.set_class(not settings.show_sidebar, "-hide-sidebar")
        self.set_class(settings.show_cache_panel, "-show-cache")
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

    async def open_conversation(
        self, conversation_id: int, *, include_id: int | None = None, follow_model: bool = False
    ) -> None:
        """Show a chat. `follow_model`: the user chose it, so the model it was last answered with
        is loaded if another one is (a registered, installed model only)."""
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
        if follow_model:
            self.follow_chat_model(conversation)

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

    @on(OptionList.OptionSelected, "#conversations")
    @shows_errors
    async def _conversation_chosen(self, event: OptionList.OptionSelected) -> None:
        conversation_id = ConversationList.conversation_id(event.option)
        if conversation_id != self.conversation_id:
            await self.open_conversation(conversation_id, follow_model=True)
        self.close_folded_sidebar()
        self.prompt.focus()

    # -- model -----------------------------------------------------------------------------------

    @shows_errors
    async def _model_status_changed(self, status: ModelStatus) -> None:
        if status.state == "loading":
            self.loading_bar.begin(status.name or "the default model", self.chat_app.load_progress)
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
                if self.has_class("-show-cache"):
                    self.count_repeats()
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
