"""A real `mixtral-chat serve` in a subprocess on 127.0.0.1 (any free port: `--port 0`), for the
tests and the serve benchmark. Its stderr is read in a thread: the start-up lines give the URL,
and the server's one line per answer tells the tests how each generation ended."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

START_TIMEOUT_S = 120.0
_LISTENING = re.compile(r"listening on (http://\S+/v1)")


class ServeProcess:
    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mixtral_chat.app.cli", "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
            encoding="utf-8",
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        line = self.wait_for_line(lambda line: _LISTENING.search(line) is not None, START_TIMEOUT_S)
        match = _LISTENING.search(line)
        assert match is not None
        self.base_url = match[1]  # http://127.0.0.1:PORT/v1
        self.root_url = self.base_url.removesuffix("/v1")

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, matches: Callable[[str], bool], timeout: float = 60.0, start: int = 0) -> str:
        """The first stderr line from index `start` on that `matches`, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines[start:] if matches(line)), None)
                if found is not None:
                    return found
                if self.process.poll() is not None and not self._changed.wait(0.5):
                    raise AssertionError("the server exited:\n" + "\n".join(self.lines))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no such line from the server:\n" + "\n".join(self.lines))
                self._changed.wait(min(left, 0.5))

    def stop(self) -> int:
        """Ctrl+C, as a user stops it; killed if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
