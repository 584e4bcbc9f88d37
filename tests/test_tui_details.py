"""Issue 17's details under Pilot: the real app on the real engine and real SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("textual")

from mixtral_chat.app.storage import Storage
from tests.test_tui import chat_model_dir, make_app, run, wait_ready

__all__ = ["chat_model_dir"]  # the fixture, shared with test_tui

LONG_TITLE = "What is a harbor and why do ships need one at all, in any weather?"


def test_a_long_chat_title_is_one_line_with_its_age_apart(isolated_home: Path, chat_model_dir: Path) -> None:
    storage = Storage()
    storage.create_conversation(LONG_TITLE)
    storage.create_conversation("Hi")
    storage.close()
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_ready(pilot, app)
            listing = app.chat_screen.conversation_list
            width = listing.content_region.width
            lines = [listing.render_line(y).text.rstrip() for y in range(listing.option_count)]
            # Newest first; each chat on exactly one line: title cut with an ellipsis, then the age.
            assert lines[0].strip().endswith("now") and lines[0].strip().startswith("Hi")
            assert "…" in lines[1] and lines[1].strip().endswith("now")
            assert lines[1].strip().startswith(LONG_TITLE[:10]) and len(lines[1]) <= width + 2

    run(scenario)
