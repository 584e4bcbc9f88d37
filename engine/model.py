"""Mixtral in plain PyTorch.

Module names mirror the Hugging Face checkpoint keys without their `model.` prefix, so a
checkpoint key names its module (`model.layers.3.block_sparse_moe.experts.5.w1.weight` ->
`layers[3].block_sparse_moe.experts[5].w1`). Experts are separate modules so that offloading can
move them one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral_chat.engine.config import ModelArgs

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

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 then cast back before the weight, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, S, D]; cos/sin [S, D] already in x's dtype."""
    return x * cos + rotate_half(x) * sin


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
        """Write k/v [B, KVH, S, D] at input_pos; return the cache up to `end` positions."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
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

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor | None, end: int
    ) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is None:
            raise RuntimeError("call Mixtral.setup_cache() before forward()")
        k, v = self.kv_cache.update(input_pos, k, v, end)  # [B, KVH, end, D]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
        )  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # [B, S, H*D]
        return self.o_proj(out)


class Expert(nn.Module):
    """One feed-forward expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)  # gate projection
        self.w2 = Linear(hidden_dim, dim, bias=False)  # down projection
        self.w3 = Linear(dim, hidden_dim, bias=False)  # up projection

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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

    def _resident_experts(self, expert_ids: Sequence[int]) -> list[nn.Module]:
        return [self.experts[e] for e in expert_ids]

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, D] -> router logits [T, E], chosen experts [T, K], float32 weights [T, K]."""
        # T=tokens, E=experts, K=active experts per token, D=hidden size
        router_logits = self.gate(x)  # [T, E]
        probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E], float32 like transformers
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalise over the kept K
        return router_logits, chosen, weights

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        x = x.view(B * S, D)  # [T, D]
        if self.prefetch_hook is not None:
            self.prefetch_hook(x)
        router_logits, chosen, weights = self.route(x)
        if self.routing_hook is not None:
            self.routing_hook(router_logits, chosen, weights)
        if B * S == 1:
            return self._one_token(x, chosen, weights).view(B, S, D)
        out = torch.zeros_like(x)  # [T, D]
        expert_ids = sorted(set(chosen.flatten().tolist()))
        # Ascending expert order whatever the source, so offloaded output stays bit-identical;
        # in groups no larger than the source holds at once (a prefill can need every expert).
        for start in range(0, len(expert_ids), self.experts_per_call):
            group = expert_ids[start : start + self.experts_per_call]
            for expert_id, expert in zip(group, self.expert_source(group), strict=True):
                token_idx, slot = torch.where(chosen == expert_id)  # tokens routed here; which of K
                y = expert(x[token_idx]) * weights[token_idx, slot, None]  # [t, D], float32 weights
                out.index_add_(0, token_idx, y.to(out.dtype))
        return out.view(B, S, D)

    def _one_token(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """Decode: the K outputs summed in ascending expert order, as the general path sums them.

        No zeros/where/index_add_: each small op costs a parallel region, and on a busy CPU
        those dominated a decode step (2.1x slower; bench/bench_engine.py --profile).
        """
        ids = chosen[0].tolist()
        order = sorted(range(len(ids)), key=ids.__getitem__)
        out = None
        for j, expert in zip(order, self.expert_source([ids[j] for j in order]), strict=True):
            y = (expert(x) * weights[:, j : j + 1]).to(x.dtype)  # [1, D], float32 weight
            out = y if out is None else out + y
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.block_sparse_moe = SparseMoE(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor | None, end: int
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, end)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


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
        self.rope_sin: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def setup_cache(self, max_seq_len: int, batch: int = 1) -> None:
        """Allocate the KV cache and rotary tables on the model's device and dtype."""
        a = self.args
        self.max_seq_len = max_seq_len
        cos, sin = rope_table(a, max_seq_len, self.device)
        self.rope_cos, self.rope_sin = cos.to(self.dtype), sin.to(self.dtype)
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(
                batch, a.num_key_value_heads, max_seq_len, a.head_dim, self.dtype, self.device
            )

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
        mask = self.attention_mask(input_pos, end)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [S, D]
        x = self.embed_tokens(tokens)  # [B, S, D]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, end)
        if last_only:
            x = x[:, -1:]  # [B, 1, D]
        return self.lm_head(self.norm(x)).float()
