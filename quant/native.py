"""The native 4-bit GEMV kernel (quant/csrc/int4_gemv.c), compiled on first use and loaded by ctypes.

It computes on the stored form of int4 (`Int4Kernel.linear`) and of bitsandbytes' nf4/fp4
(`Int4Kernel.codebook_linear`), and on the int8 lm_head of quant/int8.py (`Int4Kernel.q8_linear`,
quant/csrc/q8_gemv.c, which int4_gemv.c includes), and one decode query's attention against a
float32 KV cache (`Int4Kernel.decode_attention`, quant/csrc/attention.c, included the same way),
and the fused decode calls of quant/native_fused.py (moe.c, attention_block.c, decode_stack.c),
whose C functions it binds.

`int4_kernel()` returns an `Int4Kernel`, or None when the kernel cannot be used here: no C
compiler, a compile error, a CPU without AVX2 (the portable fallback is slower than PyTorch's
kernel), or `MIXTRAL_CHAT_NO_NATIVE=1`. `native_unavailable_reason()` then says why. Neither
raises nor prints; importing this module compiles nothing.

Build: the compiler is `$CC` or the first of cc, gcc, clang on PATH; flags
`-O3 -march=native -std=c11 -shared -fPIC -pthread` (retried without -march=native, which then
gives the scalar fallback, if the compiler rejects it). The library is cached in
`$MIXTRAL_CHAT_NATIVE_DIR`, else `cache_dir()/native` (under MIXTRAL_CHAT_HOME when set), under
a name keyed by the source, the compiler's path and version, the flags and the CPU (model and
feature flags), so a changed source, compiler or CPU builds anew; it is written to a temporary
file and renamed, so concurrent processes are safe. A compile takes ~2 s (gcc 12, 2-core Zen), once; later
processes load the cached library in ~3 ms.

The int4 path's instruction set is chosen at run time from the CPU's features (`Int4Kernel.isa`:
AVX2, or AVX-512 with or without VNNI, all bit-identical), capped by `MIXTRAL_CHAT_NATIVE_ISA`.

ctypes releases the GIL during the call; the kernel runs its own threads (pthreads, no OpenMP:
torch bundles its own runtime).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.paths import cache_dir
from mixtral_chat.quant.common import Parts, nf4_part_specs

NO_NATIVE_ENV = "MIXTRAL_CHAT_NO_NATIVE"
ISA_ENV = "MIXTRAL_CHAT_NATIVE_ISA"  # at most this instruction set (benchmarks): one of ISAS
# The int4 path's instruction sets (ISA_* in the C source), slowest first. AVX-512 needs
# avx512f/bw/vl/dq; "avx512-vnni" adds vpdpbusd. All give the same bits.
ISAS = ("portable", "avx2", "avx512", "avx512-vnni")
NATIVE_DIR_ENV = "MIXTRAL_CHAT_NATIVE_DIR"
SOURCE = Path(__file__).resolve().parent / "csrc" / "int4_gemv.c"
# #included by SOURCE: part of the build key
INCLUDED_SOURCES = tuple(
    SOURCE.parent / name
    for name in ("q8_gemv.c", "attention.c", "attention_block.c", "moe.c", "decode_stack.c")
)
BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-pthread")
NATIVE_FLAGS = ("-march=native",)
COMPILE_TIMEOUT_S = 120

# Kernel variants (INT4_VARIANT_* in the C source).
VARIANT_Q8 = 0  # activations rounded to int8 per 32 columns, integer dot products (default)
VARIANT_F32 = 1  # codes converted to float, FMA with float32 activations
_GROUP_SIZES = (32, 64, 128, 256)
MAX_MULTI = 4  # weights per `linear_multi` call (MAX_SETS in the C source)
MAX_MOE_EXPERTS = 8  # experts per `moe` call (MOE_MAX_EXPERTS in quant/csrc/moe.c)
MAX_ROUTED_EXPERTS = 64  # a router's rows in `attention_block` (BLOCK_MAX_EXPERTS, attention_block.c)
_CODEBOOK_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' (codebook_linear)
_ERRORS = {1: "invalid arguments", 2: "out of memory"}

_lock = threading.Lock()
_kernel: Int4Kernel | None = None
_reason: str | None = None
_loaded = False


class Int4Kernel:
    """A loaded build of the kernel."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._lib = library
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        args = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
        library.int4_linear_f32_variant.argtypes = args
        library.int4_linear_f32_variant.restype = ctypes.c_int
        library.int4_native_has_avx2.argtypes = []
        library.int4_native_has_avx2.restype = ctypes.c_int
        self.has_avx2 = bool(library.int4_native_has_avx2())
        library.int4_native_isa.argtypes = [ctypes.c_int]
        library.int4_native_isa.restype = ctypes.c_int
        self._isa = library.int4_native_isa
        self._run = library.int4_linear_f32_variant
        f32 = ctypes.c_float
        cb_args = [ptr, ptr, ptr, ptr, ptr, f32, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        library.cb4_linear_f32.argtypes = cb_args
        library.cb4_linear_f32.restype = ctypes.c_int
        self._run_codebook = library.cb4_linear_f32
        multi_args = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_int]
        library.int4_linear_multi.argtypes = multi_args
        library.int4_linear_multi.restype = ctypes.c_int
        self._run_multi = library.int4_linear_multi
        library.q8_linear_f32.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        library.q8_linear_f32.restype = ctypes.c_int
        self._run_q8 = library.q8_linear_f32
        attn_args = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, f32, ctypes.c_int]
        library.attn_decode_f32.argtypes = attn_args
        library.attn_decode_f32.restype = ctypes.c_int
        self._run_attention = library.attn_decode_f32
        moe_args = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
        library.int4_moe_f32.argtypes = moe_args
        library.int4_moe_f32.restype = ctypes.c_int
        self._run_moe = library.int4_moe_f32
        library.int4_silu_mul_f32.argtypes = [ptr, ptr, i64, i64, ctypes.c_int]
        library.int4_silu_mul_f32.restype = ctypes.c_int
        self._run_silu_mul = library.int4_silu_mul_f32
        block_args = [ptr, ptr, ptr, ptr, f32, ptr, ptr, ptr, ptr, *[i64] * 9]
        router_args = [ptr, i64, i64, ptr, ptr, ptr]
        library.int4_attention_block_f32.argtypes = [*block_args, f32, ptr, ptr, *router_args, ctypes.c_int]
        library.int4_attention_block_f32.restype = ctypes.c_int
        self._run_block = library.int4_attention_block_f32
        stack_args = [i64, ptr, ptr, f32, ptr, ptr, *[i64] * 9, f32, *[i64] * 5, ptr, ctypes.c_int]
        library.int4_decode_stack_f32.argtypes = stack_args
        library.int4_decode_stack_f32.restype = ctypes.c_int
        self._run_stack = library.int4_decode_stack_f32

    @property
    def isa(self) -> str:
        """The instruction set the int4 path runs on here: one of `ISAS`, the best this CPU
        supports (read from its feature flags) unless `use_isa` capped it."""
        return ISAS[self._isa(-1)]

    @property
    def supported_isas(self) -> tuple[str, ...]:
        """The instruction sets this CPU can run the int4 path on, slowest first."""
        current = self._isa(-1)
        best = self._isa(len(ISAS) - 1)
        self._isa(current)
        return ISAS[1 : best + 1] if best else ISAS[:1]

    def use_isa(self, name: str) -> str:
        """Run the int4 path on at most `name` (one of `ISAS`; tests and benchmarks compare the
        paths, MIXTRAL_CHAT_NATIVE_ISA caps it); returns the one in effect. Process-wide."""
        if name not in ISAS:
            raise QuantizationError(
                f"native int4: unknown instruction set {name!r} (one of {', '.join(ISAS)})"
            )
        return ISAS[self._isa(ISAS.index(name))]

    # Layers hold the kernel: copying a layer (copy.deepcopy of a module) shares it.
    def __copy__(self) -> Int4Kernel:
        return self

    def __deepcopy__(self, memo: dict) -> Int4Kernel:
        return self

    def linear(
        self,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor,
        x: Tensor,
        out: Tensor,
        group_size: int,
        threads: int | None = None,
        variant: int = VARIANT_Q8,
    ) -> Tensor:
        """out [M, N] = x [M, Kp] @ W^T for W stored as (qweight, scales, zeros); returns `out`.

        x and out are float32 and contiguous, on the CPU like the parts; `threads` defaults to
        torch.get_num_threads().
        """
        if not _fits(qweight, scales, zeros, x, out, group_size):
            _explain(qweight, scales, zeros, x, out, group_size)
        if variant != VARIANT_Q8 and variant != VARIANT_F32:
            raise QuantizationError(f"native int4: unknown variant {variant}")
        n, half = qweight.shape
        rc = self._run(
            qweight.data_ptr(),
            scales.data_ptr(),
            zeros.data_ptr(),
            x.data_ptr(),
            out.data_ptr(),
            x.shape[0],
            n,
            2 * half,
            group_size,
            _get_num_threads() if threads is None else threads,
            variant,
        )
        _check(rc, "int4")
        return out

    def linear_multi(
        self,
        weights: Sequence[tuple[Tensor, Tensor, Tensor]],
        x: Tensor,
        out: Tensor,
        group_size: int,
        threads: int | None = None,
        variant: int = VARIANT_Q8,
    ) -> Tensor:
        """out [M, N_0 + N_1 + ...] = x [M, Kp] @ [W_0; W_1; ...]^T for up to 4 weights stored as
        (qweight, scales, zeros) with the same Kp: one call, x prepared once. Each W_s's columns
        are bit-identical to `linear` on it alone. Returns `out`."""
        count = len(weights)
        if not 1 <= count <= MAX_MULTI:
            raise QuantizationError(f"native int4: 1 to {MAX_MULTI} weights per call, got {count}")
        if not (x.dim() == 2 and x.dtype is _F32 and x.is_cpu and x.is_contiguous()):
            raise QuantizationError("native int4: 'x' must be a contiguous float32 CPU matrix")
        column = 0
        for qweight, scales, zeros in weights:
            if not _weight_fits(qweight, scales, zeros, x.shape[1], group_size):
                _explain(qweight, scales, zeros, x, out.new_empty((x.shape[0], qweight.shape[0])), group_size)
            column += qweight.shape[0]
        if not (
            out.shape == (x.shape[0], column) and out.dtype is _F32 and out.is_cpu and out.is_contiguous()
        ):
            raise QuantizationError(
                f"native int4: 'out' is {out.dtype} {tuple(out.shape)}, expected a contiguous float32 "
                f"{(x.shape[0], column)}"
            )
        if variant != VARIANT_Q8 and variant != VARIANT_F32:
            raise QuantizationError(f"native int4: unknown variant {variant}")
        pointers = ctypes.c_void_p * count
        rc = self._run_multi(
            count,
            pointers(*(w[0].data_ptr() for w in weights)),
            pointers(*(w[1].data_ptr() for w in weights)),
            pointers(*(w[2].data_ptr() for w in weights)),
            (ctypes.c_int64 * count)(*(w[0].shape[0] for w in weights)),
            x.data_ptr(),
            out.data_ptr(),
            x.shape[0],
            x.shape[1],
            group_size,
            _get_num_threads() if threads is None else threads,
            variant,
        )
        _check(rc, "int4")
        return out

    def codebook_linear(
        self,
        parts: Parts,
        x: Tensor,
        out: Tensor,
        blocksize: int,
        threads: int | None = None,
    ) -> Tensor:
        """out [M, N] = x [M, K] @ W^T for W stored as bitsandbytes 4-bit parts (nf4 or fp4, see
        `mixtral_chat.quant.nf4`; with double quantization too); returns `out`.

        The code book's 16 values are rounded to 1/63 of its largest before they meet x (rounded
        to int8 per 32 columns, as in `linear`). Needs K % 32 == 0 and K % blocksize == 0 (no
        block spans two rows: `codebook_fits`); x and out float32, contiguous, on the CPU.
        """
        m, k = x.shape
        n = out.shape[1]
        if not codebook_fits(parts, n, k, blocksize) or out.shape != (m, n):
            raise QuantizationError(
                f"native 4-bit: parts of a {n}x{k} weight with block size {blocksize} and x "
                f"{tuple(x.shape)} -> out {tuple(out.shape)} do not fit the kernel"
            )
        if not (x.dtype is _F32 and out.dtype is _F32 and x.is_contiguous() and out.is_contiguous()):
            raise QuantizationError("native 4-bit: x and out must be contiguous float32 CPU tensors")
        double_quant = "nested_absmax" in parts
        absmax = parts["absmax"]
        rc = self._run_codebook(
            parts["qweight"].data_ptr(),
            None if double_quant else absmax.data_ptr(),
            absmax.data_ptr() if double_quant else None,
            parts["nested_absmax"].data_ptr() if double_quant else None,
            parts["nested_quant_map"].data_ptr() if double_quant else None,
            float(parts["absmax_offset"]) if double_quant else 0.0,
            parts["quant_map"].data_ptr(),
            x.data_ptr(),
            out.data_ptr(),
            m,
            n,
            k,
            blocksize,
            _get_num_threads() if threads is None else threads,
        )
        _check(rc, "4-bit")
        return out

    def q8_linear(
        self, qweight: Tensor, scales: Tensor, x: Tensor, out: Tensor, threads: int | None = None
    ) -> Tensor:
        """out [M, N] = x [M, K] @ W^T for W stored as int8 codes [N, K] with one float32 scale
        per 32 columns, scales [N, K / 32] (`mixtral_chat.quant.int8`); returns `out`. x and
        out are float32, contiguous, on the CPU like the weights."""
        n, k = qweight.shape
        m = x.shape[0] if x.dim() == 2 else -1
        expected = {
            "qweight": (qweight, torch.int8, (n, k)),
            "scales": (scales, _F32, (n, k // 32)),
            "x": (x, _F32, (m, k)),
            "out": (out, _F32, (m, n)),
        }
        for name, (tensor, dtype, shape) in expected.items():
            fits = tensor.dtype is dtype and tensor.is_cpu and tensor.is_contiguous()
            if not (fits and tensor.shape == shape):
                raise QuantizationError(
                    f"native int8: {name!r} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}, "
                    f"expected a contiguous {dtype} CPU tensor {shape}"
                )
        if k % 32 != 0:
            raise QuantizationError(f"native int8: in_features must be a multiple of 32, got {k}")
        rc = self._run_q8(
            qweight.data_ptr(),
            scales.data_ptr(),
            x.data_ptr(),
            out.data_ptr(),
            m,
            n,
            k,
            _get_num_threads() if threads is None else threads,
        )
        _check(rc, "int8")
        return out

    def silu_mul(self, gate_up: Tensor, threads: int | None = None) -> Tensor:
        """silu(g) * u [M, I] of gate_up [M, 2I] (float32, contiguous, on the CPU; g the first I
        columns): a batch's expert activations with the bits the one-token moe call gives each
        row (quant/csrc/moe.c)."""
        if not (gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and gate_up.shape[1] > 0):
            raise QuantizationError(f"native silu_mul: gate_up is {tuple(gate_up.shape)}, expected [M, 2I]")
        if not (gate_up.dtype is torch.float32 and gate_up.is_cpu and gate_up.is_contiguous()):
            raise QuantizationError("native silu_mul: gate_up must be a contiguous float32 CPU tensor")
        rows, width = gate_up.shape
        out = gate_up.new_empty((rows, width // 2))
        count = _get_num_threads() if threads is None else threads
        rc = self._run_silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, count)
        _check(rc, "silu_mul")
        return out

    def decode_attention(self, q: Tensor, k: Tensor, v: Tensor, threads: int | None = None) -> Tensor:
        """One query per head, q [1, H, 1, D], against the cache k, v [1, KVH, L, D] (a slice of
        a longer cache: its rows contiguous, its heads `stride(1)` apart) -> [1, H, 1, D], what
        SDPA gives without a mask (GQA: H a multiple of KVH), within ~1e-6 relative; float32 CPU."""
        _, heads, _, dim = q.shape
        _, kv_heads, length, _ = k.shape
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            if tensor.dtype is not _F32 or not tensor.is_cpu or tensor.shape[0] != 1:
                raise QuantizationError(f"native attention: {name!r} must be a float32 CPU tensor of batch 1")
        rows_contiguous = k.stride()[2:] == (dim, 1) and v.stride() == k.stride()
        if q.shape[2] != 1 or v.shape != k.shape or not rows_contiguous or not q.is_contiguous():
            raise QuantizationError(
                f"native attention: q {tuple(q.shape)} and k, v {tuple(k.shape)} "
                "do not fit [1, H, 1, D] and [1, KVH, L, D]"
            )
        out = torch.empty_like(q)
        rc = self._run_attention(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            out.data_ptr(),
            heads,
            kv_heads,
            length,
            dim,
            k.stride(1),
            dim**-0.5,
            _get_num_threads() if threads is None else threads,
        )
        _check(rc, "attention")
        return out


def _check(rc: int, what: str) -> None:
    """The kernels' status codes (0: done) as one error."""
    if rc != 0:
        raise QuantizationError(f"native {what} kernel failed: {_ERRORS.get(rc, f'error {rc}')}")


def kernel_input(x: Tensor, in_features: int, padded_in: int) -> Tensor:
    """x [..., in] as a layer passes it to the kernel: [M, padded_in] float32, contiguous,
    zero-padded. Per-call overhead matters (hundreds of calls per token): no-op conversions are
    skipped."""
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)  # [M, K]
    if x2.dtype is not torch.float32:
        x2 = x2.float()
    if padded_in != in_features:
        x2 = F.pad(x2, (0, padded_in - in_features))  # [M, Kp]
    return x2 if x2.is_contiguous() else x2.contiguous()


def kernel_output(y: Tensor, x: Tensor, out_features: int) -> Tensor:
    """The kernel's y [M, out] in the shape and dtype of the layer's input x [..., in]."""
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], out_features)
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def codebook_fits(parts: Parts, out_features: int, in_features: int, blocksize: int) -> bool:
    """bitsandbytes 4-bit parts that `Int4Kernel.codebook_linear` can run: whole blocks per row,
    and the tensors `nf4_part_specs` names as contiguous CPU tensors (of any shape: bnb keeps
    its codes as [(N*K+1)//2, 1])."""
    if blocksize not in _CODEBOOK_BLOCKSIZES or in_features % 32 or in_features % blocksize:
        return False
    for spec in _nf4_specs(out_features, in_features, blocksize, "nested_absmax" in parts):
        tensor = parts.get(spec.name)
        if tensor is None or tensor.dtype is not spec.dtype or tensor.numel() != math.prod(spec.shape):
            return False
        if not (tensor.is_cpu and tensor.is_contiguous()):
            return False
    return True


