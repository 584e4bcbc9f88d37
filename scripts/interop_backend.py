"""Interop check, run by hand: `mixtral-chat ask --backend URL` against an independent
OpenAI-compatible server (llama-cpp-python's, vLLM, Ollama, llama-server), next to the local
engine's `ask` on the same prompts. Prints one line per check; exit 1 if a check failed.

    python scripts/interop_backend.py http://127.0.0.1:8081/v1 [--model ID] [--api-key-env NAME]
        [--local-model demo]

Checks, each through the real CLI in a subprocess:
- /v1/models lists at least one model (`ask --backend` picks the first, or --model);
- greedy answers (`--temperature 0`) stream, and their text is compared with the local engine's
  (equal only where the server runs the same weights with the same chat template and greedy
  decoding: a report, not a failure);
- `--stats` prints the client-side TTFT and tok/s;
- an unknown model and a wrong URL are one error line each (exit 1, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROMPTS = ["What is a lighthouse?", "Hi", "Define ocean."]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mixtral_chat.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--model")
    parser.add_argument("--api-key-env")
    parser.add_argument("--local-model", default="demo", help="the local model to compare with")
    args = parser.parse_args()
    key = ["--api-key-env", args.api_key_env] if args.api_key_env else []
    remote = ["--backend", args.url, *key, *(["--model", args.model] if args.model else [])]
    failures = 0

    def report(ok: bool, what: str) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}")

    for prompt in PROMPTS:
        answer = cli("ask", "--json", "--temperature", "0", *remote, prompt)
        local = cli("ask", "--json", "--temperature", "0", "--model", args.local_model, prompt)
        if answer.returncode != 0:
            report(False, f"{prompt!r}: exit {answer.returncode}: {answer.stderr.strip()}")
            continue
        got, mine = json.loads(answer.stdout), json.loads(local.stdout)
        timings = got["timings"]
        report(
            bool(got["text"]),
            f"{prompt!r}: {got['model']} answered {got['usage']['completion_tokens']} tokens, "
            f"ttft {timings['ttft_s']} s, {timings['decode_tok_s']} tok/s, {got['finish_reason']}",
        )
        if got["text"] == mine["text"]:
            same = "equal to"
        elif got["text"].strip() == mine["text"].strip():  # llama.cpp keeps sentencepiece's leading space
            same = "equal but for surrounding whitespace to"
        else:
            same = "differs from"
        print(
            f"     text {same} the local engine's: remote {got['text'][:70]!r} / local {mine['text'][:70]!r}"
        )

    stats = cli("ask", "--stats", *remote, PROMPTS[0])
    line = stats.stderr.strip().splitlines()[-1] if stats.stderr.strip() else ""
    report(stats.returncode == 0 and "ttft" in line and "tok/s" in line, f"--stats: {line}")

    unknown = cli("ask", "--backend", args.url, "--model", "no-such-model", *key, "hi")
    lines = unknown.stderr.strip().splitlines()
    report(
        unknown.returncode == 1
        and "Traceback" not in unknown.stderr
        and lines[-1].startswith("mixtral-chat: error:"),
        f"unknown model: {lines[-1] if lines else '(nothing)'}",
    )
    wrong = cli("ask", "--backend", args.url.removesuffix("/v1") + "/nowhere", "hi")
    lines = wrong.stderr.strip().splitlines()
    report(
        wrong.returncode == 1 and "Traceback" not in wrong.stderr,
        f"wrong path: {lines[-1] if lines else '(nothing)'}",
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
