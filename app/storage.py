"""Conversations in SQLite: WAL, a schema version with migrations, FTS5 search.

One `Storage` is one connection. Several app instances may open the same database file at once:
WAL lets readers run beside one writer, and every write is a short transaction that waits
(busy timeout) instead of failing when another instance holds the write lock.

Nothing typed is lost: `add_message` commits before the caller starts generating, and a streaming
answer is saved by `PartialAnswerSaver` at most every second, so a crash (kill -9) loses at most
the tokens produced after the last save.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixtral_chat.engine.errors import MixtralChatError

DB_FILENAME = "conversations.db"
DEFAULT_TITLE = "New chat"
# How long a write waits for another instance's transaction before giving up.
BUSY_TIMEOUT_S = 10.0

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
)
SCHEMA_VERSION = len(MIGRATIONS)

# Markers around matched terms in search snippets: control characters that never occur in
# typed text, so the UI can highlight them without escaping anything.
MATCH_START = "\x02"
MATCH_END = "\x03"


class StorageError(MixtralChatError):
    """The conversation database is unusable, newer than this version, or a record is missing."""


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
        try:
            migrate(self._conn)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StorageError(f"cannot read the conversation database {self.path}: {exc}") from exc

    # -- plumbing --------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

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

    def delete_conversation(self, conversation_id: int) -> None:
        with self._write() as conn:
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
    ) -> StoredMessage:
        if role not in ROLES:
            raise StorageError(f"unknown message role {role!r}")
        if status not in STATUSES:
            raise StorageError(f"unknown message status {status!r}")
        now = time.time()
        with self._write() as conn:
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
        return StoredMessage(message_id, conversation_id, role, content, status, now, stats)

    def update_message(
        self,
        message_id: int,
        content: str,
        *,
        status: str | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        if status is not None and status not in STATUSES:
            raise StorageError(f"unknown message status {status!r}")
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE messages SET content = ?, status = COALESCE(?, status),"
                " stats = COALESCE(?, stats) WHERE id = ?",
                (content, status, _dump(stats), message_id),
            )
            if cursor.rowcount == 0:
                raise StorageError(f"no message with id {message_id}")
            conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id ="
                " (SELECT conversation_id FROM messages WHERE id = ?)",
                (time.time(), message_id),
            )

    def get_message(self, message_id: int) -> StoredMessage:
        rows = self._read("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise StorageError(f"no message with id {message_id}")
        return _message(rows[0])

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [_message(row) for row in rows]

    def delete_messages_from(self, conversation_id: int, message_id: int) -> int:
        """Delete `message_id` and every later message of the conversation (regenerate, edit)."""
        with self._write() as conn:
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
        self.storage.update_message(self.message_id, text)
        self._saved_length = len(text)
        self._last_save = self._clock()
        self.saves += 1

    def finish(self, status: str, stats: dict[str, Any] | None = None, text: str | None = None) -> None:
        """The final save: the whole text with its status (complete / stopped / error)."""
        if self.finished:
            return
        if text is not None:
            self._pieces = [text]
        self.storage.update_message(self.message_id, self.text, status=status, stats=stats)
        self.finished = True
        self.saves += 1


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a part."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


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
    )
