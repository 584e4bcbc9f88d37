"""The chat screen's answers: a prompt committed and shown, the answer's row claimed, the session's
loop (app/chat_session.py) run in a thread worker that talks to the UI only through
`Generation.*` messages, and the answer saved as it streams and when it ends."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from textual import on, work

from mixtral_chat.app.chat_session import (
    AnswerChunk,
    AnswerProgress,
    generation_config,
    prompt_messages,
    stream_answer,
)
from mixtral_chat.app.screens.chat_base import SAVE_INTERVAL_S, ActiveGeneration, ChatScreenBase, shows_errors
from mixtral_chat.app.screens.chat_sync import REFUSED
from mixtral_chat.app.screens.lifecycle import Generation
from mixtral_chat.app.storage import (
    ConversationBusy,
    PartialAnswerSaver,
    StorageError,
)
from mixtral_chat.app.widgets.prompt import PromptInput
from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.options import GenerationConfig

if TYPE_CHECKING:
    from mixtral_chat.app.remote import RemoteEngine
    from mixtral_chat.engine.runtime import Engine


class ChatAnswering(ChatScreenBase):
    # -- sending ---------------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    @shows_errors
    async def _prompt_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if self.is_generating:
            self.notify("An answer is still being written: press Esc to stop it first.", severity="warning")
            return
        if self.editing_message_id is not None:
            await self._resend_edited(self.editing_message_id, text)
            return
        await self.send(text)

    async def send(self, text: str) -> None:
        """Commit the prompt, show it, and start the answer. The prompt is appended only after
        the messages shown, and only while no other app is answering in the chat."""
        conversation_id = self._ensure_conversation(text)
        # Committed before generating, with this app's lease on the chat.
        stored = await self._checked_write(
            lambda: self.storage.add_message(conversation_id, "user", text, expected=self.shown, claim=True),
            if_busy="your message is kept in the prompt; send it when it is done.",
            if_changed="your message is not sent yet; press Enter to send it.",
        )
        if stored is REFUSED:
            return
        self.shown[stored.id] = stored.version
        self.prompt.clear()
        self.prompt.remember(text)
        await self.message_list.add(stored)
        self.refresh_sidebar()
        await self.start_generation()

    async def start_generation(self) -> None:
        """Answer the current conversation as it is stored."""
        conversation = self.current_conversation()
        if conversation is None:
            return
        engine = self.chat_app.engine
        if engine is None:
            state = self.chat_app.model_status.state
            if state in ("idle", "loading"):  # idle: the load starts right after the first frames
                self.pending_conversation_id = conversation.id
                self.notify("The model is still loading; the answer starts as soon as it is ready.")
            else:
                self._release_lease()
                self.notify(
                    "No model is loaded: choose one in Settings (F3). Your message is saved.",
                    severity="error",
                )
            return
        try:
            config = generation_config(self.chat_app.settings.generation, conversation)
        except (MixtralChatError, TypeError, ValueError) as exc:  # bad per-chat settings: say so
            self._release_lease()
            self.notify(f"Invalid generation settings: {exc}", severity="error")
            return
        try:
            # The history as stored (what another app wrote included) and the answer's row, both
            # under this app's lease: a chat another app is answering in is refused.
            answer = self.storage.add_message(
                conversation.id, "assistant", "", status="streaming", claim=True
            )
        except ConversationBusy as exc:
            self._refuse_busy(exc, "this one does not answer now.")
            return
        if conversation.model != engine.info.name:
            # The chat remembers the model that answered it last (opening it again loads that one).
            self.storage.set_conversation_model(conversation.id, engine.info.name)
        messages = prompt_messages(self.storage, conversation, answer.id)
        if self.repeats is not None:
            self.repeats.new_sequence()
        if self.conversation_id == conversation.id:
            self.shown[answer.id] = None
        view = await self.message_list.add(answer)
        await view.start_stream()
        self.generation = ActiveGeneration(
            conversation_id=conversation.id,
            message_id=answer.id,
            saver=PartialAnswerSaver(self.storage, answer.id, interval_s=SAVE_INTERVAL_S),
            stop_event=threading.Event(),
            view=view,
            progress=AnswerProgress(started=time.monotonic()),
        )
        self.status_bar.update_info(generating=True, tok_s=None, ttft_s=None)
        self.refresh_bindings()
        self.generate(engine, messages, config, answer.id, self.generation.stop_event)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(
        self,
        engine: Engine | RemoteEngine,
        messages: list[dict[str, str]],
        config: GenerationConfig,
        message_id: int,
        stop_event: threading.Event,
    ) -> None:
        """The answer, off the UI thread: the session's loop, its batches posted to this screen."""
        self.post_message(Generation.Started(message_id))

        def post_chunk(chunk: AnswerChunk) -> None:
            self.post_message(Generation.Chunk(message_id, chunk.text, chunk.pieces, chunk.cache_stats))

        outcome = stream_answer(engine, messages, config, stop_event, post_chunk)
        if outcome.error is not None:
            self.post_message(Generation.Failed(message_id, outcome.error))
        else:
            self.post_message(
                Generation.Finished(message_id, outcome.stats, outcome.notices, outcome.cache_stats)
            )

    @shows_errors
    async def on_generation_chunk(self, message: Generation.Chunk) -> None:
        generation = self.generation
        if generation is None or generation.message_id != message.message_id:
            return
        now = time.monotonic()
        progress = generation.progress
        first = progress.first_piece_at is None
        progress.add(message.pieces, now)
        if first:
            self.status_bar.update_info(ttft_s=progress.ttft_s)
        try:
            generation.saver.append(message.text)
        except StorageError as exc:
            # Keep streaming (the text stays in memory for the final save); say so once.
            if not generation.chat_deleted and not generation.save_error_shown:
                generation.save_error_shown = True
                self.notify(str(exc), title="The answer could not be saved yet", severity="error")
        if generation.view is not None and generation.view.is_attached:
            await generation.view.append(message.text)
        tok_s = progress.pieces_per_s(now)
        if tok_s is not None:
            self.status_bar.update_info(tok_s=tok_s)
        self._show_cache_stats(message.cache_stats)

    @shows_errors
    async def on_generation_finished(self, message: Generation.Finished) -> None:
        stats = message.stats
        status = "stopped" if stats is not None and stats.finish_reason == "cancelled" else "complete"
        await self._end_generation(message.message_id, status, asdict(stats) if stats else None)
        for notice in message.notices:
            self.notify(notice, title="Context")
        if stats is not None:
            self.status_bar.update_info(
                tok_s=stats.decode_tok_s or None,
                ttft_s=stats.ttft_s,
                context_used=stats.prompt_tokens + stats.completion_tokens,
            )
            if stats.finish_reason == "length":
                self.notify(
                    "The answer reached the max tokens limit (Chat options: Ctrl+O).", severity="warning"
                )
        self._show_cache_stats(message.cache_stats)

    @shows_errors
    async def on_generation_failed(self, message: Generation.Failed) -> None:
        await self._end_generation(message.message_id, "error", None)
        self.notify(message.error, title="Generation failed", severity="error", timeout=10)

    async def _end_generation(self, message_id: int, status: str, stats: dict[str, Any] | None) -> None:
        generation = self.generation
        if generation is None or generation.message_id != message_id:
            return
        # StorageError: the chat was deleted while the answer was being written.
        with contextlib.suppress(StorageError):
            generation.saver.finish(status, stats)
        if self.conversation_id == generation.conversation_id and generation.message_id in self.shown:
            self.shown[generation.message_id] = generation.saver.version
        if generation.view is not None and generation.view.is_attached:
            await generation.view.finish(generation.saver.text, status)
        self.generation = None
        self._release_lease()
        self.status_bar.update_info(generating=False)
        self.refresh_bindings()
        self.refresh_sidebar()

    def save_partial_answer(self) -> None:
        """On exit: stop the engine and keep what was written, marked stopped."""
        generation = self.generation
        if generation is None:
            return
        generation.stop_event.set()
        with contextlib.suppress(StorageError):
            generation.saver.finish("stopped")

    def _release_lease(self) -> None:
        """This app no longer answers in a chat: other apps may write in it again."""
        if self.generation is not None or self.pending_conversation_id is not None:
            return
        with contextlib.suppress(StorageError):
            self.storage.release_conversation()

    def _show_cache_stats(self, stats: dict[str, Any] | None) -> None:
        if self.repeats is not None and self.has_class("-show-cache"):
            self.cache_panel.repeats = self.repeats.summary()  # drawn with the stats just below
            if stats is None:
                self.cache_panel.show_stats(self.cache_panel.last_stats)
        if stats is None:
            return
        if stats.get("hit_rate") is not None:
            self.status_bar.update_info(cache_hit_rate=float(stats["hit_rate"]))
        if self.has_class("-show-cache"):
            self.cache_panel.show_stats(stats)
