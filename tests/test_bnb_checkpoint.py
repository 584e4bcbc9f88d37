"""bitsandbytes 4-bit checkpoints (transformers' `quantization_config`) load as they are.

Oracles: transformers' own bnb-quantized model for the checkpoints transformers 5 saves (4-bit
attention, float experts), and bitsandbytes' `dequantize_4bit` for checkpoints written the way
transformers 4.x wrote them (every expert's w1/w2/w3 and the router gate 4-bit too).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_chat.engine.errors import MixtralChatError, QuantizationError, WeightsError
from mixtral_chat.engine.options import GenerationConfig, LoadOptions
from mixtral_chat.engine.runtime import Engine
from mixtral_chat.engine.weights import load_model
from mixtral_chat.quant import Nf4Linear, is_bnb_4bit_checkpoint, is_quantizable
from mixtral_chat.quant.bnb import bitsandbytes, bnb_functional
from mixtral_chat.quant.nf4 import dequantize_nf4
from tests.conftest import mistral_tokenizer_path, run_cli, save_tiny_checkpoint

TOKENS = torch.randint(0, 32000, (1, 20), generator=torch.Generator().manual_seed(1))
# (quant type, double quantization) of the checkpoints transformers saves here.
TRANSFORMERS_CASES = [("nf4", True), ("nf4", False), ("fp4", True)]
NATIVE_LOGITS_BOUND = 0.025  # measured 0.0140 (dq) and 0.0145 (no dq) on the 2-layer wide model
# transformers 4.x's BitsAndBytesConfig.to_dict() for a Mixtral 4-bit repo.
V4_QUANTIZATION_CONFIG = {
    "_load_in_4bit": True,
    "_load_in_8bit": False,
    "bnb_4bit_compute_dtype": "float16",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": True,
    "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def our_logits(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = load_model(model_dir, "cpu", dtype)
    model.setup_cache(64)
    with torch.no_grad():
        return model(TOKENS, torch.arange(TOKENS.shape[1]))


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module")
def transformers_saved(
    float_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, bool], tuple[Path, torch.Tensor]]:
    """Checkpoints transformers quantized (bnb, on CPU) and saved, with the logits of its model
    on TOKENS, each of its 4-bit layers standing for bnb's own dequantization of that layer.

    The logits are not those of transformers' quantized model as it runs: bitsandbytes 0.50's CPU
    dequantization of a 2-D weight is wrong on AVX-512 hosts where in_features is not a multiple
    of the block size (the tiny model's 32 < 64; quant/nf4.py `dequantize_nf4`), and on
    avx512_bf16 hosts `Linear4bit.forward` first repacks each weight for a bf16 kernel, which
    fails for layers narrower than a block (`shape '[32, 0]' is invalid`). bnb's dequantization
    of the flat codes is right on every host, and is what its portable CPU path multiplies by.
    """
    bitsandbytes()  # before transformers imports it: no kernel-hub lookup (quant/bnb.py)
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig, MixtralForCausalLM

    bnbf = bnb_functional()
    saved = {}
    for quant_type, double_quant in TRANSFORMERS_CASES:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = MixtralForCausalLM.from_pretrained(
            float_dir, quantization_config=config, device_map="cpu", dtype=torch.float32
        ).eval()
        directory = tmp_path_factory.mktemp(f"bnb-{quant_type}-{double_quant}")
        model.save_pretrained(directory)
        shutil.copy(mistral_tokenizer_path(), directory / "tokenizer.model")
        for name, module in list(model.named_modules()):
            if isinstance(module, Linear4bit):
                state = copy.copy(module.weight.quant_state)
                state.shape = torch.Size([module.out_features * module.in_features])  # flat
                weight = bnbf.dequantize_4bit(module.weight.data.view(-1, 1), state)
                dense = torch.nn.Linear(module.in_features, module.out_features, bias=False)
                dense.weight.data = weight.view(module.out_features, module.in_features).float()
                model.set_submodule(name, dense)
        with torch.no_grad():
            saved[quant_type, double_quant] = directory, model(TOKENS).logits
    return saved


def write_v4_checkpoint(float_dir: Path, directory: Path, double_quant: bool) -> dict[str, tuple]:
    """The checkpoint transformers 4.x wrote for a bnb 4-bit Mixtral: float16 weights, every
    attention and expert linear and the router gate quantized by bnb (blocksize 64, nf4), each
    stored as its codes plus `QuantState.as_dict(packed=True)`; two shards and an index.
    Returns each quantized key's (codes, QuantState)."""
    bnbf = bnb_functional()

    directory.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    states = {}
    for key, value in sorted(load_file(float_dir / "model.safetensors").items()):
        value = value.to(torch.float16)
        if is_quantizable(key) or key.endswith(".block_sparse_moe.gate.weight"):
            codes, state = bnbf.quantize_4bit(
                value, blocksize=64, quant_type="nf4", compress_statistics=double_quant
            )
            tensors[key] = codes
            for item, part in state.as_dict(packed=True).items():
                tensors[f"{key}.{item}"] = part
            states[key] = codes, state
        else:
            tensors[key] = value
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in shard_keys}, directory / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {**V4_QUANTIZATION_CONFIG, "bnb_4bit_use_double_quant": double_quant}
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(mistral_tokenizer_path(), directory / "tokenizer.model")
    return states


