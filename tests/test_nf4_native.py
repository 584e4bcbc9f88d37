"""The native kernel's code-book path (nf4, fp4: `Int4Kernel.codebook_linear`) and Nf4Linear's
backends.

Bounds are relative errors norm(y - ref) / norm(ref) against float64 products with the
dequantized weight, measured on these very cases (printed with -s) and set ~1.5x above the
worst: the kernel rounds x to int8 per 32 columns and the code book to 1/63 of its largest
value (nf4 worst measured 1.47e-2, fp4 2.28e-2 with blocks of 1024); the portable fallback only
rounds in float32 (1.46e-7); native against bitsandbytes on one layer: 1.24e-2.
"""

from __future__ import annotations

import platform

import pytest
import torch

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant import native
from mixtral_chat.quant.bnb import bnb_functional
from mixtral_chat.quant.int4 import unpack_int4_codes
from mixtral_chat.quant.nf4 import Nf4Linear, dequantize_nf4, quantize_nf4
from tests import test_int4_native
from tests.test_int4_native import (
    F32_BOUND,
    assert_independent_of_batch_and_threads,
    gaussian,
    relative_error,
)

NF4_BOUND = 2.2e-2
bnbf = bnb_functional()
FP4_BOUND = 3.4e-2
BACKENDS_BOUND = 2.0e-2

# The int4 tests' fixtures: a fresh `int4_kernel()` cache; the layers finding the kernel (the
# compiled `kernel` fixture itself is in conftest.py).
fresh_native = test_int4_native.fresh_native
native_available = test_int4_native.native_available

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernel is vectorized for x86-64"
)


def run(kernel, parts, x, blocksize, threads=None) -> torch.Tensor:
    n = parts["qweight"].numel() * 2 // x.shape[1]
    out = torch.empty(x.shape[0], n)
    return kernel.codebook_linear(parts, x.contiguous(), out, blocksize, threads)


def fp4_parts(weight: torch.Tensor, blocksize: int) -> dict[str, torch.Tensor]:
    """bitsandbytes' fp4 code book (found in bitsandbytes checkpoints), as Nf4Linear's parts."""
    codes, state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type="fp4")
    return {"qweight": codes.view(-1), "absmax": state.absmax.float(), "quant_map": state.code.float()}


def dequantized(parts, n: int, k: int, blocksize: int, quant_type: str = "nf4") -> torch.Tensor:
    return dequantize_nf4(parts, n, k, blocksize, quant_type=quant_type).double()


CASES = [(17, 512), (64, 256), (40, 1024)]  # (N, K): K a multiple of every block size here


