"""`mixtral-chat ask`: one answer, streamed to stdout. Diagnostics go to stderr.

Each exchange is stored in the chat app's conversation database (app/conversation_log.py)
unless --no-log; -c/--continue and --cid ID answer after an earlier chat's turns.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from mixtral_chat.app.argtypes import float_range, int_range
from mixtral_chat.app.commands.engine_flags import add_engine_arguments, load_options
from mixtral_chat.app.progress import PhaseProgress, Row
from mixtral_chat.engine.options import (
    MAX_TOKENS_MIN,
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TOP_K_MIN,
    TOP_P_ABOVE,
    TOP_P_MAX,
    GenerationConfig,
)
from mixtral_chat.engine.units import format_count

if TYPE_CHECKING:
    from mixtral_chat.app.conversation_log import ConversationLog
    from mixtral_chat.app.storage import Conversation
    from mixtral_chat.engine.load_progress import LoadProgress
    from mixtral_chat.engine.models.resolve import ResolvedModel
    from mixtral_chat.engine.runtime import ChatStream, Engine, GenerationStats

# `ask` answers greedily unless told otherwise: the engine's defaults.
DEFAULT_GENERATION = GenerationConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ask",
        help="answer one prompt, streamed to stdout",
        description="Answer one prompt. PROMPT and piped stdin combine: "
        "git diff | mixtral-chat ask 'review this'",
    )
    parser.add_argument("prompt", nargs="?", help="the question (stdin is appended when piped)")
    parser.add_argument("--model", help="catalog name, repo id (org/name) or model directory")
    parser.add_argument("--system", help="system prompt (none unless given)")
    # The bounds of GenerationConfig (engine/options.py), checked before anything heavy loads.
    parser.add_argument(
        "--temperature",
        type=float_range("--temperature", TEMPERATURE_MIN, cap=TEMPERATURE_MAX),
        help="0 = greedy (default)",
    )
    parser.add_argument(
        "--top-p",
        type=float_range("--top-p", TOP_P_ABOVE, TOP_P_MAX, low_open=True),
        help=f"default {DEFAULT_GENERATION.top_p:g}",
    )
    parser.add_argument(
        "--top-k",
        type=int_range("--top-k", TOP_K_MIN),
        help=f"0 = no top-k cut (default {DEFAULT_GENERATION.top_k})",
    )
    parser.add_argument(
        "--max-tokens",
        type=int_range("--max-tokens", MAX_TOKENS_MIN),
        help=f"default {DEFAULT_GENERATION.max_tokens}",
    )
    parser.add_argument("--seed", type=int_range("--seed", SEED_MIN, SEED_MAX))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    history = parser.add_argument_group(
        "conversation history",
        "Each exchange is stored with the chat app's conversations (`mixtral-chat history`). A "
        "continued chat keeps its system prompt and its own generation settings unless flags "
        "are given.",
    )
    which = history.add_mutually_exclusive_group()
    which.add_argument(
        "-c",
        "--continue",
        dest="continue_latest",
        action="store_true",
        help="continue the most recent chat (the chat app's too)",
    )
    which.add_argument("--cid", type=int_range("--cid", 1), metavar="ID", help="continue chat ID")
    history.add_argument("--no-log", action="store_true", help="do not store this exchange")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    remote = parser.add_argument_group("remote backend")
    remote.add_argument(
        "--backend",
        metavar="URL",
        help="answer with an OpenAI-compatible server instead of the local engine (vLLM, "
        "llama-server, Ollama's /v1, mixtral-chat serve): http://HOST:PORT/v1",
    )
    remote.add_argument(
        "--api-key-env", metavar="NAME", help="environment variable that holds the backend's API key"
    )
    offload = add_engine_arguments(parser)
    offload.add_argument("--stats", action="store_true", help="print expert-cache statistics to stderr")
    offload.add_argument("--trace-routing", metavar="FILE", help="write chosen experts as JSON lines")
    parser.set_defaults(handler=run)


def read_prompt(args: argparse.Namespace) -> str:
    """PROMPT and piped stdin, as valid Unicode (a byte that is not UTF-8, in either, becomes
    U+FFFD: a Latin-1 file piped in is still answered)."""
    from mixtral_chat.app.errors import UsageError
    from mixtral_chat.engine.tokenizer import well_formed

    # A blank PROMPT counts as none, as blank stdin does.
    parts = [well_formed(args.prompt)] if args.prompt and args.prompt.strip() else []
    if not sys.stdin.isatty():
        raw = getattr(sys.stdin, "buffer", None)  # none on a stand-in stream (a StringIO)
        piped = raw.read().decode("utf-8", "replace") if raw is not None else sys.stdin.read()
        if piped.strip():
            parts.append(piped)
    if not parts:
        raise UsageError("no prompt: give PROMPT or pipe text on stdin")
    if args.system is not None:
        args.system = well_formed(args.system)
    return "\n\n".join(part.strip("\n") for part in parts)


def run(args: argparse.Namespace) -> int:
    # The conversation store (sqlite3) only when `ask` runs: not at every CLI start-up.
    from mixtral_chat.app.conversation_log import ConversationLog

    prompt = read_prompt(args)
    check_flags(args)
    # Before the model loads: an unknown --cid or a busy chat is said at once.
    log = ConversationLog.open(
        continue_latest=args.continue_latest,
        conversation_id=args.cid,
        write=not args.no_log,
        warn=print_warning,
    )
    stopped_by = stop_on_termination()
    try:
        if args.backend or args.api_key_env:
            code = answer_remotely(args, prompt, log)
        else:
            code = answer(args, prompt, log)
        return 128 + stopped_by[0] if code == 130 and stopped_by else code
    except KeyboardInterrupt:  # before the answer streams (the model loading): nothing to keep
        if not stopped_by:
            raise
        print(file=sys.stderr)
        return 128 + stopped_by[0]
    finally:
        if log is not None:
            log.close()


def stop_on_termination() -> list[int]:
    """SIGTERM and SIGHUP (`timeout`, a closed terminal) stop the answer as Ctrl+C does: what was
    printed is stored as stopped, the chat released. Returns the list the signal's number lands in
    (the exit code is then 128 + it, as the shell reports a process it ended)."""
    import signal

    received: list[int] = []

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)
    return received


def answer(args: argparse.Namespace, prompt: str, log: ConversationLog | None) -> int:
    from mixtral_chat.app.chat_session import chat_messages

    continued = log.conversation if log is not None else None
    config = generation_config(args, continued)
    resolved = resolve_the_model(args)
    engine = load_engine(args, resolved)
    history = log.prepare() if log is not None else []
    system_prompt = continued.system_prompt if continued is not None else (args.system or "")
    messages = [*chat_messages(system_prompt, history), {"role": "user", "content": prompt}]
    stream, pieces, interrupted = stream_answer(args, engine, messages, config, log, prompt, system_prompt)
    cache, graphs = engine.cache_stats(), engine.decode_graphs_state()
    engine.close()
    text = "".join(pieces)
    if args.json:
        conversation_id = log.conversation_id if log is not None else None
        print_json(args, engine, text, pieces, stream.stats, cache, interrupted, conversation_id, graphs)
    elif text and not text.endswith("\n"):
        sys.stdout.write("\n")
    if args.stats:
        print_stats(stream.stats, cache, graphs)
    return 130 if interrupted else 0


def answer_remotely(args: argparse.Namespace, prompt: str, log: ConversationLog | None) -> int:
    """`--backend`: the answer comes from another OpenAI-compatible server, stored as a local
    one is."""
    from mixtral_chat.app.chat_session import chat_messages
    from mixtral_chat.app.commands.ask_remote import check_local_flags, run_remote

    check_local_flags(args)  # before the chat is claimed
    continued = log.conversation if log is not None else None
    config = generation_config(args, continued)
    history = log.prepare() if log is not None else []
    system_prompt = continued.system_prompt if continued is not None else (args.system or "")
    messages = [*chat_messages(system_prompt, history), {"role": "user", "content": prompt}]
    stats, interrupted = run_remote(
        args,
        messages,
        config,
        log,
        prompt=prompt,
        system_prompt=system_prompt,
        generation=generation_flags(args),
    )
    if args.stats:
        print_stats(stats, None)
    return 130 if interrupted else 0


def check_flags(args: argparse.Namespace) -> None:
    """What the flags ask for that can be refused before anything loads or is stored."""
    import os

    from mixtral_chat.app.errors import UsageError

    if args.system is not None and (args.continue_latest or args.cid is not None):
        raise UsageError("--system starts a new chat: a continued chat keeps its own system prompt")
    trace = getattr(args, "trace_routing", None)
    if trace:
        folder = Path(trace).expanduser().resolve().parent
        if Path(trace).is_dir():
            raise UsageError(f"--trace-routing {trace}: that is a folder; give a file name")
        if not folder.is_dir():
            raise UsageError(f"--trace-routing {trace}: no folder {folder}")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--trace-routing {trace}: {folder} is not writable")


def print_warning(line: str) -> None:
    print(f"mixtral-chat: warning: {line}", file=sys.stderr)


def generation_flags(args: argparse.Namespace) -> dict[str, float | int]:
    """The sampling flags given: a new chat keeps them as its own settings, so `ask -c` answers
    it as it began (a continued chat's flags are for that answer alone)."""
    names = ("temperature", "top_p", "top_k", "max_tokens", "seed")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def generation_config(args: argparse.Namespace, continued: Conversation | None = None) -> GenerationConfig:
    """`ask`'s defaults (greedy), then a continued chat's own settings, then the flags given."""
    from mixtral_chat.app.chat_session import generation_values
    from mixtral_chat.app.errors import UsageError
    from mixtral_chat.engine.errors import MixtralChatError

    values = {**generation_values(DEFAULT_GENERATION, continued), **generation_flags(args)}
    try:
        return GenerationConfig(**values)
    except (MixtralChatError, TypeError, ValueError) as exc:
        if continued is None:  # the flags' converters check the same bounds first
            raise UsageError(str(exc)) from None
        # A flag would have been refused by its converter: the chat's stored settings are wrong.
        raise MixtralChatError(
            f"chat {continued.id} has invalid generation settings ({exc}); change them in the chat "
            "app's chat options, or give the flag"
        ) from None


def resolve_the_model(args: argparse.Namespace) -> ResolvedModel:
    from mixtral_chat.engine.models.resolve import resolve_model

    if args.model is not None and Path(args.model).expanduser().is_dir():
        # A damaged index, said as such (the registry would only find "no safetensors weights").
        from mixtral_chat.engine.checkpoint import read_weight_map

        read_weight_map(Path(args.model).expanduser())
    resolved = resolve_model(args.model)
    check_experts_per_layer(args, resolved.path)
    if resolved.is_demo and args.model is None:
        print(
            "mixtral-chat: using the bundled demo model; get Mixtral with "
            "`mixtral-chat models pull mixtral-8x7b-instruct`",
            file=sys.stderr,
        )
    return resolved


# Loads shorter than this print no progress line (the demo loads in about 0.3 s).
LOAD_QUIET_S = 1.0


def load_engine(args: argparse.Namespace, resolved: ResolvedModel) -> Engine:
    from mixtral_chat.engine import checkpoint as ckpt
    from mixtral_chat.engine.runtime import Engine

    rows = PhaseProgress(sys.stderr, log_interval_s=math.inf)
    # A terminal only (TERM=dumb: its first and last row as plain lines); a pipe or a log gets none.
    shown = sys.stderr.isatty() and not args.json

    def loading(progress: LoadProgress) -> None:
        if not shown or (progress.elapsed_s < LOAD_QUIET_S and not rows.shown):
            return  # under a second: no row at all
        row = Row(
            f"loading {resolved.name}",
            progress.bytes_done,
            progress.bytes_total or None,
            speed=progress.bytes_done / progress.elapsed_s if progress.elapsed_s > 0 else None,
            eta_s=progress.eta_s,
            elapsed_s=progress.elapsed_s,
            detail=f"{format_count(progress.tensors)} tensors",
        )
        rows.show("load", row, final=progress.finished)

    try:
        engine = Engine.load(resolved.path, load_options(args), name=resolved.name, progress=loading)
    finally:
        rows.close()
    if args.quant is not None and ckpt.detect(resolved.path).kind != ckpt.FLOAT:
        # --quant quantizes float weights as they load; a 4-bit model runs as it was quantized.
        print(
            f"mixtral-chat: --quant {args.quant} is for float models: {resolved.name} is "
            f"{engine.info.scheme} already and runs as it is",
            file=sys.stderr,
        )
    plan = engine.info.offload_plan
    # Automatic offloading is always announced: it explains a slower answer.
    if plan and (args.stats or plan.startswith("auto")):
        print(f"mixtral-chat: offload plan: {plan}", file=sys.stderr)
    if args.stats and engine.offloader is not None:
        for line in engine.offloader.plan.summary_lines():
            print(f"mixtral-chat: plan: {line}", file=sys.stderr)
    return engine


def stream_answer(
    args: argparse.Namespace,
    engine: Engine,
    messages: list[dict[str, str]],
    config: GenerationConfig,
    log: ConversationLog | None,
    prompt: str,
    system_prompt: str,
) -> tuple[ChatStream, list[str], bool]:
    """Generate, streaming to stdout unless --json, and into the log; returns the stream, the
    pieces and whether Ctrl+C stopped it."""
    stop = threading.Event()
    # A prompt over the context raises here, before anything is stored; nothing runs until the
    # stream is iterated.
    stream = engine.chat(messages, config, stop_event=stop)
    if log is not None:
        log.begin(
            prompt, system_prompt=system_prompt, model=engine.info.name, generation=generation_flags(args)
        )
    pieces: list[str] = []
    interrupted = False
    status = "error"  # unless the loop ends
    trace_file = None
    # From here on the stored answer row is finished whatever happens (never left "streaming").
    try:
        if args.trace_routing:
            from mixtral_chat.engine.offload import RoutingTrace

            trace_file = open(args.trace_routing, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
            RoutingTrace(engine.model, trace_file)
        for notice in stream.notices:
            print(f"mixtral-chat: {notice}", file=sys.stderr)
        for piece in stream:
            pieces.append(piece)
            if log is not None:
                log.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        status = "complete"
    except KeyboardInterrupt:
        # Ctrl+C stops generation; what was printed stays, and the JSON says "cancelled".
        interrupted = True
        stop.set()
        status = "stopped"
    except BrokenPipeError:  # the reader left (`| head`): stopped there, what it read is kept
        stop.set()
        status = "stopped"
        raise
    finally:
        if trace_file:
            trace_file.close()
        if log is not None:
            from mixtral_chat.app.conversation_log import exchange_stats

            stored = exchange_stats(stream.stats, config, status, model=engine.info.name)
            log.finish(status, stored, "".join(pieces))
    return stream, pieces, interrupted


def print_json(
    args: argparse.Namespace,
    engine: Engine,
    text: str,
    pieces: list[str],
    stats: GenerationStats | None,
    cache: dict | None,
    interrupted: bool,
    conversation_id: int | None,
    graphs: str | None = None,
) -> None:
    finish = "cancelled" if interrupted or stats is None else stats.finish_reason
    print(
        json.dumps(
            {
                "text": text,
                "finish_reason": finish,
                "model": engine.info.name,
                "usage": {
                    "prompt_tokens": stats.prompt_tokens if stats else None,
                    "completion_tokens": stats.completion_tokens if stats else len(pieces),
                },
                "timings": {
                    "ttft_s": round(stats.ttft_s, 4) if stats else None,
                    "decode_tok_s": round(stats.decode_tok_s, 2) if stats else None,
                },
                "conversation_id": conversation_id,  # None: not stored (--no-log, or it failed)
                **({"cache": cache_summary(cache)} if cache and args.stats else {}),
                **({"decode_graphs": graphs} if graphs and args.stats else {}),
            },
            ensure_ascii=False,
        )
    )


def check_experts_per_layer(args: argparse.Namespace, model_dir: Path) -> None:
    """--experts-per-layer against the model's config.json, before the weights load."""
    if args.experts_per_layer is None:
        return
    from mixtral_chat.app.errors import UsageError
    from mixtral_chat.engine.config import ModelArgs

    model = ModelArgs.from_hf_config(model_dir)
    low, high = model.num_experts_per_tok, model.num_local_experts
    if not low <= args.experts_per_layer <= high:
        raise UsageError(
            f"--experts-per-layer must be between {low} (experts per token) and {high} for this "
            f"model, got {args.experts_per_layer}"
        )


def cache_summary(cache: dict) -> dict:
    return {k: v for k, v in cache.items() if k != "layers"}


def print_stats(stats, cache: dict | None, graphs: str | None = None) -> None:
    if stats:
        print(
            f"mixtral-chat: {stats.prompt_tokens} prompt + {stats.completion_tokens} completion tokens, "
            f"ttft {stats.ttft_s:.3f} s, decode {stats.decode_tok_s:.2f} tok/s, {stats.finish_reason}",
            file=sys.stderr,
        )
    if cache:
        print(
            f"mixtral-chat: expert cache: hit rate {cache['hit_rate']:.1%} ({cache['hits']} hits, "
            f"{cache['misses']} misses), prefetch recall {cache['prefetch_recall']:.1%}, "
            f"{cache['prefetch_hits']} prefetch hits, {cache['prefetch_wasted']} wasted, "
            f"bytes moved {cache['bytes_moved'] / 1e6:.1f} MB, {cache['cpu_computed']} computed on the CPU, "
            f"stalled {cache['stall_s']:.3f} s",
            file=sys.stderr,
        )
    if graphs:
        print(f"mixtral-chat: decode graphs: {graphs}", file=sys.stderr)
