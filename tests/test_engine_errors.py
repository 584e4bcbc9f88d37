"""Bad input: one clear line naming the file and the field or tensor; CLI exit codes 1 and 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import ConfigError, WeightsError
from mixtral_chat.engine.weights import load_model
from tests.conftest import run_cli, save_tiny_checkpoint


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


def edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config.json: not found"):
        ModelArgs.from_hf_config(tmp_path)


def test_config_not_json(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        ModelArgs.from_hf_config(model_copy)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": ...}, r"config.json: missing field 'hidden_size'"),
        ({"num_local_experts": 0}, r"field 'num_local_experts' must be a positive integer, got 0"),
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) exceeds num_local_experts \(4\)"),
        ({"rms_norm_eps": "small"}, r"field 'rms_norm_eps' must be a positive number, got 'small'"),
        ({"num_key_value_heads": 3}, r"must be a multiple of num_key_value_heads \(3\)"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, r"unsupported architecture"),
        ({"rope_parameters": {"rope_theta": -1}}, r"rope_parameters: field 'rope_theta' must be a positive"),
    ],
)
def test_invalid_config_fields(model_copy: Path, changes: dict, message: str) -> None:
    edit_config(model_copy, **changes)
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_hf_config(model_copy)


def test_missing_weights(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no model.safetensors or model.safetensors.index.json found"):
        load_model(model_copy)


def test_pickle_weights_are_refused(model_copy: Path) -> None:
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        load_model(model_copy)


def test_truncated_weights(model_copy: Path) -> None:
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        WeightsError, match=r"model.safetensors: truncated safetensors file \(tensor '.*' is cut off\)"
    ):
        load_model(model_copy)


def test_corrupt_header(model_copy: Path) -> None:
    path = model_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"model.safetensors: corrupt safetensors header"):
        load_model(model_copy)


def test_shapes_that_do_not_match_the_config(model_copy: Path) -> None:
    edit_config(model_copy, intermediate_size=48)
    with pytest.raises(
        WeightsError,
        match=r"tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape \(64, 32\), "
        r"config.json implies \(48, 32\)",
    ):
        load_model(model_copy)


def rewrite_tensors(directory: Path, change) -> None:
    from safetensors import safe_open

    path = directory / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    change(tensors)
    save_file(tensors, str(path))


def test_missing_and_unexpected_and_wrong_dtype_tensors(model_copy: Path) -> None:
    rewrite_tensors(model_copy, lambda t: t.pop("model.layers.1.block_sparse_moe.gate.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor 'model.layers.1.block_sparse_moe.gate.weight'"):
        load_model(model_copy)
    rewrite_tensors(
        model_copy,
        lambda t: t.update(
            {
                "model.layers.1.block_sparse_moe.gate.weight": torch.zeros(4, 32),
                "model.layers.9.mlp.weight": torch.zeros(2),
            }
        ),
    )
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model.layers.9.mlp.weight'"):
        load_model(model_copy)
    rewrite_tensors(
        model_copy,
        lambda t: (
            t.update(
                {
                    "model.layers.9.mlp.weight": None,
                    "model.norm.weight": torch.ones(32, dtype=torch.int32),
                }
            )
            or t.pop("model.layers.9.mlp.weight")
        ),
    )
    with pytest.raises(
        WeightsError, match=r"tensor 'model.norm.weight' has dtype I32, expected a float type"
    ):
        load_model(model_copy)


def test_missing_shard(tmp_path: Path) -> None:
    directory = save_tiny_checkpoint(tmp_path / "sharded", with_tokenizer=False, max_shard_size="1MB")
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(
        WeightsError, match=rf"{shard.name}: shard listed in model.safetensors.index.json is missing"
    ):
        load_model(directory)


def test_cli_errors_are_one_line_with_exit_codes(model_copy: Path, tmp_path: Path) -> None:
    missing = run_cli("ask", "--model", str(tmp_path / "nowhere"), "hi")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("mixtral-chat: error: ")
    assert "Traceback" not in missing.stderr

    (model_copy / "model.safetensors").write_bytes(b"\x00" * 4)
    corrupt = run_cli("ask", "--model", str(model_copy), "hi")
    assert corrupt.returncode == 1
    assert corrupt.stderr.strip() == (
        f"mixtral-chat: error: {model_copy / 'model.safetensors'}: truncated safetensors file (no header)"
    )

    no_prompt = run_cli("ask", "--model", str(model_copy))
    assert no_prompt.returncode == 2
    assert "no prompt" in no_prompt.stderr

    bad_flag = run_cli("ask", "--temperature", "-1", "hi")
    assert bad_flag.returncode == 2
    assert "temperature must be >= 0" in bad_flag.stderr

    unknown = run_cli("ask", "--frobnicate", "hi")
    assert unknown.returncode == 2


def test_cli_prompt_longer_than_the_context(tiny_model_dir: Path) -> None:
    result = run_cli("ask", "--model", str(tiny_model_dir), "--context", "32", "word " * 100)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("mixtral-chat: error: the prompt is ")
    assert "over the context of 32 tokens; raise --context (this model takes up to" in result.stderr
    assert result.stdout == ""


def test_cli_json_and_stdin(tiny_model_dir: Path) -> None:
    result = run_cli(
        "ask",
        "--model",
        str(tiny_model_dir),
        "--max-tokens",
        "5",
        "--json",
        "review this",
        input="diff --git a/x b/x\n",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) >= {"text", "finish_reason", "usage", "timings"}
    assert payload["usage"]["completion_tokens"] <= 5
    assert payload["finish_reason"] in ("stop", "length")
    from mixtral_chat.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_model_dir / "tokenizer.model")
    combined = tokenizer.encode_chat([{"role": "user", "content": "review this\n\ndiff --git a/x b/x"}])
    assert payload["usage"]["prompt_tokens"] == len(combined)


def test_loading_peak_memory_is_model_plus_one_tensor(tmp_path: Path) -> None:
    """A ~200 MB checkpoint: peak RSS while loading <= final size + one fused group (an expert's
    w1|w3, two of the largest tensors, concatenated as soon as both are read) + small slack."""
    config = dict(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    directory = tmp_path / "big"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "mixtral", **config}))
    from mixtral_chat.engine.checkpoint import module_to_hf_name
    from mixtral_chat.engine.weights import build_on_meta

    model = build_on_meta(ModelArgs.from_dict(config))
    gen = torch.Generator().manual_seed(0)
    tensors = {
        module_to_hf_name(name): torch.randn(p.shape, generator=gen) * 0.02
        for name, p in model.state_dict().items()
    }
    total = sum(t.numel() * 4 for t in tensors.values())
    largest = max(t.numel() * 4 for t in tensors.values())
    save_file(tensors, str(directory / "model.safetensors"))
    del tensors, model
    script = textwrap.dedent(
        f"""
        import torch, resource, json
        from mixtral_chat.engine.config import ModelArgs
        from mixtral_chat.engine.weights import build_on_meta, load_model
        def rss():
            for line in open('/proc/self/status'):
                if line.startswith('VmRSS'): return int(line.split()[1]) * 1024
        def hwm():
            for line in open('/proc/self/status'):
                if line.startswith('VmHWM'): return int(line.split()[1]) * 1024
        # Warm up: the first meta-device build pages in ~70 MB of libtorch code, not weights.
        build_on_meta(ModelArgs.from_hf_config({str(directory)!r})).state_dict()
        before = rss()
        open('/proc/self/clear_refs', 'w').write('5')  # reset the high-water mark
        model = load_model({str(directory)!r})
        print(json.dumps({{"before": before, "peak": hwm()}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    numbers = json.loads(out.stdout)
    growth = numbers["peak"] - numbers["before"]
    print(
        f"checkpoint {total / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB, "
        f"peak growth {growth / 1e6:.1f} MB"
    )
    assert total > 150e6
    assert growth <= total + 2 * largest + 16e6


def test_ctrl_c_stops_generation_and_keeps_what_was_printed(tiny_model_dir: Path) -> None:
    import select
    import signal

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mixtral_chat.app.cli",
            "ask",
            "--model",
            str(tiny_model_dir),
            "--max-tokens",
            "2000",
            "--context",
            "2048",
            "Write a very long story",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    printed = b""
    try:
        while len(printed) < 20:
            ready, _, _ = select.select([process.stdout], [], [], 60)
            assert ready, "no output within 60 s"
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, process.stderr.read().decode()
            printed += chunk
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert b"Traceback" not in stderr
    # The partial answer stays on stdout, ended with a newline so the shell prompt starts clean.
    assert (printed + rest).endswith(b"\n")
