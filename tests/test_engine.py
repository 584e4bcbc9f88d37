"""The engine against its oracle: transformers' MixtralForCausalLM on the same weights."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch

from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.generate import generate_tokens, sample
from mixtral_chat.engine.options import GenerationConfig, LoadOptions
from mixtral_chat.engine.runtime import Engine
from mixtral_chat.engine.weights import load_model
from tests.conftest import run_cli, save_tiny_checkpoint

CONFIGS = {
    "8 experts top-2, GQA 4:1": dict(num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=1),
    "4 experts top-1, MHA": dict(num_local_experts=4, num_experts_per_tok=1, num_key_value_heads=4),
    "4 experts top-2, GQA 2:1, sharded": dict(max_shard_size="100KB"),
    "sliding window 6": dict(sliding_window=6),
    "tied embeddings, head_dim 16": dict(tie_word_embeddings=True, head_dim=16),
}


def reference(directory: Path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    directory = save_tiny_checkpoint(tmp_path / "m", vocab_size=512, with_tokenizer=False, **overrides)
    if "max_shard_size" in overrides:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    ref = reference(directory)
    model = load_model(directory)
    model.setup_cache(64)
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        full = model(tokens, torch.arange(24))
    assert (full - expected).abs().max().item() <= 1e-4

    # The KV-cached path: a prefill of 10 tokens, then one token at a time.
    with torch.no_grad():
        steps = [model(tokens[:, :10], torch.arange(10))]
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(10, 24)]
    assert (torch.cat(steps, dim=1) - expected).abs().max().item() <= 1e-4


def test_float_weights_are_fused_as_views_and_unfused_when_rebound(tmp_path: Path) -> None:
    """q|k|v and w1|w3 run as one GEMM each on a loaded float model, the layers keeping views
    of the fused rows (state dict and memory as before); a layer rebound to other weights (an
    offload slot, quantization in memory) drops the fused copy and runs on its own weights."""
    directory = save_tiny_checkpoint(tmp_path / "m", vocab_size=512, with_tokenizer=False)
    model = load_model(directory)
    expert = model.layers[0].block_sparse_moe.experts[1]
    fused = expert._gate_up_weight
    assert fused is not None and fused.shape == (32, 128)
    assert expert.w1.weight.data_ptr() == fused.data_ptr()
    assert model.layers[1].self_attn._qkv_weight is not None
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) < len(list(model.parameters()))  # views, not copies
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unfused = expert.w2(torch.nn.functional.silu(expert.w1(x)) * expert.w3(x))
        assert (expert(x) - unfused).abs().max().item() <= 1e-6
        expert.w3.weight = torch.nn.Parameter(expert.w3.weight.clone() * 2, requires_grad=False)
        rebound = expert.w2(torch.nn.functional.silu(expert.w1(x)) * expert.w3(x))
        assert torch.equal(expert(x), rebound)
    assert expert._gate_up_weight is None
    assert copy.deepcopy(model.layers[0].block_sparse_moe.experts[2])._gate_up_weight is None


def test_bfloat16_runs_close_to_float32(tiny_model_dir: Path) -> None:
    model32 = load_model(tiny_model_dir, dtype=torch.float32)
    model16 = load_model(tiny_model_dir, dtype=torch.bfloat16)
    for m in (model32, model16):
        m.setup_cache(32)
    tokens = torch.randint(0, 32000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model32(tokens, torch.arange(12))
        b = model16(tokens, torch.arange(12))
    assert b.dtype == torch.float32  # logits are always returned in float32
    assert model16.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; the tiny model's logits are O(0.1).
    assert (a - b).abs().max().item() < 0.05


def test_greedy_generation_matches_transformers_generate(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, LoadOptions(device="cpu", dtype="float32"))
    messages = [{"role": "user", "content": "Tell me about lighthouses."}]
    prompt = engine.tokenizer.encode_chat(messages)
    ref = reference(tiny_model_dir)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, len(prompt) :].tolist()
    expected = [t for t in out if t != 2][:32] if 2 not in out else out[: out.index(2)]
    ours = list(
        generate_tokens(
            engine.model, prompt, eos_id=2, params=GenerationConfig(temperature=0.0, max_tokens=32)
        )
    )
    assert ours == expected
    assert len(ours) > 0

    stream = engine.chat(messages, GenerationConfig(max_tokens=32))
    text = "".join(stream)
    assert text == engine.tokenizer.decode(expected)
    assert stream.stats is not None
    assert stream.stats.completion_tokens == len(expected)
    assert stream.stats.prompt_tokens == len(prompt)
    assert stream.stats.finish_reason == ("length" if len(expected) == 32 else "stop")

    # The CLI prints exactly the decoded text (plus one newline when it does not end with one).
    result = run_cli(
        "ask", "--model", str(tiny_model_dir), "--max-tokens", "32", "Tell me about lighthouses."
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + ("" if text.endswith("\n") else "\n")


def test_prefix_cache_reuse_gives_the_same_answer(tiny_model_dir: Path) -> None:
    """A second turn reuses the first turn's KV cache; its answer equals a cold start's."""
    engine = Engine.load(tiny_model_dir, LoadOptions(device="cpu", dtype="float32"))
    first = [{"role": "user", "content": "Hello there"}]
    answer = "".join(engine.chat(first, GenerationConfig(max_tokens=8)))
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    warm = "".join(engine.chat(second, GenerationConfig(max_tokens=8)))
    cold_engine = Engine.load(tiny_model_dir, LoadOptions(device="cpu", dtype="float32"))
    cold = "".join(cold_engine.chat(second, GenerationConfig(max_tokens=8)))
    assert warm == cold


def test_sampling_is_reproducible_with_a_seed(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, LoadOptions(device="cpu", dtype="float32"))
    messages = [{"role": "user", "content": "Say something"}]
    config = GenerationConfig(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=7)
    a = "".join(engine.chat(messages, config))
    b = "".join(engine.chat(messages, config))
    assert a == b


def test_sample_respects_top_k_and_top_p() -> None:
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, GenerationConfig(temperature=0.0)) == 0
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert picks == {0, 1}
    # softmax([5,4,1,0,-1]) = [.70, .26, .013, ...]: top_p 0.5 keeps only the first token.
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_p=0.5), gen) for _ in range(100)}
    assert picks == {0}
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_p=0.9), gen) for _ in range(200)}
    assert picks == {0, 1}


def test_stop_event_cancels_and_keeps_partial_text(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, LoadOptions(device="cpu", dtype="float32"))
    stop = threading.Event()
    stream = engine.chat([{"role": "user", "content": "Go"}], GenerationConfig(max_tokens=50), stop)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert stream.stats is not None
    assert stream.stats.finish_reason == "cancelled"
    assert stream.stats.completion_tokens >= 3
    assert len(pieces) >= 3


def test_long_conversations_drop_the_oldest_turns_but_keep_the_system_prompt(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, LoadOptions(device="cpu", dtype="float32", context_length=96))
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"Question number {i} about lighthouses and ships"},
            {"role": "assistant", "content": f"Answer number {i} about the sea"},
        ]
    messages = [system, *turns, {"role": "user", "content": "Last question"}]
    ids, dropped = engine.fit_prompt(messages, max_tokens=16)
    assert dropped > 0 and dropped % 2 == 0
    assert len(ids) + 16 <= 96
    assert ids == engine.tokenizer.encode_chat([system, *turns[dropped:], messages[-1]])
    stream = engine.chat(messages, GenerationConfig(max_tokens=16))
    assert any("dropped" in notice for notice in stream.notices)
    "".join(stream)
    assert stream.stats is not None and stream.stats.dropped_turns == dropped


def test_model_args_accept_top_level_rope_theta_and_rope_parameters(tmp_path: Path) -> None:
    base = {k: v for k, v in json.loads(json.dumps(REAL_MIXTRAL_CONFIG)).items()}
    args = ModelArgs.from_dict(base)
    assert args.rope_theta == 1e6 and args.head_dim == 128 and args.sliding_window is None
    assert args.n_params == 46_702_792_704  # the published parameter count of Mixtral-8x7B
    v5 = {k: v for k, v in base.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert ModelArgs.from_dict(v5).rope_theta == 5e5
    assert ModelArgs.from_dict({**base, "sliding_window": 4096}).sliding_window == 4096


REAL_MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}


def test_loading_on_the_cpu_makes_the_native_kernel_ready(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A fresh machine compiles the kernel while the model loads, not in the first reply's
    decode (a float32 model first asks for it at its first decode step)."""
    import os
    import subprocess
    import sys

    native_dir = tmp_path / "native"
    script = (
        "from mixtral_chat.engine.options import LoadOptions\n"
        "from mixtral_chat.engine.runtime import Engine\n"
        "from mixtral_chat.quant import native\n"
        f"Engine.load({str(tiny_model_dir)!r}, LoadOptions(device='cpu'))\n"
        "assert native._loaded, 'not loaded by Engine.load'\n"
        "print(native.native_unavailable_reason())\n"
    )
    env = {**os.environ, "MIXTRAL_CHAT_NATIVE_DIR": str(native_dir), "MIXTRAL_CHAT_HOME": str(tmp_path)}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "None":  # it loads on this host: the library was built into the new dir
        assert any(p.suffix == ".so" for p in native_dir.iterdir())
