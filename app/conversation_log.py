"""`ask`'s exchanges in the conversation database the TUI uses, so that both list, search and
continue the same chats.

- `ConversationLog.open` finds the chat to continue (the latest, or a given id) before the model
  loads, so that an unknown id or a chat another app is answering in is said at once.
- `prepare` takes this process's claim on that chat (the lease the TUI takes: no two apps answer
  in one chat at once) and reads its turns, which the engine then answers after.
- `begin` writes the prompt and an empty answer row, guarded against the chat having changed
  since it was read; `append` saves the answer as it streams (`PartialAnswerSaver`, at most once
  a second) and `finish` stores it with its status, stats, model and generation settings.
- While the claim is held a thread refreshes this process's heartbeat, so that a long answer is
  not taken for a dead app's.

Logging never costs the answer: a write that fails (a damaged or locked database, a full disk)
ends logging with one warning line, and the answer goes on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtral_chat.app.storage import (
    HEARTBEAT_S,
    Conversation,
    ConversationBusy,
    ConversationChanged,
    PartialAnswerSaver,
    Storage,
    StorageError,
    StoredMessage,
    title_from_text,
)

if TYPE_CHECKING:
    from mixtral_chat.engine.options import GenerationConfig
    from mixtral_chat.engine.runtime import GenerationStats

# What `warn` is told when the exchange is not (or not wholly) stored.
NOT_LOGGED = "the answer is not saved in the conversation history"


class ConversationLog:
    """One `ask` exchange: the chat it continues (None: a new one) and its writes."""

    def __init__(
        self,
        storage: Storage,
        conversation: Conversation | None,
        *,
        write: bool,
        warn: Callable[[str], None],
    ) -> None:
        self.storage = storage
        self.conversation = conversation
        self.write = write
        self._warn = warn
        self._versions: dict[int, int] = {}  # message id -> version, as `prepare` read them
        self._saver: PartialAnswerSaver | None = None
        self._save_failed = False  # a save while streaming failed: only the final one is tried
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @classmethod
    def open(
        cls,
        *,
        continue_latest: bool,
        conversation_id: int | None,
        write: bool,
        warn: Callable[[str], None],
        path: Path | None = None,
    ) -> ConversationLog | None:
        """The log for a new chat (None when there is nothing to write, or the database cannot
        be opened: `warn` says so) or for continuing one. Continuing needs the database: an
        unknown id, no chat at all, a chat another app is answering in or an unreadable
        database raise StorageError."""
        continuing = continue_latest or conversation_id is not None
        if not continuing and not write:
            return None
        try:
            storage, repaired = Storage.checked(path)  # a damaged file is left as it is
        except StorageError as exc:
            if continuing:
                raise
            warn(f"{NOT_LOGGED}: {exc}")
            return None
        for notice in repaired:
            warn(notice)
        try:
            conversation = cls._find(storage, continue_latest, conversation_id) if continuing else None
        except BaseException:
            storage.close()
            raise
        return cls(storage, conversation, write=write, warn=warn)

    @staticmethod
    def _find(storage: Storage, continue_latest: bool, conversation_id: int | None) -> Conversation:
        if conversation_id is not None:
            conversation = storage.get_conversation(conversation_id)  # "no conversation with id N"
        else:
            latest = storage.list_conversations()
            if not latest:
                raise StorageError("no conversation to continue: ask without --continue to start one")
            conversation = latest[0]
        busy = storage.busy_conversations()
        if conversation.id in busy:
            raise ConversationBusy(conversation.id, busy[conversation.id])
        return conversation

    @property
    def conversation_id(self) -> int | None:
        """The chat the exchange is stored in, once it is (None while it is not)."""
        if not self.write or self._saver is None or self.conversation is None:
            return None
        return self.conversation.id

    def prepare(self) -> list[StoredMessage]:
        """The continued chat's turns, read under this process's claim when the answer is to be
        stored (ConversationBusy if another app took it meanwhile)."""
        if self.conversation is None:
            return []
        if self.write:
            try:
                self.storage.register_instance(kind="ask")
                self.storage.claim_conversation(self.conversation.id)
            except (ConversationBusy, ConversationChanged):
                raise  # another app is answering in it, or deleted it
            except StorageError as exc:
                self._give_up(exc)
            else:
                self._start_heartbeat()
        history = self.storage.messages(self.conversation.id)
        self._versions = {message.id: message.version for message in history}
        return history

    def begin(
        self, prompt: str, *, system_prompt: str, model: str, generation: dict[str, Any] | None = None
    ) -> None:
        """Store the prompt and an empty answer row (marked streaming); a new chat keeps
        `generation` as its own settings. In a continued chat that changed since `prepare` read
        it, ConversationChanged (or ConversationBusy) is raised."""
        if not self.write:
            return
        created = None  # the chat made here, gone again if its first messages cannot be stored
        try:
            if self.conversation is None:
                self.storage.register_instance(kind="ask")
                self.conversation = created = self.storage.create_conversation(
                    title_from_text(prompt), system_prompt=system_prompt, model=model, generation=generation
                )
                self._start_heartbeat()
            chat_id = self.conversation.id
            self.storage.add_message(chat_id, "user", prompt, expected=self._versions, claim=True)
            answer = self.storage.add_message(chat_id, "assistant", "", status="streaming", claim=True)
        except (ConversationBusy, ConversationChanged):
            raise  # another app answers in the chat, or changed it: the caller says so as an error
        except StorageError as exc:
            if created is not None:  # no chat without its prompt in the history
                with contextlib.suppress(StorageError):
                    self.storage.delete_conversation(created.id)
            self._give_up(exc)
            return
        self._saver = PartialAnswerSaver(self.storage, answer.id)

    def append(self, piece: str) -> None:
        if self._saver is None or self._save_failed:
            return  # `finish` is given the whole text
        try:
            self._saver.append(piece)
        except StorageError:
            # Keep the text in memory for the final save; saves while it streams would wait for
            # the busy timeout each time.
            self._save_failed = True

    def finish(self, status: str, stats: dict[str, Any] | None, text: str) -> None:
        """The final save: the whole answer with its status (complete / stopped / error)."""
        if self._saver is None:
            return
        try:
            self._saver.finish(status, stats, text=text)
        except StorageError as exc:
            self._give_up(exc)

    def close(self) -> None:
        """Release the claim and the instance row, and close the database."""
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with contextlib.suppress(StorageError):
            self.storage.release_conversation()
        with contextlib.suppress(StorageError):
            self.storage.close()

    def _give_up(self, exc: StorageError) -> None:
        """Nothing more is written; one warning says why."""
        if self.write:
            self._warn(f"{NOT_LOGGED}: {exc}")
        self.write = False
        self._saver = None

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None:
            return
        self._heartbeat = threading.Thread(target=self._keep_alive, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def _keep_alive(self) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_S):
            with contextlib.suppress(StorageError):
                self.storage.heartbeat()


def exchange_stats(
    stats: GenerationStats | None, config: GenerationConfig, status: str, **about: str
) -> dict[str, Any]:
    """What an answer's row keeps beside its text: the stats (as the TUI stores them), the
    generation settings that produced it and `about` it (the model; a remote one's backend)."""
    stored: dict[str, Any] = asdict(stats) if stats is not None else {}
    if status == "stopped":  # Ctrl+C lands in the loop, not through the engine's stop event
        stored["finish_reason"] = "cancelled"
    return {**stored, **about, "generation": asdict(config)}
