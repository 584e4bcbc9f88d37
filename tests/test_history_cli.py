"""Conversations from the command line: `ask` logging, -c/--cid, --no-log and every `history`
action, through the real CLI in subprocesses on one SQLite database with the bundled demo model
(greedy, a few tokens); and one store with the TUI under Pilot.

Most tests read one logged database made once for the module (`logged`); those that change a
database make their own."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mixtral_chat.app.storage import DB_FILENAME, ConversationBusy, Storage
from mixtral_chat.engine.tokenizer import Tokenizer
from tests.conftest import REPO_ROOT, run_cli

DEMO_DIR = REPO_ROOT / "assets" / "demo"
FEW_TOKENS = ("--max-tokens", "6")
NOT_LOGGED_WARNING = "mixtral-chat: warning: the answer is not saved in the conversation history: "


@dataclass
class Home:
    """A MIXTRAL_CHAT_HOME for the CLI subprocesses and its conversation database."""

    path: Path

    @property
    def env(self) -> dict[str, str]:
        return {"MIXTRAL_CHAT_HOME": str(self.path)}

    @property
    def db(self) -> Path:
        return self.path / "data" / DB_FILENAME

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, input=input, env=self.env)

    def ask_json(self, *args: str) -> dict:
        result = self.cli("ask", "--json", *FEW_TOKENS, *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def storage(self) -> Storage:
        return Storage(self.db)


@dataclass
class Logged:
    home: Home
    first: dict  # `ask --json` of the lighthouse chat's first exchange
    continued: dict  # ... of its second, by -c
    cats: dict  # the second chat, with a system prompt
    unlogged: dict  # --no-log, a new chat
    peeked: dict  # --cid <lighthouse> --no-log


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    home = Home(tmp_path_factory.mktemp("history") / "home")
    first = home.ask_json("What is a lighthouse?")
    continued = home.ask_json("-c", "And a harbour?")
    cats = home.ask_json("--system", "Answer in one line.", "Tell me about cats")
    unlogged = home.ask_json("--no-log", "A question nobody keeps")
    peeked = home.ask_json("--cid", str(first["conversation_id"]), "--no-log", "And a ship?")
    return Logged(home, first, continued, cats, unlogged, peeked)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def prompt_tokens(messages: list[dict[str, str]]) -> int:
    """What the engine's prompt is for these messages (the demo's context holds them all)."""
    return len(Tokenizer(DEMO_DIR / "tokenizer.model").encode_chat(messages))


def turns(storage: Storage, conversation_id: int) -> list[tuple[str, str, str]]:
    return [(m.role, m.status, m.content) for m in storage.messages(conversation_id)]


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line on stderr (nothing on stdout, no traceback)."""
    assert result.stdout == "" and "Traceback" not in result.stderr, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("usage:"), result.stderr
    assert lines[-1].startswith("mixtral-chat: error: "), result.stderr
    return lines[-1].removeprefix("mixtral-chat: error: ")


# -- ask: logging ---------------------------------------------------------------------------------


def test_ask_logs_the_prompt_and_the_answer_with_its_model_and_settings(logged: Logged) -> None:
    chat_id = logged.first["conversation_id"]
    with logged.home.storage() as storage:
        conversation = storage.get_conversation(chat_id)
        messages = storage.messages(chat_id)
    assert conversation.title == "What is a lighthouse?"  # the TUI's title from the first prompt
    assert conversation.model == "demo" and conversation.system_prompt == ""
    assert [(m.role, m.status, m.content) for m in messages[:2]] == [
        ("user", "complete", "What is a lighthouse?"),
        ("assistant", "complete", logged.first["text"]),
    ]
    stats = messages[1].stats
    assert stats is not None
    assert stats["model"] == "demo"
    assert stats["generation"] == {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_tokens": 6,
        "seed": None,
    }
    assert stats["completion_tokens"] == logged.first["usage"]["completion_tokens"] == 6
    assert stats["prompt_tokens"] == logged.first["usage"]["prompt_tokens"]
    # Each run released its claim and took its instance row away.
    with sqlite3.connect(logged.home.db) as conn:
        assert conn.execute("SELECT count(*) FROM instances").fetchone() == (0,)


