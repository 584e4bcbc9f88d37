"""A guard against network use, for a process of the fault-matrix tests.

`install(log)` adds a Python audit hook (PEP 578) that sees every name lookup and every connect
the interpreter makes (`socket.getaddrinfo`, `socket.gethostbyname`, `socket.connect`,
`socket.sendto`, from any library that goes through Python's socket module: huggingface_hub,
httpx, requests, urllib). A lookup or connect to anything but this machine's loopback (or a Unix
socket) is written to `log`, one line each, and fails with an OSError, as on a machine without
network. Audit hooks cannot be removed: the guard holds until the process ends.

Run a command under it: `python -c guard_code(log) + CLI_MAIN ARGS...`.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

_EVENTS = (
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyname_ex",
    "socket.connect",
    "socket.connect_ex",
    "socket.sendto",
    "socket.sendmsg",
)
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: object) -> bool:
    """True for a loopback name or address (127.0.0.0/8, ::1); None and '' mean this machine."""
    if host in (None, b"", ""):
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    text = str(host).strip("[]").lower()
    if text in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return False


def _target(event: str, args: tuple) -> object:
    """The host that the event reaches for, or None for a local (Unix) socket."""
    if event.startswith("socket.gethostbyname") or event == "socket.getaddrinfo":
        return args[0]
    address = args[1]
    sock = args[0]
    if getattr(sock, "family", None) == socket.AF_UNIX or not isinstance(address, tuple):
        return None
    return address[0]


def install(log: Path) -> None:
    def hook(event: str, args: tuple) -> None:
        if event not in _EVENTS:
            return
        host = _target(event, args)
        if host is None or is_loopback(host):
            return
        with open(log, "a", encoding="utf-8") as file:
            file.write(f"{event} {host!r}\n")
        raise OSError(f"network guard: {event} to {host!r} refused")

    sys.addaudithook(hook)


def guard_code(log: Path) -> str:
    """Python source that installs the guard in the process that runs it (`python -c`)."""
    here = str(Path(__file__).parent)
    return (
        f"import sys; sys.path.insert(0, {here!r}); import netguard; netguard.install({str(log)!r}); "
        "sys.path.pop(0)\n"
    )


# After `guard_code`: the real CLI on the command line's arguments.
CLI_MAIN = "from mixtral_chat.app.cli import main; sys.exit(main(sys.argv[1:]))\n"
