"""Conversation storage on real SQLite files: CRUD, FTS5 search, migrations, two instances at
once, and a kill -9 in the middle of an answer."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mixtral_chat.app.storage import (
    DB_FILENAME,
    MATCH_END,
    MATCH_START,
    SCHEMA_VERSION,
    PartialAnswerSaver,
    Storage,
    StorageError,
    connect,
    fts_query,
    migrate,
    schema_version,
    title_from_text,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / DB_FILENAME


def test_default_location_follows_mixtral_chat_home(isolated_home: Path) -> None:
    with Storage() as storage:
        assert storage.path == isolated_home / "data" / DB_FILENAME
    assert (isolated_home / "data" / DB_FILENAME).exists()


def test_conversations_and_messages_round_trip(db_path: Path) -> None:
    with Storage(db_path) as storage:
        older = storage.create_conversation("Older")
        chat = storage.create_conversation(
            "Sorting", system_prompt="Be brief.", persona="Concise", generation={"temperature": 0.2}
        )
        user = storage.add_message(chat.id, "user", "How do I sort?")
        answer = storage.add_message(chat.id, "assistant", "", status="streaming")
        storage.update_message(answer.id, "Use sorted().", status="complete", stats={"ttft_s": 0.5})
        storage.add_message(older.id, "user", "bump")  # the older chat becomes the most recent

        assert [c.title for c in storage.list_conversations()] == ["Older", "Sorting"]
        got = storage.get_conversation(chat.id)
        assert (got.system_prompt, got.persona, got.generation) == (
            "Be brief.",
            "Concise",
            {"temperature": 0.2},
        )
        messages = storage.messages(chat.id)
        assert [(m.id, m.role, m.content, m.status) for m in messages] == [
            (user.id, "user", "How do I sort?", "complete"),
            (answer.id, "assistant", "Use sorted().", "complete"),
        ]
        assert messages[1].stats == {"ttft_s": 0.5}

        storage.rename_conversation(chat.id, "  Sorting   lists ")
        assert storage.get_conversation(chat.id).title == "Sorting lists"
        storage.update_conversation_settings(chat.id, system_prompt="", persona=None, generation={"seed": 1})
        assert storage.get_conversation(chat.id).generation == {"seed": 1}

        storage.delete_conversation(chat.id)
        with pytest.raises(StorageError, match="no conversation"):
            storage.get_conversation(chat.id)
        assert storage.search("sorted") == []  # its messages left the index too
        with pytest.raises(StorageError):
            storage.add_message(chat.id, "user", "into a deleted chat")
        with pytest.raises(StorageError, match="role"):
            storage.add_message(older.id, "robot", "x")


def test_ids_are_never_reused(db_path: Path) -> None:
    with Storage(db_path) as storage:
        chat = storage.create_conversation()
        first = storage.add_message(chat.id, "user", "a")
        answer = storage.add_message(chat.id, "assistant", "b")
        assert storage.delete_messages_from(chat.id, answer.id) == 1
        again = storage.add_message(chat.id, "assistant", "c")
        assert again.id > answer.id > first.id
        storage.delete_conversation(chat.id)
        assert storage.create_conversation().id > chat.id


def test_search_uses_fts5_with_prefixes_and_plain_text_queries(db_path: Path) -> None:
    with Storage(db_path) as storage:
        chat = storage.create_conversation("Coffee")
        storage.add_message(chat.id, "user", "Where is the best café in Zürich?")
        storage.add_message(chat.id, "assistant", "Try the one near the lake; it roasts its own beans.")
        other = storage.create_conversation("Code")
        storage.add_message(other.id, "user", 'What does "SELECT * FROM t" AND NOT x do?')

        hits = storage.search("cafe zurich")  # diacritics folded
        assert [(h.conversation_title, h.role) for h in hits] == [("Coffee", "user")]
        assert f"{MATCH_START}café{MATCH_END}" in hits[0].snippet
        assert [h.role for h in storage.search("roas")] == ["assistant"]  # the last word is a prefix
        # FTS5 syntax in the text is plain text, never an error.
        assert [h.conversation_id for h in storage.search('"SELECT * AND NOT')] == [other.id]
        assert storage.search("   ") == [] and storage.search("*") == []
        assert fts_query('a "b') == '"a" "b"*'


def test_recent_prompts_and_titles(db_path: Path) -> None:
    with Storage(db_path) as storage:
        chat = storage.create_conversation()
        for text in ["one", "two", "one", "three"]:
            storage.add_message(chat.id, "user", text)
        storage.add_message(chat.id, "assistant", "not a prompt")
        assert storage.recent_user_prompts() == ["two", "one", "three"]
        assert storage.recent_user_prompts(limit=2) == ["one", "three"]
    assert title_from_text("\n\n  Fix   this bug \nplease") == "Fix this bug"
    assert title_from_text("x" * 100, limit=10) == "x" * 9 + "…"
    assert title_from_text("  \n ") == "New chat"


def test_export_writes_markdown_and_json_atomically(db_path: Path, tmp_path: Path) -> None:
    with Storage(db_path) as storage:
        chat = storage.create_conversation("Plan / trip?", system_prompt="You plan trips.")
        storage.add_message(chat.id, "user", "Three days in Rome")
        storage.add_message(chat.id, "assistant", "Day 1: the Forum", status="stopped")
        out = tmp_path / "exports"
        paths = storage.export(chat.id, out)
    assert [p.name for p in paths] == [f"plan-trip-{chat.id}.md", f"plan-trip-{chat.id}.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    markdown = paths[0].read_text()
    assert markdown.startswith("# Plan / trip?\n")
    assert "## System\n\nYou plan trips." in markdown
    assert "## User\n\nThree days in Rome" in markdown
    assert "## Assistant (stopped)\n\nDay 1: the Forum" in markdown
    data = json.loads(paths[1].read_text())
    assert data["system_prompt"] == "You plan trips."
    assert [(m["role"], m["content"], m["status"]) for m in data["messages"]] == [
        ("user", "Three days in Rome", "complete"),
        ("assistant", "Day 1: the Forum", "stopped"),
    ]


def test_migrates_a_version_1_database_and_keeps_its_data(db_path: Path) -> None:
    conn = connect(db_path)
    assert migrate(conn, target=1) == 0
    conn.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES ('Old chat', 1.0, 2.0)")
    conn.execute(
        "INSERT INTO messages (conversation_id, role, content, created_at)"
        " VALUES (1, 'user', 'an old question about tensors', 1.0)"
    )
    conn.close()

    with Storage(db_path) as storage:
        assert schema_version(storage._conn) == SCHEMA_VERSION
        [chat] = storage.list_conversations()
        assert (chat.title, chat.system_prompt, chat.generation) == ("Old chat", "", {})
        [message] = storage.messages(chat.id)
        assert (message.content, message.status) == ("an old question about tensors", "complete")
        assert [h.message_id for h in storage.search("tensors")] == [message.id]  # indexed on migration
        storage.add_message(chat.id, "assistant", "a new answer about tensors")
        assert len(storage.search("tensors")) == 2
    # Opening again migrates nothing more.
    conn = connect(db_path)
    assert migrate(conn) == SCHEMA_VERSION
    conn.close()


def test_a_newer_or_broken_database_is_a_clear_error(db_path: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError, match="newer than this mixtral-chat") as info:
        Storage(db_path)
    assert "\n" not in str(info.value)

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"garbage\.db"):
        Storage(garbage)


def test_partial_answer_saver_saves_at_most_once_per_interval(db_path: Path) -> None:
    now = [0.0]
    with Storage(db_path) as storage:
        chat = storage.create_conversation()
        answer = storage.add_message(chat.id, "assistant", "", status="streaming")
        saver = PartialAnswerSaver(storage, answer.id, interval_s=1.0, clock=lambda: now[0])
        for index in range(10):  # 10 pieces in 0.9 s: nothing written yet
            now[0] = index * 0.1
            saver.append(f"p{index} ")
        assert saver.saves == 0 and storage.get_message(answer.id).content == ""
        now[0] = 1.0
        saver.append("p10 ")  # a second has passed: one save with everything so far
        assert saver.saves == 1
        assert storage.get_message(answer.id).content == "".join(f"p{i} " for i in range(11))
        assert storage.get_message(answer.id).status == "streaming"
        now[0] = 1.5
        saver.append("tail")
        saver.finish("stopped", {"completion_tokens": 12})
        message = storage.get_message(answer.id)
        assert (message.content, message.status) == (saver.text, "stopped")
        assert message.stats == {"completion_tokens": 12} and saver.saves == 2


TWO_WRITERS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mixtral_chat.app.storage import Storage

    path, conversation_id, tag = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with Storage(path) as storage:
        print("ready", flush=True)
        sys.stdin.readline()  # start together
        for index in range(60):
            message = storage.add_message(conversation_id, "user", f"{tag} {index}")
            storage.update_message(message.id, f"{tag} {index} edited")
    """
)


