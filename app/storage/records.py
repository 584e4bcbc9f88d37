"""What the database holds, as frozen dataclasses, and their rows' JSON columns."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_TITLE = "New chat"
Role = Literal["system", "user", "assistant"]
# complete: a finished message. streaming: an answer being written (or cut off by a crash).
# stopped: the user stopped the answer; error: the engine failed mid-answer.
MessageStatus = Literal["complete", "streaming", "stopped", "error"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
STATUSES: tuple[str, ...] = ("complete", "streaming", "stopped", "error")

# Markers around matched terms in search snippets: control characters that never occur in
# typed text, so the UI can highlight them without escaping anything.
MATCH_START = "\x02"
MATCH_END = "\x03"


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
    kind: str = "app"  # "app" (the chat TUI) or "ask" (a stored one-shot answer)


@dataclass(frozen=True)
class SearchHit:
    conversation_id: int
    conversation_title: str
    message_id: int
    role: str
    snippet: str  # matched terms wrapped in MATCH_START / MATCH_END


def title_from_text(text: str, limit: int = 48) -> str:
    """A conversation title from its first prompt: the first non-empty line, shortened."""
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"
    return DEFAULT_TITLE


def dump_json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def load_json(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None  # a damaged settings blob must not make the whole conversation unreadable
    return value if isinstance(value, dict) else None


def conversation_from_row(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        title=row["title"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        system_prompt=row["system_prompt"] or "",
        persona=row["persona"],
        generation=load_json(row["generation"]) or {},
        model=row["model"],
    )


def message_from_row(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        id=row["id"],
        conversation_id=row["conversation_id"],
        role=row["role"],
        content=row["content"],
        status=row["status"],
        created_at=row["created_at"],
        stats=load_json(row["stats"]),
        version=row["version"],
    )


def instance_from_row(row: sqlite3.Row) -> Instance:
    return Instance(
        id=row["id"],
        pid=row["pid"],
        host=row["host"],
        started_at=row["started_at"],
        heartbeat_at=row["heartbeat_at"],
        generating_in=row["generating_in"],
        kind=row["kind"],
    )
