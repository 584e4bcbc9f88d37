"""Is it a Mixtral? Config and model-directory checks, before anything is downloaded or loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine.checkpoint import CONFIG_FILE, TOKENIZER_FILE
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import ConfigError, ModelNotFoundError
from mixtral_chat.engine.models.errors import UnsupportedArchitectureError
from mixtral_chat.engine.models.hub_cache import weight_files


def validate_config(raw: Any, source: str) -> ModelArgs:
    """A Mixtral (MoE) config or a clear error; returns the parsed shape."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    architectures = [str(a) for a in raw.get("architectures") or []]
    model_type = raw.get("model_type")
    is_mixtral = model_type == "mixtral" or any(a.startswith("Mixtral") for a in architectures)
    if not is_mixtral and (model_type is not None or architectures or "num_local_experts" not in raw):
        what = model_type or (architectures[0] if architectures else "no model_type/architectures")
        raise UnsupportedArchitectureError(
            f"{source}: unsupported architecture '{what}' (mixtral-chat runs Mixtral models: "
            "model_type 'mixtral', MixtralForCausalLM)"
        )
    return ModelArgs.from_dict(raw, source=source)


def validate_model_dir(path: Path) -> ModelArgs:
    config = path / CONFIG_FILE
    if not config.is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a model directory")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{config}: not valid JSON ({exc})") from None
    args = validate_config(raw, str(config))
    if not (path / TOKENIZER_FILE).is_file():
        raise ModelNotFoundError(f"{path} has no tokenizer.model (mixtral-chat needs the sentencepiece file)")
    quantized = ckpt.detect(path).kind == ckpt.QUANTIZED
    if not quantized and not weight_files(path):
        raise ModelNotFoundError(f"{path} has no safetensors weights")
    return args
