"""The native int4 kernel (quant/csrc/int4_gemv.c via quant/native.py) and Int4Linear's backends.

Accuracy bounds are relative errors norm(y - ref) / norm(ref) against float64 products with the
dequantized weight, measured on these very cases (printed with -s) and set ~1.5x above the worst:
the Q8 variant rounds x to int8 per 32 columns (worst measured 6.3e-3), the float variant and the
portable fallback only round in float32 (worst measured 9.6e-7). Int4Linear's native and aten
backends differ by their own roundings of x (int8, bf16): 5.6e-3 measured.
"""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant import native
from mixtral_chat.quant.int4 import Int4Linear, dequantize_int4, quantize_int4, unpack_int4_codes

Q8_BOUND = 9.5e-3
F32_BOUND = 1.5e-6
BACKENDS_BOUND = 8.5e-3

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernel is vectorized for x86-64"
)


@pytest.fixture
def fresh_native(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`int4_kernel()` looks again, with its cache under tmp_path; the old state comes back after."""
    monkeypatch.setenv("MIXTRAL_CHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(native.NATIVE_DIR_ENV, raising=False)
    monkeypatch.delenv(native.NO_NATIVE_ENV, raising=False)
    saved = (native._kernel, native._reason, native._loaded)
    native.reset_cache()
    yield tmp_path / "home" / "cache" / "native"
    native._kernel, native._reason, native._loaded = saved


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def run_kernel(kernel, parts, x, group_size, variant=native.VARIANT_Q8, threads=None) -> torch.Tensor:
    kp = parts["qweight"].shape[1] * 2
    x2 = F.pad(x, (0, kp - x.shape[1])).contiguous()
    out = torch.empty(x.shape[0], parts["qweight"].shape[0])
    return kernel.linear(
        parts["qweight"], parts["scales"], parts["zeros"], x2, out, group_size, threads, variant
    )


CASES = [(17, 100), (64, 256), (40, 512)]  # (N, K): odd N, K padded up to the group size


@pytest.mark.parametrize("variant", [native.VARIANT_Q8, native.VARIANT_F32], ids=["q8", "f32"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_kernel_matches_the_dequantized_product(kernel, variant: int, group_size: int) -> None:
    worst = 0.0
    for i, (n, k) in enumerate(CASES):
        parts = quantize_int4(gaussian(n, k, seed=i), group_size)
        weight = dequantize_int4(parts, k, group_size, torch.float64)
        for m in (1, 3, 8, 33):
            x = gaussian(m, k, seed=100 + m)
            y = run_kernel(kernel, parts, x, group_size, variant)
            worst = max(worst, relative_error(y, x.double() @ weight.T))
    print(f"variant {variant} g{group_size}: worst relative error {worst:.2e}")
    assert worst < (Q8_BOUND if variant == native.VARIANT_Q8 else F32_BOUND)


def q8_emulation(parts: dict[str, torch.Tensor], x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The Q8 variant's arithmetic in float64: x rounded per 32 columns, codes centered on 8."""
    m, kp = x.shape
    xb = x.view(m, kp // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.round(xb * torch.where(amax > 0, 127 / amax, 0)).clamp(-127, 127)
    xr = (xq * (amax / 127)).view(m, kp).double()
    codes = unpack_int4_codes(parts["qweight"]).double() - 8
    n, groups = codes.shape[0], kp // group_size
    dot = (xr.view(m, 1, groups, group_size) * codes.view(1, n, groups, group_size)).sum(-1)
    xsum = x.double().view(m, 1, groups, group_size).sum(-1)
    return (dot * parts["scales"].double() + xsum * parts["zeros"].double()).sum(-1)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_q8_variant_computes_exactly_its_scheme(kernel, group_size: int) -> None:
    """Against a float64 emulation: only float32 rounding apart (catches indexing slips that an
    accuracy bound of 1% would let through)."""
    for n, k in [(17, 512), (9, 96 if group_size == 32 else 2 * group_size)]:
        parts = quantize_int4(gaussian(n, k, seed=n), group_size)
        x = gaussian(5, k, seed=k)
        y = run_kernel(kernel, parts, x, group_size)
        assert relative_error(y, q8_emulation(parts, x, group_size)) < 2e-6


def assert_independent_of_batch_and_threads(run) -> None:
    """`run(x, threads)` on 1000 rows of K = 256: the same bits with 1, 2 or 3 threads, and each
    row of a batch of 7 equal to that row alone."""
    x = gaussian(7, 256, seed=2)
    batch = run(x, 1)
    assert torch.equal(run(x, 2), batch)
    assert torch.equal(run(x, 3), batch)
    for m in (0, 6):
        assert torch.equal(run(x[m : m + 1], 2), batch[m : m + 1])


def test_results_do_not_depend_on_batch_or_threads(kernel) -> None:
    parts = quantize_int4(gaussian(1000, 256, seed=1), 64)
    assert_independent_of_batch_and_threads(
        lambda x, threads: run_kernel(kernel, parts, x, 64, threads=threads)
    )


@pytest.mark.parametrize("group_size", [32, 64])
def test_several_weights_in_one_call_give_each_ones_own_bits(kernel, group_size: int) -> None:
    """linear_multi (w1|w3, q|k|v): each weight's columns equal its own call, bit for bit,
    whatever the batch, the threads and where the work chunks fall between the weights."""
    k = 192
    weights = [quantize_int4(gaussian(n, k, seed=30 + n), group_size) for n in (40, 17, 64)]
    for m in (1, 5):
        x = gaussian(m, k, seed=m)
        alone = torch.cat([run_kernel(kernel, parts, x, group_size) for parts in weights], dim=1)
        for threads in (1, 2, 3):
            out = torch.empty(m, alone.shape[1])
            stored = [(w["qweight"], w["scales"], w["zeros"]) for w in weights]
            kernel.linear_multi(stored, x.contiguous(), out, group_size, threads)
            assert torch.equal(out, alone)
    with pytest.raises(QuantizationError, match="'out'"):
        kernel.linear_multi(stored, x.contiguous(), torch.empty(5, 3), group_size)
    with pytest.raises(QuantizationError, match="1 to 4 weights"):
        kernel.linear_multi(stored * 2, x.contiguous(), torch.empty(5, 6 * 121), group_size)


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_the_instruction_set_is_what_this_cpu_has(kernel) -> None:
    """The int4 path runs on the best instruction set the CPU reports (never assumed)."""
    flags = cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    expected = ("avx512-vnni" if "avx512_vnni" in flags else "avx512") if avx512 else "avx2"
    assert kernel.supported_isas[-1] == expected
    assert kernel.isa == expected
    with pytest.raises(QuantizationError, match="unknown instruction set"):
        kernel.use_isa("sse2")


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_every_instruction_set_gives_the_same_bits(kernel, group_size: int) -> None:
    """AVX2, AVX-512 and AVX-512 VNNI compute the same integer dot products and add them in the
    same order: bit-identical outputs, for batch 1 (512-bit tiles) and batches (VNNI on 256
    bits), odd block counts and half blocks (K % 64 == 32) included."""
    isas = kernel.supported_isas
    chosen = kernel.isa
    shapes = [(33, 512), (20, 2 * group_size + (32 if group_size == 32 else 0)), (64, 1024)]
    try:
        for n, k in shapes:
            parts = quantize_int4(gaussian(n, k, seed=n + k), group_size)
            for m in (1, 2, 5):
                x = gaussian(m, k, seed=m)
                outs = {}
                for isa in isas:
                    assert kernel.use_isa(isa) == isa
                    outs[isa] = run_kernel(kernel, parts, x, group_size)
                for isa in isas:
                    assert torch.equal(outs[isa], outs["avx2"]), (isa, n, k, m)
    finally:
        kernel.use_isa(chosen)
    assert kernel.isa == chosen


def test_the_instruction_set_can_be_capped_by_environment(fresh_native: Path, monkeypatch) -> None:
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    kernel = native.int4_kernel()
    assert kernel is not None
    try:
        assert kernel.isa == "avx2"
    finally:
        kernel.use_isa(kernel.supported_isas[-1])
    native.reset_cache()
    monkeypatch.setenv(native.ISA_ENV, "mmx")
    assert native.int4_kernel() is None
    assert "MIXTRAL_CHAT_NATIVE_ISA" in native.native_unavailable_reason()


_THREADS_SCRIPT = """
import os, sys, threading, torch
from mixtral_chat.quant import native
from mixtral_chat.quant.int4 import quantize_int4
kernel = native.load_kernel(__import__("pathlib").Path(sys.argv[1]))
parts = quantize_int4(torch.randn(2000, 512), 64)
x = torch.randn(3, 512)
def run(threads):
    out = torch.empty(3, 2000)
    return kernel.linear(parts["qweight"], parts["scales"], parts["zeros"], x, out, 64, threads)
ref = run(1)
errors = []
def caller():
    errors.extend(1 for _ in range(30) if not torch.equal(run(3), ref))
callers = [threading.Thread(target=caller) for _ in range(4)]
for t in callers: t.start()
for t in callers: t.join()
assert not errors, errors
pid = os.fork()  # the pool's threads do not survive a fork: the child starts its own
if pid == 0:
    os._exit(0 if all(torch.equal(run(2), ref) for _ in range(10)) else 1)
assert os.waitpid(pid, 0)[1] == 0
assert torch.equal(run(2), ref)
print("ok")
"""


def test_concurrent_callers_and_fork(kernel) -> None:
    """Calls from several Python threads (the GIL is released) share the pool safely, and a
    forked child that calls the kernel gets a working pool."""
    result = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(kernel.path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_nan_in_x_reaches_the_output(kernel) -> None:
    parts = quantize_int4(gaussian(8, 128, seed=3), 64)
    x = gaussian(2, 128, seed=4)
    x[0, 5] = float("nan")
    y = run_kernel(kernel, parts, x, 64)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


def test_zero_rows_and_empty_batches(kernel) -> None:
    parts = quantize_int4(gaussian(5, 64, seed=5), 64)
    assert run_kernel(kernel, parts, torch.zeros(2, 64), 64).abs().max() == 0
    assert run_kernel(kernel, parts, torch.zeros(0, 64), 64).shape == (0, 5)


def test_portable_fallback_builds_and_computes(fresh_native: Path) -> None:
    """Without -march=native (x86-64 baseline, no AVX2) the scalar loop is compiled: the same
    product in float."""
    fallback = native.load_kernel(native.build_library(native=False))
    assert not fallback.has_avx2
    parts = quantize_int4(gaussian(17, 100, seed=6), 32)
    x = gaussian(3, 100, seed=7)
    ref = x.double() @ dequantize_int4(parts, 100, 32, torch.float64).T
    error = relative_error(run_kernel(fallback, parts, x, 32), ref)
    print(f"portable fallback: relative error {error:.2e}")
    assert error < F32_BOUND


def test_kernel_rejects_what_does_not_fit(kernel) -> None:
    parts = quantize_int4(gaussian(4, 64, seed=8), 64)
    q, s, z = parts["qweight"], parts["scales"], parts["zeros"]
    x, out = torch.zeros(1, 64), torch.empty(1, 4)
    with pytest.raises(QuantizationError, match=r"'x' is torch.bfloat16"):
        kernel.linear(q, s, z, x.bfloat16(), out, 64)
    with pytest.raises(QuantizationError, match=r"'out' is torch.float32 \(2, 4\)"):
        kernel.linear(q, s, z, x, torch.empty(2, 4), 64)
    with pytest.raises(QuantizationError, match="'scales' is"):
        kernel.linear(q, s.float(), z, x, out, 64)
    with pytest.raises(QuantizationError, match="does not fit group size 48"):
        kernel.linear(q, s, z, x, out, 48)
    with pytest.raises(QuantizationError, match="contiguous"):
        kernel.linear(q, s, z, torch.zeros(2, 128)[:1, ::2], out, 64)


# Int4Linear ------------------------------------------------------------------------------------


def build(parts, out_features, in_features, group_size, native_on: bool, monkeypatch) -> Int4Linear:
    if native_on:
        monkeypatch.delenv(native.NO_NATIVE_ENV, raising=False)
    else:
        monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    layer = Int4Linear.from_parts(parts, out_features, in_features, group_size, "cpu", torch.float32)
    monkeypatch.delenv(native.NO_NATIVE_ENV, raising=False)
    return layer


@pytest.fixture
def native_available(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4-bit layers find the module's kernel, whatever this process found before."""
    monkeypatch.delenv(native.NO_NATIVE_ENV, raising=False)
    monkeypatch.setattr(native, "_kernel", kernel)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setattr(native, "_loaded", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_native_matches_aten(native_available, monkeypatch, dtype: torch.dtype) -> None:
    out_features, in_features, group_size = 17, 100, 32
    parts = quantize_int4(gaussian(out_features, in_features, seed=9), group_size)
    fast = build(parts, out_features, in_features, group_size, True, monkeypatch)
    aten = build(parts, out_features, in_features, group_size, False, monkeypatch)
    assert (fast.backend, aten.backend) == ("native", "aten")
    assert "backend=native" in repr(fast) and "backend=aten" in repr(aten)
    x = gaussian(2, 3, in_features, seed=10).to(dtype)  # leading dimensions kept
    y_fast, y_aten = fast(x), aten(x)
    assert y_fast.shape == y_aten.shape == (2, 3, out_features)
    assert y_fast.dtype == y_aten.dtype == dtype
    ref = F.linear(x.double(), dequantize_int4(parts, in_features, group_size, torch.float64))
    print(
        f"{dtype}: native {relative_error(y_fast, ref):.2e}, aten {relative_error(y_aten, ref):.2e}, "
        f"native vs aten {relative_error(y_fast, y_aten.double()):.2e}"
    )
    assert relative_error(y_fast, ref) < Q8_BOUND
    assert relative_error(y_fast, y_aten.double()) < BACKENDS_BOUND


def test_int4_linear_native_buffers_are_the_given_parts(native_available, monkeypatch) -> None:
    parts = quantize_int4(gaussian(24, 128, seed=11), 64)
    layer = build(parts, 24, 128, 64, True, monkeypatch)
    names = [name for name, _ in layer.named_buffers()]
    assert names == ["qweight", "scales", "zeros"]
    for name, buffer in layer.named_buffers():
        assert buffer.data_ptr() == parts[name].data_ptr()
    # Parts that are not contiguous are copied into ones that are.
    wide = torch.zeros(24, 128, dtype=torch.uint8)
    wide[:, :64] = parts["qweight"]
    strided = {**parts, "qweight": wide[:, :64]}
    copied = build(strided, 24, 128, 64, True, monkeypatch)
    assert copied.qweight.is_contiguous() and torch.equal(copied.qweight, parts["qweight"])
    x = gaussian(3, 128, seed=12)
    assert torch.equal(copied(x), layer(x))
    # Copies of the module (the offload engine's slot modules) share the kernel and compute alike.
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))


def test_int4_linear_native_computes_on_views_into_an_expert_blob(native_available) -> None:
    """The offload engine binds experts' tensors as views into one blob per expert."""
    from mixtral_chat.quant import ExpertBlobLayout, expert_linears_from_blob, get_scheme

    handler = get_scheme("int4", 64)
    layout = ExpertBlobLayout.build(handler, 64, 96)
    shapes = {"w1": (96, 64), "w2": (64, 96), "w3": (96, 64)}
    parts = {name: handler.quantize_weight(gaussian(*shape, seed=20)) for name, shape in shapes.items()}
    blob = layout.pack(parts)
    for name, module in expert_linears_from_blob(blob, layout, handler, "cpu", torch.float32).items():
        assert module.backend == "native"
        storages = {b.untyped_storage().data_ptr() for b in module.buffers()}
        assert storages == {blob.untyped_storage().data_ptr()}
        x = gaussian(2, shapes[name][1], seed=21)
        ref = F.linear(x.double(), dequantize_int4(parts[name], shapes[name][1], 64, torch.float64))
        assert relative_error(module(x), ref) < Q8_BOUND


def test_int4_linears_share_one_call_where_they_fit(native_available, monkeypatch) -> None:
    """Int4Linear.forward_concat (an expert's w1|w3): the layers' outputs side by side, bit for
    bit; None for layers that cannot share the call (another input size, the aten backend)."""
    parts = [quantize_int4(gaussian(n, 100, seed=n), 32) for n in (24, 40)]
    w1, w3 = (build(p, p["qweight"].shape[0], 100, 32, True, monkeypatch) for p in parts)
    x = gaussian(2, 3, 100, seed=1)  # leading dimensions kept
    both = w1.forward_concat([w3], x)
    assert both.shape == (2, 3, 64)
    assert torch.equal(both, torch.cat([w1(x), w3(x)], dim=-1))
    assert torch.equal(
        w1.forward_concat([w3], x.bfloat16()), torch.cat([w1(x.bfloat16()), w3(x.bfloat16())], -1)
    )
    other = build(quantize_int4(gaussian(8, 64, seed=3), 32), 8, 64, 32, True, monkeypatch)
    aten = build(parts[1], 40, 100, 32, False, monkeypatch)
    assert w1.forward_concat([other], x) is None
    assert w1.forward_concat([aten], x) is None


def test_int4_linear_is_aten_without_the_kernel(fresh_native, monkeypatch) -> None:
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    parts = quantize_int4(gaussian(16, 64, seed=13), 64)
    layer = Int4Linear.from_parts(parts, 16, 64, 64, "cpu", torch.float32)
    assert layer.backend == "aten"
    assert [name for name, _ in layer.named_buffers()] == ["weight_packed", "scales_and_zeros"]


# Build and cache -------------------------------------------------------------------------------


def test_first_call_compiles_then_the_cache_is_reused(fresh_native: Path, monkeypatch) -> None:
    assert not fresh_native.exists()
    first = native.int4_kernel()
    assert first is not None, native.native_unavailable_reason()
    assert native.native_unavailable_reason() is None
    assert first.path.parent == fresh_native and first.path.suffix == ".so"
    assert native.int4_kernel() is first  # cached in the process
    assert [p.name for p in fresh_native.iterdir()] == [first.path.name]  # no temporary left

    def no_compile(*args: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(native, "_compile", no_compile)
    native.reset_cache()
    again = native.int4_kernel()
    assert again is not None and again.path == first.path


def test_disabled_by_environment(fresh_native: Path, monkeypatch) -> None:
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    assert native.int4_kernel() is None
    assert native.NO_NATIVE_ENV in native.native_unavailable_reason()
    assert not fresh_native.exists()  # nothing compiled


@pytest.mark.parametrize("cc", ["/bin/false", "no-such-compiler-anywhere", "fake"])
def test_a_broken_compiler_gives_none_and_a_reason(fresh_native: Path, monkeypatch, cc: str) -> None:
    if cc == "fake":  # answers --version, fails to compile
        script = fresh_native.parent.parent / "fakecc"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(
            '#!/bin/sh\n[ "$1" = --version ] && echo fake 1.0 && exit 0\necho "error: boom" >&2\nexit 1\n'
        )
        script.chmod(0o755)
        cc = str(script)
    monkeypatch.setenv("CC", cc)
    assert native.int4_kernel() is None
    reason = native.native_unavailable_reason()
    assert reason
    if cc.endswith("fakecc"):
        assert "boom" in reason
        assert not any(fresh_native.iterdir())  # the failed output was removed
    elif cc.startswith("no-such"):
        assert "no C compiler" in reason


def test_importing_compiles_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "MIXTRAL_CHAT_HOME": str(tmp_path), native.NATIVE_DIR_ENV: str(tmp_path / "native")}
    code = "import mixtral_chat.quant.native, mixtral_chat.quant.int4, mixtral_chat.quant.schemes"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not (tmp_path / "native").exists() and not (tmp_path / "cache").exists()
