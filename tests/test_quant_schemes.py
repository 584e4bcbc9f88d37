"""Quantization schemes on single weights: round trips, runtime layers, odd shapes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant import (
    ExpertBlobLayout,
    dequantize_int4,
    dequantize_nf4,
    expert_linears_from_blob,
    get_scheme,
    is_quantizable,
    quantize_int4,
    quantize_nf4,
)
from mixtral_chat.quant import int4 as int4_module
from mixtral_chat.quant import nf4 as nf4_module
from mixtral_chat.quant.bnb import bnb_functional

# Per (scheme, group size, double quant): a bound on the relative Frobenius error of
# dequantize(quantize(W)) on W ~ N(0, 1) [512, 1024], seed 0, and the stored bits per weight of a
# 4096x4096 matrix (codes + scales/zeros/absmax).
# Measured (torch 2.13, bitsandbytes 0.50.2): int4 g32 0.0785, g64 0.0895, g128 0.0999,
# g256 0.1092; nf4 b64 0.0920 (double quant 0.0920). Bounds: measured + ~5%.
ROUND_TRIP_BOUND_AND_BITS = {
    ("int4", 32, False): (0.083, 5.0),
    ("int4", 64, False): (0.094, 4.5),
    ("int4", 128, False): (0.105, 4.25),
    ("int4", 256, False): (0.115, 4.125),
    ("nf4", 64, False): (0.097, 4.5),
    ("nf4", 64, True): (0.097, 4.127),
}


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator)


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


@pytest.mark.parametrize(("scheme", "group", "double_quant"), list(ROUND_TRIP_BOUND_AND_BITS))
def test_round_trip_error_is_within_the_measured_bound(scheme: str, group: int, double_quant: bool) -> None:
    bound, bits_per_weight = ROUND_TRIP_BOUND_AND_BITS[(scheme, group, double_quant)]
    handler = get_scheme(scheme, group, double_quant)
    weight = gaussian(512, 1024)
    parts = handler.quantize_weight(weight)
    restored = handler.dequantize_weight(parts, 512, 1024)
    assert restored.shape == weight.shape
    error = rel_error(restored, weight)
    assert 0.05 < error < bound
    # It really is 4-bit: what is stored per weight.
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in parts.values()) / weight.numel()
    assert stored_bits == handler.bits_per_weight(512, 1024)
    assert handler.bits_per_weight() == pytest.approx(bits_per_weight, abs=0.01)


def test_int4_codes_follow_the_documented_formula() -> None:
    weight = gaussian(16, 64)
    parts = quantize_int4(weight, 32)
    packed = parts["qweight"]
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).view(16, 64).float()  # even column high nibble
    scales = parts["scales"].float().repeat_interleave(32, dim=1)
    zeros = parts["zeros"].float().repeat_interleave(32, dim=1)
    assert torch.equal((codes - 8) * scales + zeros, dequantize_int4(parts, 64, 32))
    # Each group's extremes land on (or next to) the ends of the code range.
    grouped = codes.view(16, 2, 32)
    assert grouped.amin(-1).max() <= 1 and grouped.amax(-1).min() >= 14


def test_quantization_does_not_depend_on_chunking_or_input_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = gaussian(96, 320).to(torch.bfloat16)
    whole_int4 = quantize_int4(weight, 64)
    whole_nf4 = quantize_nf4(weight, 64, double_quant=True)
    monkeypatch.setattr(int4_module, "_CHUNK_ELEMENTS", 320 * 7)  # 7 rows at a time
    monkeypatch.setattr(nf4_module, "_CHUNK_ELEMENTS", 64 * 5)  # 5 blocks at a time
    for chunked, whole in (
        (quantize_int4(weight.float(), 64), whole_int4),
        (quantize_nf4(weight.float(), 64, double_quant=True), whole_nf4),
    ):
        assert chunked.keys() == whole.keys()
        for name in whole:
            assert torch.equal(chunked[name], whole[name]), name


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_matches_bitsandbytes_quantize_4bit(double_quant: bool) -> None:
    bnbf = bnb_functional()

    weight = gaussian(130, 70)  # 9100 values: the last block is partial
    parts = quantize_nf4(weight, 64, double_quant)
    codes, state = bnbf.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    assert torch.equal(parts["qweight"], codes.view(-1))
    assert torch.equal(dequantize_nf4(parts, 130, 70, 64), bnbf.dequantize_4bit(codes, state))


def nf4_decoded_by_hand(
    parts: dict[str, torch.Tensor], shape: tuple[int, int], blocksize: int
) -> torch.Tensor:
    """The weight the NF4 parts stand for, from bnb's documented layout alone: two codes a byte
    (high nibble first), blocks of `blocksize` over the flattened weight, and with double
    quantization absmax = nested_quant_map[code] * nested_absmax[block // 256] + offset."""
    codes = parts["qweight"].view(-1)
    values = parts["quant_map"][torch.stack([codes >> 4, codes & 15], 1).view(-1).long()]
    absmax = parts["absmax"]
    if "nested_absmax" in parts:
        scales = parts["nested_absmax"].repeat_interleave(nf4_module.NESTED_BLOCKSIZE)[: absmax.numel()]
        absmax = parts["nested_quant_map"][absmax.long()] * scales + parts["absmax_offset"]
    n = shape[0] * shape[1]
    padded = torch.cat([values[:n], values.new_zeros(-n % blocksize)])
    return (padded.view(-1, blocksize) * absmax.view(-1, 1)).view(-1)[:n].view(shape)


@pytest.mark.parametrize("double_quant", [False, True], ids=["no-dq", "dq"])
@pytest.mark.parametrize("shape", [(64, 32), (128, 16), (96, 96), (8, 96), (17, 33)])
def test_nf4_dequantizes_rows_that_do_not_hold_whole_blocks(
    shape: tuple[int, int], double_quant: bool
) -> None:
    # bitsandbytes 0.50's CPU dequantization of a 2-D [N, K] weight is wrong on AVX-512 hosts
    # where K is not a multiple of the block size (relative error 0.40 at [64, 32]): the project
    # dequantizes the flat codes (quant/nf4.py), right on every host.
    weight = gaussian(*shape, seed=3)
    parts = quantize_nf4(weight, 64, double_quant)
    expected = nf4_decoded_by_hand(parts, shape, 64)
    got = dequantize_nf4(parts, *shape, 64)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    bound, _ = ROUND_TRIP_BOUND_AND_BITS["nf4", 64, False]
    assert rel_error(got, weight) < bound
    layer = nf4_module.Nf4Linear.from_parts(parts, *shape, 64, double_quant, "cpu", torch.float32)
    assert layer.backend == "bnb"  # rows do not hold whole blocks: not the native kernel
    x = gaussian(3, shape[1], seed=4)
    assert torch.allclose(layer(x), x @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int4", "nf4", "none"])
@pytest.mark.parametrize("shape", [(64, 128), (100, 200), (17, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_computes_like_nn_linear(
    scheme: str, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    out_features, in_features = shape
    handler = get_scheme(scheme, 32 if scheme == "int4" else None)
    weight = gaussian(out_features, in_features, seed=1)
    parts = handler.quantize_weight(weight)
    layer = handler.build_linear(parts, out_features, in_features, "cpu", dtype)
    dequantized = handler.dequantize_weight(parts, out_features, in_features)
    x = gaussian(6, in_features, seed=2).view(2, 3, in_features)
    # Exact in float32: nn.Linear and bitsandbytes (it dequantizes, then multiplies). The native
    # CPU kernel (int4; nf4 where rows hold whole blocks, here 64x128) rounds x to int8 (nf4's
    # code book too: tests/test_nf4_native.py), ATen's int4 kernel computes in bfloat16.
    exact = scheme == "none" or getattr(layer, "backend", None) == "bnb"
    kernel_tolerance = 1e-5 if dtype == torch.float32 and exact else 2e-2
    for inputs in (x, x[0, 0], x[0]):  # [2, 3, K], [K], [3, K]
        y = layer(inputs.to(dtype))
        assert y.shape == (*inputs.shape[:-1], out_features)
        assert y.dtype == dtype
        # The kernel computes exactly with the dequantized weight (up to the dtype's rounding) ...
        assert rel_error(y, F.linear(inputs, dequantized)) < kernel_tolerance
        # ... and the float layer within the quantization error.
        assert rel_error(y, F.linear(inputs, weight)) < (0.12 if scheme != "none" else kernel_tolerance)
    if scheme != "none":  # (`none` is a plain nn.Linear, strict about dtypes)
        # A quantized layer built for one dtype takes the other and answers in the input's dtype.
        other = torch.bfloat16 if dtype == torch.float32 else torch.float32
        assert layer(x.to(other)).dtype == other


def test_int4_pads_odd_shapes_without_changing_the_result() -> None:
    # in_features 40 is not a multiple of the group (32): padded to 64 by repeating the last column.
    weight = gaussian(20, 40)
    parts = quantize_int4(weight, 32)
    assert parts["qweight"].shape == (20, 32) and parts["scales"].shape == (20, 2)
    # The first group is quantized as if the padding were absent.
    first = quantize_int4(weight[:, :32].contiguous(), 32)
    assert torch.equal(parts["scales"][:, :1], first["scales"])
    assert torch.equal(parts["qweight"][:, :16], first["qweight"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: get_scheme("int3"), "unknown quantization scheme 'int3'"),
        (lambda: get_scheme("int4", 48), "int4 group size must be one of 32, 64, 128, 256, got 48"),
        (lambda: get_scheme("int4", 16), "int4 group size must be one of"),
        (lambda: get_scheme("nf4", 100), "nf4 block size must be one of 32, 64, 128, 256, got 100"),
        (lambda: get_scheme("int4", 64, double_quant=True), "double quantization applies to nf4 only"),
        (lambda: quantize_int4(torch.randn(64), 32), "int4 quantizes 2-D weights"),
        (lambda: quantize_nf4(torch.randn(2, 3, 64)), "nf4 quantizes 2-D weights"),
        (lambda: quantize_int4(torch.empty(0, 64), 32), "cannot quantize an empty weight"),
        (lambda: quantize_int4(torch.full((16, 64), float("nan")), 32), "NaN or infinity"),
        (lambda: quantize_nf4(torch.full((16, 64), float("inf"))), "NaN or infinity"),
    ],
)
def test_bad_requests_give_clear_errors(call, message: str) -> None:
    with pytest.raises(QuantizationError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        call()
    assert "\n" not in str(info.value)


def test_parts_of_another_group_size_are_refused_with_a_hint() -> None:
    parts = quantize_int4(gaussian(32, 128), 32)
    with pytest.raises(
        QuantizationError,
        match=r"'scales' has shape \(32, 4\), expected \(32, 2\) \(was it quantized with another group size",
    ):
        get_scheme("int4", 64).build_linear(parts, 32, 128, "cpu", torch.float32)
    del parts["zeros"]
    with pytest.raises(QuantizationError, match="missing 'zeros' tensor"):
        get_scheme("int4", 32).build_linear(parts, 32, 128, "cpu", torch.float32)
    nf4_parts = quantize_nf4(gaussian(32, 128), 64)
    with pytest.raises(QuantizationError, match=r"absmax.*block size"):
        get_scheme("nf4", 128).build_linear(nf4_parts, 32, 128, "cpu", torch.float32)


def test_only_attention_and_expert_weights_are_quantizable() -> None:
    yes = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.31.self_attn.o_proj.weight",
        "layers.2.self_attn.k_proj.weight",
        "model.layers.3.block_sparse_moe.experts.7.w1.weight",
        "model.layers.3.block_sparse_moe.experts.0.w2.weight",
        "layers.3.block_sparse_moe.experts.0.w3.weight",
    ]
    no = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.block_sparse_moe.experts.0.w4.weight",
    ]
    assert all(is_quantizable(k) for k in yes)
    assert not any(is_quantizable(k) for k in no)


@pytest.mark.parametrize(
    ("scheme", "double_quant"), [("int4", False), ("nf4", False), ("nf4", True), ("none", False)]
)
def test_an_expert_blob_gives_the_same_layers_as_its_parts(scheme: str, double_quant: bool) -> None:
    handler = get_scheme(scheme, None, double_quant, float_dtype=torch.bfloat16 if scheme == "none" else None)
    hidden, intermediate = 64, 96
    layout = ExpertBlobLayout.build(handler, hidden, intermediate)
    assert all(p.offset % 64 == 0 for p in layout.parts) and layout.nbytes % 64 == 0
    weights = {
        "w1": gaussian(intermediate, hidden, 1),
        "w2": gaussian(hidden, intermediate, 2),
        "w3": gaussian(intermediate, hidden, 3),
    }
    if scheme == "none":
        weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    parts = {name: handler.quantize_weight(w) for name, w in weights.items()}
    blob = layout.pack(parts)
    assert blob.dtype == torch.uint8 and blob.shape == (layout.nbytes,)
    views = layout.unpack(blob)
    for name in parts:
        for part, tensor in parts[name].items():
            assert torch.equal(views[name][part], tensor)
            assert views[name][part].untyped_storage().data_ptr() == blob.untyped_storage().data_ptr()
    modules = expert_linears_from_blob(blob, layout, handler, "cpu", torch.float32)
    x = gaussian(5, hidden, 4)
    for name, module in modules.items():
        out_features, in_features = layout.linears[name]
        inputs = x if in_features == hidden else gaussian(5, intermediate, 5)
        direct = handler.build_linear(parts[name], out_features, in_features, "cpu", torch.float32)
        assert torch.equal(module(inputs), direct(inputs))
    # The layout survives quant_config.json.
    assert ExpertBlobLayout.from_json(layout.to_json()) == layout