def test_a_system_prompt_starts_a_chat_that_keeps_it(logged: Logged) -> None:
    with logged.home.storage() as storage:
        conversation = storage.get_conversation(logged.cats["conversation_id"])
        assert turns(storage, conversation.id) == [
            ("user", "complete", "Tell me about cats"),
            ("assistant", "complete", logged.cats["text"]),
        ]
    assert (conversation.title, conversation.system_prompt) == ("Tell me about cats", "Answer in one line.")
    system_and_prompt = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Tell me about cats"},
    ]
    assert logged.cats["usage"]["prompt_tokens"] == prompt_tokens(system_and_prompt)


def test_continue_answers_after_the_earlier_turns_and_appends_to_the_latest_chat(logged: Logged) -> None:
    chat_id = logged.first["conversation_id"]
    assert logged.continued["conversation_id"] == chat_id
    with logged.home.storage() as storage:
        stored = turns(storage, chat_id)
    assert stored == [
        ("user", "complete", "What is a lighthouse?"),
        ("assistant", "complete", logged.first["text"]),
        ("user", "complete", "And a harbour?"),
        ("assistant", "complete", logged.continued["text"]),
    ]
    # The engine was given the first exchange before the new prompt.
    history = [
        {"role": "user", "content": "What is a lighthouse?"},
        {"role": "assistant", "content": logged.first["text"]},
        {"role": "user", "content": "And a harbour?"},
    ]
    assert logged.continued["usage"]["prompt_tokens"] == prompt_tokens(history)


def test_a_chat_begun_with_sampling_flags_is_continued_with_them(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    flags = {"temperature": 0.9, "top_k": 5, "seed": 3, "max_tokens": 4}
    for args in (
        ["--temperature", "0.9", "--top-k", "5", "--seed", "3", "--max-tokens", "4", "A dog?"],
        ["-c", "And a cat?"],  # no flags: the chat's own settings
        ["-c", "--max-tokens", "2", "And a cow?"],  # a flag: for this answer alone
    ):
        result = home.cli("ask", *args)
        assert result.returncode == 0, result.stderr
    chat_id = 1
    with home.storage() as storage:
        assert storage.get_conversation(chat_id).generation == flags
        used = [m.stats["generation"] for m in storage.messages(chat_id) if m.role == "assistant"]
    assert used[0] == used[1] and {k: used[1][k] for k in flags} == flags
    assert used[2] == {**used[1], "max_tokens": 2}


def test_no_log_stores_nothing_even_when_it_continues_a_chat(logged: Logged) -> None:
    assert logged.unlogged["conversation_id"] is None and logged.peeked["conversation_id"] is None
    with logged.home.storage() as storage:
        chats = storage.list_conversations()
        assert len(chats) == 2  # the lighthouse chat and the cats chat only
        assert len(storage.messages(logged.first["conversation_id"])) == 4
        assert storage.search("nobody") == [] and storage.search("ship") == []
    # --cid with --no-log still answered after the stored turns.
    history = [
        {"role": "user", "content": "What is a lighthouse?"},
        {"role": "assistant", "content": logged.first["text"]},
        {"role": "user", "content": "And a harbour?"},
        {"role": "assistant", "content": logged.continued["text"]},
        {"role": "user", "content": "And a ship?"},
    ]
    assert logged.peeked["usage"]["prompt_tokens"] == prompt_tokens(history)


def test_an_unknown_cid_is_one_line_before_the_model_loads(logged: Logged) -> None:
    result = logged.home.cli("ask", "--cid", "999", "hello")
    assert result.returncode == 1
    # Said before the model resolves: its "using the bundled demo model" notice never came.
    assert result.stderr == "mixtral-chat: error: no conversation with id 999\n" and result.stdout == ""


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["-c", "--cid", "1"], "argument --cid: not allowed with argument -c/--continue"),
        (
            ["-c", "--system", "Be brief."],
            "--system starts a new chat: a continued chat keeps its own system prompt",
        ),
        (["--cid", "0"], "--cid must be a positive integer, got 0"),
    ],
    ids=["continue-and-cid", "system-with-continue", "cid-zero"],
)
def test_conversation_flags_misused_are_usage_errors(home: Home, argv: list[str], error: str) -> None:
    result = home.cli("ask", *argv, "hello")
    assert result.returncode == 2
    assert one_error(result) == error
    assert not home.db.exists()  # refused before anything was opened


