"""Mixtral in plain PyTorch.

Module names mirror the Hugging Face checkpoint keys without their `model.` prefix, so a
checkpoint key names its module (`model.layers.3.block_sparse_moe.experts.5.w1.weight` ->
`layers[3].block_sparse_moe.experts[5].w1`). Experts are separate modules so that offloading can
move them one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral_chat.engine.bindings import Bindings
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant import native_fused
from mixtral_chat.quant.int4 import expert_operand, native_parts, same_tensors
from mixtral_chat.quant.native import MAX_ROUTED_EXPERTS, int4_kernel
from mixtral_chat.quant.native_fused import AttentionBlockOperand, BlockOutput, ExpertOperand, StackOperand

if TYPE_CHECKING:
    from mixtral_chat.engine.decode_graphs import DecodeGraphs

# Offloading swaps this for an expert cache: given a layer's expert ids (ascending), return
# modules that compute each expert. The default is the layer's own resident experts.
ExpertSource = Callable[[Sequence[int]], Sequence[nn.Module]]


class Linear(nn.Linear):
    """nn.Linear without random initialisation: weights always come from a checkpoint.

    Initialising on the meta device still runs torch's reference ops, whose first use imports
    torch._dynamo: 1.9 s of start-up for nothing.
    """

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without random initialisation (see Linear)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._eps_tensor: Tensor | None = None  # not a buffer: not in the state dict or a blob

    def forward(self, x: Tensor) -> Tensor:
        # Normalised in float32 then cast back before the weight, as transformers does. Each op
        # is a dispatch (and on CPU a parallel region) whatever its size: 5 in float32 where
        # x.pow(2).mean() + eps, rsqrt and the two products took 6, and no casts for float32.
        x32 = x if x.dtype is torch.float32 else x.float()
        norm = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)  # [..., 1]: sqrt(sum x^2)
        # mean(x^2) + eps as eps + norm * norm / D, in one op.
        var = torch.addcmul(self._eps_for(x32), norm, norm, value=1.0 / x32.shape[-1])  # [..., 1]
        scaled = x32 * var.rsqrt_()
        return self.weight * (scaled if x.dtype is torch.float32 else scaled.to(x.dtype))

    def _eps_for(self, x: Tensor) -> Tensor:
        """eps as a 0-dim float32 tensor on x's device, made once per device."""
        eps = self._eps_tensor
        if eps is None or eps.device != x.device:
            eps = self._eps_tensor = torch.tensor(self.eps, dtype=torch.float32, device=x.device)
        return eps