@pytest.mark.parametrize("double_quant", [False, True], ids=["no-dq", "dq"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_nf4_matches_the_dequantized_product(kernel, blocksize: int, double_quant: bool) -> None:
    worst = 0.0
    for i, (n, k) in enumerate(CASES):
        parts = quantize_nf4(gaussian(n, k, seed=i), blocksize, double_quant)
        weight = dequantized(parts, n, k, blocksize)
        for m in (1, 3, 8, 33):
            x = gaussian(m, k, seed=100 + m)
            worst = max(worst, relative_error(run(kernel, parts, x, blocksize), x.double() @ weight.T))
    print(f"nf4 b{blocksize} dq={double_quant}: worst relative error {worst:.2e}")
    assert worst < NF4_BOUND


@pytest.mark.parametrize("blocksize", [64, 1024])
def test_fp4_and_large_blocks_match_the_dequantized_product(kernel, blocksize: int) -> None:
    worst = 0.0
    for i, (n, k) in enumerate([(17, 1024), (40, 2048)]):
        parts = fp4_parts(gaussian(n, k, seed=i), blocksize)
        weight = dequantized(parts, n, k, blocksize, "fp4")
        for m in (1, 5):
            x = gaussian(m, k, seed=m)
            worst = max(worst, relative_error(run(kernel, parts, x, blocksize), x.double() @ weight.T))
    print(f"fp4 b{blocksize}: worst relative error {worst:.2e}")
    assert worst < FP4_BOUND


def codebook_emulation(
    parts: dict[str, torch.Tensor], x: torch.Tensor, n: int, blocksize: int
) -> torch.Tensor:
    """The kernel's arithmetic in float64: x rounded per 32 columns to int8, the code book to
    round(63 * value / max |value|), each block scaled by its absmax (float32, as bnb resolves a
    double-quantized one)."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.round(xb * torch.where(amax > 0, 127 / amax, 0)).clamp(-127, 127)
    xr = (xq * (amax / 127)).view(m, k).double()
    qmap = parts["quant_map"]
    qmax = qmap.abs().max()
    levels = torch.round(63 * qmap / qmax).double() * (qmax.double() / 63)
    codes = unpack_int4_codes(parts["qweight"].view(n, k // 2)).long()  # [N, K]
    absmax = parts["absmax"]
    if "nested_absmax" in parts:
        nested = parts["nested_absmax"].repeat_interleave(256)[: absmax.numel()]
        absmax = parts["nested_quant_map"][absmax.long()] * nested + parts["absmax_offset"]
    scale = absmax.view(n, k // blocksize).repeat_interleave(blocksize, dim=1).double()
    return xr @ (levels[codes] * scale).T


@pytest.mark.parametrize("double_quant", [False, True], ids=["no-dq", "dq"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_kernel_computes_exactly_its_scheme(kernel, blocksize: int, double_quant: bool) -> None:
    """Against a float64 emulation: only float32 rounding apart (catches indexing slips that an
    accuracy bound of 2% would let through)."""
    for n, k in [(17, 512), (9, 2 * blocksize if blocksize > 32 else 96)]:
        parts = quantize_nf4(gaussian(n, k, seed=n), blocksize, double_quant)
        x = gaussian(5, k, seed=k)
        error = relative_error(run(kernel, parts, x, blocksize), codebook_emulation(parts, x, n, blocksize))
        assert error < 2e-6, (n, k, error)


def test_results_do_not_depend_on_batch_or_threads(kernel) -> None:
    parts = quantize_nf4(gaussian(1000, 256, seed=1), 64, double_quant=True)
    assert_independent_of_batch_and_threads(lambda x, threads: run(kernel, parts, x, 64, threads))


def test_portable_fallback_computes_with_the_exact_code_book(fresh_native) -> None:
    fallback = native.load_kernel(native.build_library(native=False))
    assert not fallback.has_avx2
    for double_quant in (False, True):
        parts = quantize_nf4(gaussian(17, 256, seed=6), 64, double_quant)
        x = gaussian(3, 256, seed=7)
        error = relative_error(run(fallback, parts, x, 64), x.double() @ dequantized(parts, 17, 256, 64).T)
        print(f"portable fallback dq={double_quant}: relative error {error:.2e}")
        assert error < F32_BOUND


def test_what_does_not_fit_is_refused(kernel) -> None:
    parts = quantize_nf4(gaussian(4, 96, seed=8), 64)  # 96 columns: blocks of 64 span rows
    assert not native.codebook_fits(parts, 4, 96, 64)
    with pytest.raises(QuantizationError, match="do not fit the kernel"):
        kernel.codebook_linear(parts, torch.zeros(1, 96), torch.empty(1, 4), 64)
    parts = quantize_nf4(gaussian(4, 128, seed=8), 64)
    assert native.codebook_fits(parts, 4, 128, 64)
    assert not native.codebook_fits({**parts, "absmax": parts["absmax"].half()}, 4, 128, 64)
    assert not native.codebook_fits({k: v for k, v in parts.items() if k != "quant_map"}, 4, 128, 64)
    with pytest.raises(QuantizationError, match="contiguous float32"):
        kernel.codebook_linear(parts, torch.zeros(1, 128).bfloat16(), torch.empty(1, 4), 64)
    with pytest.raises(QuantizationError, match="do not fit the kernel"):
        kernel.codebook_linear(parts, torch.zeros(1, 128), torch.empty(2, 4), 64)


# Nf4Linear -------------------------------------------------------------------------------------


def layer(parts, n: int, k: int, dtype: torch.dtype = torch.float32) -> Nf4Linear:
    return Nf4Linear.from_parts(parts, n, k, 64, "nested_absmax" in parts, "cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_native_matches_bitsandbytes(native_available, monkeypatch, dtype: torch.dtype) -> None:
    parts = quantize_nf4(gaussian(48, 256, seed=3), 64, double_quant=True)
    fast = layer(parts, 48, 256, dtype)
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    reference = layer(parts, 48, 256, dtype)
    assert (fast.backend, reference.backend) == ("native", "bnb")
    assert "backend=native" in repr(fast)
    x = gaussian(2, 3, 256, seed=4).to(dtype)  # [B, S, K]
    y = fast(x)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    error = relative_error(y.float(), reference(x).double())
    print(f"Nf4Linear native vs bnb ({dtype}): relative error {error:.2e}")
    assert error < BACKENDS_BOUND
    # The buffers are the given parts: views into an expert's blob stay views.
    assert fast.qweight.data_ptr() == parts["qweight"].data_ptr()
    assert fast.absmax.data_ptr() == parts["absmax"].data_ptr()


def test_nf4_linear_uses_bitsandbytes_where_the_kernel_cannot(native_available) -> None:
    parts = quantize_nf4(gaussian(8, 96, seed=5), 64)  # blocks of 64 span rows of 96
    assert layer(parts, 8, 96).backend == "bnb"
    meta = {
        name: torch.empty_like(t, device="meta") for name, t in quantize_nf4(gaussian(8, 128, seed=5)).items()
    }
    assert Nf4Linear(128, 8, 64, meta, torch.float32).backend == "bnb"
