"""Decode attention on the CPU for one query: the native kernel (quant/csrc/attention.c) where it
loads, else two matmuls (engine/model.py `decode_attention`) against a long cache. Each must give
what SDPA gives, and the engine must pick each where it should."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.model import DECODE_MATMUL_ATTENTION_MIN, decode_attention
from mixtral_chat.quant.native import NO_NATIVE_ENV, Int4Kernel, build_library, int4_kernel, load_kernel


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "length"), [(4, 2, 48, 7), (32, 8, 128, 300), (8, 8, 64, 33)]
)
def test_it_matches_sdpa(heads: int, kv_heads: int, dim: int, length: int) -> None:
    generator = torch.Generator().manual_seed(heads + length)
    q = torch.randn(2, heads, 1, dim, generator=generator)
    k = torch.randn(2, kv_heads, length, dim, generator=generator)
    v = torch.randn(2, kv_heads, length, dim, generator=generator)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(decode_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)
    # q as the model has it: a transposed view of [B, S, H, D]
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(decode_attention(q_view, k, v), expected, rtol=1e-5, atol=1e-5)


def prefill_then_decode(model: torch.nn.Module, seed: int) -> Callable[[], torch.Tensor]:
    """A function giving the logits [1, 10, V] of 10 decode steps after a prefill of 20 tokens."""
    model.setup_cache(40)
    tokens = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(seed))

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            model(tokens[:, :20], torch.arange(20))
            return torch.cat([model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(20, 30)], dim=1)

    return decode


def test_a_long_cache_decodes_alike_either_way(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose every decode step takes the matmul path gives SDPA's logits."""
    import mixtral_chat.engine.model as model_module
    from mixtral_chat.engine.weights import load_model

    model = load_model(tiny_model_dir)
    decode = prefill_then_decode(model, seed=1)
    monkeypatch.setenv(NO_NATIVE_ENV, "1")  # the native kernel would take every step
    calls = []
    real = model_module.decode_attention
    monkeypatch.setattr(model_module, "decode_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(model_module, "DECODE_MATMUL_ATTENTION_MIN", 1)
    matmul_logits = decode()
    layers = model.args.num_hidden_layers
    assert len(calls) == 10 * layers  # every decode step, every layer (the prefill uses SDPA)
    monkeypatch.setattr(model_module, "DECODE_MATMUL_ATTENTION_MIN", DECODE_MATMUL_ATTENTION_MIN)
    sdpa_logits = decode()
    assert len(calls) == 10 * layers  # the tiny model's heads x 30 positions: far below it, SDPA
    torch.testing.assert_close(matmul_logits, sdpa_logits, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", params=["native", "portable"])
def attention_kernel(request: pytest.FixtureRequest) -> Int4Kernel:
    """The build the engine loads (-march=native: AVX2 where the CPU has it) and the portable one."""
    if request.param == "native":
        built = int4_kernel()
        if built is None:
            pytest.skip("the native kernel does not load on this host")
        return built
    return load_kernel(build_library(native=False))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "length"),
    [(4, 2, 48, 7), (32, 8, 128, 300), (8, 8, 64, 33), (8, 2, 20, 1), (6, 3, 12, 129)],
)
def test_the_native_kernel_matches_sdpa(
    attention_kernel: Int4Kernel, heads: int, kv_heads: int, dim: int, length: int
) -> None:
    """Against a slice of a longer cache, as the model hands it over; D not a multiple of 8 too."""
    generator = torch.Generator().manual_seed(heads * dim + length)
    q = torch.randn(1, heads, 1, dim, generator=generator)
    k_cache = torch.randn(1, kv_heads, length + 5, dim, generator=generator)
    v_cache = torch.randn(1, kv_heads, length + 5, dim, generator=generator)
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    gqa = heads != kv_heads
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=gqa)
    got = attention_kernel.decode_attention(q, k, v, threads=2)
    assert got.shape == q.shape and got.dtype is torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_kernel.decode_attention(q, k, v, threads=1), got, rtol=0, atol=0)


def test_the_native_kernel_refuses_what_does_not_fit(attention_kernel: Int4Kernel) -> None:
    kernel = attention_kernel
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(QuantizationError, match="native attention"):
        kernel.decode_attention(q.double(), k, k)  # not float32
    with pytest.raises(QuantizationError, match="native attention"):
        kernel.decode_attention(torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16))
    with pytest.raises(QuantizationError, match="native attention"):
        kernel.decode_attention(q, k, k.transpose(2, 3).contiguous().transpose(2, 3))  # rows not contiguous
    with pytest.raises(QuantizationError, match="invalid arguments"):
        kernel.decode_attention(torch.randn(1, 3, 1, 16), k, k)  # 3 heads over 2 kv heads


def test_the_engine_decodes_with_the_native_kernel(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decode step of every layer takes the native kernel where it loads; logits as SDPA's."""
    from mixtral_chat.engine.weights import load_model

    if int4_kernel() is None:
        pytest.skip("the native kernel does not load on this host")
    model = load_model(tiny_model_dir)
    decode = prefill_then_decode(model, seed=2)
    calls = []
    real = Int4Kernel.decode_attention
    monkeypatch.setattr(Int4Kernel, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    native_logits = decode()
    assert len(calls) == 10 * model.args.num_hidden_layers
    monkeypatch.setenv(NO_NATIVE_ENV, "1")
    sdpa_logits = decode()
    assert len(calls) == 10 * model.args.num_hidden_layers  # none more: SDPA took them
    torch.testing.assert_close(native_logits, sdpa_logits, rtol=1e-4, atol=1e-5)
