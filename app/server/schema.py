"""A chat-completions request body, checked field by field into a `ChatRequest`.

What OpenAI's API accepts and this engine cannot do (n > 1, logprobs, tools, ...) is refused
with a 400 that names the field, rather than ignored: a client that asked for tools must not get
an answer that silently has none. Sampling values are checked against GenerationConfig's bounds
(engine/options.py), the one set the CLI and the settings use too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from mixtral_chat.app.server.errors import ApiError, bad_request
from mixtral_chat.engine.options import (
    MAX_TOKENS_MIN,
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TOP_K_MIN,
    TOP_P_ABOVE,
    TOP_P_MAX,
)

# OpenAI's defaults for what a request leaves out (temperature 1, not `ask`'s greedy 0): clients
# written against the API expect them.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant")  # "developer" is the newer name of "system"

# Accepted and used. `top_k` is not OpenAI's, but vLLM and llama-server take it the same way.
SUPPORTED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
}
# Accepted and without effect here: bookkeeping for the caller, or the value that means "off".
# The prompt-cache hints: this server reuses the KV prefix of the last answer whatever they say.
IGNORED = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
}
# Fields this engine cannot honour, unless given the value that means "not asked for".
UNSUPPORTED_UNLESS_OFF: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "moderation": (None,),
}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # the engine's messages: role and text only
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: up to the end of the context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The checked request; raises ApiError (400) naming the first bad field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(body)}")
    for name in body:
        if name not in SUPPORTED and name not in IGNORED and name not in UNSUPPORTED_UNLESS_OFF:
            raise bad_request(f"unrecognized request argument: {name}", param=name)
    for name, off in UNSUPPORTED_UNLESS_OFF.items():
        if name in body and not any(_same(body[name], value) for value in off):
            raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad_request(f"'n' must be 1 (one answer per request), got {json.dumps(n)}", param="n")

    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None)
    include_usage = False
    if options is not None:
        include_usage = _optional(options, "include_usage", bool, False, param="stream_options.include_usage")

    max_tokens = _max_tokens(body)
    return ChatRequest(
        model=_model(body),
        messages=_messages(body.get("messages")),
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", DEFAULT_TEMPERATURE, TEMPERATURE_MIN, TEMPERATURE_MAX),
        top_p=_top_p(body),
        top_k=_top_k(body),
        seed=_seed(body),
        stop=_stop(body.get("stop")),
    )


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: one of the ids that GET /v1/models lists", param="model")
    return model


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", param="messages")
    out = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object, got {_json_type(message)}", param=param)
        role = message.get("role")
        if role not in ROLES:
            allowed = ", ".join(ROLES)
            raise bad_request(
                f"{param}.role must be one of {allowed}, got {json.dumps(role)}", param=f"{param}.role"
            )
        for name in ("tool_calls", "function_call", "audio"):
            if message.get(name) is not None:
                raise bad_request(f"{param}.{name} is not supported by this server", param=f"{param}.{name}")
        role = "system" if role == "developer" else role
        out.append({"role": role, "content": _content(message.get("content"), f"{param}.content")})
    return out


def _content(content: Any, param: str) -> str:
    """A string, or a list of text parts (joined): images and audio are not for this model."""
    if isinstance(content, str):
        return _unicode(content, param)
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"{param}[{index}] must be a text part ({{'type': 'text', 'text': ...}}): "
                    "this model reads text only",
                    param=f"{param}[{index}]",
                )
            texts.append(_unicode(part["text"], f"{param}[{index}].text"))
        return "".join(texts)
    raise bad_request(
        f"{param} must be a string or a list of text parts, got {_json_type(content)}", param=param
    )


def _unicode(text: str, param: str) -> str:
    """JSON may escape a lone surrogate ("\\ud800"): that is no text, for the tokenizer or SQLite."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} is not valid Unicode (it holds a lone surrogate)", param=param) from None
    return text


def _max_tokens(body: dict[str, Any]) -> int | None:
    # max_completion_tokens is the newer name; when both are given, it wins (as at OpenAI).
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < MAX_TOKENS_MIN:
            raise bad_request(
                f"'{name}' must be an integer >= {MAX_TOKENS_MIN}, got {json.dumps(value)}", param=name
            )
        return value
    return None


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not low <= value <= high:
        raise bad_request(
            f"'{name}' must be a number from {low:g} to {high:g}, got {json.dumps(value)}", param=name
        )
    return float(value)


def _top_p(body: dict[str, Any]) -> float:
    value = body.get("top_p")
    if value is None:
        return DEFAULT_TOP_P
    if not _is_number(value) or not TOP_P_ABOVE < value <= TOP_P_MAX:
        raise bad_request(
            f"'top_p' must be a number in ({TOP_P_ABOVE:g}, {TOP_P_MAX:g}], got {json.dumps(value)}",
            param="top_p",
        )
    return float(value)


def _top_k(body: dict[str, Any]) -> int:
    value = body.get("top_k")
    if value is None or value == -1:  # vLLM's -1 means off, as our 0 does
        return 0
    if not _is_int(value) or value < TOP_K_MIN:
        raise bad_request(
            f"'top_k' must be 0 (off) or a positive integer, got {json.dumps(value)}", param="top_k"
        )
    return value


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not _is_int(value) or not SEED_MIN <= value <= SEED_MAX:
        raise bad_request(
            f"'seed' must be an integer from {SEED_MIN} to {SEED_MAX}, got {json.dumps(value)}", param="seed"
        )
    return value


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) and s for s in sequences):
        raise bad_request("'stop' must be a non-empty string or a list of them", param="stop")
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise bad_request(
            f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(sequences)}", param="stop"
        )
    return tuple(sequences)


def _optional(body: dict[str, Any], name: str, kind: type, default: Any, *, param: str | None = None) -> Any:
    key = name.rsplit(".", 1)[-1]
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        expected = {bool: "true or false", dict: "an object"}[kind]
        raise bad_request(
            f"'{param or name}' must be {expected}, got {json.dumps(value)}", param=param or name
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _same(value: Any, off: Any) -> bool:
    # `0 == False` in Python: a 0 must not pass for `false`, nor `false` for 0.
    return (type(value) is type(off) and value == off) or (off is None and value is None)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


__all__ = ["ApiError", "ChatRequest", "parse_chat_request"]
