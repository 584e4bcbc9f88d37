"""Fault matrix, section 2: nothing goes on the network unless the user asked for a download.

Each command runs as the real CLI (or the real app under Pilot) in a subprocess with a guard
(`netguard.py`, a Python audit hook) that fails every name lookup and connect to an address that
is not this machine's loopback and writes it down; the test asserts that none was attempted, and
that the command did its work. A control shows the guard sees real attempts.

The known source of such attempts: bitsandbytes 0.50 asks the Hugging Face hub for a kernel at
import time on avx512_bf16 CPUs (quant/bnb.py). `ask` on nf4 (native and bitsandbytes paths),
`quantize --scheme nf4`, `ask --quant nf4` and a bitsandbytes checkpoint all import it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import save_tiny_checkpoint
from tests.fault_matrix.netguard import CLI_MAIN, guard_code, is_loopback

DEMO_PROMPT = "What is a harbor?"
ASK_OPTIONS = ["--max-tokens", "4", "--temperature", "0"]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def guarded_env(home: Path) -> dict[str, str]:
    """A fresh mixtral-chat home and Hugging Face cache, and no proxy or hub setting from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        MIXTRAL_CHAT_HOME=str(home / "mixtral-chat"),
        HF_HOME=str(home / "hf"),
        PYTHONIOENCODING="utf-8",
    )
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env.pop(proxy, None)
    return env


def run_guarded(
    code: str, args: list[str], home: Path, extra_env: dict[str, str] | None = None, timeout: float = 240
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = home / "network-attempts.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**guarded_env(home), **(extra_env or {})},
        timeout=timeout,
        cwd=home,
    )
    attempts = log.read_text().splitlines() if log.exists() else []
    return result, attempts


def run_cli_guarded(
    args: list[str], home: Path, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    return run_guarded(guard_code(home / "network-attempts.log") + CLI_MAIN, args, home, extra_env)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float tiny Mixtral 64 wide (nf4 runs natively on it), its int4 and nf4 quantized
    directories made by the real CLI, and a bitsandbytes 4-bit checkpoint as transformers 4.x
    wrote them."""
    from tests.conftest import run_cli
    from tests.test_bnb_checkpoint import write_v4_checkpoint

    root = tmp_path_factory.mktemp("net-models")
    float_dir = save_tiny_checkpoint(root / "float", hidden_size=64, intermediate_size=128)
    made = {"float": float_dir, "bnb": root / "bnb"}
    write_v4_checkpoint(float_dir, made["bnb"], double_quant=True)
    for scheme in ("int4", "nf4"):
        made[scheme] = root / scheme
        result = run_cli("quantize", str(float_dir), str(made[scheme]), "--scheme", scheme)
        assert result.returncode == 0, result.stderr
    return made


def test_the_guard_sees_and_fails_a_real_lookup(tmp_path: Path) -> None:
    code = guard_code(tmp_path / "network-attempts.log") + textwrap.dedent(
        """
        import socket
        try:
            socket.getaddrinfo("huggingface.co", 443)
        except OSError as exc:
            print("refused:", exc)
        socket.getaddrinfo("localhost", 80)  # loopback passes
        """
    )
    result, attempts = run_guarded(code, [], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refused: network guard" in result.stdout
    assert attempts == ["socket.getaddrinfo 'huggingface.co'"]
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("10.0.0.1")


@pytest.mark.skipif(
    "avx512_bf16" not in cpu_flags(),
    reason="bitsandbytes looks up its hub kernel only on CPUs with avx512_bf16 (this host has none)",
)
def test_a_plain_bitsandbytes_import_goes_on_the_network_here(tmp_path: Path) -> None:
    """What quant/bnb.py prevents, seen through the guard: on this host a plain import of
    bitsandbytes (with `kernels` installed, as transformers brings it) asks the hub."""
    pytest.importorskip("kernels")
    code = guard_code(tmp_path / "network-attempts.log") + ("import bitsandbytes")
    _, attempts = run_guarded(code, [], tmp_path)
    assert any("huggingface.co" in line for line in attempts), attempts


def test_ask_on_the_demo_model(tmp_path: Path) -> None:
    result, attempts = run_cli_guarded(
        ["ask", "--max-tokens", "8", "--temperature", "0", DEMO_PROMPT], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert attempts == []


def test_listing_models_and_paths(tmp_path: Path) -> None:
    for args in (["models", "list"], ["paths"]):
        result, attempts = run_cli_guarded(args, tmp_path)
        assert result.returncode == 0, result.stderr
        assert attempts == [], args


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_quantize(scheme: str, models: dict[str, Path], tmp_path: Path) -> None:
    destination = tmp_path / f"out-{scheme}"
    result, attempts = run_cli_guarded(
        ["quantize", str(models["float"]), str(destination), "--scheme", scheme], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (destination / "quant_config.json").exists()
    assert attempts == []


@pytest.mark.parametrize(
    ("model", "extra_args", "extra_env"),
    [
        ("int4", [], {}),
        ("nf4", [], {}),  # the native kernel; bitsandbytes is still imported for its states
        ("nf4", [], {"MIXTRAL_CHAT_NO_NATIVE": "1"}),  # bitsandbytes computes
        ("float", ["--quant", "nf4"], {}),  # quantized in memory
        ("bnb", [], {}),  # a bitsandbytes checkpoint, loaded as it is
    ],
    ids=["int4", "nf4-native", "nf4-bnb", "quant-in-memory", "bnb-checkpoint"],
)
def test_ask_loads_and_answers(
    model: str, extra_args: list[str], extra_env: dict[str, str], models: dict[str, Path], tmp_path: Path
) -> None:
    args = [
        "ask",
        "--model",
        str(models[model]),
        *extra_args,
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "Hi",
    ]
    result, attempts = run_cli_guarded(args, tmp_path, extra_env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert attempts == []


TUI_SCENARIO = """
import asyncio
from tests.test_tui import make_app, send, wait_ready

async def scenario():
    app = make_app(MODEL, max_tokens=6)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_ready(pilot, app)
        await send(pilot, app, "Hi")
        await pilot.press("f3")  # the settings screen lists models (local and catalog)
        await pilot.pause()
        messages = app.storage.messages(app.chat_screen.conversation_id)
        print("STORED", [m.role for m in messages])
        app.exit()

asyncio.run(scenario())
"""


@pytest.mark.parametrize("model", ["demo", "nf4"])
def test_the_chat_app(model: str, models: dict[str, Path], tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    spec = "demo" if model == "demo" else str(models[model])
    code = (
        guard_code(tmp_path / "network-attempts.log")
        + f"sys.path.insert(0, {str(repo)!r}); MODEL = {spec!r}\n"
        + TUI_SCENARIO
    )
    result, attempts = run_guarded(code, [], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STORED ['user', 'assistant']" in result.stdout
    assert attempts == []
