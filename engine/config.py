"""`ModelArgs`: the shape of a Mixtral model, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_chat.engine.checkpoint import CONFIG_FILE
from mixtral_chat.engine.errors import ConfigError


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def n_params(self) -> int:
        """All parameters (every expert counted)."""
        return self._params(self.num_local_experts)

    @property
    def n_active_params(self) -> int:
        """Parameters used per token (top-k experts)."""
        return self._params(self.num_experts_per_tok)

    def kv_cache_bytes(self, context_length: int, itemsize: int) -> int:
        """Keys and values of every layer for `context_length` tokens, `itemsize` bytes each."""
        per_token = 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
        return per_token * context_length * itemsize

    def _params(self, experts: int) -> int:
        d, h, kv = self.hidden_size, self.head_dim, self.num_key_value_heads
        attention = d * h * self.num_attention_heads * 2 + d * h * kv * 2
        moe = experts * 3 * d * self.intermediate_size + self.num_local_experts * d
        per_layer = attention + moe + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + d

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelArgs:
        """Read a model directory's `config.json` (or the file itself); errors name file and field."""
        path = Path(path)
        file = path / CONFIG_FILE if path.is_dir() else path
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{file}: not found (a model directory needs a config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = CONFIG_FILE) -> ModelArgs:
        fields = _ConfigReader(raw, source)
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type not in (None, "mixtral") or (
            architectures and not any("Mixtral" in str(a) for a in architectures)
        ):
            raise ConfigError(
                f"{source}: unsupported architecture {model_type or architectures!r} "
                "(mixtral-chat runs Mixtral-architecture models)"
            )
        hidden_size = fields.positive_int("hidden_size")
        num_heads = fields.positive_int("num_attention_heads")
        num_kv_heads = fields.positive_int("num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ConfigError(f"{source}: hidden_size is not divisible by num_attention_heads")
            head_dim = hidden_size // num_heads
        else:
            head_dim = fields.positive_int("head_dim")
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")
        num_experts = fields.positive_int("num_local_experts")
        top_k = fields.positive_int("num_experts_per_tok")
        if top_k > num_experts:
            raise ConfigError(
                f"{source}: num_experts_per_tok ({top_k}) exceeds num_local_experts ({num_experts})"
            )
        # The real Mixtral config has rope_theta at the top level; transformers 5 writes
        # rope_parameters: {rope_theta, rope_type}.
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type {rope_type!r} is not supported")
            rope_theta = _ConfigReader(rope, f"{source}: rope_parameters").positive_float("rope_theta")
        else:
            rope_theta = fields.positive_float("rope_theta", default=1e6)
        sliding_window = raw.get("sliding_window")
        if sliding_window is not None:
            sliding_window = fields.positive_int("sliding_window")
        return cls(
            vocab_size=fields.positive_int("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=fields.positive_int("intermediate_size"),
            num_hidden_layers=fields.positive_int("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            rms_norm_eps=fields.positive_float("rms_norm_eps", default=1e-5),
            rope_theta=rope_theta,
            max_position_embeddings=fields.positive_int("max_position_embeddings", default=32768),
            sliding_window=sliding_window,
            tie_word_embeddings=fields.boolean("tie_word_embeddings", default=False),
            bos_token_id=fields.token_id("bos_token_id", default=1),
            eos_token_id=fields.token_id("eos_token_id", default=2),
        )


_MISSING = object()


class _ConfigReader:
    """Typed access to config fields, with errors that name the file and the field."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def _get(self, name: str, default: Any) -> Any:
        value = self.raw.get(name)
        if value is None:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: missing field '{name}'")
            return default
        return value

    def _invalid(self, name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{name}' must be {expected}, got {value!r}")

    def positive_int(self, name: str, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._invalid(name, value, "a positive integer")
        return value

    def positive_float(self, name: str, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self._invalid(name, value, "a positive number")
        return float(value)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self._invalid(name, value, "true or false")
        return value

    def token_id(self, name: str, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if isinstance(value, list) and value:  # some configs list several eos ids
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._invalid(name, value, "a token id")
        return value