def test_two_app_instances_write_one_database_at_once(db_path: Path) -> None:
    with Storage(db_path) as first, Storage(db_path) as second:
        chat = first.create_conversation("Shared")
        assert [c.id for c in second.list_conversations()] == [chat.id]  # each sees the other's writes
        second.add_message(chat.id, "user", "from the second")
        assert [m.content for m in first.messages(chat.id)] == ["from the second"]

        # Two processes hammer the same conversation while this one reads.
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", TWO_WRITERS, str(db_path), str(chat.id), tag],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for tag in ("a", "b")
        ]
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
        while any(writer.poll() is None for writer in writers):
            first.search("edited")  # reads run beside the writes (WAL)
            time.sleep(0.01)
        assert [writer.returncode for writer in writers] == [0, 0]
        contents = [m.content for m in second.messages(chat.id)]
        assert len(contents) == 121
        assert sorted(contents[1:]) == sorted(f"{tag} {i} edited" for tag in "ab" for i in range(60))
        assert len(first.search("edited")) == 50  # the search limit; the index holds all 120


def test_two_connections_in_threads(db_path: Path) -> None:
    with Storage(db_path) as setup:
        chat = setup.create_conversation()
    errors: list[BaseException] = []

    def write(tag: str) -> None:
        try:
            with Storage(db_path) as storage:
                for index in range(40):
                    storage.add_message(chat.id, "user", f"{tag}{index}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in "xy"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Storage(db_path) as storage:
        assert len(storage.messages(chat.id)) == 80


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mixtral_chat.app.storage import PartialAnswerSaver, Storage

    storage = Storage(Path(sys.argv[1]))
    chat = storage.create_conversation("Crash")
    storage.add_message(chat.id, "user", "committed before the answer")
    answer = storage.add_message(chat.id, "assistant", "", status="streaming")
    saver = PartialAnswerSaver(storage, answer.id, interval_s=0.1)
    index = 0
    while True:  # an answer that never ends, one piece every 5 ms
        saves = saver.saves
        saver.append(f"piece{index} ")
        if saver.saves != saves:
            print(len(saver.text), flush=True)  # saved so far
        index += 1
        time.sleep(0.005)
    """
)


def test_kill_9_during_an_answer_loses_only_the_unsaved_tail(db_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(db_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    saved_lengths = [int(writer.stdout.readline()) for _ in range(3)]  # three periodic saves
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL

    with Storage(db_path) as storage:
        assert storage._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        [chat] = storage.list_conversations()
        user, answer = storage.messages(chat.id)
        assert (user.role, user.content, user.status) == ("user", "committed before the answer", "complete")
        assert answer.role == "assistant" and answer.status == "streaming"  # shown as interrupted
        # At least what the last reported save held, and a clean prefix of the stream.
        assert len(answer.content) >= saved_lengths[-1]
        pieces = answer.content.split()
        assert pieces == [f"piece{i}" for i in range(len(pieces))]


def test_a_locked_database_is_a_storage_error_and_loses_nothing(db_path: Path) -> None:
    with Storage(db_path) as storage:
        chat = storage.create_conversation()
        storage.add_message(chat.id, "user", "before the lock")
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another instance holding the write lock
        storage._conn.execute("PRAGMA busy_timeout = 100")  # give up after 0.1 s, not 10 s
        with pytest.raises(StorageError, match=r"cannot write the conversation database.*locked"):
            storage.add_message(chat.id, "user", "during the lock")
        blocker.execute("ROLLBACK")
        blocker.close()
        storage.add_message(chat.id, "user", "after the lock")  # the connection is still usable
        assert [m.content for m in storage.messages(chat.id)] == ["before the lock", "after the lock"]