_U8, _BF16, _F32 = torch.uint8, torch.bfloat16, torch.float32


@functools.lru_cache(maxsize=256)  # layers check their parts per call
def _nf4_specs(out_features: int, in_features: int, blocksize: int, double_quant: bool) -> list:
    return nf4_part_specs(out_features, in_features, blocksize, double_quant)


_get_num_threads = torch.get_num_threads


def _fits(qweight: Tensor, scales: Tensor, zeros: Tensor, x: Tensor, out: Tensor, group_size: int) -> bool:
    """The arguments' dtypes, shapes, contiguity and device are what the kernel reads and writes.

    Written for speed (~3 us): layers call it per forward."""
    if qweight.dim() != 2 or x.dim() != 2:
        return False
    return (
        _weight_fits(qweight, scales, zeros, x.shape[1], group_size)
        and out.shape == (x.shape[0], qweight.shape[0])
        and x.dtype is _F32
        and out.dtype is _F32
        and x.is_cpu
        and out.is_cpu
        and x.is_contiguous()
        and out.is_contiguous()
    )


def _weight_fits(qweight: Tensor, scales: Tensor, zeros: Tensor, kp: int, group_size: int) -> bool:
    """The stored parts of one weight fit x's Kp and the group size (see `_fits`)."""
    if qweight.dim() != 2:
        return False
    n, half = qweight.shape
    groups = scales.shape
    return (
        kp == 2 * half
        and group_size in _GROUP_SIZES
        and kp % group_size == 0
        and groups == zeros.shape
        and groups == (n, kp // group_size)
        and qweight.dtype is _U8
        and scales.dtype is _BF16
        and zeros.dtype is _BF16
        and qweight.is_cpu
        and scales.is_cpu
        and zeros.is_cpu
        and qweight.is_contiguous()
        and scales.is_contiguous()
        and zeros.is_contiguous()
    )


def _explain(qweight: Tensor, scales: Tensor, zeros: Tensor, x: Tensor, out: Tensor, group_size: int) -> None:
    """Raises the QuantizationError that says what does not fit."""
    if qweight.dim() != 2 or group_size not in _GROUP_SIZES or (qweight.shape[1] * 2) % group_size:
        raise QuantizationError(
            f"native int4: qweight {tuple(qweight.shape)} does not fit group size {group_size}"
        )
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    m = x.shape[0] if x.dim() == 2 else -1
    expected = {
        "qweight": (qweight, torch.uint8, (n, kp // 2)),
        "scales": (scales, torch.bfloat16, (n, kp // group_size)),
        "zeros": (zeros, torch.bfloat16, (n, kp // group_size)),
        "x": (x, torch.float32, (m, kp)),
        "out": (out, torch.float32, (m, n)),
    }
    for name, (tensor, dtype, shape) in expected.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise QuantizationError(
                f"native int4: '{name}' is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}"
            )
        if not (tensor.is_cpu and tensor.is_contiguous()):
            raise QuantizationError(f"native int4: '{name}' must be a contiguous CPU tensor")
    raise QuantizationError("native int4: invalid arguments")


def _find_compiler() -> list[str] | None:
    """The compiler command: `$CC` (which may carry arguments, e.g. "ccache gcc"), else cc/gcc/clang."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        try:
            words = shlex.split(cc)
        except ValueError:
            return None
        path = shutil.which(words[0]) if words else None
        return [path, *words[1:]] if path else None
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _compiler_version(cc: list[str]) -> str:
    try:
        result = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"{' '.join(cc)} --version failed: {exc}") from None
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cc)} --version exited with status {result.returncode}")
    return result.stdout.strip()


def _cpu_identity() -> str:
    """The CPU's model and feature flags where the OS says (Linux): a library built with
    -march=native may use any of them, so a cache shared by several machines (a network home)
    must not hand it to another CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 16).splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    found = {}
    for line in lines:
        name = line.split(":", 1)[0].strip()
        if name in wanted and name not in found:
            found[name] = line
    return "\n".join(found.values()) or platform.processor()


def _library_path(source: str, cc: list[str], version: str, flags: tuple[str, ...]) -> Path:
    machine = [platform.machine(), sys.platform, _cpu_identity()]
    key = "\0".join([source, " ".join(cc), version, " ".join(flags), *machine])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return native_dir() / f"int4_gemv-{digest}.so"


def native_dir() -> Path:
    """Where compiled kernels are kept: $MIXTRAL_CHAT_NATIVE_DIR, else the cache folder."""
    override = os.environ.get(NATIVE_DIR_ENV)
    return Path(override) if override else cache_dir() / "native"


def _compile(cc: list[str], flags: tuple[str, ...], target: Path) -> str | None:
    """Builds `target` (atomically); None, or the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [*cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            errors = [line for line in lines if "error" in line.lower()]
            return (errors or lines or [f"exit status {result.returncode}"])[0].strip()
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_library(native: bool = True) -> Path:
    """The cached library's path, compiling it if needed; RuntimeError with the reason otherwise.

    `native=False` builds without -march=native (the portable scalar fallback on x86).
    """
    cc = _find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc, gcc or clang)")
    version = _compiler_version(cc)
    source = "\0".join(path.read_text(encoding="utf-8") for path in (SOURCE, *INCLUDED_SOURCES))
    attempts = [NATIVE_FLAGS + BASE_FLAGS, BASE_FLAGS] if native else [BASE_FLAGS]
    errors = []
    for flags in attempts:
        target = _library_path(source, cc, version, flags)
        if target.exists():
            return target
        error = _compile(cc, flags, target)
        if error is None:
            return target
        errors.append(f"{' '.join(cc)} {' '.join(flags)}: {error}")
    raise RuntimeError("compiling the native int4 kernel failed: " + "; ".join(errors))


def load_kernel(path: Path) -> Int4Kernel:
    return Int4Kernel(ctypes.CDLL(str(path)), path)


def _load() -> tuple[Int4Kernel | None, str | None]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the native kernel is vectorized for x86-64 AVX2, not {platform.machine()}"
    try:
        kernel = load_kernel(build_library())
    except Exception as exc:  # any failure means: use PyTorch's kernel instead
        return None, str(exc) or type(exc).__name__
    if not kernel.has_avx2:
        return None, "this CPU (or compiler) has no AVX2: the scalar fallback is slower than PyTorch's"
    capped = os.environ.get(ISA_ENV, "")
    if capped:
        try:
            kernel.use_isa(capped)
        except QuantizationError as exc:
            return None, f"{ISA_ENV}: {exc}"
    return kernel, None


def _disabled() -> str | None:
    value = os.environ.get(NO_NATIVE_ENV, "")
    return f"disabled by {NO_NATIVE_ENV}={value}" if value not in ("", "0") else None


def int4_kernel() -> Int4Kernel | None:
    """The kernel, built and loaded on the first call (cached); None when unavailable.

    `MIXTRAL_CHAT_NO_NATIVE` is read on every call (layers ask when they are built).
    """
    global _kernel, _reason, _loaded
    if _disabled():
        return None
    if _loaded:
        return _kernel
    with _lock:
        if not _loaded:
            _kernel, _reason = _load()
            _loaded = True
    return _kernel


def native_unavailable_reason() -> str | None:
    """Why `int4_kernel()` returns None (None when it gives a kernel or was not called yet)."""
    return _disabled() or (_reason if _loaded else None)


def reset_cache() -> None:
    """Forget the loaded kernel, so the next `int4_kernel()` looks again (tests)."""
    global _kernel, _reason, _loaded
    with _lock:
        _kernel, _reason, _loaded = None, None, False
