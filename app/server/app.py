"""The Starlette app: /health, /v1/models and /v1/chat/completions over one engine.

Each chat request is checked (schema.py), its prompt measured against the context, then it takes
its place in the FIFO queue (queue.py) before any response starts, so that a refusal is a status
code. Streaming answers are Server-Sent Events (`data: {chunk}` ... `data: [DONE]`) through
Starlette's StreamingResponse, which cancels the body when the client disconnects; the job then
stops the engine within one token (generation.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mixtral_chat.app.server.errors import ApiError, bad_request
from mixtral_chat.app.server.generation import Finished, GenerationJob
from mixtral_chat.app.server.queue import EngineQueue, Turn
from mixtral_chat.app.server.schema import ChatRequest, parse_chat_request
from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.options import GenerationConfig

if TYPE_CHECKING:
    from mixtral_chat.engine.runtime import Engine

# A chat request is text: 2 MiB is several times a full 32k-token context written as JSON.
MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_WAITING = 16
OWNER = "mixtral-chat"


@dataclass(frozen=True)
class ServerOptions:
    api_key: str | None = None  # None: no key asked for (loopback only, checked by the CLI)
    max_waiting: int = DEFAULT_MAX_WAITING
    max_body_bytes: int = MAX_BODY_BYTES
    cors_origins: tuple[str, ...] = ()


def log(line: str) -> None:
    """One line per answer or refusal on stderr. Never a header, so never a key."""
    print(f"mixtral-chat serve: {line}", file=sys.stderr, flush=True)


class ChatServer:
    """The routes' state: the engine, its queue, the options."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.queue = EngineQueue(options.max_waiting)
        self.created = int(time.time())
        self._key = options.api_key.encode() if options.api_key else None

    # -- routes -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "running": self.queue.running, "waiting": self.queue.waiting})

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_key(request)
        self.check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    async def chat_completions(self, request: Request) -> Response:
        self.check_key(request)
        chat = parse_chat_request(await self.read_body(request))
        self.check_model(chat.model)
        config = self.generation_config(chat)
        stop_event = threading.Event()
        stream = self.engine.chat(chat.messages, config, stop_event=stop_event)
        turn = self.queue.admit()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"

        def done(finished: Finished) -> None:  # on the loop, once the engine is free
            self.queue.release(turn)
            self.log_end(completion_id, finished)

        job = GenerationJob(stream, stop_event, chat.stop, done)
        if chat.stream:
            body = self.sse_chunks(chat, job, turn, completion_id)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        return await self.whole_answer(request, chat, job, turn, completion_id)

    # -- checks -------------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Constant time, so that the answer's timing does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key):
            raise ApiError(
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                type="authentication_error",
                code="invalid_api_key",
            )

    def check_model(self, model: str) -> None:
        if model != self.engine.info.name:
            raise ApiError(
                404,
                f"the model '{model}' does not exist here; this server has '{self.engine.info.name}'",
                param="model",
                code="model_not_found",
            )

    async def read_body(self, request: Request) -> bytes:
        limit = self.options.max_body_bytes
        too_large = ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no Content-Length to trust
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def generation_config(self, chat: ChatRequest) -> GenerationConfig:
        """The engine's config. The prompt must leave a token for the answer; `max_tokens` is cut
        to the room the context leaves, so the engine never drops a turn the client sent."""
        try:
            prompt = len(self.engine.tokenizer.encode_chat(chat.messages))
        except MixtralChatError as exc:  # a malformed conversation (order of roles, empty reply)
            raise bad_request(str(exc), param="messages") from None
        context = self.engine.info.context_length
        room = context - prompt
        if room < 1:
            raise bad_request(
                f"the messages are {prompt} tokens, {1 - room} over what this model's context of "
                f"{context} tokens takes with one token for the answer; shorten them",
                param="messages",
                code="context_length_exceeded",
            )
        config = GenerationConfig(
            temperature=chat.temperature,
            top_p=chat.top_p,
            top_k=chat.top_k,
            seed=chat.seed,
        )
        return replace(config, max_tokens=min(chat.max_tokens or room, room))

    # -- answers ------------------------------------------------------------------------------

    async def whole_answer(
        self, request: Request, chat: ChatRequest, job: GenerationJob, turn: Turn, completion_id: str
    ) -> Response:
        async def answer() -> str:
            await self.queue.wait(turn)
            job.start()
            return "".join([piece async for piece in job.pieces()])

        work = asyncio.ensure_future(answer())
        gone = asyncio.ensure_future(until_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: stop its generation, or give up its place
            job.cancel()
            work.cancel()
            if not job.started:
                log(f"{completion_id}: the client went away while it waited")
            return Response(status_code=499)
        gone.cancel()
        text = work.result()
        finished = job.finished
        assert finished is not None
        if finished.error:
            raise ApiError(500, finished.error, type="server_error", code="generation_failed")
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.engine.info.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finished.finish_reason,
                    }
                ],
                "usage": usage(finished),
            }
        )

    async def sse_chunks(
        self, chat: ChatRequest, job: GenerationJob, turn: Turn, completion_id: str
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.engine.info.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if chat.include_usage:
                data["usage"] = None  # as OpenAI: null in every chunk but the last
            return sse(data)

        try:
            await self.queue.wait(turn)
            job.start()
            yield chunk({"role": "assistant", "content": ""})
            async for piece in job.pieces():
                yield chunk({"content": piece})
        except BaseException:  # cancelled: the client disconnected (or the server stops)
            job.cancel()
            if not job.started:
                log(f"{completion_id}: the client went away while it waited")
            raise
        finished = job.finished
        assert finished is not None
        if finished.error:
            error = ApiError(500, finished.error, type="server_error", code="generation_failed")
            yield sse(error.body())
        else:
            yield chunk({}, finished.finish_reason)
            if chat.include_usage:
                final = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.engine.info.name,
                    "choices": [],
                    "usage": usage(finished),
                }
                yield sse(final)
        yield "data: [DONE]\n\n"

    def log_end(self, completion_id: str, finished: Finished) -> None:
        stats = finished.stats
        if finished.error:
            log(f"{completion_id}: failed: {finished.error}")
        elif stats is not None:
            reason = finished.finish_reason
            if reason == "cancelled":
                reason = "cancelled: the client went away"
            log(
                f"{completion_id}: {stats.prompt_tokens} prompt + {stats.completion_tokens} completion "
                f"tokens, ttft {stats.ttft_s:.3f} s, {stats.decode_tok_s:.1f} tok/s, {reason}"
            )

    def model_card(self) -> dict[str, Any]:
        return {"id": self.engine.info.name, "object": "model", "created": self.created, "owned_by": OWNER}


def usage(finished: Finished) -> dict[str, Any]:
    stats = finished.stats
    prompt = stats.prompt_tokens if stats else 0
    completion = stats.completion_tokens if stats else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # OpenAI's field for a reused prompt prefix: a request that extends the previous
        # conversation finds its start in the engine's KV cache.
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0},
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    log(f"{request.method} {request.url.path}: {exc.status} {exc.message}")
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape too."""
    assert isinstance(exc, HTTPException)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


def build_app(engine: Engine, options: ServerOptions) -> Starlette:
    server = ChatServer(engine, options)
    middleware = []
    if options.cors_origins:  # none unless asked: a web page elsewhere must not reach the model
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(options.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={ApiError: api_error, HTTPException: http_error},
    )
    app.state.server = server
    return app
