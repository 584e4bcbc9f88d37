"""User-facing errors: each carries one line that the CLI and the TUI show as is."""

from __future__ import annotations


class MixtralChatError(Exception):
    """An error caused by the user's input or environment, shown as one line, exit code 1."""


class ConfigError(MixtralChatError):
    """A model's config.json is missing, unreadable, or has a missing/invalid field."""


class WeightsError(MixtralChatError):
    """Weights are missing, truncated, corrupt, or do not match the config."""


class TokenizerError(MixtralChatError):
    """The tokenizer file is missing or unusable, or a conversation is malformed."""


class ContextTooLongError(MixtralChatError):
    """Even the last turn of the conversation does not fit in the context window."""


class ModelNotFoundError(MixtralChatError):
    """A model name, repo id, or path does not resolve to a usable model."""


class QuantizationError(MixtralChatError):
    """A quantized model or quantization request is invalid."""


class OutOfMemoryError(MixtralChatError):
    """The model does not fit in the memory budget."""


class CacheError(MixtralChatError):
    """The Hugging Face cache cannot be changed without breaking what another tool cached there."""
