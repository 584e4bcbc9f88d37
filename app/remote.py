"""Answers from a remote OpenAI-compatible server (vLLM, llama.cpp's llama-server, Ollama's /v1,
another `mixtral-chat serve`) with the local engine's shapes: a stream of text pieces whose
`stats` (GenerationStats) are measured here, on the client.

- `RemoteBackend(url, api_key)`: `models()` from GET /v1/models, `chat(...)` streams
  POST /v1/chat/completions (Server-Sent Events).
- `RemoteEngine`: a backend's model where the TUI holds an Engine (chat, info, cache_stats).
- Every failure is a RemoteError with one line: unreachable, time-out, 401, 404, an error event
  in the stream. The key is sent as a header and never put in a message.

httpx2 is imported where a request is made, never at CLI start-up.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.options import GenerationConfig

if TYPE_CHECKING:
    from mixtral_chat.engine.runtime import GenerationStats

CONNECT_TIMEOUT_S = 10.0
# Between two pieces of an answer: a queued request on a busy server, or a long prompt's prefill
# on a CPU, may take minutes before its first token.
READ_TIMEOUT_S = 600.0
# A model list is cheap on any server, however busy: one that sends none this soon (a port that
# accepts and stays silent) is an error line, not a model loading for ten minutes.
LIST_TIMEOUT_S = 20.0


class RemoteError(MixtralChatError):
    """A remote server could not be reached or refused the request: one line, no key in it."""


def api_base(url: str) -> str:
    """The API root: `http://host:8000` and `http://host:8000/v1/` both mean `http://host:8000/v1`."""
    base = url.strip().rstrip("/")
    if "://" not in base:
        raise RemoteError(f"--backend {url!r} is not a URL: give one like http://127.0.0.1:8000/v1")
    return base if base.endswith("/v1") else base + "/v1"


class RemoteStream:
    """Iterate for the answer's text pieces; `stats` is set once iteration ends (also when it
    ends early: a stop, an error), `model` is the model that answered."""

    def __init__(self, pieces: Iterator[str], model: str) -> None:
        self._pieces = pieces
        self.model = model
        self.stats: GenerationStats | None = None
        self.notices: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return self._pieces


class RemoteBackend:
    def __init__(
        self, url: str, api_key: str | None = None, *, read_timeout_s: float = READ_TIMEOUT_S
    ) -> None:
        self.base = api_base(url)
        self._api_key = api_key
        self._read_timeout_s = read_timeout_s

    def models(self) -> list[str]:
        """The ids that the server's GET /v1/models lists, in its order."""
        with self._client(min(self._read_timeout_s, LIST_TIMEOUT_S)) as client:
            response = self._send(client, "GET", "/models")
            raw = response.read()
            if response.status_code != 200:
                raise self._status_error(response, raw)
            try:
                data = json.loads(raw)["data"]
                return [str(item["id"]) for item in data]
            except (ValueError, KeyError, TypeError):
                raise RemoteError(f"{self.base}/models did not answer with a model list") from None

    def pick_model(self, wanted: str | None) -> str:
        """`wanted` if the server has it, else the first it lists (None: the first)."""
        served = self.models()
        if wanted is not None and wanted in served:
            return wanted
        if wanted is not None:
            listed = ", ".join(served[:10]) or "none"
            raise RemoteError(f"{self.base} has no model '{wanted}' (it serves: {listed})")
        if not served:
            raise RemoteError(f"{self.base} serves no model (GET /v1/models is empty)")
        return served[0]

    def chat(
        self,
        messages: list[dict[str, str]],
        config: GenerationConfig,
        model: str,
        stop_event: threading.Event | None = None,
    ) -> RemoteStream:
        """Start the answer; the request is sent when the stream is first iterated."""
        stream = RemoteStream(iter(()), model)
        stream._pieces = self._stream(messages, config, model, stop_event or threading.Event(), stream)
        return stream

    # -- the request ----------------------------------------------------------------------------

    def _stream(
        self,
        messages: list[dict[str, str]],
        config: GenerationConfig,
        model: str,
        stop_event: threading.Event,
        stream: RemoteStream,
    ) -> Iterator[str]:
        from mixtral_chat.engine.runtime import GenerationStats

        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_tokens": config.max_tokens,
        }
        if config.top_k:
            body["top_k"] = config.top_k  # not OpenAI's; vLLM, llama-server and serve take it
        if config.seed is not None:
            body["seed"] = config.seed
        start = time.perf_counter()
        first_at: float | None = None
        last_at = start
        pieces = 0
        usage: dict[str, Any] = {}
        finish = "cancelled"
        try:
            with self._client() as client:
                response = self._send(client, "POST", "/chat/completions", body, stream=True)
                try:
                    if response.status_code != 200:
                        raise self._status_error(response, response.read())
                    for event in self._events(response):
                        if "error" in event:
                            raise RemoteError(f"{self.base}: {_error_message(event)}")
                        usage = event.get("usage") or usage
                        for choice in event.get("choices") or []:
                            text = (choice.get("delta") or {}).get("content")
                            if text:
                                pieces += 1
                                last_at = time.perf_counter()
                                first_at = first_at or last_at
                                yield text
                            if choice.get("finish_reason"):
                                finish = str(choice["finish_reason"])
                        if stop_event.is_set():
                            finish = "cancelled"
                            return  # closing the response closes the stream: the server stops
                finally:
                    response.close()
        except GeneratorExit:  # the consumer stopped reading (Ctrl+C, a stop key)
            finish = "cancelled"
            raise
        finally:
            completion = int(usage.get("completion_tokens") or pieces)
            span = last_at - first_at if first_at is not None else 0.0
            stream.stats = GenerationStats(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=completion,
                ttft_s=(first_at or time.perf_counter()) - start,
                decode_tok_s=(completion - 1) / span if completion > 1 and span > 0 else 0.0,
                finish_reason=finish if finish in ("stop", "length") else "cancelled",  # type: ignore[arg-type]
            )

    def _client(self, read_timeout_s: float | None = None):
        import httpx2

        timeout = httpx2.Timeout(read_timeout_s or self._read_timeout_s, connect=CONNECT_TIMEOUT_S)
        return httpx2.Client(timeout=timeout, follow_redirects=False)

    def _send(self, client, method: str, path: str, body: dict | None = None, *, stream: bool = False):
        import httpx2

        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = self.base + path
        try:
            request = client.build_request(method, url, json=body, headers=headers)
            return client.send(request, stream=True)
        except httpx2.ConnectTimeout:
            raise RemoteError(
                f"cannot reach {self.base}: no connection within {CONNECT_TIMEOUT_S:g} s"
            ) from None
        except httpx2.TimeoutException:
            raise RemoteError(f"{url}: no answer within {client.timeout.read:g} s (time-out)") from None
        except httpx2.HTTPError as exc:
            raise RemoteError(f"cannot reach {self.base}: {_network_reason(exc)}") from None

    def _events(self, response) -> Iterator[dict[str, Any]]:
        """The JSON objects of the SSE `data:` lines, until `[DONE]`."""
        import httpx2

        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # comments (": ping"), `event:` lines, blank separators
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise RemoteError(
                        f"{self.base} sent a stream event that is not JSON: {data[:80]}"
                    ) from None
                if isinstance(event, dict):
                    yield event
        except httpx2.TimeoutException:
            raise RemoteError(
                f"{self.base}: no data for {self._read_timeout_s:g} s (time-out); the answer so far is kept"
            ) from None
        except httpx2.HTTPError as exc:
            raise RemoteError(f"{self.base}: the connection broke: {_network_reason(exc)}") from None

    def _status_error(self, response, raw: bytes) -> RemoteError:
        status = response.status_code
        code = None
        try:
            body = json.loads(raw)
            message = _error_message(body)
            code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        except (ValueError, AttributeError):
            message = " ".join(raw.decode("utf-8", "replace").split())[:200] or response.reason_phrase
        where = f"{self.base}: {status} {message}"
        if status == 401:
            return RemoteError(f"{where} (give the key with --api-key-env NAME)")
        if status == 404 and code != "model_not_found" and "model " not in message.lower():
            return RemoteError(f"{where} (is {self.base} an OpenAI-compatible API root, ending in /v1?)")
        return RemoteError(where)


