"""What every part of the chat screen shares: its state (the chat shown and the versions of its
messages, the answer being written, the chats other apps are busy in), typed access to its widgets,
and the guards that turn storage and engine errors into notifications.

The screen is split by concern, each a class on this base: app/screens/chat_answer.py (sending
and the answer's worker), chat_sync.py (other apps on the same database), chat_actions.py (the
keys' actions), and chat.py, which composes them with the layout, the conversations and the model.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual.screen import Screen

from mixtral_chat.app.chat_session import (
    AnswerProgress,
)
from mixtral_chat.app.storage import (
    PartialAnswerSaver,
    Storage,
)
from mixtral_chat.app.widgets.cache_panel import ExpertCachePanel
from mixtral_chat.app.widgets.message_view import MessageList, MessageView
from mixtral_chat.app.widgets.prompt import PromptInput
from mixtral_chat.app.widgets.sidebar import ConversationList, ModelLoadingBar
from mixtral_chat.app.widgets.status_bar import StatusBar
from mixtral_chat.engine.errors import MixtralChatError

if TYPE_CHECKING:
    from mixtral_chat.app.chat_app import ChatApp
    from mixtral_chat.engine.offload.locality import LiveRepeats


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


class ChatScreenBase(Screen[None]):
    """State and widget access; no handlers (see the module docstring for where they are)."""

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
        # Routing repeats of the loaded model, counted once the cache panel has been shown.
        self.repeats: LiveRepeats | None = None

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
