"""`mixtral-chat ask --backend URL`: the answer from a remote OpenAI-compatible server, printed as
the local `ask` prints it (streamed, or `--json`; `--stats` measured on this side).

The flags that only the local engine knows are refused with --backend (a usage error, exit 2),
so that nobody believes `--quant int4` changed what a remote vLLM runs. The exchange is stored
with the chat app's conversations as a local one is (`-c`/`--cid` continue it; `--no-log`).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import TYPE_CHECKING

from mixtral_chat.app.errors import UsageError
from mixtral_chat.engine.options import GenerationConfig

if TYPE_CHECKING:
    from mixtral_chat.app.conversation_log import ConversationLog
    from mixtral_chat.engine.runtime import GenerationStats

# Flags of the local engine, and the value each has when not given.
LOCAL_ONLY = {
    "device": "auto",
    "dtype": "auto",
    "quant": None,
    "context": None,
    "experts_per_layer": None,
    "gpu_mem": None,
    "offload": None,
    "prefetch": False,
    "cache_policy": "lru",
    "vocab_weights": "auto",
    "cuda_graphs": True,
    "trace_routing": None,
}


def run_remote(
    args: argparse.Namespace,
    messages: list[dict[str, str]],
    config: GenerationConfig,
    log: ConversationLog | None = None,
    *,
    prompt: str,
    system_prompt: str,
    generation: dict[str, float | int] | None = None,
) -> tuple[GenerationStats | None, bool]:
    """Print the answer to `messages` (and store the exchange in `log`, as the local `ask`
    does, a new chat keeping `generation`, the sampling flags given); returns its client-side
    stats and whether Ctrl+C stopped it."""
    from mixtral_chat.app.remote import RemoteBackend

    backend = RemoteBackend(args.backend or "", api_key(args))
    model = backend.pick_model(args.model)
    stop = threading.Event()
    stream = backend.chat(messages, config, model, stop_event=stop)
    if log is not None:
        log.begin(prompt, system_prompt=system_prompt, model=model, generation=generation)
    pieces: list[str] = []
    interrupted = False
    status = "error"  # unless the loop ends
    try:
        for piece in stream:
            pieces.append(piece)
            if log is not None:
                log.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        status = "complete"
    except KeyboardInterrupt:  # the answer so far stays printed; the stream is closed
        interrupted = True
        status = "stopped"
        stop.set()
    except Exception:
        if pieces and not args.json:
            sys.stdout.write("\n")  # the partial answer stays; the error line follows on stderr
        raise
    finally:
        iter(stream).close()
        if log is not None:
            from mixtral_chat.app.conversation_log import exchange_stats

            stored = exchange_stats(stream.stats, config, status, model=model, backend=backend.base)
            log.finish(status, stored, "".join(pieces))
    text = "".join(pieces)
    stats = stream.stats
    if args.json:
        print_json(
            text, model, backend.base, stats, interrupted, log.conversation_id if log is not None else None
        )
    elif text and not text.endswith("\n"):
        sys.stdout.write("\n")
    return stats, interrupted


def api_key(args: argparse.Namespace) -> str | None:
    if not args.backend:
        raise UsageError("--api-key-env goes with --backend URL")
    if args.api_key_env is None:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    return key


def check_local_flags(args: argparse.Namespace) -> None:
    for name, unset in LOCAL_ONLY.items():
        if getattr(args, name, unset) != unset:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} is for the local engine; the server at --backend decides that")


def print_json(
    text: str,
    model: str,
    base: str,
    stats: GenerationStats | None,
    interrupted: bool,
    conversation_id: int | None,
) -> None:
    """The local `ask --json`'s keys that a remote answer has (no expert cache, no decode graphs)."""
    import json

    finish = "cancelled" if interrupted or stats is None else stats.finish_reason
    print(
        json.dumps(
            {
                "text": text,
                "finish_reason": finish,
                "model": model,
                "backend": base,
                "usage": {
                    "prompt_tokens": stats.prompt_tokens if stats else None,
                    "completion_tokens": stats.completion_tokens if stats else None,
                },
                "timings": {
                    "ttft_s": round(stats.ttft_s, 4) if stats else None,
                    "decode_tok_s": round(stats.decode_tok_s, 2) if stats else None,
                },
                "conversation_id": conversation_id,  # None: not stored (--no-log, or it failed)
            },
            ensure_ascii=False,
        )
    )