def dequantized_float32(codes: torch.Tensor, state) -> torch.Tensor:
    bnbf = bnb_functional()

    state = copy.deepcopy(state)
    state.dtype = torch.float32  # what the float32 model computes with
    return bnbf.dequantize_4bit(codes, state)


@pytest.fixture(scope="module")
def v4_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, dict]]:
    # Twice the tiny model's width: every row then holds whole blocks of 64, which the native
    # CPU kernel needs (with hidden 32, blocks span rows and bitsandbytes computes).
    source = save_tiny_checkpoint(
        tmp_path_factory.mktemp("float-wide"), hidden_size=64, intermediate_size=128
    )
    root = tmp_path_factory.mktemp("v4")
    dirs = {dq: root / ("dq" if dq else "no-dq") for dq in (True, False)}
    return {dq: (path, write_v4_checkpoint(source, path, dq)) for dq, path in dirs.items()}


@pytest.mark.parametrize("case", TRANSFORMERS_CASES, ids=[f"{q}-dq{d}" for q, d in TRANSFORMERS_CASES])
def test_logits_match_the_transformers_quantized_model(transformers_saved, float_dir: Path, case) -> None:
    directory, expected = transformers_saved[case]
    assert is_bnb_4bit_checkpoint(directory) and not is_bnb_4bit_checkpoint(float_dir)
    got = our_logits(directory)
    # Measured: 0.0 (the same dequantized weights in float32); logits are O(0.5).
    assert (got - expected).abs().max().item() <= 1e-5
    # The quantization is real: the float model differs by ~0.04.
    assert (our_logits(float_dir) - expected).abs().max().item() > 1e-3

    model = load_model(directory)
    state = load_file(directory / "model.safetensors")
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Nf4Linear) and q_proj.quant_type == case[0] and q_proj.double_quant == case[1]
    prefix = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(q_proj.qweight, state[prefix])  # the stored codes, not re-quantized
    assert torch.equal(q_proj.absmax, state[f"{prefix}.absmax"])
    # transformers 5 saves the fused experts in float.
    w1 = model.layers[0].block_sparse_moe.experts[0].w1
    assert isinstance(w1, torch.nn.Linear)
    assert torch.equal(w1.weight, state["model.layers.0.block_sparse_moe.experts.0.w1.weight"])


def test_bfloat16_runs_close_to_transformers(transformers_saved) -> None:
    directory, expected = transformers_saved["nf4", True]
    model = load_model(directory, "cpu", torch.bfloat16)
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Nf4Linear) and q_proj.compute_dtype == torch.bfloat16
    got = our_logits(directory, torch.bfloat16)
    assert got.dtype == torch.float32
    # Measured: 0.0035 against transformers' float32 logits of O(0.5) (bf16 keeps ~3 digits).
    assert (got - expected).abs().max().item() < 0.05


