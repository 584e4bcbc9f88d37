"""The local registry: one JSON file (models.json) in `data_dir()`, read with every entry
type-checked, and written atomically under a file lock so the TUI and the CLI can both write it.

It records pulled/added models, where their files are (the snapshot in the Hugging Face cache,
the quantized directory), the quantization scheme, and the default model.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mixtral_chat.engine import paths
from mixtral_chat.engine.fileio import write_json_atomic
from mixtral_chat.engine.models.errors import RegistryError

REGISTRY_FILE = "models.json"
REGISTRY_VERSION = 1


def registry_path() -> Path:
    return paths.data_dir() / REGISTRY_FILE


def models_dir() -> Path:
    """Quantized model directories live here: `<name>-<scheme>`."""
    return paths.data_dir() / "models"


def _empty_registry() -> dict[str, Any]:
    return {"version": REGISTRY_VERSION, "default": None, "models": {}}


def read_registry() -> dict[str, Any]:
    path = registry_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _empty_registry()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RegistryError(
            f"{path} is unreadable ({' '.join(str(exc).split())}); fix or move it away (models stay on disk)"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise RegistryError(f"{path} is not a mixtral-chat model registry; fix or move it away")
    version = raw.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise RegistryError(
            f"{path}: 'version' must be a number, not {_json_type(version)}; fix or move it away"
        )
    if version > REGISTRY_VERSION:
        raise RegistryError(f"{path} was written by a newer mixtral-chat (version {raw['version']})")
    raw.setdefault("default", None)
    if raw["default"] is not None and not isinstance(raw["default"], str):
        raise RegistryError(
            f"{path}: 'default' must be a model name, not {_json_type(raw['default'])}; fix or remove it"
        )
    for name, record in raw["models"].items():
        problem = _record_problem(record)
        if problem is not None:
            raise RegistryError(
                f"{path}: entry '{name}' {problem}; fix or remove that entry (its model files stay on disk)"
            )
    return raw


# The fields a registry entry may have, with their JSON types (each may also be null).
_RECORD_FIELDS: dict[str, type] = {
    "source": str,
    "repo_id": str,
    "revision": str,
    "commit": str,
    "original_path": str,
    "quantized_path": str,
    "path": str,
    "scheme": str,
    "group_size": int,
    "state": str,
    "added": str,
    "download_bytes": int,
}
_SOURCES = ("catalog", "hub", "local")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    for kind, name in ((str, "a string"), (int, "a number"), (float, "a number"), (list, "a list")):
        if isinstance(value, kind):
            return name
    return "an object" if isinstance(value, dict) else type(value).__name__


def _record_problem(record: Any) -> str | None:
    """What is wrong with one entry of models.json, or None."""
    if not isinstance(record, dict):
        return f"must be a JSON object, not {_json_type(record)}"
    for key, kind in _RECORD_FIELDS.items():
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = "a number" if kind is int else "a string"
            return f"has '{key}' {_json_type(value)} ({value!r:.40}) where {expected} belongs"
    if record.get("source") is not None and record["source"] not in _SOURCES:
        return f"has an unknown source '{record['source']}' (one of {', '.join(_SOURCES)})"
    if record.get("source") == "local" and not record.get("path"):
        return "is a local model without a 'path'"
    return None


def _write_registry(data: dict[str, Any]) -> None:
    write_json_atomic(registry_path(), data, sort_keys=True)


@contextlib.contextmanager
def registry_update() -> Iterator[dict[str, Any]]:
    """Read-modify-write under a lock shared by every process that uses this data folder."""
    from filelock import FileLock

    lock_path = paths.data_dir() / f"{REGISTRY_FILE}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path, timeout=30):
        data = read_registry()
        yield data
        _write_registry(data)


def timestamp_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
