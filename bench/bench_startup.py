"""Cold start of `mixtral-chat` to an interactive chat screen, next to its floor.

Each program runs in a real pseudo-terminal (120x40), and the time is from just before the process
is spawned to the moment the program says it is interactive:

- `python -c pass`-like: the interpreter alone (it writes the time as its only statement);
- a bare Textual app (a Label and a Footer) that writes the time after its first refresh;
- `mixtral-chat` (the installed console script), with MIXTRAL_CHAT_STARTUP_REPORT set: the chat
  screen writes "interactive" once it is mounted, its prompt focused and drawn
  (`call_after_refresh` from its `on_mount`; keys typed from here are kept), then "history" once
  the latest chat is drawn, then exits. The model would load from there, in a background thread;
  it is not part of these times. Measured with an empty data folder and with a history of 200
  chats (the app opens the most recent: 40 messages with Markdown and code, the latest 6 shown).

Runs are interleaved (A, B, C, D, A, B, ...) because the machine is shared; the table reports the
median, min and max of each.

    python bench/bench_startup.py            # 9 rounds
    python bench/bench_startup.py --rounds 15
    python bench/bench_startup.py --typing MODEL_DIR   # also: key latency while an answer streams

`--typing MODEL_DIR` (a model directory with a context of 4096 or more; a tiny random one streams
fastest, the worst case for the UI) runs the app headless and times key events into the prompt
(from the event reaching the app to the character being in the prompt), 20 keys a second, first
with the app idle, then while an answer streams.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import pty
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPORT_ENV = "MIXTRAL_CHAT_STARTUP_REPORT"
TIMEOUT_S = 60.0

PYTHON_ONLY = "import sys, time; open(sys.argv[1], 'w').write(f'interactive {time.time()}\\n')"
BARE_TEXTUAL = """
import sys, time
from textual.app import App
from textual.widgets import Footer, Label

class Bare(App):
    def compose(self):
        yield Label("hello")
        yield Footer()

    def on_mount(self):
        self.call_after_refresh(self.ready)

    def ready(self):
        open(sys.argv[1], "w").write(f"interactive {time.time()}\\n")
        self.exit()

Bare().run()
"""


@dataclass
class Program:
    name: str
    argv: list[str]
    env: dict[str, str]


def run_in_pty(program: Program, report: Path) -> dict[str, float]:
    """Seconds from spawn to each mark the program reports ("interactive", and for mixtral-chat
    "history": the latest chat drawn), run in a 120x40 pseudo-terminal."""
    report.unlink(missing_ok=True)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40", **program.env}

    def drain() -> None:  # a full pty buffer would block the program's writes
        while True:
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break

    threading.Thread(target=drain, daemon=True).start()
    started = time.time()
    process = subprocess.Popen(
        program.argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    try:
        process.wait(timeout=TIMEOUT_S)  # each program exits on its own after its last mark
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    if process.returncode != 0 or not report.exists():
        raise RuntimeError(f"{program.name} exited with {process.returncode} without a report")
    marks = {}
    for line in report.read_text().splitlines():
        name, stamp = line.split()
        marks[name] = float(stamp) - started
    marks.setdefault("history", marks["interactive"])
    return marks


def make_history(home: Path) -> None:
    """200 chats; the most recent one with 40 messages of Markdown and code."""
    env = {**os.environ, "MIXTRAL_CHAT_HOME": str(home)}
    script = """
from mixtral_chat.app.storage import Storage
answer = ("Here is how:\\n\\n```python\\nfor i in range(10):\\n    print(i * i)\\n```\\n\\n"
          "- a **bold** point\\n- a `code` point\\n\\n" + "Some prose. " * 40)
with Storage() as storage:
    for index in range(200):
        chat = storage.create_conversation(f"Chat number {index}")
        turns = 20 if index == 199 else 2
        for turn in range(turns):
            storage.add_message(chat.id, "user", f"Question {turn} about squares?")
            storage.add_message(chat.id, "assistant", answer)
