"""The native 4-bit GEMV kernel (quant/csrc/int4_gemv.c), compiled on first use and loaded by ctypes.

It computes on the stored form of int4 (`Int4Kernel.linear`) and of bitsandbytes' nf4/fp4
(`Int4Kernel.codebook_linear`), and on the int8 lm_head of quant/int8.py (`Int4Kernel.q8_linear`,
quant/csrc/q8_gemv.c, which int4_gemv.c includes), and one decode query's attention against a
float32 KV cache (`Int4Kernel.decode_attention`, quant/csrc/attention.c, included the same way),
and one token through a layer's chosen experts (`Int4Kernel.moe`, quant/csrc/moe.c).

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
import dataclasses
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
from typing import NamedTuple

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
        block_args = [
            ptr,
            ptr,
            ptr,
            ptr,
            f32,
            ptr,
            ptr,
            ptr,
            ptr,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        ]
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

    def expert_operand(
        self, w1: Sequence[Tensor], w3: Sequence[Tensor], w2: Sequence[Tensor], group_size: int
    ) -> ExpertOperand:
        """One expert's three weights, each stored as (qweight, scales, zeros) with `group_size`:
        W1 and W3 [I, Kp1], W2 [D, Kp2] (Kp2 >= I), checked once for `moe`."""
        for name, (qweight, scales, zeros) in (("w1", w1), ("w3", w3), ("w2", w2)):
            kp = 2 * qweight.shape[1] if qweight.dim() == 2 else 0
            if not _weight_fits(qweight, scales, zeros, kp, group_size):
                raise QuantizationError(f"native int4 expert: {name} is not a stored int4 weight")
        hidden, kp1 = w1[0].shape[0], 2 * w1[0].shape[1]
        out, kp2 = w2[0].shape[0], 2 * w2[0].shape[1]
        if w3[0].shape != w1[0].shape or kp2 < hidden:
            raise QuantizationError(
                f"native int4 expert: w1 {tuple(w1[0].shape)}, w3 {tuple(w3[0].shape)} and "
                f"w2 {tuple(w2[0].shape)} (packed) do not make one expert"
            )
        tensors = (*w1, *w3, *w2)
        pointers = tuple(t.data_ptr() for t in tensors)
        return ExpertOperand(self, tensors, pointers, hidden, kp1, out, kp2, group_size)

    def moe(
        self,
        experts: Sequence[ExpertOperand],
        weights: Sequence[float],
        x: Tensor,
        threads: int | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        """One token through several experts in one call: [1, D] = residual + sum over e of
        weights[e] * W2_e (silu(W1_e x) * W3_e x), x float32 [1, in] on the CPU (in <= Kp1:
        zero-padded here), summed in the order given, `residual` (float32 [1, D], optional) added
        last. Each expert's result equals this call on it alone with weight 1.0, so a float32 sum
        of those (then + residual) gives the same bits (quant/csrc/moe.c)."""
        count = len(experts)
        first = experts[0] if count else None
        if first is None or count > MAX_MOE_EXPERTS or count != len(weights):
            raise QuantizationError(f"native int4 moe: 1 to {MAX_MOE_EXPERTS} experts with a weight each")
        if any(e.shape != first.shape or e.kernel is not self for e in experts):
            raise QuantizationError("native int4 moe: the experts differ in shape or kernel")
        hidden, kp1, out_features, kp2, group_size = first.shape
        if residual is not None and not (
            residual.shape == (1, out_features)
            and residual.dtype is _F32
            and residual.is_cpu
            and residual.is_contiguous()
        ):
            raise QuantizationError(f"native int4 moe: the residual must be float32 (1, {out_features})")
        if not (x.dim() == 2 and x.shape[0] == 1 and x.shape[1] <= kp1 and x.dtype is _F32 and x.is_cpu):
            raise QuantizationError(
                f"native int4 moe: x is {x.dtype} {tuple(x.shape)}, expected float32 (1, {kp1})"
            )
        if x.shape[1] != kp1:
            x = F.pad(x, (0, kp1 - x.shape[1]))
        x = x.contiguous()
        out = x.new_empty((1, out_features))
        pointers = (ctypes.c_void_p * (9 * count))(*(p for e in experts for p in e.pointers))
        rc = self._run_moe(
            count,
            pointers,
            (ctypes.c_float * count)(*weights),
            x.data_ptr(),
            out.data_ptr(),
            None if residual is None else residual.data_ptr(),
            hidden,
            kp1,
            out_features,
            kp2,
            group_size,
            _get_num_threads() if threads is None else threads,
        )
        _check(rc, "int4 moe")
        return out

    def attention_block_operand(
        self,
        weights: Sequence[Sequence[Tensor]],
        group_size: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        norms: Sequence[Tensor],
        eps: float,
        cache: Sequence[Tensor],
        router: Tensor | None = None,
        top_k: int = 0,
    ) -> AttentionBlockOperand:
        """A decoder layer's attention half for `attention_block`: `weights` Wq, Wk, Wv, Wo each
        stored as (qweight, scales, zeros) with `group_size`; `norms` the float32 weights of the
        norm before and after it; `cache` its float32 keys and values [1, KVH, max_seq, D];
        `router` the float32 weights [E, D] of the MoE's gate, to route the output too (its
        `top_k` experts of E <= MAX_ROUTED_EXPERTS)."""
        q, k, v, o = weights
        kp, kpo = 2 * q[0].shape[1], 2 * o[0].shape[1]
        width = o[0].shape[0]
        rows = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim, width)
        for name, (qweight, scales, zeros), n, columns in zip(
            "qkvo", weights, rows, (kp, kp, kp, kpo), strict=True
        ):
            if (
                qweight.dim() != 2
                or qweight.shape[0] != n
                or not _weight_fits(qweight, scales, zeros, columns, group_size)
            ):
                raise QuantizationError(
                    f"native attention block: W{name} is not a stored int4 [{n}, {columns}] weight"
                )
        for norm in norms:
            if not (norm.shape == (width,) and norm.dtype is _F32 and norm.is_cpu and norm.is_contiguous()):
                raise QuantizationError(f"native attention block: a norm weight is not float32 ({width},)")
        keys = cache[0]
        shape = (1, kv_heads, keys.shape[2] if keys.dim() == 4 else 0, head_dim)
        for tensor in cache:
            if not (
                tensor.shape == shape and tensor.dtype is _F32 and tensor.is_cpu and tensor.is_contiguous()
            ):
                raise QuantizationError(f"native attention block: the cache is not float32 {shape}")
        if heads % kv_heads or head_dim % 2 or kpo < heads * head_dim or kp < width:
            raise QuantizationError("native attention block: the heads do not fit the weights")
        routed = () if router is None else (router,)
        if router is not None and not (
            router.dim() == 2
            and 1 <= top_k <= router.shape[0] <= MAX_ROUTED_EXPERTS
            and router.shape[1] == width
            and router.dtype is _F32
            and router.is_cpu
            and router.is_contiguous()
        ):
            raise QuantizationError(
                f"native attention block: the router is not float32 [<= {MAX_ROUTED_EXPERTS}, {width}]"
                f" with top {top_k}"
            )
        tensors = (*q, *k, *v, *o, *norms, *cache, *routed)
        pointers = tuple(t.data_ptr() for t in tensors)
        dims = (width, kp, heads, kv_heads, head_dim, kpo, group_size)
        experts = 0 if router is None else router.shape[0]
        parts = (ctypes.c_void_p * 12)(*pointers[:12])
        return AttentionBlockOperand(self, tensors, pointers, parts, dims, eps, shape[2], experts, top_k)

    def attention_block(
        self,
        block: AttentionBlockOperand,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        pos: int,
        threads: int | None = None,
    ) -> BlockOutput:
        """One token x float32 [.., D] at position `pos` through the attention half of a layer
        (quant/csrc/attention_block.c): h = x + attention(norm_in(x)), written into the cache at
        `pos`, and norm_post(h), routed where the operand has a router; cos and sin float32
        [1, head_dim] (this position's rows)."""
        _check_block_input(block, x, cos, sin, pos)
        head_dim = block.dims[4]
        h, normed = torch.empty_like(x), torch.empty_like(x)
        p = block.pointers
        experts, top_k = block.experts, block.top_k
        if experts:
            logits = torch.empty((1, experts), dtype=_F32)
            ids, weights = (ctypes.c_int32 * top_k)(), (ctypes.c_float * top_k)()
            routing = (p[16], experts, top_k, logits.data_ptr(), ids, weights)
        else:
            logits = ids = weights = None
            routing = (None, 0, 0, None, None, None)
        rc = self._run_block(
            block.parts,
            x.data_ptr(),
            p[12],
            p[13],
            block.eps,
            cos.data_ptr(),
            sin.data_ptr(),
            p[14],
            p[15],
            block.max_seq_len * head_dim,
            pos,
            *block.dims,
            head_dim**-0.5,
            h.data_ptr(),
            normed.data_ptr(),
            *routing,
            _get_num_threads() if threads is None else threads,
        )
        _check(rc, "attention block")
        if ids is None:
            return BlockOutput(h, normed, None, None, None)
        return BlockOutput(h, normed, list(ids), list(weights), logits)

    def decode_stack_operand(
        self, blocks: Sequence[AttentionBlockOperand], experts: Sequence[Sequence[ExpertOperand]]
    ) -> StackOperand:
        """Layers for `decode_stack`: each layer's attention block, with its router, and all of
        its experts in id order (E of them, as the router's rows), of one shape throughout."""
        first = blocks[0] if blocks else None
        if first is None or len(experts) != len(blocks):
            raise QuantizationError("native decode stack: a block and its experts for each layer")
        shape = experts[0][0].shape if experts[0] else None
        for block, layer in zip(blocks, experts, strict=True):
            if not (
                block.kernel is self
                and block.dims == first.dims
                and block.eps == first.eps
                and block.max_seq_len == first.max_seq_len
                and block.experts == len(layer) == first.experts
                and block.top_k == first.top_k
                and 1 <= block.top_k <= MAX_MOE_EXPERTS
                and all(e.kernel is self and e.shape == shape for e in layer)
            ):
                raise QuantizationError("native decode stack: the layers differ, or a block has no router")
        width = first.dims[0]
        if shape is None or shape[2] != width or shape[1] < width:
            raise QuantizationError("native decode stack: the experts do not fit the blocks")
        pointers = []
        for block, layer in zip(blocks, experts, strict=True):
            pointers += block.pointers
            pointers += (p for e in layer for p in e.pointers)
        dims = (first.experts, first.top_k, shape[0], shape[1], shape[3])
        parts = (ctypes.c_void_p * len(pointers))(*pointers)
        return StackOperand(self, tuple(blocks), tuple(tuple(layer) for layer in experts), parts, dims)

    def decode_stack(
        self, stack: StackOperand, x: Tensor, cos: Tensor, sin: Tensor, pos: int, threads: int | None = None
    ) -> Tensor:
        """One token x float32 [.., D] at position `pos` through every layer of `stack`
        (quant/csrc/decode_stack.c): each layer's `attention_block` with its routing, then `moe`
        on the chosen experts (ascending ids) with the residual, in one call; the bits of those
        calls made layer by layer. Each layer's cache row is written."""
        first = stack.blocks[0]
        _check_block_input(first, x, cos, sin, pos)
        out = torch.empty_like(x)
        head_dim = first.dims[4]
        rc = self._run_stack(
            len(stack.blocks),
            stack.parts,
            x.data_ptr(),
            first.eps,
            cos.data_ptr(),
            sin.data_ptr(),
            first.max_seq_len * head_dim,
            pos,
            *first.dims,
            head_dim**-0.5,
            *stack.dims,
            out.data_ptr(),
            _get_num_threads() if threads is None else threads,
        )
        _check(rc, "decode stack")
        return out


@dataclasses.dataclass(frozen=True, slots=True, eq=False)  # equal: the same object
class StackOperand:
    """A resident model's layers as `Int4Kernel.decode_stack` reads them (`decode_stack_operand`)."""

    kernel: Int4Kernel
    blocks: tuple[AttentionBlockOperand, ...]  # with their tensors: kept alive
    experts: tuple[tuple[ExpertOperand, ...], ...]
    parts: ctypes.Array  # every layer's pointers (quant/csrc/decode_stack.c)
    dims: tuple[int, int, int, int, int]  # E, K, and the experts' I, Kp1, Kp2


@dataclasses.dataclass(frozen=True, slots=True, eq=False)  # equal: the same object
class AttentionBlockOperand:
    """A layer's attention half as `Int4Kernel.attention_block` reads it (`attention_block_operand`)."""

    kernel: Int4Kernel
    # Wq, Wk, Wv, Wo parts, the two norm weights, the cache's k and v, the router's weights if any
    tensors: tuple[Tensor, ...]
    pointers: tuple[int, ...]
    parts: ctypes.Array  # the weights' 12 pointers, as the call takes them
    dims: tuple[int, int, int, int, int, int, int]  # D, Kp, H, KVH, Dh, Kpo, group size
    eps: float
    max_seq_len: int
    experts: int  # E: the router's rows; 0 without a router
    top_k: int


class BlockOutput(NamedTuple):
    """What `Int4Kernel.attention_block` returns for one token; the routing is None without a router."""

    h: Tensor  # x + attention: the residual stream
    normed: Tensor  # norm_post(h): the experts' input
    expert_ids: list[int] | None  # the top K, largest first
    expert_weights: list[float] | None  # their softmax weights, renormalised over the K
    router_logits: Tensor | None  # [1, E]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)  # equal: the same object
class ExpertOperand:
    """An expert's weights as `Int4Kernel.moe` reads them (made by `Int4Kernel.expert_operand`)."""

    kernel: Int4Kernel
    tensors: tuple[Tensor, ...]  # w1's, w3's, w2's qweight, scales, zeros: kept alive
    pointers: tuple[int, ...]
    hidden: int  # I: w1's and w3's rows
    kp1: int  # the input's padded width
    out_features: int  # D: w2's rows
    kp2: int  # w2's padded input, >= I
    group_size: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.hidden, self.kp1, self.out_features, self.kp2, self.group_size)


def _check_block_input(block: AttentionBlockOperand, x: Tensor, cos: Tensor, sin: Tensor, pos: int) -> None:
    """What `attention_block` and `decode_stack` take: one float32 token of the block's width, this
    position's float32 rope rows, a position inside the cache."""
    width, _, _, _, head_dim, _, _ = block.dims
    if not (x.numel() == width and x.dtype is _F32 and x.is_cpu and x.is_contiguous()):
        raise QuantizationError(
            f"native attention block: x is {x.dtype} {tuple(x.shape)}, expected {width} float32"
        )
    for table in (cos, sin):
        fits = table.shape == (1, head_dim) and table.dtype is _F32 and table.is_cpu
        if not (fits and table.is_contiguous()):
            raise QuantizationError(f"native attention block: cos and sin must be float32 (1, {head_dim})")
    if not 0 <= pos < block.max_seq_len:
        raise QuantizationError(
            f"native attention block: position {pos} is beyond the cache ({block.max_seq_len})"
        )


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
