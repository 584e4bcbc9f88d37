"""`mixtral-chat history`: list, show, search, export and delete the stored conversations (the
chat app's and `ask`'s, one database).

Plain SQLite through app/storage (imported when an action runs, not at CLI start-up): no torch,
no Textual. A database that does not exist yet is read as empty and not created.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mixtral_chat.app.argtypes import int_range
from mixtral_chat.app.errors import UsageError
from mixtral_chat.app.terminal import ask_yes_no
from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.fileio import write_atomic
from mixtral_chat.engine.units import format_age

if TYPE_CHECKING:
    from mixtral_chat.app.storage import Storage

# Matched words in `search` snippets on a terminal: bold, as grep --color shows them.
BOLD, RESET = "\x1b[1m", "\x1b[0m"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "history",
        help="list, show, search, export and delete stored conversations",
        description="The conversations of the chat app and of `ask`, kept in one database "
        "(`mixtral-chat paths` shows where).",
    )
    parser.set_defaults(handler=run, history_command=None)
    actions = parser.add_subparsers(dest="history_command", metavar="ACTION", parser_class=type(parser))

    list_parser = actions.add_parser("list", help="conversations, most recent first (default action)")
    list_parser.add_argument("--json", action="store_true", help="machine-readable output")

    show = actions.add_parser("show", help="print a conversation's turns")
    show.add_argument("id", type=int_range("ID", 1), metavar="ID")

    search = actions.add_parser("search", help="full-text search over every message")
    search.add_argument("query", metavar="QUERY", help="words that must all match (the last one as a prefix)")
    search.add_argument("--limit", type=int_range("--limit", 1), default=50, help="at most N hits (50)")
    search.add_argument("--json", action="store_true", help="machine-readable output")

    export = actions.add_parser("export", help="write a conversation as Markdown or JSON")
    export.add_argument("id", type=int_range("ID", 1), metavar="ID")
    export.add_argument("--format", choices=("md", "json"), default="md", help="md (default) or json")
    export.add_argument("-o", "--output", metavar="FILE", help="write FILE (atomically) instead of stdout")

    rm = actions.add_parser("rm", help="delete a conversation (asks first on a terminal)")
    rm.add_argument("id", type=int_range("ID", 1), metavar="ID")
    rm.add_argument("-y", "--yes", action="store_true", help="delete without asking")


def run(args: argparse.Namespace) -> int:
    command = args.history_command or "list"
    handler = {"list": _list, "show": _show, "search": _search, "export": _export, "rm": _rm}[command]
    return handler(args)


def _open() -> Storage | None:
    """The conversation database; None if there is none yet (nothing is created)."""
    from mixtral_chat.app.storage import Storage, default_db_path

    path = default_db_path()
    if not path.exists():
        return None
    storage, repaired = Storage.checked(path)  # damage: the one line that says what to do
    for notice in repaired:
        print(f"mixtral-chat: warning: {notice}", file=sys.stderr)
    return storage


def _no_conversation(conversation_id: int) -> MixtralChatError:
    return MixtralChatError(f"no conversation with id {conversation_id}")


# -- list ---------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    storage = _open()
    if storage is None:
        conversations, counts, busy = [], {}, {}
    else:
        with storage:
            conversations = storage.list_conversations()
            counts = storage.message_counts()
            busy = storage.busy_conversations()
    if getattr(args, "json", False):  # `history` alone lists, without the list flags
        rows = [
            {
                "id": c.id,
                "title": c.title,
                "created_at": c.created_at,
                "updated_at": c.updated_at,
                "messages": counts.get(c.id, 0),
                "model": c.model,
                "busy": c.id in busy,
            }
            for c in conversations
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not conversations:
        print('No conversations yet: `mixtral-chat ask "..."` or the chat app starts one.')
        return 0
    now = time.time()
    table = [("ID", "AGE", "MESSAGES", "TITLE")]
    for c in conversations:
        age = "busy" if c.id in busy else format_age(now - c.updated_at)
        table.append((str(c.id), age, str(counts.get(c.id, 0)), c.title))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        # Numbers right-aligned, the title last and as long as it is.
        print(f"{row[0].rjust(widths[0])}  {row[1].ljust(widths[1])}  {row[2].rjust(widths[2])}  {row[3]}")
    return 0


# -- show ---------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    storage = _open()
    if storage is None:
        raise _no_conversation(args.id)
    with storage:
        conversation = storage.get_conversation(args.id)
        messages = storage.messages(args.id)
        busy = storage.busy_conversations()
    age = format_age(time.time() - conversation.updated_at)
    updated = "updated just now" if age == "now" else f"updated {age} ago"
    facts = [f"{len(messages)} messages", "being answered now" if args.id in busy else updated]
    if conversation.model:
        facts.insert(0, f"model {conversation.model}")
    print(f"#{conversation.id} {conversation.title}")
    print(" · ".join(facts))
    if conversation.system_prompt:
        print(f"\n[system]\n{conversation.system_prompt}")
    for message in messages:
        label = message.role
        if message.status != "complete":
            label += f" ({_status_word(message.status)})"
        print(f"\n[{label}]\n{message.content}")
    return 0


def _status_word(status: str) -> str:
    return {"stopped": "stopped", "streaming": "incomplete", "error": "failed"}.get(status, status)


# -- search -------------------------------------------------------------------------------------


def _search(args: argparse.Namespace) -> int:
    from mixtral_chat.app.storage import fts_query

    if not fts_query(args.query):
        raise UsageError("QUERY needs at least one word to search for")
    storage = _open()
    hits = []
    if storage is not None:
        with storage:
            hits = storage.search(args.query, limit=args.limit)
    if args.json:
        rows = [
            {
                "conversation_id": hit.conversation_id,
                "title": hit.conversation_title,
                "message_id": hit.message_id,
                "role": hit.role,
                "snippet": _plain(hit.snippet),
            }
            for hit in hits
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print(f"mixtral-chat: no message matches {args.query!r}", file=sys.stderr)
        return 0
    highlight = sys.stdout.isatty()
    id_width = max(len(str(hit.conversation_id)) for hit in hits)
    title_width = max(len(hit.conversation_title) for hit in hits)
    for hit in hits:
        snippet = _highlighted(hit.snippet) if highlight else _plain(hit.snippet)
        print(
            f"{str(hit.conversation_id).rjust(id_width)}  {hit.conversation_title.ljust(title_width)}  "
            f"{hit.role}: {snippet}"
        )
    return 0


def _plain(snippet: str) -> str:
    """A snippet on one line without its match markers."""
    from mixtral_chat.app.storage import MATCH_END, MATCH_START

    return " ".join(snippet.replace(MATCH_START, "").replace(MATCH_END, "").split())


def _highlighted(snippet: str) -> str:
    from mixtral_chat.app.storage import MATCH_END, MATCH_START

    return " ".join(snippet.replace(MATCH_START, BOLD).replace(MATCH_END, RESET).split())


# -- export -------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    storage = _open()
    if storage is None:
        raise _no_conversation(args.id)
    with storage:
        if args.format == "json":
            text = json.dumps(storage.export_json(args.id), indent=2, ensure_ascii=False) + "\n"
        else:
            text = storage.export_markdown(args.id)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    target = Path(args.output).expanduser()
    if target.is_dir():
        raise MixtralChatError(f"{target} is a folder: give a file name to export to")
    write_atomic(target, text)
    print(f"mixtral-chat: exported chat {args.id} to {target}", file=sys.stderr)
    return 0


# -- rm -----------------------------------------------------------------------------------------


def _rm(args: argparse.Namespace) -> int:
    from mixtral_chat.app.storage import ConversationBusy

    storage = _open()
    if storage is None:
        raise _no_conversation(args.id)
    with storage:
        conversation = storage.get_conversation(args.id)
        versions = storage.message_versions(args.id) or {}
        busy = storage.busy_conversations()
        if args.id in busy:
            raise ConversationBusy(args.id, busy[args.id])
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError("no terminal to confirm on: add -y to delete without asking")
            question = f"Delete chat {args.id} '{conversation.title}' ({len(versions)} messages)? [y/N] "
            if not ask_yes_no(question):
                print(f"mixtral-chat: chat {args.id} kept", file=sys.stderr)
                return 1
        # Guarded: refused if another app started answering in it, or changed it, meanwhile.
        storage.delete_conversation(args.id, expected=versions)
    print(f"deleted chat {args.id} '{conversation.title}'")
    return 0
