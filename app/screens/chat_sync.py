"""The chat screen with other apps on the same database: a write refused because another app is
answering in the chat, a chat changed or deleted elsewhere, and re-reading what is shown when
another app commits (`DatabaseChanged`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mixtral_chat.app.screens.chat_base import ChatScreenBase, shows_errors
from mixtral_chat.app.screens.lifecycle import DatabaseChanged
from mixtral_chat.app.storage import (
    ConversationBusy,
    ConversationChanged,
)

# What a checked write returns when it was refused (the chat is busy elsewhere, or changed).
REFUSED = object()


class ChatSync(ChatScreenBase):
    # -- other instances -------------------------------------------------------------------------

    async def _checked_write(self, write: Callable[[], Any], *, if_busy: str, if_changed: str) -> Any:
        """Run a write guarded against the chat shown (`expected=self.shown`, `claim=True`): its
        result, or REFUSED once the user has been told why (`if_busy` / `if_changed`: what became
        of their action)."""
        try:
            return write()
        except ConversationBusy as exc:
            self._refuse_busy(exc, if_busy)
        except ConversationChanged as exc:
            await self._reload_changed(exc, if_changed)
        return REFUSED

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
