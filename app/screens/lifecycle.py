"""Lifecycle messages posted from worker threads to the UI (post_message is thread-safe).

`Generation.*` go to the chat screen that runs the answer; `ModelLoad.*` go to the app;
`DatabaseChanged` goes from the app to the chat screen when another instance committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from textual.message import Message

if TYPE_CHECKING:
    from mixtral_chat.engine.load_progress import LoadProgress
    from mixtral_chat.engine.runtime import Engine, GenerationStats


class Generation:
    """One answer being generated, identified by its assistant message id in storage."""

    @dataclass(eq=False)
    class Started(Message):
        message_id: int

    @dataclass(eq=False)
    class Chunk(Message):
        message_id: int
        text: str  # one or more pieces, batched by the worker
        pieces: int  # how many engine pieces `text` holds (about one per token)
        cache_stats: dict[str, Any] | None = None

    @dataclass(eq=False)
    class Finished(Message):
        message_id: int
        stats: GenerationStats | None
        notices: list[str] = field(default_factory=list)
        cache_stats: dict[str, Any] | None = None

    @dataclass(eq=False)
    class Failed(Message):
        message_id: int
        error: str  # one line for the user


class ModelLoad:
    """Loading a model in the background. `serial` tells which load: only the latest counts."""

    @dataclass(eq=False)
    class Progress(Message):
        serial: int
        progress: LoadProgress

    @dataclass(eq=False)
    class Finished(Message):
        serial: int
        engine: Engine
        seconds: float

    @dataclass(eq=False)
    class Failed(Message):
        serial: int
        spec: str | None  # what the user asked for (None: the default model)
        error: str


class DatabaseChanged(Message):
    """Another connection (another app instance) committed to the conversation database."""
