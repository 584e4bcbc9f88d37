"""The database file: opening it (WAL), its schema migrations, damage detection, moving a
damaged file aside."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from mixtral_chat.app.storage.errors import DamagedDatabaseError, StorageError
from mixtral_chat.engine.paths import data_dir

DB_FILENAME = "conversations.db"
# How long a write waits for another instance's transaction before giving up.
BUSY_TIMEOUT_S = 10.0
# SQLite's primary result codes for a damaged file (extended codes carry them in the low byte).
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

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
    # 4 -> 5: what each instance is, "app" (the chat TUI) or "ask" (a one-shot answer that is
    # stored): an app announces other apps, not every `ask` run beside it.
    ("ALTER TABLE instances ADD COLUMN kind TEXT NOT NULL DEFAULT 'app'",),
)
SCHEMA_VERSION = len(MIGRATIONS)


def is_damage(exc: sqlite3.Error) -> bool:
    """A SQLite error that says the file is damaged (not a lock, a full disk or permissions)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


def default_db_path() -> Path:
    return data_dir() / DB_FILENAME


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # an unwritable home: the caller decides (ask answers without its log)
        reason = exc.strerror or type(exc).__name__
        raise StorageError(
            f"cannot create the folder for the conversation database {path.parent}: {reason}"
        ) from exc
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
