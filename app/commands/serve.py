"""`mixtral-chat serve`: the model behind an OpenAI-compatible HTTP API (app/server/).

The usage checks (a key for a non-loopback address) and the port come before the model loads, so a
mistake costs no load. Starlette and uvicorn are imported in `run`, never at CLI start-up.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import TYPE_CHECKING

from mixtral_chat.app.argtypes import int_range
from mixtral_chat.app.commands.engine_flags import add_engine_arguments

if TYPE_CHECKING:
    from mixtral_chat.engine.runtime import Engine

API_KEY_ENV = "MIXTRAL_CHAT_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_QUEUE = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve the model at /v1/chat/completions and /v1/models (OpenAI's API). Binds "
        f"{DEFAULT_HOST} unless told otherwise; any other address needs an API key.",
    )
    parser.add_argument("--model", help="catalog name, repo id (org/name) or model directory")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=int_range("--port", 0, 65535), default=DEFAULT_PORT, help="0: any free port"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"the key clients must send (Authorization: Bearer KEY); or set {API_KEY_ENV}, which "
        "other users cannot read in the process list",
    )
    parser.add_argument(
        "--queue-size",
        type=int_range("--queue-size", 0),
        default=DEFAULT_QUEUE,
        help=f"requests that may wait for the engine; more get 429 (default {DEFAULT_QUEUE})",
    )
    parser.add_argument(
        "--cors",
        action="append",
        metavar="ORIGIN",
        default=[],
        help="allow browser pages from ORIGIN (repeatable); no cross-origin access unless given",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    add_engine_arguments(parser)
    parser.set_defaults(stats=False)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mixtral_chat.app.commands import ask

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    check_key_and_origins(api_key, args.cors)
    check_host(args.host, api_key)
    listener = open_listener(args.host, args.port)
    resolved = ask.resolve_the_model(args)
    engine = ask.load_engine(args, resolved)
    try:
        serve(args, engine, listener, api_key)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it shut down for: the normal way to stop
        pass
    finally:
        engine.close()
    print("mixtral-chat serve: stopped", file=sys.stderr)
    return 0


def check_key_and_origins(api_key: str | None, origins: list[str]) -> None:
    """A key a client could send, and origins a browser sends (the key itself is never said)."""
    from mixtral_chat.app.errors import UsageError

    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise UsageError(
            f"the API key (--api-key or {API_KEY_ENV}) is blank or starts or ends with spaces: "
            "clients could not send it"
        )
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise UsageError(f"--cors {origin!r}: give an origin such as http://localhost:3000, or *")


def check_host(host: str, api_key: str | None) -> None:
    """Anything but loopback is reachable from the network: only with a key."""
    from mixtral_chat.app.errors import UsageError

    if api_key is None and not is_loopback(host):
        raise UsageError(
            f"--host {host} is reachable from other machines: give an API key "
            f"(--api-key KEY or {API_KEY_ENV}), or keep the default {DEFAULT_HOST}"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def open_listener(host: str, port: int) -> socket.socket:
    from mixtral_chat.engine.errors import MixtralChatError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[
            0
        ]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MixtralChatError(f"cannot listen on {host}:{port}: {reason}") from None
    return listener


def serve(args: argparse.Namespace, engine: Engine, listener: socket.socket, api_key: str | None) -> None:
    import uvicorn

    from mixtral_chat.app.server.app import ServerOptions, build_app

    options = ServerOptions(api_key=api_key, max_waiting=args.queue_size, cors_origins=tuple(args.cors))
    app = build_app(engine, options)
    host, port = listener.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    info = engine.info
    placement = info.offload_plan or f"all experts resident on {info.device}"
    loaded = f"{info.device}, {info.dtype}, {info.scheme}, context {info.context_length} tokens"
    lines = [
        f"model {info.name} ({loaded})",
        f"plan: {placement}",
        f"API key: {'required' if api_key else 'none (loopback only)'}",
        f"listening on http://{shown_host}:{port}/v1 (Ctrl+C stops)",
    ]
    for line in lines:
        print(f"mixtral-chat serve: {line}", file=sys.stderr, flush=True)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # our own line per answer; never the headers
        lifespan="off",
        http="h11",
        ws="none",
        timeout_graceful_shutdown=3,
    )
    uvicorn.Server(config).run(sockets=[listener])
