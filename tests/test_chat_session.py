"""The chat session (app/chat_session.py) without a UI: real SQLite storage for the history, the
bundled demo model on the real engine for the answer loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixtral_chat.app.chat_session import (
    AnswerChunk,
    AnswerProgress,
    chat_messages,
    generation_config,
    generation_values,
    prompt_messages,
    stream_answer,
)
from mixtral_chat.app.settings import DEFAULT_PERSONAS
from mixtral_chat.app.storage import Storage
from mixtral_chat.engine.options import GenerationConfig, LoadOptions
from mixtral_chat.engine.runtime import Engine

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
GREEDY = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=16)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    with Storage(tmp_path / "chats.db") as opened:
        yield opened


@pytest.fixture(scope="module")
def demo() -> Iterator[Engine]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and cheaper on shared cores
    engine = Engine.load(DEMO_DIR, LoadOptions(device="cpu"), name="demo")
    yield engine
    engine.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_context_demo() -> Iterator[Engine]:
    engine = Engine.load(DEMO_DIR, LoadOptions(device="cpu", context_length=96), name="demo")
    yield engine
    engine.close()


# -- history to messages --------------------------------------------------------------------------


def test_the_system_prompt_and_the_stored_turns_become_the_engines_messages(storage: Storage) -> None:
    chat = storage.create_conversation("Cats", system_prompt="Answer in one line.")
    storage.add_message(chat.id, "user", "What is a cat?")
    storage.add_message(chat.id, "assistant", "A small furry animal.")
    storage.add_message(chat.id, "user", "And a dog?")
    storage.add_message(chat.id, "assistant", "", status="stopped")  # stopped before its first word
    storage.add_message(chat.id, "user", "And a bird?")
    answer = storage.add_message(chat.id, "assistant", "", status="streaming")

    assert prompt_messages(storage, storage.get_conversation(chat.id), answer.id) == [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is a cat?"},
        {"role": "assistant", "content": "A small furry animal."},
        {"role": "user", "content": "And a dog?"},
        {"role": "user", "content": "And a bird?"},
    ]


def test_without_a_system_prompt_the_first_message_is_the_users(storage: Storage) -> None:
    chat = storage.create_conversation()
    storage.add_message(chat.id, "user", "")  # kept: a user turn always counts
    answer = storage.add_message(chat.id, "assistant", "", status="streaming")
    assert prompt_messages(storage, storage.get_conversation(chat.id), answer.id) == [
        {"role": "user", "content": ""}
    ]
    assert chat_messages("", []) == []


def test_a_persona_is_its_text_as_the_system_prompt(storage: Storage) -> None:
    chat = storage.create_conversation()
    persona = "Code reviewer"
    storage.update_conversation_settings(
        chat.id, system_prompt=DEFAULT_PERSONAS[persona], persona=persona, generation={}
    )
    question = storage.add_message(chat.id, "user", "Review `x=1`.")
    messages = prompt_messages(storage, storage.get_conversation(chat.id), question.id + 1)
    assert messages[0] == {"role": "system", "content": DEFAULT_PERSONAS[persona]}
    assert messages[1:] == [{"role": "user", "content": "Review `x=1`."}]


def test_an_edited_prompt_is_sent_as_edited_without_what_came_after_it(storage: Storage) -> None:
    chat = storage.create_conversation()
    first = storage.add_message(chat.id, "user", "What is a cat?")
    storage.add_message(chat.id, "assistant", "A small furry animal.")
    storage.add_message(chat.id, "user", "And a dog?")
    storage.add_message(chat.id, "assistant", "A loyal animal.")
    assert storage.edit_message(chat.id, first.id, "What is a lion?") == 3
    answer = storage.add_message(chat.id, "assistant", "", status="streaming")
    assert prompt_messages(storage, storage.get_conversation(chat.id), answer.id) == [
        {"role": "user", "content": "What is a lion?"}
    ]


def test_a_chats_generation_settings_override_the_defaults(storage: Storage) -> None:
    chat = storage.create_conversation(generation={"temperature": 0.2, "max_tokens": 7, "unknown": 1})
    defaults = GenerationConfig(temperature=0.7, top_p=0.9, top_k=5, max_tokens=100, seed=3)
    conversation = storage.get_conversation(chat.id)
    assert generation_values(defaults, conversation) == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "max_tokens": 7,
        "seed": 3,
    }
    assert generation_values(defaults, None)["temperature"] == 0.7
    assert generation_config(defaults, conversation) == GenerationConfig(0.2, 0.9, 5, 7, 3)


# -- the answer loop ------------------------------------------------------------------------------


def answer_in_chunks(engine: Engine, messages: list[dict[str, str]], interval_s: float) -> list[AnswerChunk]:
    chunks: list[AnswerChunk] = []
    outcome = stream_answer(engine, messages, GREEDY, threading.Event(), chunks.append, interval_s=interval_s)
    assert not outcome.failed and outcome.stats is not None, outcome.error
    return chunks


def test_pieces_are_batched_and_add_up_to_the_engines_answer(demo: Engine) -> None:
    messages = [{"role": "user", "content": "What is a lighthouse?"}]
    expected = "".join(demo.chat(messages, GREEDY))
    one_each = answer_in_chunks(demo, messages, interval_s=0.0)
    all_at_once = answer_in_chunks(demo, messages, interval_s=3600.0)

    assert expected and "".join(chunk.text for chunk in one_each) == expected
    assert all(chunk.pieces == 1 for chunk in one_each) and len(one_each) > 1
    assert [chunk.text for chunk in all_at_once] == [expected]  # the rest goes out at the end
    assert all_at_once[0].pieces == len(one_each)


def test_the_outcome_keeps_the_engines_stats(demo: Engine) -> None:
    chunks: list[AnswerChunk] = []
    messages = [{"role": "user", "content": "What is a volcano?"}]
    outcome = stream_answer(demo, messages, GREEDY, threading.Event(), chunks.append, interval_s=0.0)
    stats = outcome.stats
    assert stats is not None and outcome.error is None and outcome.notices == []
    assert stats.prompt_tokens == len(demo.tokenizer.encode_chat(messages))
    assert 1 <= stats.completion_tokens <= GREEDY.max_tokens
    assert stats.finish_reason in ("stop", "length") and stats.ttft_s >= 0
    assert outcome.cache_stats is None  # all experts resident: no cache to report


def test_the_stop_event_ends_the_answer_within_a_token(demo: Engine) -> None:
    stop = threading.Event()
    chunks: list[AnswerChunk] = []

    def stop_after_first(chunk: AnswerChunk) -> None:
        chunks.append(chunk)
        stop.set()

    config = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=200)
    messages = [{"role": "user", "content": "Tell a long story about the sea."}]
    outcome = stream_answer(demo, messages, config, stop, stop_after_first, interval_s=0.0)
    assert outcome.stats is not None and outcome.stats.finish_reason == "cancelled"
    assert outcome.stats.completion_tokens <= 3
    assert 1 <= len(chunks) <= 2


def test_the_oldest_turns_are_dropped_to_fit_the_context(small_context_demo: Engine) -> None:
    system = [{"role": "system", "content": "Be brief."}]
    turns = []
    for n in range(6):
        turns += [
            {"role": "user", "content": f"Question {n}: what is a harbor, a lighthouse and a ship?"},
            {"role": "assistant", "content": f"Answer {n}: places and things by the sea."},
        ]
    messages = [*system, *turns, {"role": "user", "content": "And a boat?"}]
    config = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=8)
    outcome = stream_answer(small_context_demo, messages, config, threading.Event(), lambda _: None)
    assert outcome.stats is not None and outcome.stats.dropped_turns > 0
    assert outcome.stats.dropped_turns % 2 == 0  # a question goes with its answer
    dropped = outcome.stats.dropped_turns
    assert outcome.notices == [f"dropped the {dropped} oldest messages to fit the context"]
    assert outcome.stats.prompt_tokens + config.max_tokens <= 96


def test_a_failure_is_one_line_for_the_user(small_context_demo: Engine) -> None:
    chunks: list[AnswerChunk] = []
    messages = [{"role": "user", "content": "word " * 400}]  # alone more than the context
    outcome = stream_answer(small_context_demo, messages, GREEDY, threading.Event(), chunks.append)
    assert outcome.failed and outcome.stats is None and chunks == []
    assert outcome.error is not None and "over the context of 96 tokens" in outcome.error


def test_progress_counts_time_to_first_piece_and_speed() -> None:
    progress = AnswerProgress(started=10.0)
    assert progress.ttft_s is None and progress.pieces_per_s(10.5) is None
    progress.add(1, now=10.5)
    progress.add(4, now=10.6)
    assert progress.pieces == 5 and progress.ttft_s == pytest.approx(0.5)
    assert progress.pieces_per_s(10.6) is None  # under 0.2 s since the first piece: too soon to tell
    assert progress.pieces_per_s(11.5) == pytest.approx(4 / 1.0)
