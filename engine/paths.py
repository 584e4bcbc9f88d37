"""Where mixtral-chat keeps its files (platformdirs), with an environment override for tests."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "mixtral-chat"
# One variable moves data, config and logs under one folder: tests and portable installs use it.
HOME_ENV = "MIXTRAL_CHAT_HOME"


def _base(kind: str) -> Path:
    override = os.environ.get(HOME_ENV)
    if override:
        home = Path(override)
        if home.exists() and not home.is_dir():  # every file under it would fail, each its own way
            from mixtral_chat.engine.errors import MixtralChatError

            raise MixtralChatError(f"{HOME_ENV}={override} is a file, not a folder: give it a folder")
        return home / kind
    import platformdirs

    getter = {
        "data": platformdirs.user_data_dir,
        "config": platformdirs.user_config_dir,
        "log": platformdirs.user_log_dir,
        "cache": platformdirs.user_cache_dir,
    }[kind]
    return Path(getter(APP_NAME, appauthor=False))


def data_dir() -> Path:
    return _base("data")


def config_dir() -> Path:
    return _base("config")


def log_dir() -> Path:
    return _base("log")


def cache_dir() -> Path:
    """What can be made again (the compiled native kernel)."""
    return _base("cache")


def assets_dir() -> Path:
    """The bundled assets folder (demo model), wherever the package is installed."""
    return Path(__file__).resolve().parent.parent / "assets"
