"""The native kernel's fused decode calls, each with its operand (its tensors checked once):
one token through a layer's chosen experts (`moe`, quant/csrc/moe.c), a layer's attention half
with its routing (`attention_block`, quant/csrc/attention_block.c), and every layer of a resident
model (`decode_stack`, quant/csrc/decode_stack.c). engine/model.py takes them at decode time for
one float32 token on the CPU; quant/native.py loads the library and binds their C functions.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant.native import (
    _F32,
    MAX_MOE_EXPERTS,
    MAX_ROUTED_EXPERTS,
    Int4Kernel,
    _check,
    _get_num_threads,
    _weight_fits,
)


@dataclasses.dataclass(frozen=True, slots=True, eq=False)  # equal: the same object
class StackOperand:
    """A resident model's layers as `decode_stack` reads them (`decode_stack_operand`)."""

    kernel: Int4Kernel
    blocks: tuple[AttentionBlockOperand, ...]  # with their tensors: kept alive
    experts: tuple[tuple[ExpertOperand, ...], ...]
    parts: ctypes.Array  # every layer's pointers (quant/csrc/decode_stack.c)
    dims: tuple[int, int, int, int, int]  # E, K, and the experts' I, Kp1, Kp2


@dataclasses.dataclass(frozen=True, slots=True, eq=False)  # equal: the same object
class AttentionBlockOperand:
    """A layer's attention half as `attention_block` reads it (`attention_block_operand`)."""

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
    """What `attention_block` returns for one token; the routing is None without a router."""

    h: Tensor  # x + attention: the residual stream
    normed: Tensor  # norm_post(h): the experts' input
    expert_ids: list[int] | None  # the top K, largest first
    expert_weights: list[float] | None  # their softmax weights, renormalised over the K
    router_logits: Tensor | None  # [1, E]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)  # equal: the same object
class ExpertOperand:
    """An expert's weights as `moe` reads them (made by `expert_operand`)."""

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


def expert_operand(
    kernel: Int4Kernel, w1: Sequence[Tensor], w3: Sequence[Tensor], w2: Sequence[Tensor], group_size: int
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
    return ExpertOperand(kernel, tensors, pointers, hidden, kp1, out, kp2, group_size)


def moe(
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
    kernel = first.kernel
    if any(e.shape != first.shape or e.kernel is not kernel for e in experts):
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
    rc = kernel._run_moe(
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
    kernel: Int4Kernel,
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
        if not (tensor.shape == shape and tensor.dtype is _F32 and tensor.is_cpu and tensor.is_contiguous()):
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
    return AttentionBlockOperand(kernel, tensors, pointers, parts, dims, eps, shape[2], experts, top_k)


def attention_block(
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
    rc = block.kernel._run_block(
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
    blocks: Sequence[AttentionBlockOperand], experts: Sequence[Sequence[ExpertOperand]]
) -> StackOperand:
    """Layers for `decode_stack`: each layer's attention block, with its router, and all of
    its experts in id order (E of them, as the router's rows), of one shape throughout."""
    first = blocks[0] if blocks else None
    if first is None or len(experts) != len(blocks):
        raise QuantizationError("native decode stack: a block and its experts for each layer")
    shape = experts[0][0].shape if experts[0] else None
    for block, layer in zip(blocks, experts, strict=True):
        if not (
            block.kernel is first.kernel
            and block.dims == first.dims
            and block.eps == first.eps
            and block.max_seq_len == first.max_seq_len
            and block.experts == len(layer) == first.experts
            and block.top_k == first.top_k
            and 1 <= block.top_k <= MAX_MOE_EXPERTS
            and all(e.kernel is first.kernel and e.shape == shape for e in layer)
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
    return StackOperand(first.kernel, tuple(blocks), tuple(tuple(layer) for layer in experts), parts, dims)


def decode_stack(
    stack: StackOperand, x: Tensor, cos: Tensor, sin: Tensor, pos: int, threads: int | None = None
) -> Tensor:
    """One token x float32 [.., D] at position `pos` through every layer of `stack`
    (quant/csrc/decode_stack.c): each layer's `attention_block` with its routing, then `moe`
    on the chosen experts (ascending ids) with the residual, in one call; the bits of those
    calls made layer by layer. Each layer's cache row is written."""
    first = stack.blocks[0]
    _check_block_input(first, x, cos, sin, pos)
    out = torch.empty_like(x)
    head_dim = first.dims[4]
    rc = stack.kernel._run_stack(
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
