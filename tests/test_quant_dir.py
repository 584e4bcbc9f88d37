"""Quantized model directories: the CLI, save/load against in-memory quantization, resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, run_cli, save_tiny_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.units import format_bytes
from mixtral_chat.engine.weights import load_model
from mixtral_chat.quant import (
    ExpertBlobReader,
    QuantConfig,
    QuantizationCancelled,
    QuantProgress,
    get_scheme,
    quantize_model_dir,
    quantize_model_in_memory,
)
from mixtral_chat.quant import convert as convert_module

# (scheme, group size, double quant) of the directories made once per module.
VARIANTS = {"int4": ("int4", 32, False), "nf4": ("nf4", 64, True), "none": ("none", None, False)}
# Relative error of the tiny model's logits, 4-bit vs float. It depends on the draw of random
# weights, and that draw depends on the host (torch's vectorized normal_ differs between AVX2 and
# AVX-512 builds), so the bound is the spread over 20 seeds (Sapphire Rapids, AVX-512):
# int4 g32 mean 0.054 sd 0.0063 max 0.065; nf4 b64 + double quant mean 0.066 sd 0.0074 max 0.077
# (Zen 3 drew 0.056 / 0.058). Bound: mean + 5 sd.
LOGITS_BOUND = {"int4": 0.086, "nf4": 0.103, "none": 0.0}


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    return tensors


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.setup_cache(64, batch=tokens.shape[0])
    return model(tokens, torch.arange(tokens.shape[1]))


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Small shards: experts of one layer spread over several shards, as in the real checkpoint.
    return save_tiny_checkpoint(tmp_path_factory.mktemp("float") / "tiny", max_shard_size="100KB")


@pytest.fixture(scope="module")
def quantized(float_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("quantized")
    return {
        name: quantize_model_dir(float_dir, base / name, scheme, group, double_quant=dq)
        for name, (scheme, group, dq) in VARIANTS.items()
    }


def test_cli_quantizes_into_a_model_directory(float_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "models" / "tiny-int4"
    result = run_cli(
        "quantize", str(float_dir), str(dst), "--scheme", "int4", "--group-size", "32", "--threads", "1"
    )
    assert result.returncode == 0, result.stderr
    # Not a terminal: plain lines, the first and the last of each phase (10 s apart otherwise).
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    source = sum(p.stat().st_size for p in float_dir.glob("*.safetensors"))
    shards = len(list(float_dir.glob("*.safetensors")))
    assert lines[0].startswith(f"quantizing    0.0%  0 B / {format_bytes(source)}  ")
    assert "ETA " in lines[0] and "elapsed " in lines[0] and f"0/{shards} shards" in lines[0]
    assert lines[-3].startswith(f"quantizing  100.0%  {format_bytes(source)} / {format_bytes(source)}  ")
    assert "B/s  elapsed " in lines[-3] and f"{shards}/{shards} shards" in lines[-3]
    assert lines[-2].startswith("writing index and config    0.0%  elapsed ")
    assert lines[-1].startswith("writing index and config  100.0%  elapsed ")
    assert "int4 (group size 32)" in result.stdout
    assert not (dst.parent / ".tiny-int4.partial").exists()
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.model", "quant_config.json"} <= names
    assert "model.safetensors.index.json" in names and "progress.json" not in names
    config = json.loads((dst / "quant_config.json").read_text())
    assert config["scheme"] == "int4" and config["group_size"] == 32 and config["format_version"] == 1
    assert set(config["libraries"]) == {"torch", "bitsandbytes", "safetensors", "mixtral-chat"}
    assert config["source"]["files"] == {p.name: p.stat().st_size for p in float_dir.glob("*.safetensors")}
    assert len(config["source"]["config_sha256"]) == 64
    # Every expert is one blob; no float expert or attention weight is left.
    tensors = read_all(dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(tensors)
    blobs = [k for k in tensors if k.endswith(".packed")]
    assert len(blobs) == 2 * 4 and all(
        tensors[k].dtype == torch.uint8 and tensors[k].dim() == 1 for k in blobs
    )
    assert not [k for k in tensors if ".experts." in k and not k.endswith(".packed")]
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == torch.bfloat16
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # kept as stored
    # It loads and computes exactly what in-memory quantization computes.
    tokens = torch.randint(0, 32000, (1, 11), generator=torch.Generator().manual_seed(0))
    loaded = logits(load_model(dst), tokens)
    in_memory = logits(load_model(float_dir, quant="int4", group_size=32), tokens)
    assert torch.equal(loaded, in_memory)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_quantized_directory_loads_to_the_in_memory_model_bit_for_bit(
    variant: str, float_dir: Path, quantized: dict[str, Path]
) -> None:
    scheme, group, double_quant = VARIANTS[variant]
    # The stored tensors are exactly the handler's quantized state dict of the float weights.
    handler = get_scheme(scheme, group, double_quant, float_dtype=torch.float32 if scheme == "none" else None)
    expected = handler.quantize_state_dict(read_all(float_dir))
    stored = read_all(quantized[variant])
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) for k in stored)
    # Whole-model logits: loaded directory == in-memory quantization, close to the float model.
    tokens = torch.randint(0, 32000, (2, 9), generator=torch.Generator().manual_seed(1))
    loaded = load_model(quantized[variant])
    in_memory = load_model(float_dir)
    float_logits = logits(load_model(float_dir), tokens)
    quantize_model_in_memory(in_memory, scheme, group, double_quant)
    loaded_logits = logits(loaded, tokens)
    assert torch.equal(loaded_logits, logits(in_memory, tokens))
    error = float((loaded_logits - float_logits).norm() / float_logits.norm())
    assert error <= LOGITS_BOUND[variant]
    if scheme != "none":
        assert error > 0.01  # it is quantized
        assert (
            type(loaded.layers[1].block_sparse_moe.experts[3].w2).__name__ == f"{scheme.capitalize()}Linear"
        )
        assert isinstance(loaded.layers[0].block_sparse_moe.gate, torch.nn.Linear)  # router stays float


def test_bfloat16_checkpoint_loads_bit_identical_in_bfloat16(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    src = tmp_path / "bf16"
    torch.manual_seed(3)
    # hidden 40 and intermediate 72 are not multiples of the group: int4 pads them.
    config = MixtralConfig(**{**TINY_CONFIG, "hidden_size": 40, "intermediate_size": 72})
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(src)
    dst = quantize_model_dir(src, tmp_path / "bf16-int4", "int4", 32)
    tokens = torch.randint(0, 32000, (1, 7), generator=torch.Generator().manual_seed(2))
    loaded = load_model(dst, dtype=torch.bfloat16)
    in_memory = load_model(src, dtype=torch.bfloat16, quant="int4", group_size=32)
    assert loaded.layers[0].block_sparse_moe.experts[0].w2.padded_in == 96
    assert torch.equal(logits(loaded, tokens), logits(in_memory, tokens))


def test_expert_blobs_can_be_read_one_at_a_time(quantized: dict[str, Path]) -> None:
    reader = ExpertBlobReader(quantized["nf4"])
    assert reader.experts() == [(layer, e) for layer in range(2) for e in range(4)]
    file, offset, nbytes = reader.location(1, 2)
    assert nbytes == reader.layout.nbytes
    with open(file, "rb") as f:
        f.seek(offset)
        raw = f.read(nbytes)
    blob = reader.read(1, 2)
    assert raw == blob.numpy().tobytes()
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    assert reader.read(1, 2, out=buffer).data_ptr() == buffer.data_ptr()
    modules = reader.linears(1, 2, "cpu", torch.float32)
    model = load_model(quantized["nf4"])
    x = torch.randn(3, 32)
    for name in ("w1", "w3"):
        assert torch.equal(modules[name](x), getattr(model.layers[1].block_sparse_moe.experts[2], name)(x))


def copy_of(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "quant_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def drop_tensor(directory: Path, key: str) -> None:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    file = directory / index["weight_map"].pop(key)
    with safe_open(file, "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != key}  # noqa: SIM118
    save_file(kept, file)
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "quant_config.json").write_text('{"scheme": "int4", '), "quant_config.json: corrupt"),
        (lambda d: (d / "quant_config.json").write_text("[1, 2]"), r"corrupt \(expected a JSON object\)"),
        (lambda d: edit_config(d, scheme="int3"), "unknown quantization scheme 'int3'"),
        (lambda d: edit_config(d, format_version=99), "format version 99 is newer"),
        (lambda d: edit_config(d, group_size=64), "expert_layout does not match int4 .group size 64"),
        (lambda d: edit_config(d, group_size=48), "int4 group size must be one of"),
        (
            lambda d: drop_tensor(d, "model.layers.1.self_attn.v_proj.scales"),
            "v_proj': missing 'scales' tensor",
        ),
        (
            lambda d: drop_tensor(d, "model.layers.0.block_sparse_moe.experts.3.packed"),
            "missing expert blob 'model.layers.0.block_sparse_moe.experts.3.packed'",
        ),
    ],
)
def test_damaged_quantized_directories_give_clear_errors(
    damage, message: str, quantized: dict[str, Path], tmp_path: Path
) -> None:
    directory = copy_of(quantized["int4"], tmp_path)
    damage(directory)
    with pytest.raises(Exception, match=message) as info:
        load_model(directory)
    assert "\n" not in str(info.value)
    assert type(info.value).__name__ in {"QuantizationError", "WeightsError"}


def test_mismatched_group_size_of_attention_tensors_is_named(
    quantized: dict[str, Path], tmp_path: Path
) -> None:
    # Without the expert layout to catch it, the attention scales' shapes give it away.
    directory = copy_of(quantized["int4"], tmp_path)
    edit_config(directory, group_size=64, expert_layout=None)
    for layer in range(2):
        for e in range(4):
            drop_tensor(directory, f"model.layers.{layer}.block_sparse_moe.experts.{e}.packed")
    with pytest.raises(
        QuantizationError,
        match=r"'qweight' has shape \(16, 16\), expected \(16, 32\) "
        r"\(was it quantized with another group size than 64\?\)",
    ):
        load_model(directory)


def test_cancel_then_resume_finishes_the_same_model(float_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    partial = tmp_path / ".out.partial"
    cancel = threading.Event()
    seen: list[QuantProgress] = []

    def cancel_after_first_shard(p: QuantProgress) -> None:
        seen.append(p)
        if p.shards_done >= 1:
            cancel.set()

    with pytest.raises(QuantizationCancelled, match="run it again to resume") as info:
        quantize_model_dir(float_dir, dst, "int4", 32, progress=cancel_after_first_shard, cancel=cancel)
    assert "\n" not in str(info.value)
    assert not dst.exists()  # never half a model at DST
    progress = json.loads((partial / "progress.json").read_text())
    assert len(progress["done"]) == 1
    assert not list(partial.glob("*.tmp"))  # the interrupted shard was removed
    finished_first = next(iter(progress["done"]))
    first_mtime = (partial / finished_first).stat().st_mtime_ns

    resumed: list[QuantProgress] = []
    quantize_model_dir(float_dir, dst, "int4", 32, progress=resumed.append)
    assert resumed[0].shards_done == 1 and resumed[0].tensors_done > 0  # it resumed
    assert resumed[-1].phase == "done" and resumed[-1].tensors_done == resumed[-1].tensors_total
    assert [p.tensors_done for p in resumed] == sorted(p.tensors_done for p in resumed)
    assert (dst / finished_first).stat().st_mtime_ns == first_mtime  # not rewritten
    assert not partial.exists()

    fresh = quantize_model_dir(float_dir, tmp_path / "fresh", "int4", 32)
    for file in fresh.glob("*.safetensors"):
        assert file.read_bytes() == (dst / file.name).read_bytes()


@pytest.mark.parametrize("moment", ["the file made", "the file closed"])
def test_an_interrupt_between_a_shard_file_and_its_clean_up_leaves_no_temporary(
    float_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """Ctrl-C right after the second shard's file is made (before the writer's own clean-up takes
    charge: a CI run once left a .tmp so), and as it closes. The run stops with the first shard
    kept and no .tmp left."""
    made: list[Path] = []

    class InterruptedWriter(convert_module.StreamWriter):
        def __init__(self, path: Path, *args: object, **kwargs: object) -> None:
            super().__init__(path, *args, **kwargs)
            made.append(path)
            if moment == "the file made" and len(made) == 2:
                raise KeyboardInterrupt

        def close(self) -> None:
            super().close()
            if moment == "the file closed" and len(made) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "StreamWriter", InterruptedWriter)
    with pytest.raises(KeyboardInterrupt):
        quantize_model_dir(float_dir, tmp_path / "out", "int4", 32)
    partial = tmp_path / ".out.partial"
    assert len(made) == 2 and made[1].name.endswith(".tmp")
    assert not list(partial.glob("*.tmp"))
    assert len(json.loads((partial / "progress.json").read_text())["done"]) == 1


def test_a_partial_run_with_other_options_is_started_over(float_dir: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(QuantizationCancelled):
        quantize_model_dir(float_dir, tmp_path / "out", "int4", 32, cancel=cancel)
    assert (tmp_path / ".out.partial" / "progress.json").exists()
    dst = quantize_model_dir(float_dir, tmp_path / "out", "nf4", 64)
    assert QuantConfig.read(dst).scheme == "nf4"
    # A directory in the way that is not ours is never deleted.
    (tmp_path / ".other.partial").mkdir()
    with pytest.raises(QuantizationError, match="is not an unfinished quantization"):
        quantize_model_dir(float_dir, tmp_path / "other", "int4", 32)


def test_requests_that_cannot_work_fail_before_writing(
    float_dir: Path, quantized: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(QuantizationError, match="already exists"):
        quantize_model_dir(float_dir, quantized["int4"], "int4")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model_dir(quantized["int4"], tmp_path / "twice", "int4")
    with pytest.raises(QuantizationError, match="source model directory not found"):
        quantize_model_dir(tmp_path / "nowhere", tmp_path / "x", "int4")
    with pytest.raises(QuantizationError, match="int4 group size must be one of"):
        quantize_model_dir(float_dir, tmp_path / "x", "int4", 100)
    # A full disk cannot be made for real here: report a small one.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda _: usage._replace(free=100_000))
    with pytest.raises(
        QuantizationError, match=r"not enough disk space in .*: the quantized model needs [\d.]+ MB"
    ):
        quantize_model_dir(float_dir, tmp_path / "full", "int4")
    assert not (tmp_path / "full").exists() and not (tmp_path / ".full.partial").exists()
    assert not (tmp_path / "x").exists()


def test_cli_errors_are_one_line(float_dir: Path, quantized: dict[str, Path]) -> None:
    result = run_cli("quantize", str(float_dir), str(quantized["int4"]), "--scheme", "nf4")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"mixtral-chat: error: {quantized['int4']} already exists; choose a new destination or remove it"
    ]
    usage = run_cli("quantize", str(float_dir), "x", "--scheme", "int8")
    assert usage.returncode == 2 and "invalid choice: 'int8'" in usage.stderr


# Run in a fresh interpreter: its peak RSS (VmHWM, reset after the imports) is the converter's.
_RSS_SCRIPT = """
import sys, torch
from pathlib import Path
from mixtral_chat.quant import quantize_model_dir
torch.set_num_threads(1)
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
base = status('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset VmHWM to the current RSS
quantize_model_dir(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], 64)
print(base, status('VmHWM'))
"""


def write_synthetic_checkpoint(
    directory: Path, layers: int, experts: int, hidden: int, intermediate: int
) -> None:
    """A Mixtral-shaped bf16 checkpoint, one shard per layer plus one for the embeddings."""
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(1024, hidden), "lm_head.weight": rand(1024, hidden)}]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        shard = {
            f"{p}.self_attn.{n}.weight": rand(hidden, hidden)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        shard[f"{p}.block_sparse_moe.gate.weight"] = rand(experts, hidden)
        for e in range(experts):
            for w, shape in (
                ("w1", (intermediate, hidden)),
                ("w2", (hidden, intermediate)),
                ("w3", (intermediate, hidden)),
            ):
                shard[f"{p}.block_sparse_moe.experts.{e}.{w}.weight"] = rand(*shape)
        shards.append(shard)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": hidden}))


def test_peak_memory_stays_under_twice_the_largest_shard(tmp_path: Path) -> None:
    # int4 only: bnb's NF4 quantization runs at ~18 MB/s per core here, too slow for a unit
    # test; bench/bench_quant.py --mode quantize measures both on a >= 2 GB checkpoint.
    scheme = "int4"
    src = tmp_path / "synthetic"
    # 2 layers x 8 experts x 3 linears of 1024x1536 in bf16: shards of ~84 MB.
    write_synthetic_checkpoint(src, layers=2, experts=8, hidden=1024, intermediate=1536)
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(src), str(tmp_path / "out"), scheme],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    base, peak = map(int, result.stdout.split())
    growth = peak - base
    print(f"\n{scheme}: largest shard {largest / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.0f} MB")
    assert growth <= 2 * largest