def _error_message(body: Any) -> str:
    """OpenAI's `{"error": {"message": ...}}`, or llama-server's and Ollama's variants."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return " ".join(str(error.get("message") or error.get("detail") or error).split())
        return " ".join(str(error).split())
    return " ".join(str(body).split())[:200]


def _network_reason(exc: BaseException) -> str:
    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "No route to host", "timed out"):
        if known.lower() in text.lower():
            return known.lower()
    return " ".join(text.split()) or type(exc).__name__


class RemoteEngine:
    """A remote server's model where the app holds an Engine: `chat`, `info`, `cache_stats` and
    `close`, so the TUI's answer loop (chat_session.stream_answer) runs unchanged. `model` is None:
    there are no weights here (nor an expert cache to show)."""

    model = None

    def __init__(self, backend: RemoteBackend, model: str, label: str) -> None:
        from mixtral_chat.engine.runtime import EngineInfo

        self.backend = backend
        self.info = EngineInfo(
            name=model,
            path=Path(),
            device=f"remote: {label}",  # what the status bar shows after the model's name
            dtype="",
            scheme="",
            context_length=0,  # not told by /v1/models: the server cuts the answer itself
            n_params=0,
            n_active_params=0,
        )

    @classmethod
    def connect(cls, url: str, api_key: str | None, model: str | None, label: str) -> RemoteEngine:
        """Ask the server for its models; the one wanted (or its first) answers."""
        backend = RemoteBackend(url, api_key)
        return cls(backend, backend.pick_model(model), label)

    def chat(
        self,
        messages: list[dict[str, str]],
        config: GenerationConfig | None = None,
        stop_event: threading.Event | None = None,
    ) -> RemoteStream:
        return self.backend.chat(messages, config or GenerationConfig(), self.info.name, stop_event)

    def cache_stats(self) -> None:
        return None

    def close(self) -> None:
        pass  # each answer has its own connection, closed when it ends
