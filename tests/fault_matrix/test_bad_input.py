"""Bad input to `ask` and `quantize`: one clear line, the right exit code, before any heavy work.

Every test runs the real CLI in a subprocess on real files. Usage errors (exit 2) are also run
through `mixtral_chat.app.cli.main` in a fresh interpreter that reports whether torch was
imported: the check must come before the model, or even torch, loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from mixtral_chat.app.storage import Storage
from tests.conftest import run_cli, save_tiny_checkpoint

# Calls the CLI's main() and prints its exit code and whether torch got imported.
_MAIN_SCRIPT = """
import json, sys
from mixtral_chat.app.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # argparse exits itself
    code = exc.code
print(json.dumps({"rc": code, "torch": "torch" in sys.modules}))
"""


def run_main(*args: str, input: str = "") -> tuple[int, bool, str]:
    """(exit code, torch imported?, stderr) of main(args) in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", _MAIN_SCRIPT, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["rc"], report["torch"], result.stderr


def error_line(stderr: str) -> str:
    """The one error line of stderr (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("mixtral-chat: error: "), stderr
    assert stderr.rstrip("\n").splitlines()[-1] == errors[0], stderr  # nothing after it
    return errors[0]


def assert_usage_error(stderr: str, command: str, message: str) -> None:
    assert stderr.startswith(f"usage: mixtral-chat {command} "), stderr  # the command's usage line
    assert error_line(stderr) == f"mixtral-chat: error: {message}"


@pytest.fixture
def home(isolated_home: Path) -> Path:
    return isolated_home  # the bundled demo model is the default: no registry of the user's


@pytest.fixture
def float_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "float"))


def edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def set_nan(file: Path, key: str) -> None:
    """Rewrite a safetensors file with one NaN in tensor `key`."""
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        metadata = f.metadata()
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, str(file), metadata=metadata)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime_ns) of the files in a directory."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------
# Invalid values: exit 2 with the usage line, torch never imported.

ASK_VALUES = [
    (["--experts-per-layer", "0"], "--experts-per-layer must be a positive integer, got 0"),
    (["--gpu-mem", "-4"], "--gpu-mem must be >= 0 and finite, got -4"),
    (["--gpu-mem", "nan"], "--gpu-mem must be >= 0 and finite, got nan"),
    (["--max-tokens", "0"], "--max-tokens must be a positive integer, got 0"),
    (["--temperature", "nan"], "--temperature must be >= 0 and finite, got nan"),
    (["--temperature", "inf"], "--temperature must be >= 0 and finite, got inf"),
    (["--temperature", "-1"], "--temperature must be >= 0 and finite, got -1"),
    (["--temperature", "warm"], "--temperature expects a number, got 'warm'"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0, got -1"),
    (["--context", "8"], "--context must be an integer >= 16, got 8"),
    (["--seed", "1.5"], "--seed expects an integer, got '1.5'"),
    (
        ["--seed", str(2**64)],
        f"--seed must be an integer from {-(2**63)} to {2**64 - 1}, got {2**64}",
    ),
    (["--simulate-link-gbps", "0"], "--simulate-link-gbps must be > 0 and finite, got 0"),
    # A trace that cannot be written: said before the model loads (and before a chat is stored).
    (
        ["--trace-routing", "/nonexistent/dir/t.jsonl"],
        "--trace-routing /nonexistent/dir/t.jsonl: no folder /nonexistent/dir",
    ),
    (["--trace-routing", "/tmp"], "--trace-routing /tmp: that is a folder; give a file name"),
]


@pytest.mark.parametrize(("flags", "message"), ASK_VALUES, ids=[" ".join(f) for f, _ in ASK_VALUES])
def test_ask_invalid_values_exit_2_before_torch(flags: list[str], message: str, home: Path) -> None:
    rc, torch_imported, stderr = run_main("ask", *flags, "hi")
    assert rc == 2
    assert_usage_error(stderr, "ask", message)
    assert not torch_imported


def test_ask_invalid_value_through_the_entry_point(home: Path) -> None:
    result = run_cli("ask", "--temperature", "nan", "hi")
    assert result.returncode == 2 and result.stdout == ""
    assert_usage_error(result.stderr, "ask", "--temperature must be >= 0 and finite, got nan")


def test_experts_per_layer_outside_the_models_range_exits_2_before_loading(home: Path) -> None:
    # The demo model: 8 experts, top-2. Read from its config.json; no weights, no torch.
    for k in ("1", "9"):
        rc, torch_imported, stderr = run_main("ask", "--experts-per-layer", k, "hi")
        assert rc == 2
        assert_usage_error(
            stderr,
            "ask",
            f"--experts-per-layer must be between 2 (experts per token) and 8 for this model, got {k}",
        )
        assert not torch_imported


QUANTIZE_VALUES = [
    (["--group-size", "7"], "--group-size must be one of 32, 64, 128, 256, got 7"),
    (["--scheme", "nf4", "--group-size", "48"], "--group-size must be one of 32, 64, 128, 256, got 48"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--threads", "-2"], "--threads must be a positive integer, got -2"),
    (["--scheme", "int4", "--double-quant"], "--double-quant applies to --scheme nf4 only"),
]


@pytest.mark.parametrize(("flags", "message"), QUANTIZE_VALUES, ids=[" ".join(f) for f, _ in QUANTIZE_VALUES])
def test_quantize_invalid_values_exit_2_before_torch(
    flags: list[str], message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "out"
    rc, torch_imported, stderr = run_main("quantize", str(tiny_model_dir), str(dst), *flags)
    assert rc == 2
    assert_usage_error(stderr, "quantize", message)
    assert not torch_imported
    assert list(tmp_path.iterdir()) == []  # neither DST nor a partial directory


def test_cli_group_sizes_are_the_schemes() -> None:
    from mixtral_chat.app.commands.quantize import GROUP_SIZES
    from mixtral_chat.quant.schemes import GROUP_SIZES as SCHEME_GROUP_SIZES

    assert all(tuple(sizes) == GROUP_SIZES for sizes in SCHEME_GROUP_SIZES.values())


def test_models_pull_takes_the_same_group_sizes(home: Path) -> None:
    rc, torch_imported, stderr = run_main("models", "pull", "org/any", "--group-size", "7")
    assert rc == 2 and not torch_imported
    assert error_line(stderr).endswith("--group-size must be one of 32, 64, 128, 256, got 7")


# ---------------------------------------------------------------------------------------------
# Whitespace-only prompts.


def test_whitespace_prompt_is_no_prompt_like_whitespace_on_stdin(home: Path) -> None:
    on_stdin = run_cli("ask", input="   \n\t\n")
    argument = run_cli("ask", "   ")
    both = run_cli("ask", " \t ", input="  \n")
    for result in (on_stdin, argument, both):
        assert result.returncode == 2 and result.stdout == ""
        assert_usage_error(result.stderr, "ask", "no prompt: give PROMPT or pipe text on stdin")
    assert argument.stderr == on_stdin.stderr == both.stderr
    rc, torch_imported, _ = run_main("ask", "   ")
    assert rc == 2 and not torch_imported


# ---------------------------------------------------------------------------------------------
# quantize refuses a source that cannot run, before writing anything.


def test_quantize_refuses_a_source_without_tokenizer(float_copy: Path, tmp_path: Path) -> None:
    (float_copy / "tokenizer.model").unlink()
    dst = tmp_path / "models" / "out"
    rc, torch_imported, stderr = run_main("quantize", str(float_copy), str(dst))
    assert rc == 1 and not torch_imported
    assert error_line(stderr) == (
        f"mixtral-chat: error: {float_copy}: no tokenizer.model "
        "(mixtral-chat needs the sentencepiece file to run the model)"
    )
    assert not (tmp_path / "models").exists()


def test_quantize_refuses_top_k_above_the_expert_count(float_copy: Path, tmp_path: Path) -> None:
    edit_config(float_copy, num_experts_per_tok=9)
    dst = tmp_path / "models" / "out"
    result = run_cli("quantize", str(float_copy), str(dst))
    assert result.returncode == 1
    assert error_line(result.stderr) == (
        f"mixtral-chat: error: {float_copy / 'config.json'}: num_experts_per_tok (9) exceeds "
        "num_local_experts (4)"
    )
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------------------
# Damaged inputs are named.


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "sharded", max_shard_size="100KB")


def test_an_index_that_is_not_json_says_so(sharded: Path, tmp_path: Path, home: Path) -> None:
    (sharded / "model.safetensors.index.json").write_text('{\n  "weight_map": {\n    "model.norm')
    expected = (
        f"mixtral-chat: error: {sharded}: model.safetensors.index.json is not valid JSON (line 3 col 5)"
    )
    ask = run_cli("ask", "--model", str(sharded), "hi")
    assert ask.returncode == 1 and ask.stdout == ""
    assert error_line(ask.stderr) == expected
    dst = tmp_path / "models" / "out"
    quantize = run_cli("quantize", str(sharded), str(dst))
    assert quantize.returncode == 1
    assert error_line(quantize.stderr) == expected
    assert not (tmp_path / "models").exists()


def test_a_nan_weight_is_named_by_the_loader(float_copy: Path, home: Path) -> None:
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    set_nan(float_copy / "model.safetensors", key)
    result = run_cli("ask", "--model", str(float_copy), "--max-tokens", "2", "hi")
    assert result.returncode == 1 and result.stdout == ""
    assert error_line(result.stderr) == (
        f"mixtral-chat: error: {float_copy / 'model.safetensors'}: tensor '{key}' has NaN values"
    )


def test_a_nan_weight_is_named_by_quantize(sharded: Path, tmp_path: Path) -> None:
    file = sharded / "model-00003-of-00005.safetensors"
    with safe_open(str(file), "pt") as f:
        key = sorted(f.keys())[0]
    set_nan(file, key)
    dst = tmp_path / "models" / "out"
    result = run_cli("quantize", str(sharded), str(dst), "--threads", "1")
    assert result.returncode == 1
    assert error_line(result.stderr) == f"mixtral-chat: error: {file}: tensor '{key}' has NaN values"
    assert not dst.exists()
    partial = tmp_path / "models" / ".out.partial"
    assert not list(partial.glob("*.tmp"))  # the shard being written was removed


def test_nan_logits_name_the_weight(sharded: Path, tmp_path: Path, home: Path) -> None:
    # A quantized directory's float tensors are loaded as stored; a NaN there shows in the logits.
    dst = tmp_path / "q"
    assert run_cli("quantize", str(sharded), str(dst), "--threads", "1").returncode == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    set_nan(dst / index["model.norm.weight"], "model.norm.weight")
    result = run_cli("ask", "--model", str(dst), "--max-tokens", "2", "hi")
    assert result.returncode == 1 and result.stdout == ""
    assert error_line(result.stderr) == (
        "mixtral-chat: error: the model produced NaN logits: tensor 'model.norm.weight' has NaN values"
    )


# ---------------------------------------------------------------------------------------------
# Disk space and resume, on real small file systems (tmpfs; mounting needs root).


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator:
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root and mount(8)): {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_quantize_on_a_disk_too_small_says_how_much_is_needed(sharded: Path, mount_tmpfs) -> None:
    disk = mount_tmpfs("size=1m")
    result = run_cli("quantize", str(sharded), str(disk / "out"), "--threads", "1")
    assert result.returncode == 1
    line = error_line(result.stderr)
    match = re.fullmatch(
        rf"mixtral-chat: error: not enough disk space in {re.escape(str(disk))}: the quantized model "
        r"needs ([\d.]+) MB more, ([\d.]+) (kB|MB) free",
        line,
    )
    assert match, line
    assert float(match[1]) > 1.0
    assert list(disk.iterdir()) == []  # nothing written


def test_a_full_disk_mid_run_names_the_path_and_the_run_resumes(sharded: Path, mount_tmpfs) -> None:
    # Few inodes: the space check before starting passes, then creating a file fails with ENOSPC
    # from the kernel after a few shards (root dir, partial dir, progress.json and its temp
    # file, then one inode per shard).
    disk = mount_tmpfs("size=64m,nr_inodes=7")
    dst = disk / "out"
    partial = disk / ".out.partial"
    args = ("quantize", str(sharded), str(dst), "--threads", "1")
    full = run_cli(*args)
    assert full.returncode == 1
    line = error_line(full.stderr)
    match = re.fullmatch(
        rf"mixtral-chat: error: no space left on device writing {re.escape(str(partial))}/(\S+): "
        r"needs about [\d.]+ MB more \([\d.]+ MB free; no free inodes\)",
        line,
    )
    assert match, line
    assert not dst.exists()
    assert not list(partial.glob("*.tmp")) and not list(partial.glob(".*.tmp"))
    done = json.loads((partial / "progress.json").read_text())["done"]
    shards = len(list(sharded.glob("model-*.safetensors")))
    assert 0 < len(done) < shards
    assert all((partial / name).stat().st_size == size for name, size in done.items())
    kept = {name: (partial / name).stat().st_mtime_ns for name in done}

    subprocess.run(["mount", "-o", "remount,nr_inodes=1000", str(disk)], check=True)
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"mixtral-chat: resuming: {len(done)} of {shards} shards done\n" in resumed.stderr
    assert {name: (dst / name).stat().st_mtime_ns for name in done} == kept  # not rewritten
    assert not partial.exists()
    fresh = run_cli("quantize", str(sharded), str(disk / "fresh"), "--threads", "1")
    assert fresh.returncode == 0, fresh.stderr
    for file in (disk / "fresh").glob("*.safetensors"):
        assert file.read_bytes() == (dst / file.name).read_bytes()


# ---------------------------------------------------------------------------------------------
# Ctrl+C during quantize.


def test_sigint_during_quantize_keeps_the_work_and_says_how_to_resume(tmp_path: Path) -> None:
    # Big enough that nf4 on one thread takes seconds: the signal lands between shards 1 and 12.
    src = save_tiny_checkpoint(
        tmp_path / "mid",
        max_shard_size="4MB",
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=8,
    )
    dst = tmp_path / "models" / "out"
    partial = tmp_path / "models" / ".out.partial"
    args = ["quantize", str(src), str(dst), "--scheme", "nf4", "--threads", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mixtral_chat.app.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if json.loads((partial / "progress.json").read_text())["done"]:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        assert process.poll() is None, "quantize finished before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    line = error_line(stderr)
    match = re.fullmatch(
        r"mixtral-chat: error: interrupted with (\d+) of (\d+) shards done, "
        rf"kept in {re.escape(str(partial))}: run the same command to resume",
        line,
    )
    assert match, line
    done = json.loads((partial / "progress.json").read_text())["done"]
    assert int(match[1]) == len(done) >= 1 and int(match[2]) > len(done)
    assert not dst.exists() and not list(partial.glob("*.tmp"))
    assert all((partial / name).stat().st_size == size for name, size in done.items())
    kept = snapshot(partial)

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"mixtral-chat: resuming: {len(done)} of {match[2]} shards done\n" in resumed.stderr
    for name in done:
        assert (dst / name).stat().st_mtime_ns == kept[name][1]  # kept, not rewritten
    from mixtral_chat.engine.weights import load_model

    load_model(dst)  # a complete model directory


def test_bytes_that_are_not_utf8_are_answered_as_replacement_characters(home: Path) -> None:
    """A Latin-1 byte in PROMPT and in piped text: answered and stored with U+FFFD in its place,
    not a sentencepiece error about casting to C++."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixtral_chat.app.cli",
            "ask",
            "--max-tokens",
            "2",
            "--json",
            b"caf\xe9 au lait",
        ],
        input=b"na\xefve\n",
        capture_output=True,
        env={**os.environ, "MIXTRAL_CHAT_HOME": str(home)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    conversation_id = json.loads(done.stdout)["conversation_id"]
    with Storage() as storage:
        assert storage.messages(conversation_id)[0].content == "caf\ufffd au lait\n\nna\ufffdve"


CLI = [sys.executable, "-m", "mixtral_chat.app.cli"]


def test_a_reader_that_leaves_ends_the_answer_quietly(home: Path, tiny_model_dir: Path) -> None:
    """`ask ... | head -c 5`: no "error: Broken pipe", the shell's code for a closed pipe, and the
    stored answer is stopped where the reader left, not failed."""
    process = subprocess.Popen(
        [*CLI, "ask", "--model", str(tiny_model_dir), "--max-tokens", "400", "a long answer, please"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.read(5)  # a random model: it writes to its last token, never stopping early
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141 and stderr == b""
    with Storage() as storage:
        [chat] = storage.list_conversations()
        answer = storage.messages(chat.id)[-1]
        assert answer.role == "assistant" and answer.status == "stopped" and answer.content


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_termination_mid_answer_keeps_what_was_printed(home: Path, tiny_model_dir: Path, signum: int) -> None:
    """`timeout 5 mixtral-chat ask ...` or a closed terminal: stopped as Ctrl+C stops it (the
    printed text stored as stopped, no instance left registered), exit 128 + the signal."""
    process = subprocess.Popen(
        [*CLI, "ask", "--model", str(tiny_model_dir), "--max-tokens", "3000", "a long answer, please"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    printed = process.stdout.read(20)
    process.send_signal(signum)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    with Storage() as storage:
        [chat] = storage.list_conversations()
        answer = storage.messages(chat.id)[-1]
        assert answer.status == "stopped" and answer.content.encode().startswith(printed)
        assert storage.other_instances() == []


def test_quant_on_a_quantized_model_says_it_runs_as_it_is(
    home: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    int4 = tmp_path / "int4"
    assert run_cli("quantize", str(tiny_model_dir), str(int4), "--scheme", "int4").returncode == 0
    asked = run_cli("ask", "--model", str(int4), "--quant", "nf4", "--max-tokens", "2", "--no-log", "hi")
    assert asked.returncode == 0, asked.stderr
    assert "mixtral-chat: --quant nf4 is for float models: " in asked.stderr
    assert "is int4 already and runs as it is" in asked.stderr
    on_float = run_cli(
        "ask", "--model", str(tiny_model_dir), "--quant", "int4", "--max-tokens", "2", "--no-log", "hi"
    )
    assert on_float.returncode == 0 and "is for float models" not in on_float.stderr


def test_a_home_that_is_a_file_is_said_once(tmp_path: Path) -> None:
    home_file = tmp_path / "home"
    home_file.write_text("not a folder")
    for command in (["ask", "hi"], ["models", "list"]):
        result = run_cli(*command, env={"MIXTRAL_CHAT_HOME": str(home_file)})
        assert result.returncode == 1
        assert error_line(result.stderr) == (
            f"mixtral-chat: error: MIXTRAL_CHAT_HOME={home_file} is a file, not a folder: give it a folder"
        )


def test_a_data_folder_that_cannot_be_made_costs_the_log_not_the_answer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """(As root no permission stops a mkdir: a file where the folder goes does.)"""
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").write_text("in the way")
    result = run_cli(
        "ask", "--model", str(tiny_model_dir), "--max-tokens", "2", "hi", env={"MIXTRAL_CHAT_HOME": str(home)}
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "warning" in line]
    assert "not saved in the conversation history: cannot create the folder for the conversation" in warning