"""
    subprocess.run([sys.executable, "-c", script], env=env, check=True)


async def typing_latency(model_dir: Path, presses: int) -> tuple[dict[str, list[float]], int]:
    """Seconds from a key event reaching the app to the prompt holding the character: idle, then
    while an answer streams. (Pilot.press is not used: it waits until every widget is idle,
    which a streaming Markdown widget never is.)"""
    from dataclasses import replace

    from textual import events

    from mixtral_chat.app.chat_app import ChatApp
    from mixtral_chat.app.settings import Settings
    from mixtral_chat.app.storage import Storage

    settings = Settings()
    settings.generation = replace(settings.generation, temperature=0.0, max_tokens=3500)
    app = ChatApp(Storage(), settings, model=str(model_dir))
    times: dict[str, list[float]] = {"idle": [], "streaming": []}

    async def press(kind: str) -> None:
        prompt = app.chat_screen.prompt
        before = len(prompt.text)
        started = time.perf_counter()
        app.post_message(events.Key("x", "x"))
        while len(prompt.text) == before:
            await asyncio.sleep(0.0005)
        times[kind].append(time.perf_counter() - started)
        await asyncio.sleep(0.05)  # a fast typist: 20 keys a second

    async with app.run_test(size=(120, 40)) as pilot:
        while app.model_status.state not in ("ready", "failed"):
            await asyncio.sleep(0.05)
        if app.engine is None:
            raise RuntimeError(f"the model did not load: {app.model_status.error}")
        screen = app.chat_screen
        for _ in range(presses):
            await press("idle")
        screen.prompt.clear()
        await pilot.press(*"Tell me a very long story", "enter")
        while screen.generation is None or not screen.generation.pieces:
            await asyncio.sleep(0.01)
        for _ in range(presses):
            await press("streaming")
        pieces = screen.generation.pieces if screen.generation else -1
        await pilot.press("escape")
        while screen.generation is not None:
            await asyncio.sleep(0.01)
    return times, pieces


def print_typing(model_dir: Path, presses: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="bench-typing-"))
    os.environ["MIXTRAL_CHAT_HOME"] = str(home)
    import torch

    torch.set_num_threads(1)
    times, pieces = asyncio.run(typing_latency(model_dir, presses))
    shutil.rmtree(home, ignore_errors=True)
    if pieces < 0:
        raise RuntimeError("the answer ended before the last key press: measure with a longer one")
    print()
    print(
        f"key event to character in the prompt, {presses} presses each, headless, model "
        f"{model_dir.name} ({pieces} pieces streamed meanwhile)"
    )
    print()
    print("| prompt | median ms | p90 ms | max ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        ordered = sorted(values)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.1f} | {p90 * 1000:.1f} | {max(values) * 1000:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--typing", type=Path, metavar="MODEL_DIR", help="also measure key latency")
    parser.add_argument("--presses", type=int, default=40)
    args = parser.parse_args()

    here = str(Path(sys.executable).parent)  # the venv's own script first
    command = shutil.which("mixtral-chat", path=here) or shutil.which("mixtral-chat")
    if command is None:
        print("the mixtral-chat command is not installed (pip install -e .)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    empty_home, full_home = work / "empty", work / "history"
    make_history(full_home)
    report = work / "report.txt"
    programs = [
        Program("python (interpreter only)", [sys.executable, "-c", PYTHON_ONLY, str(report)], {}),
        Program("bare Textual app", [sys.executable, "-c", BARE_TEXTUAL, str(report)], {}),
        Program(
            "mixtral-chat, no history",
            [command],
            {REPORT_ENV: str(report), "MIXTRAL_CHAT_HOME": str(empty_home)},
        ),
        Program(
            "mixtral-chat, 200 chats (opens one of 40 messages)",
            [command],
            {REPORT_ENV: str(report), "MIXTRAL_CHAT_HOME": str(full_home)},
        ),
    ]
    for program in programs:  # warm the file cache once, untimed
        run_in_pty(program, report)
    times: dict[str, dict[str, list[float]]] = {
        program.name: {"interactive": [], "history": []} for program in programs
    }
    for _ in range(args.rounds):
        for program in programs:
            for mark, seconds in run_in_pty(program, report).items():
                times[program.name][mark].append(seconds)
    shutil.rmtree(work, ignore_errors=True)

    bare = statistics.median(times["bare Textual app"]["interactive"])
    print(f"startup to interactive, {args.rounds} interleaved rounds, 120x40 pty, {os.cpu_count()} CPUs")
    print()
    print("| program | interactive: median s | min s | max s | vs bare Textual | chat shown: median s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, marks in times.items():
        values = marks["interactive"]
        median = statistics.median(values)
        print(
            f"| {name} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {median / bare:.2f}x "
            f"| {statistics.median(marks['history']):.3f} |"
        )
    if args.typing is not None:
        print_typing(args.typing, args.presses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
