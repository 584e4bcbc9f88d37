"""`Storage`: one connection to the conversation database; every method is one short
transaction, guarded where it changes what another instance may show."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mixtral_chat.app.storage.errors import (
    ConversationBusy,
    ConversationChanged,
    DamagedDatabaseError,
    StorageError,
)
from mixtral_chat.app.storage.instances import instance_is_live
from mixtral_chat.app.storage.records import (
    DEFAULT_TITLE,
    MATCH_END,
    MATCH_START,
    ROLES,
    STATUSES,
    Conversation,
    Instance,
    SearchHit,
    StoredMessage,
    conversation_from_row,
    dump_json,
    instance_from_row,
    message_from_row,
)
from mixtral_chat.app.storage.schema import connect, default_db_path, is_damage, migrate
from mixtral_chat.engine.fileio import write_atomic


def fts_query(text: str) -> str:
    """User text -> an FTS5 query: every word must match, the last one as a prefix (search as
    you type). Words are quoted, so FTS5 syntax characters in the text are plain text."""
    words = re.findall(r"\w+", text, flags=re.UNICODE)
    if not words:
        return ""
    quoted = ['"' + word.replace('"', '""') + '"' for word in words]
    quoted[-1] += "*"
    return " ".join(quoted)


class Storage:
    """The conversation database. Methods commit before they return."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_db_path()
        self._conn = connect(self.path)
        # One connection may be shared by the UI thread and a worker thread: serialise its use.
        self._lock = threading.RLock()
        # This app's row in `instances` once `register_instance` is called.
        self.instance_id: int | None = None
        self.instance_kind = "app"
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

    @classmethod
    def checked(cls, path: Path | None = None) -> tuple[Storage, list[str]]:
        """The database opened and checked for damage (`check`), and what the check repaired.
        Raises DamagedDatabaseError (closed again) for a damaged file, which is then untouched."""
        storage = cls(path)
        try:
            return storage, storage.check()
        except BaseException:
            storage.close()
            raise

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

    def register_instance(self, kind: str = "app") -> int:
        """Add this app to `instances` as `kind` ("app" or "ask"), and drop the rows of apps that
        are gone."""
        now = time.time()
        self.instance_kind = kind
        with self._write() as conn:
            for row in conn.execute("SELECT * FROM instances").fetchall():
                if not instance_is_live(instance_from_row(row), now):
                    conn.execute("DELETE FROM instances WHERE id = ?", (row["id"],))
            cursor = conn.execute(
                "INSERT INTO instances (pid, host, started_at, heartbeat_at, kind) VALUES (?, ?, ?, ?, ?)",
                (os.getpid(), socket.gethostname(), now, now, kind),
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
                    "INSERT INTO instances (id, pid, host, started_at, heartbeat_at, kind)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        self.instance_id,
                        os.getpid(),
                        socket.gethostname(),
                        time.time(),
                        time.time(),
                        self.instance_kind,
                    ),
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
            for instance in map(instance_from_row, rows)
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
            instance = instance_from_row(row)
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
                (title, now, now, system_prompt, persona, dump_json(generation), model),
            )
            conversation_id = int(cursor.lastrowid or 0)
        return self.get_conversation(conversation_id)

    def get_conversation(self, conversation_id: int) -> Conversation:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise StorageError(f"no conversation with id {conversation_id}")
        return conversation_from_row(rows[0])

    def list_conversations(self) -> list[Conversation]:
        rows = self._read("SELECT * FROM conversations ORDER BY updated_at DESC, id DESC")
        return [conversation_from_row(row) for row in rows]

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
            (system_prompt, persona, dump_json(generation)),
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
                    (conversation_id, role, content, now, status, dump_json(stats)),
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
                (content, status, dump_json(stats), message_id),
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
        return message_from_row(rows[0])

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [message_from_row(row) for row in rows]

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

    def message_counts(self) -> dict[int, int]:
        """Conversation id -> how many messages it holds (chats without any are absent)."""
        rows = self._read("SELECT conversation_id, count(*) AS n FROM messages GROUP BY conversation_id")
        return {row["conversation_id"]: row["n"] for row in rows}

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

    def export_name(self, conversation_id: int) -> str:
        """`<title>-<id>`: a file name stem for the chat's export."""
        conversation = self.get_conversation(conversation_id)
        slug = re.sub(r"[^\w-]+", "-", conversation.title.lower(), flags=re.UNICODE).strip("-")[:40]
        return f"{slug or 'chat'}-{conversation.id}"

    def export_file(self, conversation_id: int, path: Path) -> Path:
        """Write the chat to `path` (atomically): JSON for a `.json` name, else Markdown. A folder
        gets `<title>-<id>.md` inside it. Returns the file written."""
        if path.is_dir():
            path = path / f"{self.export_name(conversation_id)}.md"
        if path.suffix.lower() == ".json":
            text = json.dumps(self.export_json(conversation_id), indent=2, ensure_ascii=False) + "\n"
        else:
            text = self.export_markdown(conversation_id)
        write_atomic(path, text)
        return path

    def export(self, conversation_id: int, folder: Path) -> list[Path]:
        """Write `<title>-<id>.md` and `.json` into `folder` (atomically); returns their paths."""
        stem = self.export_name(conversation_id)
        return [self.export_file(conversation_id, folder / f"{stem}{suffix}") for suffix in (".md", ".json")]