@pytest.mark.parametrize("backend", ["bnb", "native"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_experts_and_router_saved_in_4bit_load_as_bnb_dequantizes_them(
    v4_dirs, tmp_path: Path, double_quant: bool, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIXTRAL_CHAT_NO_NATIVE", "1" if backend == "bnb" else "0")
    directory, states = v4_dirs[double_quant]
    model = load_model(directory)
    dequantized = {key: dequantized_float32(*value) for key, value in states.items()}
    for key in (
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        "model.layers.1.block_sparse_moe.experts.2.w3.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ):
        layer = model.get_submodule(key.removeprefix("model.").removesuffix(".weight"))
        assert isinstance(layer, Nf4Linear) and layer.double_quant == double_quant
        assert layer.backend == backend
        ours = dequantize_nf4(layer._parts(), layer.out_features, layer.in_features, layer.blocksize)
        assert torch.equal(ours, dequantized[key]), key
    # mixtral-chat keeps the router in float: dequantized once, exactly as bnb does.
    gate = model.layers[1].block_sparse_moe.gate
    assert isinstance(gate, torch.nn.Linear) and gate.weight.dtype == torch.float32
    assert torch.equal(gate.weight, dequantized["model.layers.1.block_sparse_moe.gate.weight"])

    # Against a float model of the dequantized weights (the other tensors as stored, float16).
    float_dir = tmp_path / "dequantized"
    float_dir.mkdir()
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    float_state = {
        key: dequantized.get(key, value.float())
        for key, value in state.items()
        if key in dequantized or not key.startswith(tuple(f"{k}." for k in dequantized))
    }
    save_file(float_state, float_dir / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (float_dir / "config.json").write_text(json.dumps(config))
    ours, reference = our_logits(directory), our_logits(float_dir)
    if backend == "bnb":
        diff = (ours - reference).abs().max().item()
        assert diff <= 1e-5  # measured: 0.0 (bnb's CPU matmul_4bit dequantizes, then multiplies)
    else:
        # x and the code book rounded to int8 / 7 bits: ~1% per layer (tests/test_nf4_native.py).
        print(f"\nnative logits: relative error {rel_error(ours, reference):.2e}")
        assert rel_error(ours, reference) < NATIVE_LOGITS_BOUND


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_offloading_a_bnb_checkpoint_gives_the_same_text(v4_dirs, isolated_home: Path, store: str) -> None:
    directory, _ = v4_dirs[True]
    messages = [{"role": "user", "content": "Tell me a story"}]
    config = GenerationConfig(max_tokens=12)
    resident = Engine.load(directory, LoadOptions(device="cpu", dtype="float32"))
    assert resident.info.scheme == "nf4 (bitsandbytes)"
    expected = "".join(resident.chat(messages, config))
    engine = Engine.load(
        directory,
        LoadOptions(device="cpu", dtype="float32", offload=True, experts_per_layer=2, offload_store=store),
    )
    try:
        assert engine.info.scheme == "nf4 (bitsandbytes)"
        assert "".join(engine.chat(messages, config)) == expected
        stats = engine.cache_stats()
        assert stats is not None and stats["hits"] + stats["misses"] > 0
    finally:
        engine.close()


def rewrite(
    source: Path,
    target: Path,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    quantization: Callable[[dict], None] | None = None,
) -> Path:
    """A copy of a single-file checkpoint with its tensors and/or quantization_config edited."""
    shutil.copytree(source, target)
    if tensors is not None:
        state = load_file(source / "model.safetensors")
        tensors(state)
        save_file(state, target / "model.safetensors")
    if quantization is not None:
        config = json.loads((source / "config.json").read_text())
        quantization(config["quantization_config"])
        (target / "config.json").write_text(json.dumps(config))
    return target


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
STATE = f"{Q_PROJ}.quant_state.bitsandbytes__nf4"


def packed_json(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def edit_state(**changes: object) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        fields = json.loads(bytes(state[STATE].tolist()))
        state[STATE] = packed_json(json.dumps({**fields, **changes}))

    return edit


DAMAGE = {
    "missing absmax": (
        lambda s: s.pop(f"{Q_PROJ}.absmax"),
        QuantizationError,
        f"missing tensor '{Q_PROJ}.absmax' (incomplete bitsandbytes 4-bit weight)",
    ),
    "missing nested quant map": (
        lambda s: s.pop(f"{Q_PROJ}.nested_quant_map"),
        QuantizationError,
        f"missing tensor '{Q_PROJ}.nested_quant_map'",
    ),
    "missing quant state": (lambda s: s.pop(STATE), QuantizationError, f"missing tensor '{STATE}'"),
    "missing codes": (lambda s: s.pop(Q_PROJ), QuantizationError, f"missing tensor '{Q_PROJ}'"),
    "quant state not JSON": (
        lambda s: s.update({STATE: packed_json('{"quant_type": "nf4", "blocksize"')}),
        QuantizationError,
        f"tensor '{STATE}' is not a bitsandbytes quantization state (not JSON)",
    ),
    "quant state without a field": (
        lambda s: s.update({STATE: packed_json('{"quant_type": "nf4"}')}),
        QuantizationError,
        "corrupt bitsandbytes quantization state (no 'blocksize')",
    ),
    "quant state of another shape": (
        edit_state(shape=[32, 16]),
        QuantizationError,
        "its quantization state says shape [32, 16], config.json implies [32, 32]",
    ),
    "odd block size": (edit_state(blocksize=48), QuantizationError, "unsupported block size 48"),
    "short absmax": (
        lambda s: s.update({f"{Q_PROJ}.absmax": s[f"{Q_PROJ}.absmax"][:-1].clone()}),
        QuantizationError,
        "'absmax' is torch.uint8 (15,), expected torch.uint8 (16,)",
    ),
    "codes of another size": (
        lambda s: s.update({Q_PROJ: s[Q_PROJ][:-2].clone()}),
        WeightsError,
        f"4-bit tensor '{Q_PROJ}' holds 510 bytes, a [32, 32] weight takes 512",
    ),
    "4-bit weight without its state": (
        lambda s: [s.pop(k) for k in list(s) if k.startswith(f"{Q_PROJ}.")],
        QuantizationError,
        f"tensor '{Q_PROJ}' is U8 without a bitsandbytes quantization state",
    ),
    "unexpected tensor": (
        lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(2)}),
        WeightsError,
        "unexpected tensor 'model.layers.0.extra.weight'",
    ),
    "missing float tensor": (
        lambda s: s.pop("model.norm.weight"),
        WeightsError,
        "missing tensor 'model.norm.weight'",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_checkpoints_give_one_line_errors(transformers_saved, tmp_path: Path, damage) -> None:
    edit, error, message = damage
    directory = rewrite(transformers_saved["nf4", True][0], tmp_path / "damaged", tensors=edit)
    with pytest.raises(error) as info:
        load_model(directory)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert str(directory) in text


CONFIGS = {
    "8-bit": (
        lambda q: q.update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True, _load_in_8bit=True),
        "8-bit bitsandbytes checkpoints (load_in_8bit) are not supported",
    ),
    "gptq": (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
    "unknown quant type": (
        lambda q: q.update(bnb_4bit_quant_type="int4"),
        "bnb_4bit_quant_type must be nf4 or fp4, got 'int4'",
    ),
}


@pytest.mark.parametrize("change", CONFIGS.values(), ids=CONFIGS.keys())
def test_other_quantization_configs_are_refused(transformers_saved, tmp_path: Path, change) -> None:
    edit, message = change
    directory = rewrite(transformers_saved["nf4", True][0], tmp_path / "other", quantization=edit)
    assert not is_bnb_4bit_checkpoint(directory)
    with pytest.raises(QuantizationError, match=re.escape(message)):
        load_model(directory)


def test_quantizing_again_is_refused(transformers_saved) -> None:
    directory, _ = transformers_saved["nf4", True]
    with pytest.raises(QuantizationError, match=r"already 4-bit \(nf4 \(bitsandbytes\)\)"):
        load_model(directory, quant="int4")
    with pytest.raises(MixtralChatError, match="already 4-bit"):
        Engine.load(directory, LoadOptions(device="cpu", quant="nf4"))
    assert load_model(directory, quant="none").layers[0].self_attn.q_proj.quant_type == "nf4"
    result = run_cli("ask", "--model", str(directory), "--device", "cpu", "--quant", "int4", "hi")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mixtral-chat: error: ")
    assert "already 4-bit" in result.stderr and "Traceback" not in result.stderr
