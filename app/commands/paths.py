"""`mixtral-chat paths`: where data, config and logs live."""

from __future__ import annotations

import argparse

from mixtral_chat.engine import paths


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("paths", help="print where conversations, config and logs are kept")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print(f"data:   {paths.data_dir()}")
    print(f"config: {paths.config_dir()}")
    print(f"logs:   {paths.log_dir()}")
    print(f"assets: {paths.assets_dir()}")
    return 0
