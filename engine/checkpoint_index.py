"""`model.safetensors.index.json`, read without torch so the CLI can check it before loading."""

from __future__ import annotations

import json
from pathlib import Path

from mixtral_chat.engine.errors import WeightsError

INDEX_FILE = "model.safetensors.index.json"


def read_weight_map(model_dir: str | Path) -> dict[str, str] | None:
    """The index's weight map (tensor key -> shard file name), or None when there is no index.

    A damaged index is a WeightsError that says what is wrong with it, e.g.
    `<dir>: model.safetensors.index.json is not valid JSON (line 3 col 5)`.
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    try:
        text = index.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise WeightsError(f"{model_dir}: {INDEX_FILE} is not valid JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise WeightsError(f"{model_dir}: {INDEX_FILE} is unreadable ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WeightsError(
            f"{model_dir}: {INDEX_FILE} is not valid JSON (line {exc.lineno} col {exc.colno})"
        ) from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
    ):
        raise WeightsError(f'{model_dir}: {INDEX_FILE} has no valid "weight_map" (tensor -> file names)')
    return weight_map
