"""One token through a layer's chosen experts in one native call (quant/csrc/moe.c,
`native_fused.moe`), and the engine taking it for every decode step wherever an expert is placed.

Bounds are relative errors norm(y - ref) / norm(ref), measured on these cases (printed with -s)
and set ~1.5x above the worst. Against float64 with the dequantized weights and exact silu, the
error is the GEMV kernel's, twice (x, then h, rounded to int8 per 32 columns): worst 1.49e-2 (the
portable build rounds only in float32: 8.1e-7). Against the
per-layer path (the same kernel for w1, w3 and w2, ATen's silu between) only silu differs (a
vector e^x, ~1 ulp): worst 1.7e-7 measured, but a 1-ulp change of h can move one of its int8
codes by one step (~1e-3 of the output), so that bound allows one such step.
"""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant import native_fused
from mixtral_chat.quant.int4 import Int4Linear, dequantize_int4, quantize_int4
from mixtral_chat.quant.native import Int4Kernel, int4_kernel

ORACLE_BOUND = 2.2e-2
LAYERED_BOUND = 2e-3

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernel is vectorized for x86-64"
)


def gaussian(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def stored(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = quantize_int4(weight, group_size)
    return parts["qweight"], parts["scales"], parts["zeros"]


def dequantized(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], columns: int, group_size: int):
    qweight, scales, zeros = parts
    named = {"qweight": qweight, "scales": scales, "zeros": zeros}
    return dequantize_int4(named, columns, group_size).double()


def make_expert(kernel: Int4Kernel, dim: int, hidden: int, group_size: int, seed: int) -> dict:
    """An expert's three stored weights and the operand the kernel takes for them."""
    w1, w3 = (stored(gaussian(hidden, dim, seed=seed + i, scale=0.1), group_size) for i in (1, 3))
    w2 = stored(gaussian(dim, hidden, seed=seed + 2, scale=0.1), group_size)
    return {
        "w1": w1,
        "w3": w3,
        "w2": w2,
        "operand": native_fused.expert_operand(kernel, w1, w3, w2, group_size),
    }


def exact(expert: dict, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """float64 w2(silu(w1 x) * w3 x) with the dequantized weights."""
    dim, hidden = x.shape[1], expert["w1"][0].shape[0]
    w1, w3 = (dequantized(expert[name], dim, group_size) for name in ("w1", "w3"))
    w2 = dequantized(expert["w2"], hidden, group_size)
    x64 = x.double()
    return (F.silu(x64 @ w1.T) * (x64 @ w3.T)) @ w2.T


def layered(kernel: Int4Kernel, expert: dict, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) with one GEMV call per layer and ATen's silu between."""

    def linear(parts, inputs: torch.Tensor) -> torch.Tensor:
        kp = parts[0].shape[1] * 2
        padded = F.pad(inputs, (0, kp - inputs.shape[1])).contiguous()
        return kernel.linear(*parts, padded, torch.empty(1, parts[0].shape[0]), group_size)

    return linear(expert["w2"], F.silu(linear(expert["w1"], x)) * linear(expert["w3"], x))


# (dim, hidden, group): the widths of the small bench model, padded inputs (100 -> 128 for w1,
# 200 -> 256 for w2) with a silu tail past the last 8, one expert row chunk.
SHAPES = [(512, 1024, 64), (100, 200, 64), (96, 70, 32)]


@pytest.mark.parametrize(("dim", "hidden", "group_size"), SHAPES)
def test_one_expert_matches_float64_and_the_per_layer_path(
    either_build: Int4Kernel, dim: int, hidden: int, group_size: int
) -> None:
    expert = make_expert(either_build, dim, hidden, group_size, seed=dim + hidden)
    for seed in range(3):
        x = gaussian(1, dim, seed=seed)
        got = native_fused.moe([expert["operand"]], [1.0], x)
        assert got.shape == (1, dim) and got.dtype is torch.float32
        for name, reference, bound in (
            ("float64", exact(expert, x, group_size), ORACLE_BOUND),
            ("per-layer", layered(either_build, expert, x, group_size).double(), LAYERED_BOUND),
        ):
            error = float((got.double() - reference).norm() / reference.norm())
            print(f"moe vs {name} {dim}x{hidden} g{group_size}: {error:.2e}")
            assert error < bound, (name, error)


@pytest.mark.parametrize(("dim", "hidden", "group_size"), SHAPES)
def test_several_experts_give_the_float32_sum_of_each_alone(
    either_build: Int4Kernel, dim: int, hidden: int, group_size: int
) -> None:
    """What SparseMoE's per-expert loop computes (each alone, times its weight, summed in order
    in float32) bit for bit, whatever the thread count: so every placement gives the same token."""
    experts = [make_expert(either_build, dim, hidden, group_size, seed=10 * e) for e in range(3)]
    operands = [e["operand"] for e in experts]
    x = gaussian(1, dim, seed=7)
    weights = [0.6171875, 0.3828125, 0.25]
    alone = [native_fused.moe([op], [1.0], x) for op in operands]
    for count in (2, 3):
        expected = alone[0] * weights[0]
        for y, w in zip(alone[1:count], weights[1:count], strict=True):
            expected = expected + y * w
        residual = gaussian(1, dim, seed=count)
        for threads in (1, 2, 3):
            got = native_fused.moe(operands[:count], weights[:count], x, threads=threads)
            assert torch.equal(got, expected), (count, threads)
            with_residual = native_fused.moe(operands[:count], weights[:count], x, threads, residual)
            assert torch.equal(with_residual, residual + expected), (count, threads)


def test_every_instruction_set_gives_the_same_bits(kernel: Int4Kernel) -> None:
    chosen = kernel.isa
    experts = [make_expert(kernel, 256, 448, 64, seed=e) for e in (1, 2)]
    x = gaussian(1, 256, seed=3)
    outs = {}
    try:
        for isa in kernel.supported_isas:
            kernel.use_isa(isa)
            outs[isa] = native_fused.moe([e["operand"] for e in experts], [0.5, 0.5], x)
    finally:
        kernel.use_isa(chosen)
    for isa, out in outs.items():
        assert torch.equal(out, outs["avx2"]), isa


def test_non_finite_input_reaches_the_output(kernel: Int4Kernel) -> None:
    expert = make_expert(kernel, 64, 128, 32, seed=5)
    x = gaussian(1, 64, seed=1)
    x[0, 3] = float("nan")
    assert torch.isnan(native_fused.moe([expert["operand"]], [1.0], x)).all()


def test_what_does_not_fit_is_refused_in_one_line(kernel: Int4Kernel) -> None:
    small = make_expert(kernel, 64, 128, 32, seed=1)
    other = make_expert(kernel, 64, 96, 32, seed=2)
    x = gaussian(1, 64, seed=1)
    op = small["operand"]
    with pytest.raises(QuantizationError, match="1 to 8 experts"):
        native_fused.moe([], [], x)
    with pytest.raises(QuantizationError, match="1 to 8 experts"):
        native_fused.moe([op] * 9, [1.0] * 9, x)
    with pytest.raises(QuantizationError, match="1 to 8 experts"):
        native_fused.moe([op, op], [1.0], x)  # a weight short
    with pytest.raises(QuantizationError, match="differ in shape"):
        native_fused.moe([op, other["operand"]], [0.5, 0.5], x)
    with pytest.raises(QuantizationError, match="expected float32"):
        native_fused.moe([op], [1.0], x.double())
    with pytest.raises(QuantizationError, match="expected float32"):
        native_fused.moe([op], [1.0], gaussian(2, 64, seed=1))  # two tokens
    for residual in (gaussian(1, 32, seed=2), gaussian(1, 64, seed=2).double()):
        with pytest.raises(QuantizationError, match="the residual must be float32"):
            native_fused.moe([op], [1.0], x, residual=residual)
    with pytest.raises(QuantizationError, match="do not make one expert"):
        native_fused.expert_operand(kernel, small["w1"], other["w3"], small["w2"], 32)  # w3 of another width
    w2_g64 = stored(gaussian(64, 128, seed=3), 64)
    with pytest.raises(QuantizationError, match="w2 is not a stored int4 weight"):
        native_fused.expert_operand(kernel, small["w1"], small["w3"], w2_g64, 32)  # another group size


def native_experts_model(tiny_model_dir):
    """The tiny model with every expert's layers native int4 (g32), as a quantized directory loads."""
    from mixtral_chat.engine.weights import load_model

    return native_experts_model_from(load_model(tiny_model_dir))


def native_experts_model_from(model):
    """`model` with every expert's layers made native int4 (g32)."""
    from mixtral_chat.engine.model import Expert

    for module in model.modules():
        if isinstance(module, Expert):
            for name in ("w1", "w2", "w3"):
                linear = getattr(module, name)
                parts = quantize_int4(linear.weight.detach().float(), 32)
                shape = (linear.out_features, linear.in_features)
                setattr(module, name, Int4Linear.from_parts(parts, *shape, 32, "cpu", torch.float32))
    return model


def test_every_decode_step_runs_a_layers_experts_in_one_call(tiny_model_dir, monkeypatch) -> None:
    """One call per layer and decode step; the logits those of the per-expert path (ATen's silu)."""
    import mixtral_chat.engine.model as model_module
    from tests.test_decode_attention import prefill_then_decode

    if int4_kernel() is None:
        pytest.skip("the native kernel does not load on this host")
    model = native_experts_model(tiny_model_dir)
    decode = prefill_then_decode(model, seed=4)
    calls = []
    real = native_fused.moe

    def counted(operands, *args, **kwargs):
        calls.append(len(operands))
        return real(operands, *args, **kwargs)

    monkeypatch.setattr(native_fused, "moe", counted)
    fused = decode()
    layers = model.args.num_hidden_layers
    assert calls == [model.args.num_experts_per_tok] * (10 * layers)
    monkeypatch.setattr(model_module, "expert_operand", lambda *a, **k: None)
    per_layer = decode()
    assert len(calls) == 10 * layers  # none more
    torch.testing.assert_close(fused, per_layer, rtol=1e-4, atol=1e-5)


def test_an_experts_operand_follows_its_tensors(tiny_model_dir) -> None:
    """Checked once per set of tensors: a slot refilled in place keeps its operand; an expert
    rebound to other tensors (a blob's views) gets a new one, which computes on them."""
    if int4_kernel() is None:
        pytest.skip("the native kernel does not load on this host")
    model = native_experts_model(tiny_model_dir)
    experts = model.layers[0].block_sparse_moe.experts
    target, source = experts[0], experts[1]
    x = gaussian(1, model.args.hidden_size, seed=2)
    first = target.native_operand(x)
    assert first is not None and target.native_operand(x) is first
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(target, name).repack_from(getattr(source, name).stored_parts())
    assert target.native_operand(x) is first
    assert torch.equal(target(x), source(x))  # in place: the same operand reads the new weights
    for name in ("w1", "w2", "w3"):
        layer = getattr(target, name)
        for part, tensor in list(layer._buffers.items()):
            layer._buffers[part] = tensor.clone()
    assert target.native_operand(x) is not first
    assert torch.equal(target(x), source(x))
    assert target.native_operand(x.double()) is None and target.native_operand(torch.cat([x, x])) is None


def test_a_batch_gives_each_token_the_bits_it_gets_alone(tiny_model_dir) -> None:
    """A prefill's rows through a native int4 expert (W1|W3, silu(g) * u, W2 on the batch) equal
    each token's one-token call (moe.c): the GEMVs' rows do not depend on the batch, and the
    batch's silu(g) * u is the one-token call's (`Int4Kernel.silu_mul`), not ATen's."""
    kernel = int4_kernel()
    if kernel is None:
        pytest.skip("the native kernel does not load on this host")
    model = native_experts_model(tiny_model_dir)
    expert = model.layers[0].block_sparse_moe.experts[0]
    x = gaussian(7, model.args.hidden_size, seed=5)
    with torch.inference_mode():
        batch = expert(x)
        alone = torch.cat([expert(x[t : t + 1]) for t in range(x.shape[0])])
    assert expert.native_operand(x[:1]) is not None  # alone: the one-token call
    assert torch.equal(batch, alone)


def test_silu_mul_is_exact_to_float32_and_refuses_what_does_not_fit(kernel: Int4Kernel) -> None:
    for rows, width in ((0, 8), (1, 7), (5, 1024), (300, 1000)):  # 300 x 1000: split over the pool
        gate_up = gaussian(rows, 2 * width, seed=rows, scale=4.0)
        h = kernel.silu_mul(gate_up)
        g, u = gate_up[:, :width].double(), gate_up[:, width:].double()
        reference = F.silu(g) * u
        assert h.shape == (rows, width) and h.dtype is torch.float32
        # each element within a few float32 ulps (the vector e^x ~1 ulp, then /, * rounded)
        assert bool(((h.double() - reference).abs() <= 5e-7 * reference.abs() + 1e-30).all())
        for r in range(min(rows, 3)):
            assert torch.equal(kernel.silu_mul(gate_up[r : r + 1].contiguous()), h[r : r + 1])
    with pytest.raises(QuantizationError, match="expected \\[M, 2I\\]"):
        kernel.silu_mul(torch.zeros(2, 3))
    with pytest.raises(QuantizationError, match="contiguous float32 CPU"):
        kernel.silu_mul(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(QuantizationError, match="contiguous float32 CPU"):
        kernel.silu_mul(torch.zeros(4, 2).t())
