"""`mixtral-chat serve` through the official `openai` client (and raw HTTP where a client cannot
send the fault), against real server subprocesses on 127.0.0.1: the demo model for answers and
errors, a tiny random model with a long context for the queue (its greedy answers run to
max_tokens, so a generation lasts as long as a test needs)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from tests.conftest import REPO_ROOT, run_cli, save_tiny_checkpoint
from tests.serve_process import ServeProcess

PROMPTS = ["What is a lighthouse?", "What does the word harbor mean?"]
DEMO_CONTEXT = 512
DEMO_TOKENIZER = REPO_ROOT / "assets" / "demo" / "tokenizer.model"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def api_key() -> str:
    return "sk-test-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def demo_server(home: Path, api_key: str) -> Iterator[ServeProcess]:
    """The demo model, its key from the environment (as a user should pass it)."""
    server = ServeProcess([], env={"MIXTRAL_CHAT_HOME": str(home), "MIXTRAL_CHAT_API_KEY": api_key})
    yield server
    assert server.stop() == 0, "\n".join(server.lines)


@pytest.fixture(scope="module")
def client(demo_server: ServeProcess, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.base_url, api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ask_answers(home: Path) -> dict[str, dict]:
    """`mixtral-chat ask --json` (greedy by default) for each prompt: the real CLI."""
    answers = {}
    for prompt in PROMPTS:
        result = run_cli("ask", "--json", prompt, env={"MIXTRAL_CHAT_HOME": str(home)})
        assert result.returncode == 0, result.stderr
        answers[prompt] = json.loads(result.stdout)
    return answers


def ask(client: openai.OpenAI, prompt: str, **options: object):
    return client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": prompt}], **options
    )


# -- answers ---------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["demo"]
    assert client.models.retrieve("demo").owned_by == "mixtral-chat"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_greedy_answer_equals_asks_streamed_or_not(
    client: openai.OpenAI, ask_answers: dict[str, dict], prompt: str
) -> None:
    expected = ask_answers[prompt]
    assert expected["text"]  # the demo answers these

    whole = ask(client, prompt, temperature=0)
    assert whole.choices[0].message.content == expected["text"]
    assert whole.choices[0].finish_reason == expected["finish_reason"] == "stop"
    assert whole.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert whole.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(ask(client, prompt, temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == expected["text"]
    assert len([d for d in deltas if d]) > 1  # streamed in pieces, not in one
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert all(c.usage is None for c in chunks[:-1])


def test_a_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(ask(client, PROMPTS[0], temperature=0, stream=True))
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_sequences_end_the_answer_before_them(
    client: openai.OpenAI, ask_answers: dict[str, dict]
) -> None:
    text = ask_answers[PROMPTS[0]]["text"]
    words = text.split()
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer
    expected = text[: text.find(stop)]
    for stops in (stop, ["zzzz-not-there", stop]):
        answer = ask(client, PROMPTS[0], temperature=0, stop=stops)
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].finish_reason == "stop"
        streamed = ask(client, PROMPTS[0], temperature=0, stop=stops, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_max_tokens_and_max_completion_tokens_cut_the_answer(client: openai.OpenAI) -> None:
    for option in ("max_tokens", "max_completion_tokens"):
        answer = ask(client, PROMPTS[0], temperature=0, **{option: 3})
        assert answer.usage.completion_tokens == 3
        assert answer.choices[0].finish_reason == "length"


def test_a_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    texts = [
        ask(client, PROMPTS[1], temperature=1.5, top_p=0.95, seed=seed).choices[0].message.content
        for seed in (7, 7, 8, 9, 10)
    ]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1  # sampling does sample: other seeds, other answers


def test_a_request_that_extends_the_last_conversation_reuses_its_kv_prefix(client: openai.OpenAI) -> None:
    first = ask(client, PROMPTS[0], temperature=0)
    answer = first.choices[0].message.content
    follow_up = [
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": PROMPTS[1]},
    ]
    extended = client.chat.completions.create(model="demo", messages=follow_up, temperature=0)
    cached = extended.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < extended.usage.prompt_tokens
    unrelated = ask(client, "Define ocean.", temperature=0)
    assert unrelated.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens  # <s> [INST] only


def test_health_answers_without_a_key(demo_server: ServeProcess) -> None:
    response = httpx2.get(f"{demo_server.root_url}/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


# -- errors ----------------------------------------------------------------------------------------


def test_bad_json_and_a_bad_schema_are_400(demo_server: ServeProcess, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    url = f"{demo_server.base_url}/chat/completions"
    bad_json = httpx2.post(url, content=b'{"model": "demo", "messages": [', headers=headers)
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["message"].startswith("the request body is not valid JSON")
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    not_an_object = httpx2.post(url, content=b"[1, 2]", headers=headers)
    assert not_an_object.status_code == 400
    # Valid JSON, but no text: a lone surrogate (neither the tokenizer nor SQLite takes one).
    for content in (b'"caf\\ud800"', b'[{"type": "text", "text": "\\udc80"}]'):
        body = b'{"model": "demo", "messages": [{"role": "user", "content": ' + content + b"}]}"
        surrogate = httpx2.post(url, content=body, headers=headers)
        assert surrogate.status_code == 400, surrogate.text
        error = surrogate.json()["error"]
        assert error["param"].startswith("messages[0].content") and "lone surrogate" in error["message"]


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"temperature": 9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_bad_or_unsupported_field_is_a_400_that_names_it(
    client: openai.OpenAI, options: dict, param: str
) -> None:
    request = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **options}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert param.split("[")[0].split(".")[0] in caught.value.message


def test_a_prompt_over_the_context_is_a_400_saying_by_how_much(client: openai.OpenAI) -> None:
    from mixtral_chat.engine.tokenizer import Tokenizer

    prompt = " ".join(f"word{i}" for i in range(400))
    tokens = len(Tokenizer(DEMO_TOKENIZER).encode_chat([{"role": "user", "content": prompt}]))
    assert tokens > DEMO_CONTEXT
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, prompt)
    over = tokens - DEMO_CONTEXT + 1  # one token of the context is the answer's
    assert f"the messages are {tokens} tokens, {over} over" in caught.value.message
    assert caught.value.code == "context_length_exceeded"


def test_a_missing_or_wrong_key_is_401(demo_server: ServeProcess) -> None:
    wrong = openai.OpenAI(base_url=demo_server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        ask(wrong, "hi")
    missing = httpx2.get(f"{demo_server.base_url}/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "'gpt-4o' does not exist" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_body_over_the_limit_is_413_declared_or_chunked(demo_server: ServeProcess, api_key: str) -> None:
    from mixtral_chat.app.server.app import MAX_BODY_BYTES

    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    url = f"{demo_server.base_url}/chat/completions"
    big = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]})
    declared = httpx2.post(url, content=big.encode(), headers=headers)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
        data = big.encode()
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    chunked = httpx2.post(url, content=chunks(), headers=headers)
    assert chunked.status_code == 413 and "over" in chunked.json()["error"]["message"]


def test_no_cors_headers_unless_asked(demo_server: ServeProcess) -> None:
    preflight = httpx2.options(
        f"{demo_server.base_url}/chat/completions",
        headers={"Origin": "https://example.com", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_answers_only_the_origin_it_was_given(home: Path) -> None:
    server = ServeProcess(["--cors", "https://app.example.com"], env={"MIXTRAL_CHAT_HOME": str(home)})
    try:
        url = f"{server.base_url}/chat/completions"
        for origin, allowed in (("https://app.example.com", True), ("https://elsewhere.example", False)):
            preflight = httpx2.options(
                url,
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            assert (preflight.headers.get("access-control-allow-origin") == origin) is allowed
    finally:
        server.stop()


def test_the_key_is_never_in_the_servers_output(demo_server: ServeProcess, api_key: str) -> None:
    # Runs after the tests above: requests, refusals and 401s all left their lines.
    assert any("401" in line for line in demo_server.lines)
    assert not any(api_key in line for line in demo_server.lines)
    assert "mixtral-chat serve: API key: required" in demo_server.lines


# -- the CLI ---------------------------------------------------------------------------------------


def test_a_non_loopback_address_needs_a_key_before_the_model_loads(home: Path) -> None:
    result = run_cli("serve", "--host", "0.0.0.0", env={"MIXTRAL_CHAT_HOME": str(home)})
    assert result.returncode == 2 and "using the bundled demo" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("mixtral-chat: error: --host 0.0.0.0 is reachable")


@pytest.mark.parametrize(
    ("flags", "env_key", "message"),
    [
        (["--host", "0.0.0.0", "--api-key", "   "], None, "the API key (--api-key or "),
        (["--api-key", ""], None, "the API key (--api-key or "),
        ([], " padded-key ", "the API key (--api-key or "),
        (["--cors", ""], None, "--cors '': give an origin such as http://localhost:3000, or *"),
        (["--cors", "app.example.com"], None, "--cors 'app.example.com': give an origin"),
    ],
    ids=["blank key", "empty key", "key with spaces from the environment", "empty origin", "no scheme"],
)
def test_a_key_or_origin_no_client_could_send_is_refused_before_the_model_loads(
    home: Path, flags: list[str], env_key: str | None, message: str
) -> None:
    env = {"MIXTRAL_CHAT_HOME": str(home), "MIXTRAL_CHAT_API_KEY": env_key or ""}
    result = run_cli("serve", *flags, env=env)
    assert result.returncode == 2 and "using the bundled demo" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"mixtral-chat: error: {message}"), result.stderr
    if env_key:
        assert env_key.strip() not in result.stderr  # a key is never said


def test_the_cli_starts_without_the_server_stack() -> None:
    code = (
        "import sys\nfrom mixtral_chat.app import cli\n"
        "try:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('starlette', 'uvicorn', 'openai', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "[]", result.stderr


# -- the queue -------------------------------------------------------------------------------------

LONG_ANSWER = 6000  # tokens: ~15 s for the tiny model on one core, far longer than a test's steps


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[ServeProcess]:
    model = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=8192)
    server = ServeProcess(["--model", str(model), "--queue-size", "4"], env={"MIXTRAL_CHAT_HOME": str(home)})
    yield server
    server.stop()


def queue_client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def model_id(server: ServeProcess) -> str:
    return queue_client(server).models.list().data[0].id


def health(server: ServeProcess) -> dict:
    return httpx2.get(f"{server.root_url}/health").json()


def wait_for_health(server: ServeProcess, running: int, waiting: int) -> None:
    deadline = time.monotonic() + 30
    while (state := health(server)) != {"status": "ok", "running": running, "waiting": waiting}:
        assert time.monotonic() < deadline, state
        time.sleep(0.02)


def start_long_stream(server: ServeProcess, prompt: str):
    """A streaming answer that has begun (one chunk read) and would run for LONG_ANSWER tokens."""
    stream = queue_client(server).chat.completions.create(
        model=model_id(server),
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=LONG_ANSWER,
        stream=True,
    )
    next(iter(stream))
    return stream


def cancelled_lines(server: ServeProcess) -> list[str]:
    return [line for line in server.lines if line.endswith("cancelled: the client went away")]


def test_four_queued_clients_all_finish_in_fifo_order_and_one_more_gets_429(
    queue_server: ServeProcess,
) -> None:
    holder = start_long_stream(queue_server, "hold the engine")
    wait_for_health(queue_server, running=1, waiting=0)
    model = model_id(queue_server)
    finished: list[int] = []
    results: dict[int, object] = {}
    lock = threading.Lock()

    def client(number: int) -> None:
        answer = queue_client(queue_server).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"client {number}"}],
            temperature=0,
            max_tokens=40,
        )
        with lock:
            finished.append(number)
            results[number] = answer

    threads = []
    for number in range(4):  # each one queued before the next is sent: the order is known
        threads.append(threading.Thread(target=client, args=(number,)))
        threads[-1].start()
        wait_for_health(queue_server, running=1, waiting=number + 1)

    with pytest.raises(openai.RateLimitError) as caught:
        ask_queue = queue_client(queue_server)
        ask_queue.chat.completions.create(model=model, messages=[{"role": "user", "content": "one more"}])
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert caught.value.code == "queue_full"

    holder.close()  # the client goes away: its generation stops, the queue moves
    for thread in threads:
        thread.join(timeout=120)
    assert finished == [0, 1, 2, 3]
    assert all(results[n].choices[0].message.content for n in range(4))
    wait_for_health(queue_server, running=0, waiting=0)


def test_a_client_that_disconnects_mid_stream_frees_the_engine(queue_server: ServeProcess) -> None:
    before = len(cancelled_lines(queue_server))
    stream = start_long_stream(queue_server, "a long answer nobody reads to the end")
    for _ in range(3):
        next(iter(stream))
    stream.close()

    # The next request is answered in full; the disconnected one stopped long before its end.
    client = queue_client(queue_server)
    after = client.chat.completions.create(
        model=model_id(queue_server),
        messages=[{"role": "user", "content": "next"}],
        temperature=0,
        max_tokens=20,
    )
    assert after.usage.completion_tokens == 20 and after.choices[0].finish_reason == "length"
    queue_server.wait_for_line(lambda line: len(cancelled_lines(queue_server)) > before, timeout=30)
    line = cancelled_lines(queue_server)[before]
    completion = int(line.split(" prompt + ")[1].split()[0])
    assert 3 <= completion < LONG_ANSWER  # three pieces were read: at least three tokens
    wait_for_health(queue_server, running=0, waiting=0)


def test_a_non_streaming_client_that_gives_up_stops_its_generation(queue_server: ServeProcess) -> None:
    before = len(cancelled_lines(queue_server))
    body = {
        "model": model_id(queue_server),
        "messages": [{"role": "user", "content": "an answer nobody waits for"}],
        "temperature": 0,
        "max_tokens": LONG_ANSWER,
    }
    with pytest.raises(httpx2.ReadTimeout):  # the client closes the connection at its time-out
        httpx2.post(f"{queue_server.base_url}/chat/completions", json=body, timeout=1.0)
    queue_server.wait_for_line(lambda line: len(cancelled_lines(queue_server)) > before, timeout=30)
    line = cancelled_lines(queue_server)[before]
    assert int(line.split(" prompt + ")[1].split()[0]) < LONG_ANSWER
    wait_for_health(queue_server, running=0, waiting=0)
