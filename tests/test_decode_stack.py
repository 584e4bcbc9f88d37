"""Every layer of a decode token in one native call (quant/csrc/decode_stack.c,
`Mixtral.native_decode_stack`), with the bits of the per-layer calls, and the `Bindings` check
that remakes its operand when the model is rebound."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

import mixtral_chat.engine.model as model_module
from mixtral_chat.engine.bindings import Bindings
from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.model import DecoderLayer, Mixtral
from mixtral_chat.quant import native_fused
from mixtral_chat.quant.native import int4_kernel
from tests.test_attention_block import quantize_attention
from tests.test_decode_attention import prefill_then_decode
from tests.test_moe_kernel import native_experts_model, native_experts_model_from

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernel is vectorized for x86-64"
)


@pytest.fixture
def native_model(tiny_model_dir) -> Mixtral:
    """The tiny model as a float32 int4 directory loads on a CPU: attention and experts native
    int4 (g32), the router float32."""
    if int4_kernel() is None:
        pytest.skip("the native kernel does not load on this host")
    model = native_experts_model(tiny_model_dir)
    quantize_attention(model)
    return model


def test_every_decode_step_is_one_call_with_the_per_layer_bits(native_model: Mixtral, monkeypatch) -> None:
    decode = prefill_then_decode(native_model, seed=5)
    calls = []
    real = native_fused.decode_stack
    monkeypatch.setattr(native_fused, "decode_stack", lambda *a: calls.append(1) or real(*a))
    stacked = decode()
    assert len(calls) == 10  # each decode step, not the prefill
    caches = [c.clone() for layer in native_model.layers for c in (layer.self_attn.kv_cache.k,)]
    monkeypatch.setattr(Mixtral, "native_decode_stack", lambda self, x, mask: None)
    per_layer = decode()
    assert len(calls) == 10
    assert torch.equal(stacked, per_layer)
    for layer, keys in zip(native_model.layers, caches, strict=True):
        assert torch.equal(layer.self_attn.kv_cache.k, keys)


def test_its_operand_is_remade_when_the_model_is_rebound(native_model: Mixtral) -> None:
    native_model.setup_cache(40)
    x = torch.randn(1, 1, native_model.args.hidden_size)
    first = native_model.native_decode_stack(x, None)
    assert first is not None and native_model.native_decode_stack(x, None) is first
    moe = native_model.layers[1].block_sparse_moe
    w1 = moe.experts[3].w1
    with torch.no_grad():
        w1.qweight.add_(1)  # in place: the same tensors, the operand reads the new values
    assert native_model.native_decode_stack(x, None) is first
    w1._buffers["qweight"] = w1.qweight.clone()  # rebound: a new operand, on the new tensor
    second = native_model.native_decode_stack(x, None)
    assert second is not None and second is not first
    assert any(t is w1.qweight for layer in second.experts for e in layer for t in e.tensors)
    moe.routing_hook = lambda *routing: None  # the trace listens: layer by layer
    assert native_model.native_decode_stack(x, None) is None
    moe.routing_hook = None
    third = native_model.native_decode_stack(x, None)
    assert third is not None and third is not second
    native_model.setup_cache(40)  # a new cache
    assert native_model.native_decode_stack(x, None) not in (None, third)
    assert native_model.native_decode_stack(torch.randn(1, 2, x.shape[-1]), None) is None  # prefill
    assert native_model.native_decode_stack(x, torch.ones(1, 1, dtype=torch.bool)) is None
    moe.expert_source = lambda ids: [moe.experts[e] for e in ids]  # offloaded
    assert native_model.native_decode_stack(x, None) is None


def test_a_model_it_cannot_run_keeps_the_per_layer_path(tiny_model_dir) -> None:
    """Float experts (the tiny model as loaded): no stack, and asking again costs no build."""
    from mixtral_chat.engine.weights import load_model

    model = load_model(tiny_model_dir)
    model.setup_cache(40)
    x = torch.randn(1, 1, model.args.hidden_size)
    assert model.native_decode_stack(x, None) is None and model._stack is None


def test_what_does_not_fit_is_refused_in_one_line(native_model: Mixtral) -> None:
    native_model.setup_cache(40)
    x = torch.randn(1, 1, native_model.args.hidden_size)
    stack = native_model.native_decode_stack(x, None)
    with pytest.raises(QuantizationError, match="a block and its experts"):
        native_fused.decode_stack_operand([], [])
    with pytest.raises(QuantizationError, match="the layers differ"):
        native_fused.decode_stack_operand(stack.blocks, [layer[:-1] for layer in stack.experts])
    with pytest.raises(QuantizationError, match="expected"):
        native_fused.decode_stack(
            stack, x.double(), *(t[:1] for t in (native_model.rope_cos, native_model.rope_sin)), 0
        )


def test_bindings_see_rebinding_not_in_place_changes() -> None:
    root = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.LayerNorm(4)))
    holder = nn.Module()
    holder.hook = None
    bindings = Bindings(root, [(holder, "hook")])
    assert len(bindings) == 2 + 2 + 1 + 2 + 1  # 2 children, a weight and bias, 1 child, 2 more, the hook
    assert bindings.hold()
    with torch.no_grad():
        root[0].weight.mul_(2)
    assert bindings.hold()
    root[1][0].weight = nn.Parameter(torch.ones(4))
    assert not bindings.hold()
    bindings = Bindings(root, [(holder, "hook")])
    holder.hook = print
    assert not bindings.hold()
    holder.hook = None
    assert bindings.hold()
    root[1] = nn.Identity()
    assert not bindings.hold()


def test_its_workers_sleep_once_it_returns(tmp_path) -> None:
    """Between its per-layer calls the pool's workers wait awake (decode_stack.c's pool_hot);
    after it they sleep: an idle process burns no CPU. The model has the small bench widths
    (hidden 512, intermediate 1024), so that every call runs on 2 threads (the tiny model's
    run on one and start no worker)."""
    import resource
    import time

    from mixtral_chat.engine.weights import load_model
    from tests.conftest import save_tiny_checkpoint

    if int4_kernel() is None:
        pytest.skip("the native kernel does not load on this host")
    widths = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2)
    directory = save_tiny_checkpoint(tmp_path / "small", num_hidden_layers=1, vocab_size=1024, **widths)
    model = native_experts_model_from(load_model(directory))
    quantize_attention(model)
    decode = prefill_then_decode(model, seed=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert model.native_decode_stack(torch.zeros(1, 1, 512), None) is not None
        decode()
    finally:
        torch.set_num_threads(threads)
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.5)
    after = resource.getrusage(resource.RUSAGE_SELF)
    busy = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert busy < 0.1, busy  # a worker left spinning would burn ~0.5 s


def test_a_layer_the_calls_refuse_decodes_per_op(native_model: Mixtral, monkeypatch) -> None:
    """Where an operand cannot be made (the C call would refuse its shapes), that layer and
    expert take the per-op path: decoding goes on with its logits, nothing raises."""
    decode = prefill_then_decode(native_model, seed=7)
    monkeypatch.setattr(Mixtral, "native_decode_stack", lambda self, x, mask: None)
    monkeypatch.setattr(DecoderLayer, "native_attention_block", lambda self, x, mask: None)
    monkeypatch.setattr(model_module, "expert_operand", lambda *a, **k: None)
    per_op = decode()
    monkeypatch.undo()
    for layer in native_model.layers:  # no cached operands: each is made, and refused, anew
        layer._block = None
        for expert in layer.block_sparse_moe.experts:
            expert._operand = None

    def refuse(*args, **kwargs):
        raise QuantizationError("native attention block: the heads do not fit the weights")

    monkeypatch.setattr(native_fused, "attention_block_operand", refuse)
    monkeypatch.setattr(native_fused, "expert_operand", refuse)
    assert torch.equal(decode(), per_op)
    assert native_model.native_decode_stack(torch.zeros(1, 1, native_model.args.hidden_size), None) is None