def test_continue_with_no_chat_yet_says_so(home: Home) -> None:
    result = home.cli("ask", "-c", "hello")
    assert result.returncode == 1
    assert one_error(result) == "no conversation to continue: ask without --continue to start one"


def test_a_damaged_database_costs_the_log_not_the_answer(home: Home) -> None:
    home.db.parent.mkdir(parents=True)
    home.db.write_bytes(b"not a database, just bytes " * 200)
    result = home.cli("ask", *FEW_TOKENS, "What is a lighthouse?")
    assert result.returncode == 0
    assert result.stdout.strip()  # the answer
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(NOT_LOGGED_WARNING), result.stderr
    assert "damaged" in warnings[0] and "Traceback" not in result.stderr
    # Continuing needs the database: an error; and history says the same in one line.
    assert "is damaged" in one_error(home.cli("ask", "-c", "more"))
    listed = home.cli("history", "list")
    assert listed.returncode == 1 and "is damaged" in one_error(listed)
    assert home.db.read_bytes().startswith(b"not a database")  # never touched


@pytest.mark.parametrize("page", [2, 4, 7], ids=["conversations", "messages", "search index"])
def test_a_database_with_a_damaged_page_is_left_untouched(home: Home, page: int) -> None:
    """A database that opens but has a damaged page (the tables', or the search index's): ask
    answers and says the log is lost, history says the file is damaged; no byte changes."""
    assert home.cli("ask", *FEW_TOKENS, "What is a lighthouse?").returncode == 0
    data = bytearray(home.db.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    for offset in range((page - 1) * page_size + 8, page * page_size, 3):
        data[offset] = 0xAB
    home.db.write_bytes(bytes(data))
    result = home.cli("ask", *FEW_TOKENS, "What is a harbour?")
    assert result.returncode == 0 and result.stdout.strip()
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(NOT_LOGGED_WARNING), result.stderr
    assert "is damaged" in warnings[0] and "move it aside" in warnings[0]
    listed = home.cli("history", "list")
    assert listed.returncode == 1 and "is damaged" in one_error(listed)
    assert home.db.read_bytes() == bytes(data)  # never touched


def test_a_locked_database_costs_the_log_not_the_answer(home: Home) -> None:
    """Another process holds the write lock past the busy timeout (10 s): the answer prints."""
    with Storage(home.db):  # the database exists, as after any earlier run
        pass
    holder = sqlite3.connect(home.db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        result = home.cli("ask", *FEW_TOKENS, "What is a lighthouse?")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 0 and result.stdout.strip()
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(NOT_LOGGED_WARNING), result.stderr
    assert warnings[0].endswith("database is locked")
    with home.storage() as storage:
        assert storage.list_conversations() == [] and storage.other_instances() == []


def test_a_chat_another_instance_is_answering_in_is_refused(logged: Logged) -> None:
    """A second app (this test process, through the TUI's Storage API) holds the claim."""
    chat_id = logged.first["conversation_id"]
    other = logged.home.storage()
    try:
        other.register_instance()
        other.claim_conversation(chat_id)
        busy_line = (
            f"another mixtral-chat (pid {os.getpid()}) is writing an answer in this chat: "
            "wait for it to finish"
        )
        asked = logged.home.cli("ask", "--cid", str(chat_id), "hello")
        assert asked.returncode == 1 and one_error(asked) == busy_line
        removed = logged.home.cli("history", "rm", str(chat_id), "-y")
        assert removed.returncode == 1 and one_error(removed) == busy_line
        listed = logged.home.cli("history", "list")
        row = next(line for line in listed.stdout.splitlines() if line.split()[0] == str(chat_id))
        assert row.split()[1] == "busy"
    finally:
        other.close()
    with logged.home.storage() as storage:
        assert len(storage.messages(chat_id)) == 4  # nothing written, nothing deleted


# -- history --------------------------------------------------------------------------------------


def test_history_list_shows_id_age_count_and_title_in_aligned_columns(logged: Logged) -> None:
    result = logged.home.cli("history", "list")
    assert result.returncode == 0 and result.stderr == ""
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "AGE", "MESSAGES", "TITLE"]
    cats, lighthouse = logged.cats["conversation_id"], logged.first["conversation_id"]
    # Most recent first; the title column starts at the same place on every line.
    title_at = header.index("TITLE")
    assert [row[title_at:] for row in rows] == ["Tell me about cats", "What is a lighthouse?"]
    cells = [row[:title_at].split() for row in rows]
    assert [(cell[0], cell[2]) for cell in cells] == [(str(cats), "2"), (str(lighthouse), "4")]
    assert all(re.fullmatch(r"now|\d+ min", cell[1]) for cell in cells), cells

    listed = json.loads(logged.home.cli("history", "list", "--json").stdout)
    assert [(c["id"], c["title"], c["messages"], c["model"]) for c in listed] == [
        (cats, "Tell me about cats", 2, "demo"),
        (lighthouse, "What is a lighthouse?", 4, "demo"),
    ]
    assert logged.home.cli("history").stdout == result.stdout  # `list` is the default action


def test_history_show_prints_the_turns_in_order(logged: Logged) -> None:
    result = logged.home.cli("history", "show", str(logged.cats["conversation_id"]))
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"#{logged.cats['conversation_id']} Tell me about cats"
    assert lines[1].startswith("model demo · 2 messages · updated ")
    assert lines[2:] == [
        "",
        "[system]",
        "Answer in one line.",
        "",
        "[user]",
        "Tell me about cats",
        "",
        "[assistant]",
        *logged.cats["text"].splitlines(),
    ]


def test_history_search_prints_hits_with_a_snippet(logged: Logged) -> None:
    result = logged.home.cli("history", "search", "harbour")
    assert result.returncode == 0 and result.stderr == ""
    hits = result.stdout.splitlines()
    chat_id = logged.first["conversation_id"]
    assert hits and all(line.split()[0] == str(chat_id) for line in hits)
    assert f"{chat_id}  What is a lighthouse?  user: And a harbour?" in hits
    assert all("\x02" not in line and "\x03" not in line for line in hits)  # markers only on a terminal

    as_json = json.loads(logged.home.cli("history", "search", "harbour", "--json").stdout)
    with logged.home.storage() as storage:
        expected = storage.search("harbour")
    assert [(h["conversation_id"], h["message_id"], h["role"]) for h in as_json] == [
        (hit.conversation_id, hit.message_id, hit.role) for hit in expected
    ]
    assert all("harbour" in h["snippet"].lower() for h in as_json)

    nothing = logged.home.cli("history", "search", "zeppelin")
    assert nothing.returncode == 0 and nothing.stdout == ""
    assert nothing.stderr == "mixtral-chat: no message matches 'zeppelin'\n"
    no_words = logged.home.cli("history", "search", "++")
    assert no_words.returncode == 2 and one_error(no_words) == "QUERY needs at least one word to search for"


def test_history_export_writes_markdown_or_json_to_stdout_or_a_file(logged: Logged, tmp_path: Path) -> None:
    chat_id = logged.first["conversation_id"]
    with logged.home.storage() as storage:
        markdown, exported = storage.export_markdown(chat_id), storage.export_json(chat_id)
    to_stdout = logged.home.cli("history", "export", str(chat_id), "--format", "md")
    assert to_stdout.returncode == 0 and to_stdout.stdout == markdown
    assert "## User\n\nAnd a harbour?" in markdown and logged.continued["text"] in markdown

    target = tmp_path / "out" / "lighthouse.json"
    to_file = logged.home.cli("history", "export", str(chat_id), "--format", "json", "-o", str(target))
    assert to_file.returncode == 0 and to_file.stdout == ""
    assert json.loads(target.read_text()) == exported
    assert [m["content"] for m in exported["messages"]][-1] == logged.continued["text"]
    assert os.listdir(target.parent) == ["lighthouse.json"]  # no temp file left beside it

    unknown = logged.home.cli("history", "export", "999", "--format", "json", "-o", str(tmp_path / "x.json"))
    assert unknown.returncode == 1 and one_error(unknown) == "no conversation with id 999"
    assert not (tmp_path / "x.json").exists()
    bad_format = logged.home.cli("history", "export", str(chat_id), "--format", "html")
    assert bad_format.returncode == 2 and "invalid choice: 'html'" in one_error(bad_format)


def test_history_show_and_rm_of_an_unknown_id_and_a_bad_id(logged: Logged) -> None:
    for action in ("show", "rm"):
        unknown = logged.home.cli("history", action, "999", *(["-y"] if action == "rm" else []))
        assert unknown.returncode == 1 and one_error(unknown) == "no conversation with id 999"
        bad = logged.home.cli("history", action, "abc")
        assert bad.returncode == 2 and one_error(bad) == "ID expects an integer, got 'abc'"


def rm_on_a_terminal(home: Home, chat_id: int, typed: bytes) -> tuple[int, str]:
    """`history rm ID` with a terminal as stdin, answering the question with `typed`."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "mixtral_chat.app.cli", "history", "rm", str(chat_id)],
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **home.env, "PYTHONIOENCODING": "utf-8"},
        )
        os.write(leader, typed)
        out, err = process.communicate(timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    return process.returncode, (out + err).decode()


def test_history_rm_asks_on_a_terminal_and_needs_y_without_one(home: Home) -> None:
    with home.storage() as storage:
        chat = storage.create_conversation("Delete me")
        storage.add_message(chat.id, "user", "a prompt")
        keep = storage.create_conversation("Keep me")
    code, output = rm_on_a_terminal(home, chat.id, b"n\n")
    assert code == 1 and f"Delete chat {chat.id} 'Delete me' (1 messages)? [y/N]" in output
    assert f"chat {chat.id} kept" in output
    code, output = rm_on_a_terminal(home, chat.id, b"\x04")  # Ctrl+D: end of input is no
    assert code == 1 and f"chat {chat.id} kept" in output
    no_terminal = home.cli("history", "rm", str(chat.id))
    assert no_terminal.returncode == 2
    assert one_error(no_terminal) == "no terminal to confirm on: add -y to delete without asking"
    with home.storage() as storage:
        assert storage.get_conversation(chat.id).title == "Delete me"

    code, output = rm_on_a_terminal(home, chat.id, b"y\n")
    assert code == 0 and f"deleted chat {chat.id} 'Delete me'" in output
    removed = home.cli("history", "rm", str(keep.id), "-y")
    assert removed.returncode == 0 and removed.stdout == f"deleted chat {keep.id} 'Keep me'\n"
    with home.storage() as storage:
        assert storage.list_conversations() == [] and storage.search("prompt") == []


def test_history_without_a_database_reads_as_empty_and_creates_none(home: Home) -> None:
    listed = home.cli("history", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("No conversations yet")
    assert json.loads(home.cli("history", "list", "--json").stdout) == []
    shown = home.cli("history", "show", "1")
    assert shown.returncode == 1 and one_error(shown) == "no conversation with id 1"
    assert not home.db.exists()


def test_history_does_not_import_torch_or_textual_and_start_up_not_the_store(logged: Logged) -> None:
    probe = (
        "import sys; from mixtral_chat.app.cli import main; "
        "assert 'sqlite3' not in sys.modules, 'the store is imported at CLI start-up'; "
        "codes = [main(['history', 'list']), main(['history', 'search', 'harbour']), "
        "main(['history', 'show', '1'])]; "
        "print(codes, 'torch' in sys.modules, 'textual' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **logged.home.env},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[0, 0, 0] False False"


# -- one store with the TUI -----------------------------------------------------------------------


def test_the_tui_opens_a_cli_chat_and_ask_continues_a_tui_chat(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("textual")
    from mixtral_chat.app.chat_app import ChatApp
    from mixtral_chat.app.settings import Settings
    from mixtral_chat.engine.options import GenerationConfig
    from tests.test_tui import SIZE, send, wait_for, wait_ready

    older = home.ask_json("What is a lighthouse?")
    home.ask_json("Tell me about cats")
    monkeypatch.setenv("MIXTRAL_CHAT_HOME", str(home.path))
    settings = Settings()
    settings.generation = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=6)
    app = ChatApp(Storage(), settings, model=str(DEMO_DIR))
    tui_chat: list[int] = []

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            screen = app.chat_screen
            await wait_for(pilot, lambda: screen.conversation_list.option_count == 2, "the CLI chats listed")
            assert "What is a lighthouse?" in screen.conversation_list.label_text(older["conversation_id"])
            # Select the older CLI chat in the sidebar: its turns are shown.
            screen.conversation_list.focus()
            screen.conversation_list.select_conversation(older["conversation_id"])
            await pilot.press("enter")
            await wait_for(
                pilot, lambda: screen.conversation_id == older["conversation_id"], "the CLI chat to open"
            )
            await wait_for(pilot, lambda: len(screen.message_list.views) == 2, "its two messages")
            views = screen.message_list.views
            assert [(v.role, v.text) for v in views] == [
                ("user", "What is a lighthouse?"),
                ("assistant", older["text"]),
            ]
            # A chat of the TUI's own, for `ask --cid` below.
            await wait_ready(pilot, app)
            await pilot.press("ctrl+n")
            await wait_for(pilot, lambda: screen.conversation_id is None, "a new chat")
            await send(pilot, app, "What is a river")
            assert screen.conversation_id is not None
            tui_chat.append(screen.conversation_id)

    try:
        asyncio.run(scenario())
    finally:
        app.storage.close()
    chat_id = tui_chat[0]
    with home.storage() as storage:
        tui_answer = storage.messages(chat_id)[1].content
    continued = home.ask_json("--cid", str(chat_id), "And a lake?")
    assert continued["conversation_id"] == chat_id
    with home.storage() as storage:
        assert turns(storage, chat_id) == [
            ("user", "complete", "What is a river"),
            ("assistant", "complete", tui_answer),
            ("user", "complete", "And a lake?"),
            ("assistant", "complete", continued["text"]),
        ]
    history = [
        {"role": "user", "content": "What is a river"},
        {"role": "assistant", "content": tui_answer},
        {"role": "user", "content": "And a lake?"},
    ]
    assert continued["usage"]["prompt_tokens"] == prompt_tokens(history)


def held_ask(home: Home, fifo: Path, *args: str) -> subprocess.Popen[bytes]:
    """`ask --json ARGS` held mid-answer: its routing trace is FIFO `fifo`, which nobody reads
    yet, and `ask` opens it once the prompt is stored (opening blocks until a reader comes)."""
    os.mkfifo(fifo)
    argv = ["ask", "--json", *FEW_TOKENS, *args, "--trace-routing", str(fifo)]
    return subprocess.Popen(
        [sys.executable, "-m", "mixtral_chat.app.cli", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **home.env, "PYTHONIOENCODING": "utf-8"},
    )


def wait_until_held(storage: Storage, process: subprocess.Popen[bytes]) -> int:
    """The chat `process` holds, once its answer row is stored (then it waits on the FIFO; a
    hang fails after two minutes)."""

    def answering_in() -> int | None:
        for chat_id in storage.busy_conversations():
            messages = storage.messages(chat_id)
            if messages and (messages[-1].role, messages[-1].status) == ("assistant", "streaming"):
                return chat_id
        return None

    deadline = time.monotonic() + 120
    while (chat_id := answering_in()) is None:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "ask never stored its answer row"
        time.sleep(0.05)
    assert storage.busy_conversations() == {chat_id: process.pid}
    return chat_id


def test_ask_holds_the_chat_while_it_answers(home: Home, tmp_path: Path) -> None:
    """While `ask` answers, its chat is busy for every other app: the TUI's guarded writes and
    another `ask --cid` are refused. `ask` is held mid-answer by its routing trace, a FIFO that
    nobody reads yet: opening it blocks, and it is opened once the prompt is stored."""
    first = home.ask_json("What is a lighthouse?")
    chat_id = first["conversation_id"]
    answering = held_ask(home, tmp_path / "trace.fifo", "-c", "And a harbour?")
    other = home.storage()
    try:
        other.register_instance()
        assert wait_until_held(other, answering) == chat_id
        assert other.busy_conversations() == {chat_id: answering.pid}
        assert [(m.role, m.status) for m in other.messages(chat_id)][2:] == [
            ("user", "complete"),
            ("assistant", "streaming"),
        ]
        with pytest.raises(ConversationBusy):  # what the TUI's send does
            other.add_message(chat_id, "user", "me too", claim=True)
        refused = home.cli("ask", "--cid", str(chat_id), "me too")
        assert refused.returncode == 1 and f"(pid {answering.pid})" in one_error(refused)
        with open(tmp_path / "trace.fifo", encoding="utf-8") as trace:  # let it go on
            trace.read()
        out, err = answering.communicate(timeout=120)
        assert answering.returncode == 0, err
        answer = json.loads(out)
        assert other.busy_conversations() == {}
        assert turns(other, chat_id)[2:] == [
            ("user", "complete", "And a harbour?"),
            ("assistant", "complete", answer["text"]),
        ]
    finally:
        if answering.poll() is None:
            answering.kill()
            answering.wait()
        other.close()


def test_a_continued_chat_keeps_its_own_generation_settings_unless_a_flag_is_given(home: Home) -> None:
    """Settings a chat was given in the app (chat options) apply to `ask --cid`; flags win."""
    with home.storage() as storage:
        chat = storage.create_conversation("Lighthouses", generation={"max_tokens": 3, "top_k": 5})
        storage.add_message(chat.id, "user", "What is a lighthouse?")
        storage.add_message(chat.id, "assistant", "A tower with a light.")
        broken = storage.create_conversation("Broken", generation={"temperature": -1.0})
    own = home.cli("ask", "--json", "--cid", str(chat.id), "And a harbour?")
    assert own.returncode == 0, own.stderr
    flagged = home.cli("ask", "--json", "--cid", str(chat.id), "--max-tokens", "5", "And a ship?")
    assert flagged.returncode == 0, flagged.stderr
    assert json.loads(own.stdout)["usage"]["completion_tokens"] == 3
    assert json.loads(flagged.stdout)["usage"]["completion_tokens"] == 5
    with home.storage() as storage:
        answers = [m.stats for m in storage.messages(chat.id) if m.role == "assistant" and m.stats]
    assert [(s["generation"]["max_tokens"], s["generation"]["top_k"]) for s in answers] == [(3, 5), (5, 5)]
    bad = home.cli("ask", "--cid", str(broken.id), "hello")
    assert bad.returncode == 1
    assert one_error(bad).startswith(f"chat {broken.id} has invalid generation settings (")


def test_ctrl_c_leaves_the_answer_stored_as_stopped_and_the_chat_free(home: Home, tmp_path: Path) -> None:
    answering = held_ask(home, tmp_path / "trace.fifo", "What is a lighthouse?")
    with home.storage() as storage:
        try:
            chat_id = wait_until_held(storage, answering)
            answering.send_signal(signal.SIGINT)
            out, err = answering.communicate(timeout=120)
        finally:
            if answering.poll() is None:
                answering.kill()
                answering.wait()
        assert answering.returncode == 130, err
        printed = json.loads(out)
        assert (printed["finish_reason"], printed["conversation_id"]) == ("cancelled", chat_id)
        messages = storage.messages(chat_id)
        assert [(m.role, m.status, m.content) for m in messages] == [
            ("user", "complete", "What is a lighthouse?"),
            ("assistant", "stopped", printed["text"]),
        ]
        assert messages[1].stats is not None and messages[1].stats["finish_reason"] == "cancelled"
        assert storage.busy_conversations() == {}