def rope_table(args: ModelArgs, max_seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin, float32 [max_seq_len, head_dim], in the HF rotate_half layout."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq[None, :]  # [S, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def signed_sin(sin: Tensor) -> Tensor:
    """sin [S, D] with its first half negated: rotate_half(x) * sin == roll(x, D/2) * signed_sin."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


# One decoding query against a float32 cache on the CPU: the native kernel's decode attention
# (quant/csrc/attention.c) where it loads. Without it, against a long cache, two matmuls and a softmax beat
# SDPA's CPU kernel from ~1M cached values per token on (heads x positions x head dim).
# Measured (2 threads, AMD EPYC, wall time): Mixtral's 32x128 heads at 256 / 1024 / 4096
# positions 0.77x / 0.64x / 0.69x SDPA's time, 8x64 heads at 4096 positions 0.33x; below it SDPA
# wins (8x64 at 64 positions: manual 2.9x slower; the demo's 4x48 heads: 1.6-6x slower).
DECODE_MATMUL_ATTENTION_MIN = 1 << 20


def decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q [B, H, 1, D] against the cache k, v [B, KVH, L, D] (GQA: H a multiple of KVH) ->
    [B, H, 1, D], what SDPA gives without a mask, as two matmuls and a softmax."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(B, kv_heads, H // kv_heads, D)  # [B, KVH, G, D]: a kv head's queries
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * D**-0.5  # [B, KVH, G, L]
    return torch.matmul(scores.softmax(dim=-1), v).view(B, H, 1, D)  # [B, KVH, G, D] -> [B, H, 1, D]


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x [B, H, S, D]; cos and `signed_sin(sin)` [S, D] already in x's dtype.

    x * cos + rotate_half(x) * sin in 3 ops (rotate_half alone took 4: two slices, neg, cat):
    the rotation is a roll by D/2 once the sign is folded into the table.
    """
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), sin_signed)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer: [B, KVH, max_seq_len, D]."""

    def __init__(
        self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, end: int) -> tuple[Tensor, Tensor]:
        """Write k/v [B, KVH, S, D] at input_pos; return the cache up to `end` positions.

        index_copy_, not an indexed assignment: a CUDA graph captures it (engine/decode_graphs.py)."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None
        self._qkv_weight: Tensor | None = None  # see fuse_qkv: [hidden, (H + 2 KVH) * D]

    def fuse_qkv(self) -> None:
        """q, k and v as one GEMM where their weights are float tensors of their own (a loaded
        float checkpoint): concatenated into one [(H + 2 KVH) * D, hidden] tensor whose rows
        the three layers keep as views, so the checkpoint format and memory stay as they were."""
        self._qkv_weight = _concatenate_weights((self.q_proj, self.k_proj, self.v_proj))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, hidden] -> q [T, H*D], k and v [T, KVH*D]: one GEMM, or one kernel call for
        native int4, where the layers allow; else three."""
        sizes = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        )
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if self._qkv_weight is not None and not _still_viewed(layers, self._qkv_weight):
            self._qkv_weight = None  # their weights changed: the fused copy is dropped
        qkv = _concatenated_output(layers, self._qkv_weight, x)
        if qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = qkv.split(sizes, dim=-1)
        return q, k, v

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor | None, end: int
    ) -> Tensor:
        """x [B, S, hidden]; cos and sin [S, D] as `apply_rope` takes them."""
        B, S, _ = x.shape
        q, k, v = self.project(x.view(B * S, -1))  # [T, H*D], [T, KVH*D], [T, KVH*D]
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is None:
            raise RuntimeError("call Mixtral.setup_cache() before forward()")
        k, v = self.kv_cache.update(input_pos, k, v, end)  # [B, KVH, end, D]
        cpu_decode = S == 1 and mask is None and q.dtype is torch.float32 and q.device.type == "cpu"
        kernel = int4_kernel() if cpu_decode and B == 1 else None
        if kernel is not None:
            out = kernel.decode_attention(q, k, v)  # [1, H, 1, D]
        elif cpu_decode and self.n_heads * end * self.head_dim >= DECODE_MATMUL_ATTENTION_MIN:
            out = decode_attention(q, k, v)  # [B, H, 1, D]
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
            )  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(B * S, self.n_heads * self.head_dim)  # [T, H*D]
        return self.o_proj(out).view(B, S, -1)  # [B, S, hidden]


class Expert(nn.Module):
    """One feed-forward expert: w2(silu(w1 x) * w3 x), with w1 and w3 as one GEMM (float
    weights after `fuse_gate_up`) or one kernel call (native int4) where they allow.

    One float32 token through native int4 weights is one call of the whole expert (`native_operand`,
    quant/csrc/moe.c), as SparseMoE runs a token's experts together: wherever an expert is placed
    (resident, a slot, computed on the host) a token gets the same bits."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)  # gate projection
        self.w2 = Linear(hidden_dim, dim, bias=False)  # down projection
        self.w3 = Linear(dim, hidden_dim, bias=False)  # up projection
        self._gate_up_weight: Tensor | None = None  # see fuse_gate_up: [dim, 2 * hidden]
        self._operand: ExpertOperand | None = None  # see native_operand

    def native_operand(self, x: Tensor) -> ExpertOperand | None:
        """What the native kernel's `moe` takes for this expert when x [T, D] is one float32 token
        on the CPU and the weights are native int4; else None (checked once per set of tensors)."""
        if not (x.dim() == 2 and x.shape[0] == 1 and x.dtype is torch.float32 and x.is_cpu):
            return None
        self._operand = expert_operand(self.w1, self.w3, self.w2, self._operand)
        return self._operand

    def fuse_gate_up(self) -> None:
        """w1 and w3 as one [2 * hidden, dim] tensor (kept transposed) whose halves they keep as views (see
        `Attention.fuse_qkv`); experts bound to blobs (offloading) are left as they are."""
        self._gate_up_weight = _concatenate_weights((self.w1, self.w3))

    def forward(self, x: Tensor) -> Tensor:
        operand = self.native_operand(x)
        if operand is not None:
            return native_fused.moe((operand,), (1.0,), x)  # [1, D]
        if self._gate_up_weight is not None and not _still_viewed((self.w1, self.w3), self._gate_up_weight):
            self._gate_up_weight = None  # their weights changed: the fused copy is dropped
        gate_up = _concatenated_output((self.w1, self.w3), self._gate_up_weight, x)  # [T, 2 * hidden]
        if gate_up is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        batch_fits = gate_up.dtype is torch.float32 and gate_up.is_cpu and gate_up.is_contiguous()
        native = native_parts(self.w1) if batch_fits else None
        if native is not None:  # a batch's rows get the one-token call's bits (moe.c)
            return self.w2(native[0].silu_mul(gate_up))  # [T, hidden] -> [T, D]
        gate, up = gate_up.chunk(2, dim=-1)  # [T, hidden] each
        return self.w2(F.silu(gate) * up)

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy: the offloader's slot modules) is rebound to other tensors:
        # it must not carry, nor copy, the fused weight.
        state = dict(super().__getstate__())
        state["_gate_up_weight"] = state["_operand"] = None
        return state


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(args.hidden_size, args.intermediate_size) for _ in range(args.num_local_experts)
        )
        self.expert_source: ExpertSource = self._resident_experts
        # How many experts the source can hold at once (an offloaded layer's cache slots).
        self.experts_per_call = args.num_local_experts
        # Called with the MoE input [T, D] before routing: speculative prefetch of the next
        # layer's experts starts here, so their loading overlaps this layer's compute.
        self.prefetch_hook: Callable[[Tensor], None] | None = None
        # Called with (router logits [T, E], chosen experts [T, K], weights [T, K]) after routing:
        # the routing trace listens here.
        self.routing_hook: Callable[[Tensor, Tensor, Tensor], None] | None = None
        # A decode token's chosen experts as one CUDA graph (engine/decode_graphs.py): given x
        # [1, D], the expert modules in ascending id order, their index in the route and the
        # route's weights [1, K], their weighted sum [1, D]; or None where it cannot.
        self.graphed_experts: (
            Callable[[Tensor, Sequence[nn.Module], list[int], Tensor], Tensor | None] | None
        ) = None

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["graphed_experts"] = None  # a copy's graphs are made anew, for its own tensors
        return state

    def _resident_experts(self, expert_ids: Sequence[int]) -> list[nn.Module]:
        return [self.experts[e] for e in expert_ids]

    @property
    def routes_with_gate(self) -> bool:
        """Routing is `route` of the class (the gate's top-k), not one set on this layer (a
        replayed trace, engine/offload/replay.py): only then may native code route with the
        gate's weight in its place."""
        return "route" not in self.__dict__

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, D] -> router logits [T, E], chosen experts [T, K], float32 weights [T, K]."""
        # T=tokens, E=experts, K=active experts per token, D=hidden size
        router_logits = self.gate(x)  # [T, E]
        probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E], float32 like transformers
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalise over the kept K
        return router_logits, chosen, weights

    def forward(self, x: Tensor, routed: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """x [B, S, D] -> [B, S, D]; `routed`: what `route` gives for x, already computed (by a
        decode graph, engine/decode_graphs.py)."""
        B, S, D = x.shape
        x = x.view(B * S, D)  # [T, D]
        if self.prefetch_hook is not None:
            self.prefetch_hook(x)
        router_logits, chosen, weights = self.route(x) if routed is None else routed
        if self.routing_hook is not None:
            self.routing_hook(router_logits, chosen, weights)
        if B * S == 1:
            return self._one_token(x, chosen, weights).view(B, S, D)
        return self._many_tokens(x, chosen, weights).view(B, S, D)

    def forward_routed(self, block: BlockOutput) -> Tensor:
        """One token that the native attention block normed and routed (`DecoderLayer.forward`)
        -> its residual stream plus the experts' output, [B, S, D] as block.h."""
        x, residual = block.normed.view(1, -1), block.h.view(1, -1)  # [T=1, D] each
        ids, scale = block.expert_ids, block.expert_weights
        if self.prefetch_hook is not None:
            self.prefetch_hook(x)
        if self.routing_hook is not None:
            self.routing_hook(block.router_logits, torch.tensor([ids]), torch.tensor([scale]))
        return self._token_experts(x, ids, scale, residual).view_as(block.h)

    def _many_tokens(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """Prefill: the (token, choice) pairs sorted by expert once, each expert run on its
        contiguous run of rows, and one index_add_ that adds each token's K outputs in
        ascending expert order (the order of the sorted rows), as `_one_token` does.

        A constant number of ops plus each expert's own, where a where/index/index_add_ chain
        per expert took 6 more each."""
        K = chosen.shape[1]
        flat = chosen.flatten()  # [T*K]: (token, choice) pairs in token order
        order = torch.argsort(flat, stable=True)  # [T*K]: by expert, tokens ascending within one
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # rows per expert
        token_of = order // K  # [T*K]: the token of each sorted row
        rows = x[token_of]  # [T*K, D]: each token once per expert it chose
        expert_ids = [e for e, n in enumerate(counts) if n]
        outputs, first = [], 0  # first: the expert's first row in `rows`
        # Ascending expert order whatever the source, so offloaded output stays bit-identical;
        # in groups no larger than the source holds at once (a prefill can need every expert).
        for start in range(0, len(expert_ids), self.experts_per_call):
            group = expert_ids[start : start + self.experts_per_call]
            for expert_id, expert in zip(group, self.expert_source(group), strict=True):
                outputs.append(expert(rows[first : first + counts[expert_id]]))  # [t, D]
                first += counts[expert_id]
        y = torch.cat(outputs) * weights.flatten()[order, None]  # [T*K, D], float32 weights
        return torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))  # [T, D]

    def _one_token(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """Decode: the K outputs summed in ascending expert order, as the general path sums them.

        No zeros/where/index_add_: each small op costs a parallel region, and on a busy CPU
        those dominated a decode step (2.1x slower; bench/bench_engine.py --profile). The
        weights are Python floats: a product with one is a single op, in x's dtype computed in
        float32 and rounded once, as the float32 product cast to x's dtype was.
        """
        # One host read for both (a sync each on a GPU): ids are small ints, exact in float32.
        K = chosen.shape[1]
        packed = torch.cat((chosen.to(weights.dtype), weights), dim=1).tolist()[0]  # [2K]
        return self._token_experts(x, [int(e) for e in packed[:K]], packed[K:], None, weights)

    def _token_experts(
        self,
        x: Tensor,
        ids: list[int],
        scale: list[float],
        residual: Tensor | None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """x [1, D] through experts `ids` with weights `scale` (floats; `weights` [1, K], the same
        on the device, where known), summed in ascending id order, plus `residual` [1, D] if given
        (added last) -> [1, D]."""
        order = sorted(range(len(ids)), key=ids.__getitem__)
        experts = self.expert_source([ids[j] for j in order])
        operands = [e.native_operand(x) if type(e) is Expert else None for e in experts]
        if all(operands):  # one native call for all of them: the bits of the loop below
            return native_fused.moe(operands, [scale[j] for j in order], x, residual=residual)
        if self.graphed_experts is not None and weights is not None:
            out = self.graphed_experts(x, experts, order, weights)  # the loop below, one graph
            if out is not None:
                return out if residual is None else residual + out
        outputs = run_experts(x, experts)  # [1, D] each
        out = None
        for j, y in zip(order, outputs, strict=True):
            y = y * scale[j]  # [1, D]
            out = y if out is None else out + y
        return out if residual is None else residual + out


def run_experts(x: Tensor, experts: Sequence[nn.Module]) -> list[Tensor]:
    """Each expert's output for x [T, D], in the order given, on x's device.

    An offloaded step can mix three kinds, run in this order so that the device, the CPU and the
    link work at once: experts ready on the device are queued first; then those computed on the
    host (`forward_on_host`: a miss run by the CPU), from one host copy of x for all of them;
    last, those whose copy into a slot may still be in flight (`waits_for_copy`), which wait for
    it. On a CPU-only host the same order runs (the copies of x are no-ops), so the suite runs
    this very path; the caller sums in its own order."""
    # 0: ready on the device, 1: computed on the host, 2: waits for its copy
    stage = [
        2 if getattr(expert, "waits_for_copy", False) else 1 if hasattr(expert, "forward_on_host") else 0
        for expert in experts
    ]
    if not any(stage):
        return [expert(x) for expert in experts]
    # The host copy first: it waits for the device's work so far (which the experts need anyway);
    # after the queued experts it would wait for them too.
    x_host = x.to("cpu") if 1 in stage else x
    outputs: list[Tensor] = [x] * len(experts)  # every entry replaced below
    for wanted in (0, 1, 2):
        for index, expert in enumerate(experts):
            if stage[index] == wanted:
                outputs[index] = expert.forward_on_host(x_host).to(x.device) if wanted == 1 else expert(x)
    return outputs


class DecoderLayer(nn.Module):
    """Attention, then the experts, each around a norm and a residual.

    One float32 decode token on the CPU with native int4 q, k, v, o takes the attention half (both
    norms included, and the routing where the gate is a float32 `Linear`) as one kernel call
    (`native_attention_block`, quant/csrc/attention_block.c), then its experts as one more
    (`SparseMoE.forward_routed`, quant/csrc/moe.c, with the residual added there)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.self_attn = Attention(args)
        self.block_sparse_moe = SparseMoE(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self._block: AttentionBlockOperand | None = None  # see native_attention_block

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_block"] = None  # a copy's tensors are other tensors: its operand is made anew
        return state

    def native_attention_block(self, x: Tensor, mask: Tensor | None) -> AttentionBlockOperand | None:
        """What the native kernel's `attention_block` takes for this layer when x [B, S, D] is one
        float32 token on the CPU with no mask, q, k, v and o are native int4 layers of one kernel and
        group size, and the norms and the cache are float32; else None (checked once per set of tensors).
        It routes too where `_router` allows."""
        attn = self.self_attn
        cache = attn.kv_cache
        if (
            not (
                x.dim() == 3
                and x.shape[0] * x.shape[1] == 1
                and mask is None
                and x.dtype is torch.float32
                and x.is_cpu
            )
            or cache is None
        ):
            return None
        layers = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        found = [native_parts(layer) for layer in layers]
        if any(f is None for f in found):
            return None
        norms = (self.input_layernorm, self.post_attention_layernorm)
        router = self._router()
        routed = () if router is None else (router,)
        tensors = (*(t for f in found for t in f[1]), *(n.weight for n in norms), cache.k, cache.v, *routed)
        if self._block is not None and same_tensors(self._block.tensors, tensors):
            return self._block
        if not (
            len({f[0] for f in found}) == 1
            and len({layer.group_size for layer in layers}) == 1
            and norms[0].eps == norms[1].eps
            and all(t.dtype is torch.float32 for t in tensors[12:16])
        ):
            return None
        a = self.args
        try:
            self._block = native_fused.attention_block_operand(
                found[0][0],
                [f[1] for f in found],
                attn.q_proj.group_size,
                a.num_attention_heads,
                a.num_key_value_heads,
                a.head_dim,
                [n.weight for n in norms],
                norms[0].eps,
                [cache.k, cache.v],
                router,
                self.block_sparse_moe.top_k,
            )
        except QuantizationError:  # heads or widths the call does not take: the per-op path
            return None
        return self._block

    def _router(self) -> Tensor | None:
        """The MoE gate's weight [E, D] where the attention block can route with it: a float32
        bias-free `Linear` on the CPU, E <= MAX_ROUTED_EXPERTS, that the layer routes with."""
        gate = self.block_sparse_moe.gate
        if type(gate) is not Linear or gate.bias is not None or not self.block_sparse_moe.routes_with_gate:
            return None
        weight = gate.weight
        fits = weight.dtype is torch.float32 and weight.is_cpu and weight.is_contiguous()
        return weight if fits and weight.shape[0] <= MAX_ROUTED_EXPERTS else None

    def attention_half(
        self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor | None, end: int
    ) -> Tensor:
        """x [B, S, D] -> the residual stream after attention, x + attention(norm(x)), [B, S, D]."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, end)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor | None, end: int
    ) -> Tensor:
        block = self.native_attention_block(x, mask)
        if block is None:
            h = self.attention_half(x, cos, sin, input_pos, mask, end)
            return h + self.block_sparse_moe(self.post_attention_layernorm(h))
        out = native_fused.attention_block(block, x, cos, sin, end - 1)  # h, normed [B, S, D]
        if out.expert_ids is None:
            return out.h + self.block_sparse_moe(out.normed)
        return self.block_sparse_moe.forward_routed(out)


class Mixtral(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.max_seq_len = 0
        self.rope_cos: Tensor | None = None
        self.rope_sin: Tensor | None = None  # signed_sin(sin), as apply_rope takes it
        self._stack: tuple[StackOperand, Bindings] | None = None  # see native_decode_stack
        # A decode token's layers through engine/decode_graphs.py (set on CUDA by Engine.load).
        self.decode_graphs: DecodeGraphs | None = None

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        # A copy's tensors are other tensors: its operand and graphs are made anew.
        state["_stack"] = state["decode_graphs"] = None
        return state

    def fuse_weights(self) -> None:
        """q|k|v and each resident expert's w1|w3 as one GEMM each, where they are float
        tensors of their own (see `Attention.fuse_qkv`): once the weights are loaded."""
        for layer in self.layers:
            layer.self_attn.fuse_qkv()
            for expert in layer.block_sparse_moe.experts:
                expert.fuse_gate_up()

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # not the embeddings': they may be int8 (quant/int8.py)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def setup_cache(self, max_seq_len: int, batch: int = 1) -> None:
        """Allocate the KV cache and rotary tables on the model's device and dtype."""
        a = self.args
        self.max_seq_len = max_seq_len
        cos, sin = rope_table(a, max_seq_len, self.device)
        self.rope_cos, self.rope_sin = cos.to(self.dtype), signed_sin(sin).to(self.dtype)
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(
                batch, a.num_key_value_heads, max_seq_len, a.head_dim, self.dtype, self.device
            )

    def native_decode_stack(self, x: Tensor, mask: Tensor | None) -> StackOperand | None:
        """What the native kernel's `decode_stack` takes to run every layer of this decode token
        x [B, S, D] in one call (quant/csrc/decode_stack.c): each layer takes the routed attention
        block (`DecoderLayer.native_attention_block`) and keeps its experts resident as native
        int4 `Expert`s, with no hooks; else None. Kept while `Bindings` hold: no module, tensor,
        hook or expert source of the layers rebound since."""
        if not (x.numel() == x.shape[-1] and mask is None and x.dtype is torch.float32 and x.is_cpu):
            return None  # not one float32 token on the CPU
        cached = self._stack
        if cached is not None and cached[1].hold():
            return cached[0]
        self._stack = None
        blocks, experts, attributes = [], [], []
        token = x.view(1, -1)  # [1, D]
        for layer in self.layers:
            moe = layer.block_sparse_moe
            if moe.prefetch_hook or moe.routing_hook or moe.expert_source != moe._resident_experts:
                return None
            block = layer.native_attention_block(x, mask)
            if block is None or not block.experts:
                return None
            operands = [e.native_operand(token) if type(e) is Expert else None for e in moe.experts]
            if not all(operands):
                return None
            blocks.append(block)
            experts.append(operands)
            attributes += [
                (moe, name) for name in ("prefetch_hook", "routing_hook", "expert_source", "route")
            ]
        try:
            stack = native_fused.decode_stack_operand(blocks, experts)
        except QuantizationError:
            return None
        self._stack = (stack, Bindings(self.layers, attributes))
        return stack

    def attention_mask(self, input_pos: Tensor, end: int) -> Tensor | None:
        """Boolean [S, end] mask (True = attend): causal, within the sliding window if any."""
        window = self.args.sliding_window
        if input_pos.numel() == 1 and (window is None or end <= window):
            return None  # one new token sees the whole cache
        key_pos = torch.arange(end, device=input_pos.device)
        distance = input_pos[:, None] - key_pos[None, :]  # [S, end]
        allowed = distance >= 0
        if window is not None:
            allowed &= distance < window
        return allowed

    def forward(
        self, tokens: Tensor, input_pos: Tensor, last_only: bool = False, end: int | None = None
    ) -> Tensor:
        """tokens [B, S] at positions input_pos [S] (contiguous) -> logits [B, S or 1, V] in float32.

        `end` (input_pos[-1] + 1) from a caller that knows it: reading it from input_pos is a host
        sync on a GPU."""
        if self.rope_cos is None or self.rope_sin is None:
            raise RuntimeError("call Mixtral.setup_cache() before forward()")
        if end is None:
            end = int(input_pos[-1]) + 1
        if end > self.max_seq_len:
            raise ValueError(f"position {end - 1} is beyond the cache ({self.max_seq_len} tokens)")
        x = self.embed_tokens(tokens)  # [B, S, D]
        if self.decode_graphs is not None and x.shape[0] * x.shape[1] == 1:
            x = self.decode_graphs.forward(x, input_pos, end)  # [1, 1, D]: its own rope and mask
        else:
            mask = self.attention_mask(input_pos, end)
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [S, D]
            stack = self.native_decode_stack(x, mask)
            if stack is not None:
                x = native_fused.decode_stack(stack, x, cos, sin, end - 1)  # [B, S, D]
            else:
                for layer in self.layers:
                    x = layer(x, cos, sin, input_pos, mask, end)
        if last_only:
            x = x[:, -1:]  # [B, 1, D]
        return self.lm_head(self.norm(x)).float()


# Module-name suffixes of the weights run as one GEMM (the checkpoint keeps them apart).
FUSED_GROUPS = (
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ("w1.weight", "w3.weight"),
)


def fuse_loaded_group(state: dict[str, Tensor], name: str) -> None:
    """While a float checkpoint loads: once every weight of `name`'s group (FUSED_GROUPS) is in
    `state`, they become consecutive row views of one concatenated tensor (the originals are
    dropped), which `Mixtral.fuse_weights` then uses as it is, without copying."""
    for group in FUSED_GROUPS:
        suffix = next((s for s in group if name.endswith("." + s)), None)
        if suffix is None:
            continue
        prefix = name[: -len(suffix)]
        names = [prefix + s for s in group]
        tensors = [state.get(n) for n in names]
        if any(t is None for t in tensors):
            return
        first = tensors[0]
        if all(
            t.dim() == 2
            and t.dtype == first.dtype
            and t.device == first.device
            and t.shape[1] == first.shape[1]
            for t in tensors
        ):
            fused = torch.cat(tensors)  # [sum of rows, in_features]
            rows = [t.shape[0] for t in tensors]
            for n, view in zip(names, fused.split(rows), strict=True):
                state[n] = view
        return


def _concatenate_weights(layers: Sequence[nn.Module]) -> Tensor | None:
    """The float weights of `layers` (same input size) concatenated by rows, each layer's weight
    becoming a view of its rows; None, changing nothing, unless each is a plain float `Linear`
    weight owning its whole storage, or all already are consecutive rows of one storage
    (`fuse_loaded_group`: then nothing is copied). A view into a blob, or a meta shell, stays."""
    weights = [layer.weight if type(layer) is Linear else None for layer in layers]
    first = weights[0]
    if first is None or first.device.type == "meta" or not first.is_floating_point():
        return None
    adjacent = _consecutive_rows(weights)
    if adjacent is not None:
        return adjacent.t()
    for weight in weights:
        if not (
            weight is not None
            and weight.dtype == first.dtype
            and weight.device == first.device
            and weight.shape[1:] == first.shape[1:]
            and weight.is_contiguous()
            and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
        ):
            return None
    fused = torch.cat(weights)  # [sum of out_features, in_features]
    row = 0
    for layer, weight in zip(layers, weights, strict=True):
        layer.weight = nn.Parameter(fused[row : row + weight.shape[0]], requires_grad=False)
        row += weight.shape[0]
    return fused.t()  # [in_features, sum of out_features]: what mm takes, kept to save a `t` per call


def _consecutive_rows(weights: Sequence[Tensor | None]) -> Tensor | None:
    """[sum of rows, in] over the weights' shared storage when they are consecutive contiguous
    rows of it that fill it exactly (what `fuse_loaded_group` leaves); else None."""
    first = weights[0]
    storage = first.untyped_storage()
    expected = first.data_ptr()
    rows = 0
    for weight in weights:
        if not (
            weight is not None
            and weight.dtype == first.dtype
            and weight.is_contiguous()
            and weight.shape[1:] == first.shape[1:]
            and weight.untyped_storage().data_ptr() == storage.data_ptr()
            and weight.data_ptr() == expected
        ):
            return None
        expected += weight.numel() * weight.element_size()
        rows += weight.shape[0]
    if storage.nbytes() != rows * first.shape[1] * first.element_size():
        return None
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


def _still_viewed(layers: Sequence[nn.Module], fused_t: Tensor) -> bool:
    """The layers' weights still are the rows of `fused_t` (`_concatenate_weights`), not rebound
    since (an offload slot, `.to()`, quantization in memory)."""
    row = 0
    for layer in layers:
        weight = layer._parameters.get("weight")
        if (
            weight is None
            or weight.data_ptr() != fused_t.data_ptr() + row * fused_t.stride(1) * fused_t.element_size()
        ):
            return False
        row += weight.shape[0]
    return True


def _concatenated_output(layers: Sequence[nn.Module], fused_t: Tensor | None, x: Tensor) -> Tensor | None:
    """The outputs of `layers` on x [T, in], concatenated [T, sum of out_features], in one GEMM
    (their fused float weight, transposed, checked by the caller with `_still_viewed`) or one
    native int4 call; None when neither applies."""
    if fused_t is not None:
        return torch.mm(x, fused_t)
    concat = getattr(layers[0], "forward_concat", None)
    return None if concat is None else concat(layers[1:], x)
