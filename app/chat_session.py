"""One chat answer as plain Python, for the TUI's chat screen and any other front end (the CLI, a
future HTTP server): no Textual here.

- `prompt_messages`: a stored conversation (its system prompt, or the persona's text it holds, and
  its messages as edited) becomes the engine's chat messages. Fitting them into the context (the
  oldest turns dropped, never the system prompt) is the engine's `Engine.chat`; it says so in
  `ChatStream.notices`.
- `stream_answer`: the generation loop, run in a worker thread. It batches the engine's pieces so
  a fast model does not flood the UI with hundreds of updates a second, and returns how it ended.
- `AnswerProgress`: time to first piece and pieces per second as the batches arrive.

The engine is imported only where it is used: the chat screen imports this module at start-up,
before torch may load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from mixtral_chat.app.errors import error_line
from mixtral_chat.app.storage import Conversation, Storage, StoredMessage
from mixtral_chat.engine.options import GenerationConfig

if TYPE_CHECKING:
    from mixtral_chat.engine.runtime import Engine, GenerationStats

# Batches go out at most this often: a fast model yields hundreds of pieces a second, which would
# flood the UI's message queue; a slow one still shows every token as it comes.
CHUNK_INTERVAL_S = 0.03
# The settings a chat may override (the rest of what it stores is ignored).
GENERATION_FIELDS = tuple(item.name for item in fields(GenerationConfig))


def generation_values(defaults: GenerationConfig, conversation: Conversation | None) -> dict[str, Any]:
    """The app's generation defaults with the chat's own overrides."""
    values = asdict(defaults)
    if conversation is not None:
        values.update({k: v for k, v in conversation.generation.items() if k in GENERATION_FIELDS})
    return values


def generation_config(defaults: GenerationConfig, conversation: Conversation) -> GenerationConfig:
    """The engine's config for answering `conversation`. Raises MixtralChatError, TypeError or
    ValueError for bad per-chat settings."""
    return GenerationConfig(**generation_values(defaults, conversation))


def chat_messages(system_prompt: str, history: Sequence[StoredMessage]) -> list[dict[str, str]]:
    """The engine's messages: the system prompt (if any), then the stored turns in order."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    # Answers that never got a word (stopped at once, failed) carry nothing for the model.
    messages += [{"role": m.role, "content": m.content} for m in history if m.content or m.role == "user"]
    return messages


def prompt_messages(storage: Storage, conversation: Conversation, answer_id: int) -> list[dict[str, str]]:
    """What the engine answers for the assistant row `answer_id`: the conversation as stored now
    (what another app wrote included), without that row. A persona is stored as its text in the
    chat's system prompt, so it needs nothing more here."""
    history = [m for m in storage.messages(conversation.id) if m.id != answer_id]
    return chat_messages(conversation.system_prompt, history)


@dataclass(frozen=True)
class AnswerChunk:
    text: str  # one or more pieces, joined
    pieces: int  # how many engine pieces `text` holds (about one per token)
    cache_stats: dict[str, Any] | None = None  # the expert cache after them; None: not known


@dataclass(frozen=True)
class AnswerOutcome:
    """How an answer ended: finished (stopped counts: `stats.finish_reason == "cancelled"`) or
    failed, with `error` the one line for the user."""

    stats: GenerationStats | None = None
    notices: list[str] = field(default_factory=list)
    cache_stats: dict[str, Any] | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def stream_answer(
    engine: Engine,
    messages: list[dict[str, str]],
    config: GenerationConfig,
    stop_event: threading.Event,
    on_chunk: Callable[[AnswerChunk], None],
    *,
    interval_s: float = CHUNK_INTERVAL_S,
) -> AnswerOutcome:
    """Generate the answer, calling `on_chunk` with batches of pieces at most every `interval_s`
    (and once more for the rest). Stops within one token of `stop_event`. Never raises: a failure
    is the outcome's error line, after the pieces written so far went out."""
    batch: list[str] = []
    last_post = time.monotonic()
    try:
        stream = engine.chat(messages, config, stop_event=stop_event)
        for piece in stream:
            batch.append(piece)
            now = time.monotonic()
            if now - last_post >= interval_s:
                on_chunk(AnswerChunk("".join(batch), len(batch), engine.cache_stats()))
                batch = []
                last_post = now
        if batch:
            on_chunk(AnswerChunk("".join(batch), len(batch), engine.cache_stats()))
        return AnswerOutcome(stream.stats, list(stream.notices), engine.cache_stats())
    except Exception as exc:  # any failure is told to the user; the partial answer is kept
        if batch:
            on_chunk(AnswerChunk("".join(batch), len(batch)))
        return AnswerOutcome(error=error_line(exc, "generation"))


@dataclass
class AnswerProgress:
    """Speed of an answer as its batches arrive where it is shown."""

    started: float  # time.monotonic() when the answer was asked for
    pieces: int = 0
    first_piece_at: float | None = None

    def add(self, pieces: int, now: float) -> None:
        if self.first_piece_at is None:
            self.first_piece_at = now
        self.pieces += pieces

    @property
    def ttft_s(self) -> float | None:
        return self.first_piece_at - self.started if self.first_piece_at is not None else None

    def pieces_per_s(self, now: float) -> float | None:
        """About tokens per second since the first piece; None until there is enough to tell."""
        if self.first_piece_at is None:
            return None
        elapsed = now - self.first_piece_at
        return (self.pieces - 1) / elapsed if elapsed > 0.2 else None
