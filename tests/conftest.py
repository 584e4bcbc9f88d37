"""Shared fixtures: tiny Mixtral checkpoints saved by transformers in the real HF layout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# One compute thread in tests and in the CLI subprocesses they start: the tiny models gain nothing
# from two, and OpenMP threads that spin on a busy 2-core machine made steps 40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The native int4 kernel compiles once per test session (~2 s) into a session folder, whatever
# MIXTRAL_CHAT_HOME a test sets: neither per test nor into the user's cache.
os.environ.setdefault("MIXTRAL_CHAT_NATIVE_DIR", tempfile.mkdtemp(prefix="mixtral-chat-native-"))

# The Ctrl-C tests send SIGINT to the CLI they start. A suite launched as a background job (`cmd &`
# from a script) inherits SIGINT ignored, and so would the CLI: a handler here is reset to the
# default in each child at exec, so they see Ctrl-C as a user's foreground process does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# CPU features that send libraries down other paths (bitsandbytes, torch's kernels, ours).
_HOST_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def host_line() -> str:
    """This machine's CPU and the features that matter here, for a run's record."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    present = " ".join(flag for flag in _HOST_FLAGS if flag in flags) or "none of " + " ".join(_HOST_FLAGS)
    return f"host: {model}, {os.cpu_count()} cores; cpu flags: {present}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The host under every run (with -q too), so that a failure can be tied to a kind of machine."""
    terminalreporter.write_line(host_line())


TINY_CONFIG = dict(
    vocab_size=32000,  # Mixtral's real tokenizer (mistral-common's tokenizer.model.v1)
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)


def mistral_tokenizer_path() -> Path:
    """Mixtral's real sentencepiece model, as bundled with mistral-common (a test dependency)."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert path.exists(), path
    return path


def save_tiny_checkpoint(
    directory: Path,
    seed: int = 0,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
    dtype: object = None,
    **overrides: object,
) -> Path:
    """Random weights saved by transformers' MixtralForCausalLM.save_pretrained (in `dtype`, a
    torch dtype, where given; else float32)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if with_tokenizer:
        shutil.copy(mistral_tokenizer_path(), directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-expert top-2 Mixtral with Mixtral's real tokenizer (shared, read-only)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mixtral"))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):  # -> mixtral_chat.quant.native.Int4Kernel
    """The native kernel, compiled once per test module into a temporary MIXTRAL_CHAT_HOME
    (the int4 and int8 kernel tests); skipped without AVX2."""
    from mixtral_chat.quant import native

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXTRAL_CHAT_HOME", str(tmp_path_factory.mktemp("native-home")))
        mp.delenv(native.NATIVE_DIR_ENV, raising=False)
        mp.delenv(native.NO_NATIVE_ENV, raising=False)
        path = native.build_library()
    loaded = native.load_kernel(path)
    if not loaded.has_avx2:
        pytest.skip("this CPU has no AVX2")
    return loaded


@pytest.fixture(scope="module", params=["native", "portable"])
def either_build(request: pytest.FixtureRequest, kernel):  # -> Int4Kernel
    """The -march=native build (AVX2 or AVX-512 here), then the portable one (the fused calls' tests)."""
    from mixtral_chat.quant import native

    return kernel if request.param == "native" else native.load_kernel(native.build_library(native=False))


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(**overrides: object) -> Path:
        directory = tmp_path / f"ckpt{next(counter)}"
        return save_tiny_checkpoint(directory, **overrides)

    return make


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Data, config and logs of mixtral-chat under a temporary folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("MIXTRAL_CHAT_HOME", str(home))
    return home


def run_cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real `mixtral-chat` CLI in a subprocess."""
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    raw = subprocess.run(
        [sys.executable, "-m", "mixtral_chat.app.cli", *args],
        input=(input or "").encode(),
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )
    # Decoded by hand: text mode would turn a generated "\r" into "\n".
    return subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode("utf-8"), raw.stderr.decode("utf-8")
    )
