"""`mixtral-chat` entry point: the TUI with no subcommand, else one of app/commands/*.

Start-up stays light: torch, transformers-free engine code and Textual are imported by the
command that needs them, never here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from mixtral_chat.app.commands import ask, bench, history, models, paths, plan, quantize, serve
from mixtral_chat.app.errors import UsageError, one_line_error

# Before torch loads OpenMP: threads that sleep instead of spinning when they wait. On a busy
# 2-core machine spinning threads made decode 2-14x slower (docs/BENCHMARKS.md), and the TUI
# needs a core for itself while tokens stream.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Each subcommand lives in app/commands/<module>.py with `register(subparsers)` and
# `run(args) -> int`. Registering is cheap: the modules import nothing heavy at top level.
COMMAND_MODULES = (ask, history, serve, models, quantize, bench, plan, paths)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits 2 itself
        # "argument --top-p: --top-p must be ..." (our validators name the flag): say it once.
        match = re.match(r"argument ([^:]+): (.*)$", message, re.DOTALL)
        if match and match[2].startswith(match[1].split("/")[-1] + " "):
            message = match[2]
        self.print_usage(sys.stderr)
        self.exit(2, f"mixtral-chat: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixtral-chat", description="Local chat with Mixtral-8x7B-Instruct.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--model", help="model for the chat app: catalog name, repo id or path")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser; the subcommand's usage is the one that helps
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    debug = args.debug or bool(os.environ.get("MIXTRAL_CHAT_DEBUG"))
    try:
        if args.command is None:
            from mixtral_chat.app.tui import run_tui

            return run_tui(model=args.model)
        return int(args.handler(args) or 0)
    except UsageError as exc:
        _command_parser(parser, args).print_usage(sys.stderr)
        print(f"mixtral-chat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`| head`): no error to say. Whatever is still buffered goes nowhere,
        # or the interpreter's last flush would complain; the shell's code for a closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:
        if debug:
            raise
        print(f"mixtral-chat: error: {one_line_error(exc)}", file=sys.stderr)
        return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixtral-chat")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost chosen subcommand's parser (`models list`'s usage is the one that helps)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _command_parser(action.choices[chosen], args)
    return parser


if __name__ == "__main__":
    sys.exit(main())
