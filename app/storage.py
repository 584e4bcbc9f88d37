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

import contextlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.fileio import write_atomic

DB_FILENAME = "conversations.db"
DEFAULT_TITLE = "New chat"
# How long a write waits for another instance's transaction before giving up.
BUSY_TIMEOUT_S = 10.0
# A running app refreshes its row in `instances` this often; a row not refreshed for
# STALE_AFTER_S belongs to an app that is gone (or frozen), whatever its pid.
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
# SQLite's primary result codes for a damaged file (extended codes carry them in the low byte).
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

Role = Literal["system", "user", "assistant"]
# complete: a finished message. streaming: an answer being written (or cut off by a crash).
# stopped: the user stopped the answer; error: the engine failed mid-answer.
MessageStatus = Literal["complete", "streaming", "stopped", "error"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
STATUSES: tuple[str, ...] = ("complete", "streaming", "stopped", "error")

# Each migration moves the schema from version i to i + 1 (PRAGMA user_version). Statements run
# one by one inside one IMMEDIATE transaction, so a crash mid-migration leaves the old version.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: conversations and their messages. AUTOINCREMENT: ids are never reused, so a
    # deleted chat's id cannot come back as another chat in a second app instance, and message
    # ids grow with time within a conversation (regenerate/edit cut "everything after id").
    (
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX messages_by_conversation ON messages(conversation_id, id)",
        "CREATE INDEX conversations_by_update ON conversations(updated_at)",
    ),
    # 1 -> 2: message status (stopped / streaming answers) and stats; per-chat system prompt,
    # persona, generation settings and model.
    (
        "ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT 'complete'",
        "ALTER TABLE messages ADD COLUMN stats TEXT",
        "ALTER TABLE conversations ADD COLUMN system_prompt TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE conversations ADD COLUMN persona TEXT",
        "ALTER TABLE conversations ADD COLUMN generation TEXT",
        "ALTER TABLE conversations ADD COLUMN model TEXT",
    ),
    # 2 -> 3: full-text search over message content (external-content FTS5 kept in sync by
    # triggers), filled from the messages already there.
    (
        """CREATE VIRTUAL TABLE messages_fts USING fts5(
            content, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
        )""",
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END""",
        "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
    ),
    # 3 -> 4: a version per message (bumped by every update: guarded writes compare it with
    # what the app shows), and the running app instances with the conversation each is
    # answering in.
    (
        "ALTER TABLE messages ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
        """CREATE TABLE instances (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            generating_in INTEGER REFERENCES conversations(id) ON DELETE SET NULL
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# Markers around matched terms in search snippets: control characters that never occur in
# typed text, so the UI can highlight them without escaping anything.
MATCH_START = "\x02"
MATCH_END = "\x03"


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


def is_damage(exc: sqlite3.Error) -> bool:
    """A SQLite error that says the file is damaged (not a lock, a full disk or permissions)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    created_at: float
    updated_at: float
    system_prompt: str = ""
    persona: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    model: str | None = None


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str
    created_at: float
    stats: dict[str, Any] | None = None
    version: int = 1


@dataclass(frozen=True)
class Instance:
    """A running app on this database (a row of `instances`)."""

    id: int
    pid: int
    host: str
    started_at: float
    heartbeat_at: float
    generating_in: int | None


def pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it there: rely on the heartbeat
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def instance_is_live(instance: Instance, now: float | None = None) -> bool:
    if (now if now is not None else time.time()) - instance.heartbeat_at > STALE_AFTER_S:
        return False
    return instance.host != socket.gethostname() or pid_alive(instance.pid)


@dataclass(frozen=True)
class SearchHit:
    conversation_id: int
    conversation_title: str
    message_id: int
    role: str
    snippet: str  # matched terms wrapped in MATCH_START / MATCH_END


def default_db_path() -> Path:
    from mixtral_chat.engine.paths import data_dir

    return data_dir() / DB_FILENAME


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (kill -9); only an OS crash or
        # power cut can lose the last transactions, never corrupt the database.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise DamagedDatabaseError(path, str(exc)) from exc
        raise StorageError(f"cannot open the conversation database {path}: {exc}") from exc
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to `target`; returns the version found before. Safe to race: the
    version is re-read inside the write transaction, so two instances never migrate twice."""
    found = schema_version(conn)
    if found > SCHEMA_VERSION:
        raise StorageError(
            f"the conversation database has schema version {found}, newer than this mixtral-chat "
            f"understands ({SCHEMA_VERSION}); upgrade mixtral-chat"
        )
    if found >= target:
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(conn)
        for version in range(found, target):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            # PRAGMA takes no parameters; `version` is an int from range().
            conn.execute(f"PRAGMA user_version = {version + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def fts_query(text: str) -> str:
    """User text -> an FTS5 query: every word must match, the last one as a prefix (search as
    you type). Words are quoted, so FTS5 syntax characters in the text are plain text."""
    words = re.findall(r"\w+", text, flags=re.UNICODE)
    if not words:
        return ""
    quoted = ['"' + word.replace('"', '""') + '"' for word in words]
    quoted[-1] += "*"
    return " ".join(quoted)


def title_from_text(text: str, limit: int = 48) -> str:
    """A conversation title from its first prompt: the first non-empty line, shortened."""
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"
    return DEFAULT_TITLE


class Storage:
    """The conversation database. Methods commit before they return."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_db_path()
        self._conn = connect(self.path)
        # One connection may be shared by the UI thread and a worker thread: serialise its use.
        self._lock = threading.RLock()
        # This app's row in `instances` once `register_instance` is called.
        self.instance_id: int | None = None
        try:
            migrate(self._conn)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if is_damage(exc):
                raise DamagedDatabaseError(self.path, str(exc)) from exc
            raise StorageError(f"cannot read the conversation database {self.path}: {exc}") from exc

    # -- plumbing --------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self.instance_id is not None:
                with contextlib.suppress(StorageError, sqlite3.Error):
                    self.unregister_instance()
            self._conn.close()

    def check(self) -> list[str]:
        """Look for damage: raises DamagedDatabaseError if the file is damaged (quick_check);
        a damaged full-text index is rebuilt from the messages table (the notice says so).
        Comparing the index with every message is left to `check_search_index()`, which takes
        longer (200 ms on a 48 MB database) and can run in the background."""
        with self._lock:
            try:
                rows = self._conn.execute("PRAGMA quick_check").fetchall()
            except sqlite3.DatabaseError as exc:
                raise DamagedDatabaseError(self.path, str(exc)) from exc
        problems = [str(row[0]) for row in rows if row[0] != "ok"]
        if problems:
            raise DamagedDatabaseError(self.path, problems[0].splitlines()[-1])
        return self.check_search_index(compare_content=False)

    def check_search_index(self, compare_content: bool = True) -> list[str]:
        """FTS5's integrity-check (with `compare_content`, also against every message); a
        damaged index is rebuilt from the messages table. Returns the notice, if any."""
        statement = "INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', ?)"
        with self._lock:
            try:
                self._conn.execute(statement, (1 if compare_content else 0,))
            except sqlite3.DatabaseError as exc:
                if not is_damage(exc):
                    raise StorageError(f"cannot read the conversation database {self.path}: {exc}") from exc
                try:
                    with self._write() as conn:
                        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
                except StorageError as rebuild_error:
                    raise DamagedDatabaseError(self.path, str(exc)) from rebuild_error
                return [f"The search index of {self.path.name} was damaged: rebuilt from the messages."]
        return []

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: takes the write lock up front, so it waits for another
        instance (busy timeout) rather than failing half-way on a lock upgrade. SQLite errors
        (locked past the timeout, disk full, read-only file) become one-line StorageErrors."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot write the conversation database {self.path}: {exc}") from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StorageError(f"cannot write the conversation database {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the conversation database {self.path}: {exc}") from exc

    def data_version(self) -> int:
        """Changes whenever another connection commits to the database (PRAGMA data_version)."""
        with self._lock:
            try:
                return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the conversation database {self.path}: {exc}") from exc

    # -- running instances and their leases ------------------------------------------------------

    def register_instance(self) -> int:
        """Add this app to `instances` (and drop the rows of apps that are gone)."""
        now = time.time()
        with self._write() as conn:
            for row in conn.execute("SELECT * FROM instances").fetchall():
                if not instance_is_live(_instance(row), now):
                    conn.execute("DELETE FROM instances WHERE id = ?", (row["id"],))
            cursor = conn.execute(
                "INSERT INTO instances (pid, host, started_at, heartbeat_at) VALUES (?, ?, ?, ?)",
                (os.getpid(), socket.gethostname(), now, now),
            )
            self.instance_id = int(cursor.lastrowid or 0)
        return self.instance_id

    def heartbeat(self) -> None:
        if self.instance_id is None:
            return
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE instances SET heartbeat_at = ? WHERE id = ?", (time.time(), self.instance_id)
            )
            if cursor.rowcount == 0:  # dropped as stale by another app (this one was frozen)
                conn.execute(
                    "INSERT INTO instances (id, pid, host, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
                    (self.instance_id, os.getpid(), socket.gethostname(), time.time(), time.time()),
                )

    def unregister_instance(self) -> None:
        if self.instance_id is None:
            return
        with self._write() as conn:
            conn.execute("DELETE FROM instances WHERE id = ?", (self.instance_id,))
        self.instance_id = None

    def other_instances(self) -> list[Instance]:
        """The other apps running on this database, oldest first."""
        rows = self._read("SELECT * FROM instances ORDER BY id")
        now = time.time()
        return [
            instance
            for instance in map(_instance, rows)
            if instance.id != self.instance_id and instance_is_live(instance, now)
        ]

    def busy_conversations(self) -> dict[int, int]:
        """Conversation id -> pid of the other live app writing an answer in it."""
        return {
            instance.generating_in: instance.pid
            for instance in self.other_instances()
            if instance.generating_in is not None
        }

    def release_conversation(self) -> None:
        """This app no longer answers in any conversation."""
        if self.instance_id is None:
            return
        with self._write() as conn:
            conn.execute("UPDATE instances SET generating_in = NULL WHERE id = ?", (self.instance_id,))

    def claim_conversation(
        self, conversation_id: int, *, expected: Mapping[int, int | None] | None = None
    ) -> None:
        """Take the lease on a conversation (this app is about to answer in it)."""
        with self._write() as conn:
            self._guard(conn, conversation_id, expected, claim=True)

    def _guard(
        self,
        conn: sqlite3.Connection,
        conversation_id: int,
        expected: Mapping[int, int | None] | None,
        *,
        claim: bool,
    ) -> None:
        """Inside a write transaction: the conversation exists, no other live app is answering in
        it, and (with `expected`: message id -> version, None for any version) its messages are
        exactly those. With `claim`, this app takes the conversation's lease."""
        if not conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone():
            raise ConversationChanged(conversation_id, deleted=True)
        now = time.time()
        for row in conn.execute(
            "SELECT * FROM instances WHERE generating_in = ? AND id IS NOT ?",
            (conversation_id, self.instance_id),
        ).fetchall():
            instance = _instance(row)
            if instance_is_live(instance, now):
                raise ConversationBusy(conversation_id, instance.pid)
        if expected is not None:
            found = {
                row["id"]: row["version"]
                for row in conn.execute(
                    "SELECT id, version FROM messages WHERE conversation_id = ?", (conversation_id,)
                ).fetchall()
            }
            if found.keys() != expected.keys() or any(
                version is not None and found[key] != version for key, version in expected.items()
            ):
                raise ConversationChanged(conversation_id)
        if claim and self.instance_id is not None:
            conn.execute(
                "UPDATE instances SET generating_in = ?, heartbeat_at = ? WHERE id = ?",
                (conversation_id, now, self.instance_id),
            )

    def message_versions(self, conversation_id: int) -> dict[int, int] | None:
        """Message id -> version of a conversation; None if the conversation is gone."""
        with self._lock:
            try:
                if not self._conn.execute(
                    "SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)
                ).fetchone():
                    return None
                rows = self._conn.execute(
                    "SELECT id, version FROM messages WHERE conversation_id = ?", (conversation_id,)
                ).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the conversation database {self.path}: {exc}") from exc
        return {row["id"]: row["version"] for row in rows}

    def conversations_signature(self) -> tuple[Any, ...]:
        """Changes when a conversation is added, removed, renamed or written to."""
        row = self._read("SELECT count(*), max(updated_at), total(id) FROM conversations")[0]
        return tuple(row)

    # -- conversations ---------------------------------------------------------------------------

    def create_conversation(
        self,
        title: str = DEFAULT_TITLE,
        *,
        system_prompt: str = "",
        persona: str | None = None,
        generation: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> Conversation:
        now = time.time()
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO conversations (title, created_at, updated_at, system_prompt, persona,"
                " generation, model) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (title, now, now, system_prompt, persona, _dump(generation), model),
            )
            conversation_id = int(cursor.lastrowid or 0)
        return self.get_conversation(conversation_id)

    def get_conversation(self, conversation_id: int) -> Conversation:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise StorageError(f"no conversation with id {conversation_id}")
        return _conversation(rows[0])

    def list_conversations(self) -> list[Conversation]:
        rows = self._read("SELECT * FROM conversations ORDER BY updated_at DESC, id DESC")
        return [_conversation(row) for row in rows]

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        title = " ".join(title.split()) or DEFAULT_TITLE
        self._update_conversation(conversation_id, "title = ?", (title,))

    def update_conversation_settings(
        self,
        conversation_id: int,
        *,
        system_prompt: str,
        persona: str | None,
        generation: dict[str, Any],
    ) -> None:
        self._update_conversation(
            conversation_id,
            "system_prompt = ?, persona = ?, generation = ?",
            (system_prompt, persona, _dump(generation)),
        )

    def set_conversation_model(self, conversation_id: int, model: str | None) -> None:
        self._update_conversation(conversation_id, "model = ?", (model,))

    def _update_conversation(self, conversation_id: int, assignments: str, params: tuple[Any, ...]) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE conversations SET {assignments}, updated_at = ? WHERE id = ?",
                (*params, time.time(), conversation_id),
            )
            if cursor.rowcount == 0:
                raise StorageError(f"no conversation with id {conversation_id}")

    def delete_conversation(
        self, conversation_id: int, *, expected: Mapping[int, int | None] | None = None
    ) -> None:
        """Delete a conversation; with `expected`, only if its messages are those (and no other
        app is answering in it)."""
        with self._write() as conn:
            if expected is not None:
                self._guard(conn, conversation_id, expected, claim=False)
            conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # -- messages --------------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        status: str = "complete",
        stats: dict[str, Any] | None = None,
        expected: Mapping[int, int | None] | None = None,
        claim: bool = False,
    ) -> StoredMessage:
        """Append a message. With `expected` (or `claim`) the write is guarded: see `_guard`."""
        if role not in ROLES:
            raise StorageError(f"unknown message role {role!r}")
        if status not in STATUSES:
            raise StorageError(f"unknown message status {status!r}")
        now = time.time()
        with self._write() as conn:
            if expected is not None or claim:
                self._guard(conn, conversation_id, expected, claim=claim)
            try:
                cursor = conn.execute(
                    "INSERT INTO messages (conversation_id, role, content, created_at, status, stats)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (conversation_id, role, content, now, status, _dump(stats)),
                )
            except sqlite3.IntegrityError as exc:
                raise StorageError(f"no conversation with id {conversation_id}") from exc
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
            message_id = int(cursor.lastrowid or 0)
        return StoredMessage(message_id, conversation_id, role, content, status, now, stats, version=1)

    def update_message(
        self,
        message_id: int,
        content: str,
        *,
        status: str | None = None,
        stats: dict[str, Any] | None = None,
    ) -> int:
        """Change a message; returns its new version."""
        if status is not None and status not in STATUSES:
            raise StorageError(f"unknown message status {status!r}")
        with self._write() as conn:
            row = conn.execute(
                "UPDATE messages SET content = ?, status = COALESCE(?, status),"
                " stats = COALESCE(?, stats), version = version + 1 WHERE id = ? RETURNING version",
                (content, status, _dump(stats), message_id),
            ).fetchone()
            if row is None:
                raise StorageError(f"no message with id {message_id}")
            conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id ="
                " (SELECT conversation_id FROM messages WHERE id = ?)",
                (time.time(), message_id),
            )
        return int(row[0])

    def edit_message(
        self,
        conversation_id: int,
        message_id: int,
        content: str,
        *,
        expected: Mapping[int, int | None] | None = None,
        claim: bool = False,
    ) -> int:
        """Replace an earlier prompt and delete everything after it, in one guarded transaction;
        returns how many later messages were deleted."""
        with self._write() as conn:
            self._guard(conn, conversation_id, expected, claim=claim)
            cursor = conn.execute(
                "UPDATE messages SET content = ?, version = version + 1 WHERE id = ? AND conversation_id = ?",
                (content, message_id, conversation_id),
            )
            if cursor.rowcount == 0:
                raise ConversationChanged(conversation_id)
            deleted = conn.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id > ?", (conversation_id, message_id)
            ).rowcount
            conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id)
            )
        return deleted

    def get_message(self, message_id: int) -> StoredMessage:
        rows = self._read("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise StorageError(f"no message with id {message_id}")
        return _message(rows[0])

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [_message(row) for row in rows]

    def delete_messages_from(
        self,
        conversation_id: int,
        message_id: int,
        *,
        expected: Mapping[int, int | None] | None = None,
        claim: bool = False,
    ) -> int:
        """Delete `message_id` and every later message of the conversation (regenerate, edit).
        With `expected` (or `claim`) the write is guarded: see `_guard`."""
        with self._write() as conn:
            if expected is not None or claim:
                self._guard(conn, conversation_id, expected, claim=claim)
            cursor = conn.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conversation_id, message_id)
            )
            return cursor.rowcount

    def recent_user_prompts(self, limit: int = 200) -> list[str]:
        """The latest distinct prompts across all conversations, oldest first (prompt history)."""
        rows = self._read(
            "SELECT content FROM messages WHERE role = 'user' GROUP BY content ORDER BY MAX(id) DESC LIMIT ?",
            (limit,),
        )
        return [row["content"] for row in reversed(rows)]

    # -- search and export -----------------------------------------------------------------------

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        query = fts_query(text)
        if not query:
            return []
        rows = self._read(
            "SELECT m.id AS message_id, m.role, m.conversation_id, c.title,"
            " snippet(messages_fts, 0, ?, ?, '…', 12) AS snippet"
            " FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE messages_fts MATCH ? ORDER BY bm25(messages_fts), m.id DESC LIMIT ?",
            (MATCH_START, MATCH_END, query, limit),
        )
        return [
            SearchHit(row["conversation_id"], row["title"], row["message_id"], row["role"], row["snippet"])
            for row in rows
        ]

    def export_json(self, conversation_id: int) -> dict[str, Any]:
        conversation = self.get_conversation(conversation_id)
        return {
            "format": "mixtral-chat-conversation",
            "version": 1,
            "id": conversation.id,
            "title": conversation.title,
            "created_at": conversation.created_at,
            "updated_at": conversation.updated_at,
            "model": conversation.model,
            "system_prompt": conversation.system_prompt,
            "persona": conversation.persona,
            "generation": conversation.generation,
            "messages": [
                {
                    "role": message.role,
                    "content": message.content,
                    "status": message.status,
                    "created_at": message.created_at,
                    **({"stats": message.stats} if message.stats else {}),
                }
                for message in self.messages(conversation_id)
            ],
        }

    def export_markdown(self, conversation_id: int) -> str:
        conversation = self.get_conversation(conversation_id)
        lines = [f"# {conversation.title}", ""]
        if conversation.model:
            lines += [f"Model: {conversation.model}", ""]
        if conversation.system_prompt:
            lines += ["## System", "", conversation.system_prompt, ""]
        for message in self.messages(conversation_id):
            heading = "User" if message.role == "user" else message.role.capitalize()
            if message.status == "stopped":
                heading += " (stopped)"
            elif message.status in ("error", "streaming"):
                heading += " (incomplete)"
            lines += [f"## {heading}", "", message.content, ""]
        return "\n".join(lines)

    def export(self, conversation_id: int, folder: Path) -> list[Path]:
        """Write `<title>-<id>.md` and `.json` into `folder` (atomically); returns their paths."""
        conversation = self.get_conversation(conversation_id)
        slug = re.sub(r"[^\w-]+", "-", conversation.title.lower(), flags=re.UNICODE).strip("-")[:40]
        stem = f"{slug or 'chat'}-{conversation.id}"
        markdown_path = folder / f"{stem}.md"
        json_path = folder / f"{stem}.json"
        write_atomic(markdown_path, self.export_markdown(conversation_id))
        write_atomic(
            json_path, json.dumps(self.export_json(conversation_id), indent=2, ensure_ascii=False) + "\n"
        )
        return [markdown_path, json_path]


