"""The context a model gets by default, and how much of it the answer reserves (issue 17, item 1)."""

from __future__ import annotations

import pytest

from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.models.catalog import MIXTRAL_8X7B_CONFIG, demo_dir
from mixtral_chat.engine.runtime import Engine, default_context

MIXTRAL = ModelArgs.from_dict(MIXTRAL_8X7B_CONFIG, source="test")


@pytest.mark.parametrize(
    ("budget_gb", "expected"),
    [(80, 32768), (23, 16384), (11, 8192), (7, 4096), (1, 2048)],  # 128 KiB of bf16 KV per token
)
def test_the_default_context_is_the_models_own_until_its_kv_cache_outgrows_the_budget(
    budget_gb: int, expected: int
) -> None:
    assert MIXTRAL.max_position_embeddings == 32768
    ctx = default_context(MIXTRAL, 2, budget_gb * 1e9)
    assert ctx == expected
    assert ctx == 2048 or MIXTRAL.kv_cache_bytes(ctx, 2) <= budget_gb * 1e9 / 8


def test_the_demo_remembers_earlier_turns_with_a_1024_token_reply_budget() -> None:
    engine = Engine.load(demo_dir())
    assert engine.info.context_length == 512  # the demo's own
    messages = [
        {"role": "user", "content": "What is a harbor?"},
        {"role": "assistant", "content": "A harbor is a sheltered place where ships can stay."},
        {"role": "user", "content": "And a lighthouse?"},
    ]
    ids, dropped = engine.fit_prompt(messages, max_tokens=1024)
    assert dropped == 0 and ids == engine.tokenizer.encode_chat(messages)
    # Really full: turns go only once the answer would have less than a quarter of the context.
    long_turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 60} for i in range(9)]
    ids, dropped = engine.fit_prompt(long_turns, max_tokens=1024)
    assert dropped > 0 and len(ids) + 512 // 4 <= 512
    kept = engine.tokenizer.encode_chat(long_turns[dropped - 2 :])
    assert len(kept) + 512 // 4 > 512  # one more question and answer would not have fit
