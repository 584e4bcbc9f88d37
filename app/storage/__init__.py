"""Conversations in SQLite: WAL, a schema version with migrations, FTS5 search.

One `Storage` is one connection. Several app instances may open the same database file at once:
WAL lets readers run beside one writer, and every write is a short transaction that waits
(busy timeout) instead of failing when another instance holds the write lock.

Nothing typed is lost: `add_message` commits before the caller starts generating, and a streaming
answer is saved by `PartialAnswerSaver` at most every second, so a crash (kill -9) loses at most
the tokens produced after the last save.

Instances know of each other through the `instances` table: each running app registers a row (pid,
host, heartbeat) and marks the conversation it is answering in (`generating_in`), its lease. A row
whose process is gone (dead pid on this host, or no heartbeat for `STALE_AFTER_S`) is ignored.
The writes an app makes on what the user sees (send, regenerate, edit, delete) are guarded: in
the same transaction they check that no other live instance holds the conversation
(`ConversationBusy`) and that its messages are still those the app shows, by id and version
(`ConversationChanged`), so an instance never overwrites or deletes what it has not seen.

`check()` looks for damage (`PRAGMA quick_check`: 35 ms on a 48 MB database of 20,000 messages,
under 1 ms on a small one) and rebuilds a damaged full-text index from the messages table;
`check_search_index()` also compares the index with every message (200 ms on the 48 MB one).
"""

from __future__ import annotations

from mixtral_chat.app.storage.errors import (
    ConversationBusy,
    ConversationChanged,
    DamagedDatabaseError,
    StorageError,
)
from mixtral_chat.app.storage.instances import HEARTBEAT_S, STALE_AFTER_S, instance_is_live, pid_alive
from mixtral_chat.app.storage.partial_answer import PartialAnswerSaver
from mixtral_chat.app.storage.records import (
    DEFAULT_TITLE,
    MATCH_END,
    MATCH_START,
    ROLES,
    STATUSES,
    Conversation,
    Instance,
    MessageStatus,
    Role,
    SearchHit,
    StoredMessage,
    title_from_text,
)
from mixtral_chat.app.storage.schema import (
    DB_FILENAME,
    SCHEMA_VERSION,
    connect,
    default_db_path,
    is_damage,
    migrate,
    move_aside,
    schema_version,
)
from mixtral_chat.app.storage.store import Storage, fts_query

__all__ = [
    "DB_FILENAME",
    "DEFAULT_TITLE",
    "HEARTBEAT_S",
    "MATCH_END",
    "MATCH_START",
    "ROLES",
    "SCHEMA_VERSION",
    "STALE_AFTER_S",
    "STATUSES",
    "Conversation",
    "ConversationBusy",
    "ConversationChanged",
    "DamagedDatabaseError",
    "Instance",
    "MessageStatus",
    "PartialAnswerSaver",
    "Role",
    "SearchHit",
    "Storage",
    "StorageError",
    "StoredMessage",
    "connect",
    "default_db_path",
    "fts_query",
    "instance_is_live",
    "is_damage",
    "migrate",
    "move_aside",
    "pid_alive",
    "schema_version",
    "title_from_text",
]
