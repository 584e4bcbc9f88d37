"""Speed through `mixtral-chat serve`'s API next to the engine in-process (what `ask` runs), and
time to first token (TTFT) for 4 clients that arrive at once and queue.

- in-process: `Engine.load` of the model and `engine.chat(...)` greedy, as `mixtral-chat ask`
  does, in this process;
- API: a real `mixtral-chat serve --port 0` subprocess and the official `openai` client,
  streaming (`stream_options.include_usage` gives the token counts);
- queued: 4 threads send the same kind of request at the same moment; each one's TTFT is from its
  send to its first content chunk, so it holds the wait for the answers ahead of it.

Decode tok/s is (completion tokens - 1) / (time of the last piece - time of the first), measured
where the text arrives: the engine's iterator in-process, the client over HTTP. Rounds alternate
(in-process, API, in-process, ...) because the machine is shared; the table reports medians.

    python bench/bench_serve.py                 # the bundled demo, 5 rounds
    python bench/bench_serve.py --rounds 9 --model DIR
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it: see app/cli.py
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import host_line  # noqa: E402 (after the path)
from tests.serve_process import ServeProcess  # noqa: E402

# The demo's longest greedy answers (~50 tokens each): its definitions are 15-25 tokens.
PROMPTS = ["Hi", "Hello, who are you?", "What can you do?", "Define ocean."]
QUEUED_CLIENTS = 4


def in_process(engine, prompt: str) -> tuple[int, float, float]:
    """(completion tokens, TTFT s, decode tok/s) for one greedy answer in this process."""
    from mixtral_chat.engine.options import GenerationConfig

    start = time.perf_counter()
    stream = engine.chat([{"role": "user", "content": prompt}], GenerationConfig())
    times = [time.perf_counter() for _ in stream]
    stats = stream.stats
    return stats.completion_tokens, times[0] - start, decode_rate(stats.completion_tokens, times)


def through_api(client, model: str, prompt: str) -> tuple[int, float, float]:
    start = time.perf_counter()
    chunks = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    times, tokens = [], 0
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, times[0] - start, decode_rate(tokens, times)


def decode_rate(tokens: int, times: list[float]) -> float:
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return (tokens - 1) / span if span > 0 else 0.0


def queued_ttfts(client, model: str) -> list[float]:
    """TTFT of each of QUEUED_CLIENTS requests sent together, in the order they were answered."""
    ttfts: list[float] = []
    lock = threading.Lock()
    go = threading.Barrier(QUEUED_CLIENTS)

    def one(prompt: str) -> None:
        go.wait()
        _, ttft, _ = through_api(client, model, prompt)
        with lock:
            ttfts.append(ttft)

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS[:QUEUED_CLIENTS]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(ttfts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or name (default: the bundled demo)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import openai

    from mixtral_chat.engine.models.resolve import resolve_model
    from mixtral_chat.engine.runtime import Engine

    resolved = resolve_model(args.model)
    engine = Engine.load(resolved.path, name=resolved.name)
    server = ServeProcess(["--model", str(resolved.path)])
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    try:
        for prompt in PROMPTS:  # warm-up: first calls pay for lazy set-up on both sides
            in_process(engine, prompt)
            through_api(client, model, prompt)
        local: list[tuple[int, float, float]] = []
        remote: list[tuple[int, float, float]] = []
        queued: list[list[float]] = []
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                local.append(in_process(engine, prompt))
                remote.append(through_api(client, model, prompt))
            queued.append(queued_ttfts(client, model))
    finally:
        server.stop()
        engine.close()

    def median(rows: list[tuple[int, float, float]], column: int) -> float:
        return statistics.median(row[column] for row in rows)

    print(f"model: {resolved.name}; {args.rounds} rounds of {len(PROMPTS)} greedy prompts")
    print(host_line())
    print(f"{'':<28}{'tokens':>8}{'TTFT ms':>10}{'decode tok/s':>14}")
    for label, rows in (("in-process (ask's engine)", local), ("API (serve, openai client)", remote)):
        print(f"{label:<28}{median(rows, 0):>8.0f}{median(rows, 1) * 1000:>10.1f}{median(rows, 2):>14.1f}")
    ratio = statistics.median(r[2] / lo[2] for lo, r in zip(local, remote, strict=True) if lo[2] > 0)
    print(f"API decode / in-process decode (median of pairs): {ratio:.2f}")
    positions = [statistics.median(round_[i] for round_ in queued) * 1000 for i in range(QUEUED_CLIENTS)]
    print(
        f"{QUEUED_CLIENTS} clients at once, TTFT by place in the queue (median ms): "
        + ", ".join(f"{i + 1}: {ms:.0f}" for i, ms in enumerate(positions))
    )


if __name__ == "__main__":
    main()
