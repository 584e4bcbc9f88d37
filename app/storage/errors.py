"""What goes wrong with the conversation database, one line each."""

from __future__ import annotations

from pathlib import Path

from mixtral_chat.engine.errors import MixtralChatError


class StorageError(MixtralChatError):
    """The conversation database is unusable, newer than this version, or a record is missing."""


class DamagedDatabaseError(StorageError):
    """The database file is damaged (malformed pages, not a database at all)."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = " ".join(detail.split())
        super().__init__(
            f"{path} is damaged ({self.detail}); move it aside or restore a backup, then start again"
        )


class ConversationBusy(StorageError):
    """Another running instance is writing an answer in this conversation."""

    def __init__(self, conversation_id: int, pid: int) -> None:
        self.conversation_id = conversation_id
        self.pid = pid
        super().__init__(
            f"another mixtral-chat (pid {pid}) is writing an answer in this chat: wait for it to finish"
        )


class ConversationChanged(StorageError):
    """The conversation's messages in the database are not the ones the caller shows."""

    def __init__(self, conversation_id: int, deleted: bool = False) -> None:
        self.conversation_id = conversation_id
        self.deleted = deleted
        super().__init__(
            "this chat was deleted in another mixtral-chat"
            if deleted
            else "this chat was changed in another mixtral-chat"
        )
