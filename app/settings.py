"""User settings as TOML in the config folder: generation defaults, engine options, theme,
keymap (binding id -> keys) and personas (name -> system prompt).

Read with tomllib; written by a small writer (only tables of strings, numbers, booleans and
tables of strings occur) through a temp file and os.replace, so a crash never leaves half a file.
A broken file is reported with its path and line, and never overwritten by the app.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mixtral_chat.engine.errors import MixtralChatError

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


class SettingsError(MixtralChatError):
    """The config file cannot be read or holds a value of the wrong type."""


@dataclass
class GenerationDefaults:
    """Sampling defaults for new chats; each chat may override them."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_tokens: int = 1024
    seed: int | None = None

    def validate(self) -> None:
        if not (0.0 <= self.temperature <= 5.0) or math.isnan(self.temperature):
            raise SettingsError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise SettingsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SettingsError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.max_tokens < 1:
            raise SettingsError(f"max_tokens must be at least 1, got {self.max_tokens}")


@dataclass
class EngineSettings:
    """How the model is loaded; applied at the next model load."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"
    quant: str | None = None  # None: as stored on disk; "none" | "int4" | "nf4"
    offload: bool = False  # experts in host RAM (or on disk), a cache of them on the device
    experts_per_layer: int | None = None  # offloading: experts kept on the device per layer
    gpu_budget_gb: float | None = None  # offloading: memory budget for the planner
    prefetch: bool = False  # offloading: speculative expert loading (measured slower; see BENCHMARKS)
    offload_store: str = "ram"  # "ram" | "disk"
    context_length: int | None = None  # None: the model's own


@dataclass
class Settings:
    model: str | None = None  # catalog name, repo id or path; None: the registry's default
    theme: str = "textual-dark"
    show_sidebar: bool = True
    show_cache_panel: bool = False
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    engine: EngineSettings = field(default_factory=EngineSettings)
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> "key1,key2"
    personas: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PERSONAS))


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
            settings.generation = _dataclass_from(GenerationDefaults, value, "generation")
            settings.generation.validate()
        elif item.name == "engine":
            settings.engine = _dataclass_from(EngineSettings, value, "engine")
        elif item.name in ("keymap", "personas"):
            setattr(settings, item.name, _string_table(value, item.name))
        else:
            setattr(
                settings, item.name, _check_type(item.name, value, getattr(Settings(), item.name), item.type)
            )
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
            if value is not None:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
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


def _dataclass_from(cls: type, value: Any, table: str) -> Any:
    if not isinstance(value, dict):
        raise SettingsError(f"[{table}] must be a table")
    instance = cls()
    for item in fields(cls):
        if item.name in value:
            setattr(
                instance,
                item.name,
                _check_type(
                    f"{table}.{item.name}", value[item.name], getattr(instance, item.name), item.type
                ),
            )
    return instance


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


def _string_table(value: Any, table: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise SettingsError(f"[{table}] must be a table of strings")
    return dict(value)
