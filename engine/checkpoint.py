"""What a model directory holds, read without torch: file names, HF key names, the shard index and
the kind of checkpoint (`detect`).

Kinds:
    float      a Hugging Face safetensors checkpoint in a float dtype;
    quantized  a directory made by `mixtral-chat quantize` (it has quant_config.json; its scheme);
    bnb-4bit   a checkpoint transformers saved quantized (config.json has a `quantization_config`;
               bitsandbytes 4-bit is the kind mixtral-chat loads, others are refused on loading).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_chat.engine.errors import QuantizationError, WeightsError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QUANT_CONFIG_FILE = "quant_config.json"
TOKENIZER_FILE = "tokenizer.model"  # sentencepiece: Mixtral's tokenizer, needed to run a model

FLOAT = "float"
QUANTIZED = "quantized"
BNB_4BIT = "bnb-4bit"

BNB_QUANT_TYPES = ("nf4", "fp4")


def hf_to_module_name(key: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`."""
    return key.removeprefix("model.")


def module_to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


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


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a directory (from its index, or the single file)."""
    weight_map = read_weight_map(model_dir)
    if weight_map is not None:
        paths = [model_dir / f for f in sorted(set(weight_map.values()))]
        for path in paths:
            if not path.exists():
                raise WeightsError(f"{path}: shard listed in {INDEX_FILE} is missing")
        return paths
    single = model_dir / SINGLE_FILE
    if single.exists():
        return [single]
    raise WeightsError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")


def quantization_config(model_dir: str | Path) -> Any:
    """config.json's `quantization_config`, the mark of a checkpoint transformers saved quantized
    (None when it has none or cannot be read: reading the model's config reports that)."""
    try:
        raw = json.loads((Path(model_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return raw.get("quantization_config") if isinstance(raw, dict) else None


def read_quant_config_json(model_dir: str | Path) -> dict[str, Any] | None:
    """quant_config.json as a JSON object, or None when it is missing, unreadable or not an object
    (`quant.QuantConfig.read` checks it in full, with errors)."""
    try:
        raw = json.loads((Path(model_dir) / QUANT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def bnb_4bit_settings(model_dir: str | Path) -> tuple[str, bool]:
    """(quant type, double quant) of a bitsandbytes 4-bit checkpoint; QuantizationError for any
    other quantized (or a float) checkpoint."""
    source = Path(model_dir) / CONFIG_FILE
    config = quantization_config(model_dir)
    if config is None:
        raise QuantizationError(f"{source}: no quantization_config (not a bitsandbytes checkpoint)")
    if not isinstance(config, dict):
        raise QuantizationError(f"{source}: quantization_config must be a JSON object")
    method = config.get("quant_method")
    if method != "bitsandbytes":
        raise QuantizationError(
            f"{source}: quantization_config.quant_method {method!r} is not supported (mixtral-chat "
            "loads float checkpoints, bitsandbytes 4-bit ones and its own quantized directories)"
        )
    if config.get("load_in_8bit") or config.get("_load_in_8bit"):
        raise QuantizationError(
            f"{source}: 8-bit bitsandbytes checkpoints (load_in_8bit) are not supported; "
            "use a 4-bit one (load_in_4bit) or the original float checkpoint"
        )
    if not (config.get("load_in_4bit") or config.get("_load_in_4bit")):
        raise QuantizationError(f"{source}: a bitsandbytes quantization_config without load_in_4bit")
    quant_type = config.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's default
    if quant_type not in BNB_QUANT_TYPES:
        raise QuantizationError(
            f"{source}: quantization_config.bnb_4bit_quant_type must be nf4 or fp4, got {quant_type!r}"
        )
    return quant_type, bool(config.get("bnb_4bit_use_double_quant", False))


@dataclass(frozen=True)
class CheckpointKind:
    """What `detect` found in a model directory."""

    kind: str  # FLOAT | QUANTIZED | BNB_4BIT
    # QUANTIZED: quant_config.json's scheme (None when unreadable); BNB_4BIT: the 4-bit quant type
    # (None when config.json does not say load_in_4bit: loading it is refused).
    scheme: str | None = None
    # config.json's quantization_config (BNB_4BIT, or QUANTIZED when there is one).
    quantization_config: Any = None

    @property
    def label(self) -> str | None:
        """How `models list` names the scheme: `int4`, `nf4 (bitsandbytes)`; None for float."""
        if self.kind == BNB_4BIT and self.scheme is not None:
            return f"{self.scheme} (bitsandbytes)"
        return self.scheme if self.kind == QUANTIZED else None


def detect(model_dir: str | Path) -> CheckpointKind:
    """The kind of checkpoint in `model_dir` (never raises; loading reports what is wrong)."""
    model_dir = Path(model_dir)
    config = quantization_config(model_dir)
    if (model_dir / QUANT_CONFIG_FILE).is_file():
        return CheckpointKind(QUANTIZED, (read_quant_config_json(model_dir) or {}).get("scheme"), config)
    if config is None:
        return CheckpointKind(FLOAT)
    scheme = None
    if isinstance(config, dict) and config.get("load_in_4bit"):
        scheme = str(config.get("bnb_4bit_quant_type", "fp4"))
    return CheckpointKind(BNB_4BIT, scheme, config)
