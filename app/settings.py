"""User settings as TOML in the config folder: generation defaults, engine options, theme,
keymap (binding id -> keys), personas (name -> system prompt) and remote endpoints (name -> an
OpenAI-compatible server; `backend` names the one that answers instead of the local engine).

Read with tomllib; written by a small writer (tables of strings, numbers and booleans, and the
endpoints' tables under [endpoints]) through a temp file and os.replace, so a crash never leaves
half a file. The temp file is created 0600 (mkstemp), so the file stays private to its user: an
endpoint's key may be stored in it. A broken file is reported with its path and line, and never
overwritten by the app.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.options import GenerationConfig, GenerationConfigError, LoadOptions, LoadOptionsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_FILENAME = "config.toml"

DEFAULT_PERSONAS: dict[str, str] = {
    "Concise assistant": "You are a helpful assistant. Answer briefly and precisely.",
    "Code reviewer": (
        "You are a careful senior software engineer. Point out bugs, unclear names and missing "
        "tests, and show corrected code."
    ),
}


# Sampling for new chats (each chat may override it); the engine's own defaults are greedy.
NEW_CHAT_GENERATION = GenerationConfig(temperature=0.7, top_p=0.95, top_k=0, max_tokens=1024)


class SettingsError(MixtralChatError):
    """The config file cannot be read or holds a value of the wrong type."""


@dataclass(frozen=True)
class Endpoint:
    """A remote OpenAI-compatible server (vLLM, llama-server, Ollama's /v1, mixtral-chat serve)."""

    url: str  # the API root, http://HOST:PORT/v1
    model: str | None = None  # None: the first its /v1/models lists
    api_key_env: str | None = None  # the environment variable that holds the key
    api_key: str | None = field(default=None, repr=False)  # or the key itself, kept in the 0600 file

    def key(self) -> str | None:
        """The key to send: the stored one, else the environment variable's (None: no key)."""
        import os

        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None


@dataclass
class Settings:
    model: str | None = None  # catalog name, repo id or path; None: the registry's default
    theme: str = "textual-dark"
    show_sidebar: bool = True
    show_cache_panel: bool = False
    generation: GenerationConfig = NEW_CHAT_GENERATION  # frozen: shared safely
    engine: LoadOptions = field(default_factory=LoadOptions)  # applied at the next model load
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> "key1,key2"
    personas: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PERSONAS))
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    backend: str | None = None  # the endpoint that answers; None: the local engine


def default_config_path() -> Path:
    from mixtral_chat.engine.paths import config_dir

    return config_dir() / CONFIG_FILENAME


def load_settings(path: Path | None = None) -> Settings:
    """The settings in `path` (default: config.toml in the config folder); defaults if absent."""
    path = path if path is not None else default_config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Settings()
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{path}: {exc}") from exc
    try:
        return settings_from_dict(data)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from exc


def settings_from_dict(data: dict[str, Any]) -> Settings:
    """Build Settings from parsed TOML; unknown keys are ignored (a newer version's file)."""
    settings = Settings()
    for item in fields(Settings):
        if item.name not in data:
            continue
        value = data[item.name]
        if item.name == "generation":
            try:
                settings.generation = _dataclass_from(settings.generation, value, "generation")
            except GenerationConfigError as exc:
                raise SettingsError(str(exc)) from None
        elif item.name == "engine":
            settings.engine = _dataclass_from(settings.engine, value, "engine")
            try:
                settings.engine.check()
            except LoadOptionsError as exc:
                raise SettingsError(f"engine.{exc}") from None
        elif item.name in ("keymap", "personas"):
            setattr(settings, item.name, _string_table(value, item.name))
        elif item.name == "endpoints":
            settings.endpoints = _endpoints(value)
        else:
            setattr(
                settings, item.name, _check_type(item.name, value, getattr(Settings(), item.name), item.type)
            )
    if settings.backend is not None and settings.backend not in settings.endpoints:
        raise SettingsError(f"backend {settings.backend!r} is not one of the [endpoints.NAME] tables")
    return settings


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    from mixtral_chat.engine.fileio import write_atomic

    path = path if path is not None else default_config_path()
    write_atomic(path, dumps_toml(asdict(settings)))
    return path


def dumps_toml(data: dict[str, Any]) -> str:
    """TOML for a dict of scalars and one level of tables (None values are left out)."""
    lines = ["# mixtral-chat settings (written by the app; comments are not kept)"]
    tables = {key: value for key, value in data.items() if isinstance(value, dict)}
    for key, value in data.items():
        if value is not None and not isinstance(value, dict):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for table, entries in tables.items():
        lines += ["", f"[{_toml_key(table)}]"]
        for key, value in entries.items():
            if value is not None and not isinstance(value, dict):
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in entries.items():  # [endpoints.NAME]: one table per entry
            if isinstance(value, dict):
                lines += ["", f"[{_toml_key(table)}.{_toml_key(key)}]"]
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    if key and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in key):
        return key
    return _toml_string(key)


def _toml_string(text: str) -> str:
    # A JSON string is a valid TOML basic string: the same escapes (\" \\ \n \t \uXXXX).
    return json.dumps(text, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SettingsError(f"cannot store a non-finite number ({value}) in the config")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    raise SettingsError(f"cannot store a {type(value).__name__} in the config")


def _dataclass_from(defaults: Any, value: Any, table: str) -> Any:
    """`defaults` with the table's keys replaced, each type-checked (the dataclass checks bounds)."""
    if not isinstance(value, dict):
        raise SettingsError(f"[{table}] must be a table")
    changes = {
        item.name: _check_type(
            f"{table}.{item.name}", value[item.name], getattr(defaults, item.name), item.type
        )
        for item in fields(defaults)
        if item.name in value
    }
    return replace(defaults, **changes)


def _check_type(name: str, value: Any, default: Any, annotation: Any) -> Any:
    """Accept `value` if it has the type of the field (ints where floats are expected too)."""
    text = str(annotation)
    allowed: list[type] = []
    for type_name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if type_name in text:
            allowed.append(kind)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in allowed:
        raise SettingsError(f"{name} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
    if not isinstance(value, tuple(allowed)):
        raise SettingsError(f"{name} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
    return value


def _endpoints(value: Any) -> dict[str, Endpoint]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise SettingsError("[endpoints] must hold one [endpoints.NAME] table per endpoint")
    endpoints = {}
    for name, table in value.items():
        if not isinstance(table.get("url"), str) or "://" not in table["url"]:
            raise SettingsError(f"endpoints.{name}.url must be a URL such as http://127.0.0.1:8000/v1")
        endpoints[name] = _dataclass_from(Endpoint(url=table["url"]), table, f"endpoints.{name}")
    return endpoints


def _string_table(value: Any, table: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise SettingsError(f"[{table}] must be a table of strings")
    return dict(value)