class PartialAnswerSaver:
    """Saves an answer while it streams: at most once per `interval_s`, so a crash loses at most
    the text produced since the last save, and the database sees one small write per second
    rather than one per token."""

    def __init__(
        self,
        storage: Storage,
        message_id: int,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.message_id = message_id
        self.interval_s = interval_s
        self._clock = clock
        self._pieces: list[str] = []
        self._saved_length = 0
        self._last_save = clock()
        self.saves = 0
        self.finished = False
        self.version: int | None = None  # the message's version after this saver's last save

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def append(self, piece: str) -> None:
        self._pieces.append(piece)
        if self._clock() - self._last_save >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Save the text so far (still marked streaming) if anything is new."""
        text = self.text
        if len(text) == self._saved_length or self.finished:
            return
        self.version = self.storage.update_message(self.message_id, text)
        self._saved_length = len(text)
        self._last_save = self._clock()
        self.saves += 1

    def finish(self, status: str, stats: dict[str, Any] | None = None, text: str | None = None) -> None:
        """The final save: the whole text with its status (complete / stopped / error)."""
        if self.finished:
            return
        if text is not None:
            self._pieces = [text]
        self.version = self.storage.update_message(self.message_id, self.text, status=status, stats=stats)
        self.finished = True
        self.saves += 1


def move_aside(path: Path) -> Path:
    """Rename a damaged database (with its -wal and -shm files, which belong to it) to
    `<name>.damaged-<timestamp>` next to it; returns the new path. Nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    counter = 1
    while any(Path(f"{target}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
        counter += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{counter}")
    # The WAL first: a WAL left beside the path would be replayed into the fresh database.
    for suffix in ("-wal", "-shm", ""):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.rename(source, Path(f"{target}{suffix}"))
    return target


def _dump(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _load(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None  # a damaged settings blob must not make the whole conversation unreadable
    return value if isinstance(value, dict) else None


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        title=row["title"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        system_prompt=row["system_prompt"] or "",
        persona=row["persona"],
        generation=_load(row["generation"]) or {},
        model=row["model"],
    )


def _message(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        id=row["id"],
        conversation_id=row["conversation_id"],
        role=row["role"],
        content=row["content"],
        status=row["status"],
        created_at=row["created_at"],
        stats=_load(row["stats"]),
        version=row["version"],
    )


def _instance(row: sqlite3.Row) -> Instance:
    return Instance(
        id=row["id"],
        pid=row["pid"],
        host=row["host"],
        started_at=row["started_at"],
        heartbeat_at=row["heartbeat_at"],
        generating_in=row["generating_in"],
    )
