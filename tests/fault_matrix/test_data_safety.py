"""Data safety under faults: two app instances on one database, a damaged database, SIGTERM and
SIGHUP while an answer streams, and the TUI started without a terminal.

Real parts only: real SQLite files under a temporary MIXTRAL_CHAT_HOME, the real app under
Textual's Pilot (two at once on one database), the real `mixtral-chat` command in tmux and in a
subprocess, the real engine on the suite's tiny random-weight Mixtral.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("textual")

import test_tui
from conftest import run_cli
from test_tui import type_text
from test_tui_snapshots import wait_for

from mixtral_chat.app.chat_app import ChatApp
from mixtral_chat.app.screens.dialogs import ConfirmScreen
from mixtral_chat.app.settings import Settings
from mixtral_chat.app.storage import DB_FILENAME, SCHEMA_VERSION, Storage, StoredMessage
from mixtral_chat.app.tui import NEEDS_TERMINAL
from mixtral_chat.engine.options import GenerationConfig

SIZE = (120, 40)
# Never in a test run: an app built with it sees other instances' writes only when it acts.
NEVER_S = 10_000.0


# test_tui's fixtures: the tiny Mixtral with a 4096-token context (an answer streams long enough
# to act on), and an isolated home with one compute thread.
chat_model_dir = test_tui.chat_model_dir
home = test_tui.home


def db_path(home: Path) -> Path:
    return home / "data" / DB_FILENAME


def make_app(model_dir: Path, max_tokens: int = 8, sync_interval_s: float = 0.2) -> ChatApp:
    settings = Settings()
    settings.generation = GenerationConfig(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    app = ChatApp(Storage(), settings, model=str(model_dir), sync_interval_s=sync_interval_s)
    return record_notifications(app)


def rows(conversation_id: int) -> list[tuple[int, str, str, str]]:
    """The conversation as the database holds it, read on a connection of its own."""
    with Storage() as storage:
        return [(m.id, m.role, m.status, m.content) for m in storage.messages(conversation_id)]


def shown_ids(app: ChatApp) -> list[int]:
    return [view.message_id for view in app.chat_screen.message_list.views]


NOTICES: dict[int, list[str]] = {}


def notices(app: ChatApp) -> list[str]:
    """Every notification the app showed (toasts expire, this list does not)."""
    return NOTICES.setdefault(id(app), [])


def record_notifications(app: ChatApp) -> ChatApp:
    """A spy on the real App.notify: what it was asked to show, then shown as usual."""
    original = app.notify
    seen = notices(app)

    def recording(message: str, **kwargs: object) -> None:
        seen.append(message)
        original(message, **kwargs)  # type: ignore[arg-type]

    app.notify = recording  # type: ignore[method-assign]
    return app


def finished(app: ChatApp, count: int) -> bool:
    screen = app.chat_screen
    if screen.conversation_id is None or screen.generation is not None:
        return False
    stored = rows(screen.conversation_id)
    return len(stored) == count and stored[-1][1] == "assistant" and stored[-1][2] != "streaming"


def seed_chat(first: str = "first question", answer: str = "first answer") -> int:
    with Storage() as storage:
        chat = storage.create_conversation("Shared chat")
        storage.add_message(chat.id, "user", first)
        storage.add_message(chat.id, "assistant", answer)
        return chat.id


# -- two app instances on one database --------------------------------------------------------------


def test_an_instance_changes_only_the_messages_it_shows(home: Path, chat_model_dir: Path) -> None:
    """Instance A never sees B's writes by itself (its sync is off); B's turn must survive A's
    Ctrl+R and edit, and B must show what A did in the end."""
    chat_id = seed_chat()
    first_rows = rows(chat_id)
    app_a = make_app(chat_model_dir, sync_interval_s=NEVER_S)
    app_b = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app_a.run_test(size=SIZE) as pilot_a:
            await wait_for(lambda: app_a.model_status.state == "ready", "A's model")
            assert shown_ids(app_a) == [row[0] for row in first_rows]
            async with app_b.run_test(size=SIZE) as pilot_b:
                await wait_for(lambda: app_b.model_status.state == "ready", "B's model")
                # B is told another instance is running on this data folder.
                assert any(
                    f"Another mixtral-chat is running (pid {os.getpid()}) on this data folder" in n
                    for n in notices(app_b)
                ), notices(app_b)
                assert app_b.chat_screen.conversation_id == chat_id

                # B asks and gets its answer: A still shows the first two messages.
                await type_text(pilot_b, "question from B")
                await pilot_b.press("enter")
                await wait_for(lambda: finished(app_b, 4), "B's answer")
                with_b = rows(chat_id)
                assert with_b[2][1:] == ("user", "complete", "question from B")
                assert shown_ids(app_a) == [row[0] for row in first_rows]

                # A's Ctrl+R (today: deleted B's answer and answered B's question) reloads instead.
                await pilot_a.press("ctrl+r")
                await wait_for(lambda: shown_ids(app_a) == [row[0] for row in with_b], "A to reload")
                assert rows(chat_id) == with_b  # nothing deleted, nothing added
                assert any(
                    "changed in another mixtral-chat and has been reloaded: nothing was deleted" in n
                    for n in notices(app_a)
                ), notices(app_a)
                assert app_a.chat_screen.generation is None

                # B asks again; A (stale again) edits the first question: refused, reloaded.
                await type_text(pilot_b, "second from B")
                await pilot_b.press("enter")
                await wait_for(lambda: finished(app_b, 6), "B's second answer")
                with_b2 = rows(chat_id)
                view = app_a.chat_screen.message_list.view_for(first_rows[0][0])
                assert view is not None
                view.focus()
                await pilot_a.press("e")
                await pilot_a.press("ctrl+a")
                await type_text(pilot_a, "edited by A ")
                await pilot_a.press("enter")
                await wait_for(lambda: shown_ids(app_a) == [row[0] for row in with_b2], "A to reload again")
                assert rows(chat_id) == with_b2
                assert any("nothing was changed; your edit is kept" in n for n in notices(app_a))
                assert "edited by A" in app_a.chat_screen.prompt.text  # the typed edit is kept

                # Now A shows B's turns: its Ctrl+R replaces the last answer, and B shows that.
                app_a.chat_screen.prompt.clear()
                app_a.chat_screen.prompt.focus()
                await pilot_a.press("ctrl+r")
                await wait_for(
                    lambda: finished(app_a, 6) and rows(chat_id)[-1][0] != with_b2[-1][0], "A's new answer"
                )
                after = rows(chat_id)
                assert after[:5] == with_b2[:5] and after[5][1:3] == ("assistant", "complete")
                # B's views follow the database: the ids first, then the answer's text as it renders.
                await wait_for(
                    lambda: (
                        shown_ids(app_b) == [row[0] for row in after]
                        and app_b.chat_screen.message_list.views[-1].text == after[5][3]
                    ),
                    "B to show A's answer",
                )
                assert app_b.chat_screen.message_list.view_for(with_b2[-1][0]) is None

    asyncio.run(scenario())


def test_a_stored_ask_beside_the_app_is_shown_not_announced(home: Path, chat_model_dir: Path) -> None:
    """`ask` registers while it stores its answer (to claim its chat): the app shows the new chat,
    and does not toast "Another mixtral-chat started" for it, as it does for another app."""
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=SIZE):
            await wait_for(lambda: app.model_status.state == "ready", "the model")
            result = await asyncio.to_thread(
                run_cli, "ask", "--model", str(chat_model_dir), "--max-tokens", "4", "What is a harbor?"
            )
            assert result.returncode == 0, result.stderr
            with Storage() as storage:
                (logged,) = storage.list_conversations()
            await wait_for(
                lambda: app.chat_screen.conversation_list.label_text(logged.id) != "", "the new chat"
            )
            assert app.chat_screen.conversation_list.label_text(logged.id).startswith("What is a harbor?")
            assert not [notice for notice in notices(app) if "Another mixtral-chat" in notice]

    asyncio.run(scenario())


def test_a_chat_another_instance_answers_in_is_busy(home: Path, chat_model_dir: Path) -> None:
    chat_id = seed_chat()
    app_a = make_app(chat_model_dir, max_tokens=8)
    app_b = make_app(chat_model_dir, max_tokens=4000)

    async def scenario() -> None:
        async with app_a.run_test(size=SIZE) as pilot_a:
            await wait_for(lambda: app_a.model_status.state == "ready", "A's model")
            screen_a = app_a.chat_screen
            async with app_b.run_test(size=SIZE) as pilot_b:
                await wait_for(lambda: app_b.model_status.state == "ready", "B's model")
                # A started first and is told when B starts.
                await wait_for(
                    lambda: (
                        f"Another mixtral-chat started (pid {os.getpid()}) on this data folder."
                        in notices(app_a)
                    ),
                    "A to be told of B",
                )
                await type_text(pilot_b, "a long answer please")
                await pilot_b.press("enter")
                await wait_for(
                    lambda: rows(chat_id)[-1][1:3] == ("assistant", "streaming"), "B's answer to start"
                )

                # A marks the chat busy, in the sidebar and the status line.
                await wait_for(lambda: screen_a.busy.get(chat_id) == os.getpid(), "A to see the chat busy")
                await wait_for(lambda: screen_a.status_bar.info.busy_pid == os.getpid(), "A's status line")
                label = screen_a.conversation_list.label_text(chat_id)
                assert label.startswith("● ") and label.endswith("busy")
                assert f"busy: answered in pid {os.getpid()}" in str(screen_a.status_bar.render())

                # Sending, regenerating and deleting there are refused, with one line each (the
                # prompt is set, not typed: B's answer must still be streaming when A acts).
                screen_a.prompt.set_text("question from A")
                await pilot_a.press("enter")
                await pilot_a.press("ctrl+r")
                await pilot_a.press("f8")
                await wait_for(lambda: isinstance(app_a.screen, ConfirmScreen), "the delete confirmation")
                await pilot_a.press("y")
                await wait_for(lambda: not isinstance(app_a.screen, ConfirmScreen), "the dialog to close")

                def refusals() -> list[str]:
                    return [n for n in notices(app_a) if "is writing an answer in this chat" in n]

                await wait_for(lambda: len(refusals()) == 3, "three refusals")
                assert app_b.chat_screen.generation is not None, "B's answer ended before A acted"
                assert [n.split(": ", 1)[1] for n in refusals()] == [
                    "your message is kept in the prompt; send it when it is done.",
                    "regenerate when it is done.",
                    "nothing was deleted.",
                ]
                assert all(
                    n.startswith(f"Another mixtral-chat (pid {os.getpid()}) is writing") for n in refusals()
                )
                assert screen_a.prompt.text == "question from A"  # kept
                assert [c.id for c in app_a.storage.list_conversations()] == [chat_id]
                assert screen_a.generation is None
                assert [row[3] for row in rows(chat_id)[:3]] == [
                    "first question",
                    "first answer",
                    "a long answer please",
                ]
                assert len(rows(chat_id)) == 4

                # B stops: the chat is free again; A's message goes after B's whole turn.
                await pilot_b.press("escape")
                await wait_for(lambda: app_b.chat_screen.generation is None, "B to stop")
                await wait_for(lambda: chat_id not in screen_a.busy, "A to see the chat free")
                b_turn = rows(chat_id)
                assert b_turn[3][1:3] == ("assistant", "stopped") and b_turn[3][3]
                await wait_for(lambda: shown_ids(app_a) == [row[0] for row in b_turn], "A to show B's answer")
                screen_a.prompt.focus()
                await pilot_a.press("enter")
                await wait_for(lambda: finished(app_a, 6), "A's answer")
                final = rows(chat_id)
                assert final[:4] == b_turn
                assert [row[1:3] for row in final[4:]] == [("user", "complete"), ("assistant", "complete")]
                assert final[4][3] == "question from A"

    asyncio.run(scenario())


def test_a_dead_instance_leaves_nothing_busy(home: Path, chat_model_dir: Path) -> None:
    chat_id = seed_chat()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Storage() as storage:  # the row a crashed app left: fresh heartbeat, pid gone
        storage._conn.execute(
            "INSERT INTO instances (pid, host, started_at, heartbeat_at, generating_in)"
            " VALUES (?, ?, ?, ?, ?)",
            (dead.pid, socket.gethostname(), time.time(), time.time(), chat_id),
        )
    app = make_app(chat_model_dir)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(lambda: app.model_status.state == "ready", "the model")
            assert not any("Another mixtral-chat" in n for n in notices(app))
            assert app.chat_screen.busy == {}
            await type_text(pilot, "still mine")
            await pilot.press("enter")
            await wait_for(lambda: finished(app, 4), "the answer")
            assert rows(chat_id)[2][3] == "still mine"
        with Storage() as storage:  # the stale row was dropped, this app's own row too at exit
            assert storage._conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 0

    asyncio.run(scenario())


# -- tmux: the real command in a real terminal -------------------------------------------------------


class Tmux:
    """One tmux session running a shell command; the command's exit status is printed after it
    and the pane stays open, so its terminal modes can be read afterwards."""

    def __init__(self, tmux: str, name: str, command: str) -> None:
        self.tmux = tmux
        self.name = name
        script = f'{command}; echo "exit=$?"; sleep 600'
        subprocess.run([tmux, "new-session", "-d", "-s", name, "-x", "120", "-y", "35", script], check=True)

    def text(self) -> str:
        return subprocess.run(
            [self.tmux, "capture-pane", "-p", "-J", "-t", self.name],
            capture_output=True,
            text=True,
            check=False,
        ).stdout

    def wait(self, condition: Callable[[str], object], what: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if condition(text):
                return text
            if time.monotonic() > deadline:
                size = subprocess.run(
                    [self.tmux, "display", "-p", "-t", self.name, "#{pane_width}x#{pane_height}"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout.strip()
                raise AssertionError(f"timed out waiting for {what}; screen ({size}):\n{text}")
            time.sleep(0.2)

    def keys(self, *keys: str) -> None:
        subprocess.run([self.tmux, "send-keys", "-t", self.name, *keys], check=True)

    def modes(self) -> str:
        """alternate screen, cursor shown, any mouse reporting (1/0 each)."""
        return subprocess.run(
            [self.tmux, "display", "-p", "-t", self.name, "#{alternate_on} #{cursor_flag} #{mouse_any_flag}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def app_pid(self) -> int:
        """The mixtral-chat process: the child of the pane's shell."""
        shell = subprocess.run(
            [self.tmux, "display", "-p", "-t", self.name, "#{pane_pid}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        children = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        return int(children[0])

    def close(self) -> None:
        subprocess.run([self.tmux, "kill-session", "-t", self.name], capture_output=True, check=False)


@pytest.fixture
def tmux_command(home: Path) -> Iterator[Callable[[str], Tmux]]:
    tmux = shutil.which("tmux")
    command = shutil.which("mixtral-chat", path=str(Path(sys.executable).parent)) or shutil.which(
        "mixtral-chat"
    )
    if tmux is None or command is None:
        pytest.skip("tmux or the installed mixtral-chat command is not available")
    sessions: list[Tmux] = []

    def start(arguments: str) -> Tmux:
        session = Tmux(
            tmux,
            f"mixtral-chat-fault-{os.getpid()}-{len(sessions)}",
            # COLUMNS/LINES (set in this test process by the time it runs) would pin the app to
            # 80x24 whatever the pane's size.
            f"env -u COLUMNS -u LINES MIXTRAL_CHAT_HOME={home} OMP_NUM_THREADS=1 {command} {arguments}",
        )
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()


def damage_page(path: Path, page: int) -> bytes:
    """Overwrite one 4 KiB page of a checkpointed database; returns the damaged file's bytes."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(path, "r+b") as handle:
        handle.seek((page - 1) * 4096)
        handle.write(b"\xff" * 4096)
    return path.read_bytes()


def conversations_root_page(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(
            conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'conversations'").fetchone()[0]
        )
    finally:
        conn.close()


@pytest.mark.parametrize("answer", ["n", "y"])
def test_a_damaged_database_is_one_line_and_an_offer(
    home: Path, chat_model_dir: Path, tmux_command: Callable[[str], Tmux], answer: str
) -> None:
    seed_chat()
    path = db_path(home)
    damaged = damage_page(path, conversations_root_page(path))
    session = tmux_command(f"--model {chat_model_dir}")
    text = session.wait(lambda t: "[y/N]" in t, "the offer")
    error_lines = [line for line in text.splitlines() if line.startswith("mixtral-chat: error:")]
    assert error_lines == [
        f"mixtral-chat: error: {path} is damaged (database disk image is malformed); move it aside or "
        "restore a backup, then start again"
    ], text
    assert "Traceback" not in text
    session.keys(answer, "Enter")
    if answer == "n":
        text = session.wait(lambda t: "exit=" in t, "the command to end")
        assert "exit=1" in text
        assert path.read_bytes() == damaged  # untouched, where it was
        assert not list(path.parent.glob("*.damaged-*"))
        return
    session.wait(lambda t: "Ask anything" in t and "Started with a" in t, "the app and its notice")
    [moved] = path.parent.glob(f"{DB_FILENAME}.damaged-*")
    assert not moved.name.endswith(("-wal", "-shm"))
    assert moved.read_bytes() == damaged  # moved aside whole, never deleted
    session.keys("C-q")
    text = session.wait(lambda t: "exit=" in t, "the app to quit")
    assert "exit=0" in text and f"moved the damaged database to {moved}" in text
    with Storage(path) as fresh:
        assert fresh.list_conversations() == [] and fresh.check() == []
        assert fresh._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_damaged_search_index_is_rebuilt_from_the_messages(
    home: Path, chat_model_dir: Path, tmux_command: Callable[[str], Tmux]
) -> None:
    chat_id = seed_chat("where is the lighthouse", "the lighthouse stands on the cape")
    with Storage() as storage:  # one index entry removed behind the triggers' back
        storage._conn.execute(
            "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', ?, ?)",
            (storage.messages(chat_id)[1].id, "the lighthouse stands on the cape"),
        )
        storage._conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 0)")
        before = [(m.id, m.content) for m in storage.messages(chat_id)]
    session = tmux_command(f"--model {chat_model_dir}")
    session.wait(lambda t: "search index" in t and "rebuilt" in t, "the notice")
    session.keys("C-q")
    text = session.wait(lambda t: "exit=" in t, "the app to quit")
    assert "exit=0" in text and "Traceback" not in text
    with Storage() as storage:
        assert [(m.id, m.content) for m in storage.messages(chat_id)] == before
        assert storage.check_search_index() == []
        assert sorted(hit.message_id for hit in storage.search("lighthouse")) == [m[0] for m in before]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_while_an_answer_streams_saves_it_and_restores_the_terminal(
    home: Path, chat_model_dir: Path, tmux_command: Callable[[str], Tmux], signum: int
) -> None:
    (home / "config").mkdir(parents=True)
    (home / "config" / "config.toml").write_text("[generation]\ntemperature = 0.0\nmax_tokens = 3000\n")
    session = tmux_command(f"--model {chat_model_dir}")
    session.wait(lambda t: "Ask anything" in t, "the prompt")
    assert session.modes() == "1 0 1"  # the app's own modes: alternate screen, no cursor, mouse
    session.keys("Tell me a very long story", "Enter")

    def saved_partial() -> StoredMessage | None:
        if not db_path(home).exists():
            return None
        with Storage() as storage:
            for chat in storage.list_conversations():
                for message in storage.messages(chat.id):
                    if message.role == "assistant" and message.status == "streaming" and message.content:
                        return message
        return None

    deadline = time.monotonic() + 90
    while (partial := saved_partial()) is None:
        assert time.monotonic() < deadline, session.text()
        time.sleep(0.1)
    os.kill(session.app_pid(), signum)
    text = session.wait(lambda t: "exit=" in t, "the app to end")
    assert f"exit={128 + signum}" in text and "Traceback" not in text
    assert session.modes() == "0 1 0"  # main screen, cursor shown, no mouse reporting
    with Storage() as storage:
        [chat] = storage.list_conversations()
        user, answer = storage.messages(chat.id)
        assert (user.content, user.status) == ("Tell me a very long story", "complete")
        assert answer.id == partial.id and answer.status == "stopped"
        assert answer.content.startswith(partial.content) and len(answer.content) >= len(partial.content)
        assert storage._conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 0


# -- without a terminal ---------------------------------------------------------------------------------


def test_without_a_terminal_it_says_so_and_exits_2(home: Path) -> None:
    chat_id = seed_chat()
    before = rows(chat_id)
    result = run_cli(timeout=60)  # stdin and stdout are pipes
    assert result.returncode == 2
    assert result.stderr == NEEDS_TERMINAL + "\n"
    assert result.stdout == ""  # no escape codes
    assert NEEDS_TERMINAL == (
        "mixtral-chat: error: the chat app needs a terminal; use 'mixtral-chat ask \"...\"' for one answer"
    )
    assert rows(chat_id) == before


def test_stdout_not_a_terminal_is_refused_without_importing_textual(home: Path) -> None:
    """A terminal for input but output into a pipe (`mixtral-chat | less`): refused as well, and
    before Textual (or torch) is imported."""
    import pty

    leader, follower = pty.openpty()
    probe = (
        "import sys; from mixtral_chat.app.cli import main; code = main([]); "
        "print(code, 'textual' in sys.modules, 'torch' in sys.modules)"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", probe], stdin=follower, capture_output=True, text=True, timeout=60
        )
    finally:
        os.close(leader)
        os.close(follower)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "False", "False"]
    assert result.stderr == NEEDS_TERMINAL + "\n"
    assert not db_path(home).exists()  # nothing opened, nothing created
