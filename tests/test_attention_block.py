"""A decoder layer's attention half for one token in one native call (quant/csrc/attention_block.c,
`native_fused.attention_block`), and the engine taking it for every decode step where it applies.

Bounds are relative errors norm(y - ref) / norm(ref) against float64 with the dequantized weights,
measured on these cases (printed with -s) and set ~1.5x above the worst. The attention output
a Wo^T carries the GEMV kernel's roundings twice (x, then a, to int8 per 32 columns): worst 1.51e-2
(the portable build, which rounds only in float32: 9.2e-7); the norm after the residual 1.23e-2
(7.0e-7).
"""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.model import DecoderLayer, SparseMoE, rope_table, signed_sin
from mixtral_chat.quant import native_fused
from mixtral_chat.quant.int4 import Int4Linear, dequantize_int4, quantize_int4
from mixtral_chat.quant.native import Int4Kernel, int4_kernel
from tests.test_moe_kernel import gaussian

OUTPUT_BOUND = 2.3e-2
NORMED_BOUND = 1.9e-2

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernel is vectorized for x86-64"
)


class Layer:
    """Random int4 attention weights, norms and a partly filled cache, with the float64 reference."""

    def __init__(
        self,
        kernel: Int4Kernel,
        dim: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        seed: int,
        router: torch.Tensor | None = None,
        top_k: int = 0,
    ) -> None:
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.group_size = 32
        shapes = {"q": (heads * head_dim, dim), "k": (kv_heads * head_dim, dim)}
        shapes |= {"v": shapes["k"], "o": (dim, heads * head_dim)}
        self.parts = {
            name: quantize_int4(gaussian(*shape, seed=seed + i, scale=0.2), self.group_size)
            for i, (name, shape) in enumerate(shapes.items())
        }
        self.weights = {
            name: dequantize_int4(parts, shapes[name][1], self.group_size).double()
            for name, parts in self.parts.items()
        }
        self.norms = [1 + 0.1 * gaussian(dim, seed=seed + 10 + i) for i in range(2)]
        self.max_seq_len = 40
        self.cache = [gaussian(1, kv_heads, self.max_seq_len, head_dim, seed=seed + 20 + i) for i in range(2)]
        stored = [tuple(self.parts[n][p] for p in ("qweight", "scales", "zeros")) for n in "qkvo"]
        self.operand = native_fused.attention_block_operand(
            kernel,
            stored,
            self.group_size,
            heads,
            kv_heads,
            head_dim,
            self.norms,
            1e-5,
            self.cache,
            router,
            top_k,
        )
        cos, sin = rope_table(_Args(head_dim), self.max_seq_len, torch.device("cpu"))
        self.cos, self.sin = cos, signed_sin(sin)

    def rows(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[pos : pos + 1].contiguous(), self.sin[pos : pos + 1].contiguous()

    def reference(self, x: torch.Tensor, pos: int, cache: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """float64 h - x (the attention output), norm_post(h), and the cache rows at pos, from
        `cache` as it was before the call."""

        def norm(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return t / torch.sqrt(t.pow(2).mean() + 1e-5) * weight.double()

        def rope(t: torch.Tensor) -> torch.Tensor:  # [heads, Dh]
            cos, sin = (r.double() for r in self.rows(pos))
            return t * cos + torch.roll(t, self.head_dim // 2, -1) * sin

        D, H, KVH, Dh = self.dim, self.heads, self.kv_heads, self.head_dim
        x64 = x.double().view(D)
        xn = norm(x64, self.norms[0])
        q = rope((xn @ self.weights["q"].T).view(H, Dh))
        k = rope((xn @ self.weights["k"].T).view(KVH, Dh))
        v = (xn @ self.weights["v"].T).view(KVH, Dh)
        keys, values = (c.double()[0, :, : pos + 1].clone() for c in cache)  # [KVH, L, Dh]
        keys[:, pos], values[:, pos] = k, v
        attended = F.scaled_dot_product_attention(
            q.view(1, H, 1, Dh), keys.unsqueeze(0), values.unsqueeze(0), enable_gqa=H != KVH
        )  # [1, H, 1, Dh]
        out = attended.reshape(H * Dh) @ self.weights["o"].T
        return out, norm(x64 + out, self.norms[1]), k, v


class _Args:
    """What rope_table reads."""

    def __init__(self, head_dim: int) -> None:
        self.head_dim, self.rope_theta = head_dim, 10000.0


def relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double().flatten() - ref.flatten()).norm() / ref.norm())


# (dim, heads, kv heads, head dim): GQA with a padded o input (3 x 20 = 60 -> 64), MHA, the small
# bench model's heads (8 x 64 over 2).
SHAPES = [(64, 3, 1, 20), (96, 4, 4, 24), (512, 8, 2, 64)]


@pytest.mark.parametrize(("dim", "heads", "kv_heads", "head_dim"), SHAPES)
def test_it_matches_float64_and_writes_the_cache(
    either_build: Int4Kernel, dim: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    layer = Layer(either_build, dim, heads, kv_heads, head_dim, seed=dim + heads)
    for pos in (0, 7, 39):
        before = [c.clone() for c in layer.cache]
        x = gaussian(1, 1, dim, seed=pos)
        out, normed, k, v = layer.reference(x, pos, before)
        result = native_fused.attention_block(layer.operand, x, *layer.rows(pos), pos, threads=2)
        h, hn = result.h, result.normed
        assert h.shape == hn.shape == x.shape and h.dtype is torch.float32
        assert result.expert_ids is result.expert_weights is result.router_logits is None
        errors = (relative(h - x, out), relative(hn, normed))
        print(
            f"attention block {dim}/{heads}/{kv_heads}/{head_dim} at {pos}: {errors[0]:.2e} {errors[1]:.2e}"
        )
        assert errors[0] < OUTPUT_BOUND and errors[1] < NORMED_BOUND, errors
        keys, values = layer.cache
        assert relative(keys[0, :, pos], k) < OUTPUT_BOUND and relative(values[0, :, pos], v) < OUTPUT_BOUND
        for now, then in zip(layer.cache, before, strict=True):  # no other row changed
            assert torch.equal(now[:, :, :pos], then[:, :, :pos]) and torch.equal(
                now[:, :, pos + 1 :], then[:, :, pos + 1 :]
            )
        for threads in (1, 3):
            for cache, saved in zip(layer.cache, before, strict=True):
                cache.copy_(saved)
            again = native_fused.attention_block(layer.operand, x, *layer.rows(pos), pos, threads=threads)
            assert torch.equal(again[0], h) and torch.equal(again[1], hn), threads


def torch_routing(normed: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[list, list, torch.Tensor]:
    """SparseMoE.route's softmax, top-k and renormalisation, in float64."""
    logits = normed.double().view(1, -1) @ router.double().T  # [1, E]
    weights, chosen = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return chosen[0].tolist(), (weights / weights.sum())[0].tolist(), logits


@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (4, 1), (64, 6)])
def test_it_routes_its_output_as_the_moe_would(either_build: Int4Kernel, experts: int, top_k: int) -> None:
    """With the gate's weights, the block also returns hn's routing: torch's ids (largest first),
    weights within 1e-6 and logits within 1e-6 of float64, and h and hn unchanged by it."""
    dim = 96
    router = gaussian(experts, dim, seed=experts, scale=0.3)
    routed = Layer(either_build, dim, 4, 2, 24, seed=5, router=router, top_k=top_k)
    plain = Layer(either_build, dim, 4, 2, 24, seed=5)
    for pos in (0, 9, 39):
        x = gaussian(1, 1, dim, seed=100 + pos)
        result = native_fused.attention_block(routed.operand, x, *routed.rows(pos), pos)
        alone = native_fused.attention_block(plain.operand, x, *plain.rows(pos), pos)
        assert torch.equal(result.h, alone.h) and torch.equal(result.normed, alone.normed)
        ids, weights, logits = torch_routing(result.normed, router, top_k)
        assert result.expert_ids == ids
        assert result.router_logits.shape == (1, experts) and result.router_logits.dtype is torch.float32
        assert relative(result.router_logits, logits) < 1e-6
        torch.testing.assert_close(result.expert_weights, weights, rtol=1e-6, atol=0)
        for threads in (1, 3):
            again = native_fused.attention_block(routed.operand, x, *routed.rows(pos), pos, threads=threads)
            assert again.expert_ids == result.expert_ids and again.expert_weights == result.expert_weights


def test_equal_logits_route_to_the_lower_id_first(kernel: Int4Kernel) -> None:
    router = gaussian(1, 64, seed=2).repeat(4, 1)  # four equal rows: four equal logits
    layer = Layer(kernel, 64, 4, 2, 16, seed=3, router=router, top_k=3)
    result = native_fused.attention_block(layer.operand, gaussian(1, 1, 64, seed=0), *layer.rows(0), 0)
    assert result.expert_ids == [0, 1, 2]
    assert result.expert_weights == [pytest.approx(1 / 3, rel=1e-6)] * 3


def test_what_does_not_fit_is_refused_in_one_line(kernel: Int4Kernel) -> None:
    layer = Layer(kernel, 64, 4, 2, 16, seed=1)
    x = gaussian(1, 1, 64, seed=0)
    rows = layer.rows(3)
    with pytest.raises(QuantizationError, match="expected 64 float32"):
        native_fused.attention_block(layer.operand, x.double(), *rows, 3)
    with pytest.raises(QuantizationError, match="cos and sin"):
        native_fused.attention_block(layer.operand, x, layer.cos[:2], rows[1], 3)
    with pytest.raises(QuantizationError, match="beyond the cache"):
        native_fused.attention_block(layer.operand, x, *rows, 40)
    stored = [tuple(layer.parts[n][p] for p in ("qweight", "scales", "zeros")) for n in "qkvo"]
    with pytest.raises(QuantizationError, match="Wk is not"):
        native_fused.attention_block_operand(
            kernel, stored, 32, 4, 1, 16, layer.norms, 1e-5, layer.cache
        )  # 1 KV head
    with pytest.raises(QuantizationError, match="a norm weight"):
        native_fused.attention_block_operand(
            kernel, stored, 32, 4, 2, 16, [n.double() for n in layer.norms], 1e-5, layer.cache
        )
    with pytest.raises(QuantizationError, match="the cache"):
        native_fused.attention_block_operand(
            kernel, stored, 32, 4, 2, 16, layer.norms, 1e-5, [c.bfloat16() for c in layer.cache]
        )
    for router, top_k in ((gaussian(8, 64, seed=1).double(), 2), (gaussian(8, 64, seed=1), 9)):
        with pytest.raises(QuantizationError, match="the router is not float32"):
            native_fused.attention_block_operand(
                kernel, stored, 32, 4, 2, 16, layer.norms, 1e-5, layer.cache, router, top_k
            )
    with pytest.raises(QuantizationError, match="the router"):
        native_fused.attention_block_operand(
            kernel, stored, 32, 4, 2, 16, layer.norms, 1e-5, layer.cache, gaussian(65, 64, seed=1), 2
        )


def quantize_attention(model: torch.nn.Module) -> None:
    """Every attention projection of the model as a native int4 layer (g32)."""
    for layer in model.layers:
        attn = layer.self_attn
        attn._qkv_weight = None
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(attn, name)
            parts = quantize_int4(linear.weight.detach().float(), 32)
            shape = (linear.out_features, linear.in_features)
            setattr(attn, name, Int4Linear.from_parts(parts, *shape, 32, "cpu", torch.float32))


def test_every_decode_step_takes_it_with_the_per_op_logits(tiny_model_dir, monkeypatch) -> None:
    """Each layer of each decode step (not the prefill) runs the block and its routing; the
    logits and the routing hooks' experts are the per-op path's; and a new cache (setup_cache)
    gets a new operand."""
    from mixtral_chat.engine.weights import load_model
    from tests.test_decode_attention import prefill_then_decode

    if int4_kernel() is None:
        pytest.skip("the native kernel does not load on this host")
    model = load_model(tiny_model_dir)
    quantize_attention(model)
    decode = prefill_then_decode(model, seed=3)
    taken = []
    real = DecoderLayer.native_attention_block

    def counted(self, x, mask):
        block = real(self, x, mask)
        taken.append(block is not None)
        return block

    routed = []
    real_routed = SparseMoE.forward_routed
    monkeypatch.setattr(SparseMoE, "forward_routed", lambda self, b: routed.append(1) or real_routed(self, b))
    seen: list[tuple[list[int], torch.Tensor]] = []
    for layer in model.layers:  # the routing trace's and the locality count's hook
        layer.block_sparse_moe.routing_hook = lambda logits, chosen, weights: seen.append(
            (sorted(chosen[0].tolist()), weights.sort().values)
        )
    monkeypatch.setattr(DecoderLayer, "native_attention_block", counted)
    fused = decode()
    layers = model.args.num_hidden_layers
    assert taken == [False] * layers + [True] * (10 * layers)
    assert len(routed) == 10 * layers
    fused_routing, seen[:] = seen[:], []
    first = model.layers[0]._block
    monkeypatch.setattr(DecoderLayer, "native_attention_block", lambda self, x, mask: None)
    per_op = decode()
    torch.testing.assert_close(fused, per_op, rtol=1e-4, atol=1e-5)
    assert [ids for ids, _ in fused_routing] == [ids for ids, _ in seen]
    for (_, mine), (_, torch_weights) in zip(fused_routing, seen, strict=True):
        torch.testing.assert_close(mine, torch_weights, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(DecoderLayer, "native_attention_block", real)
    model.setup_cache(40)
    x = torch.zeros(1, 1, model.args.hidden_size)
    assert model.layers[0].native_attention_block(x, None) is not first
    assert model.layers[0].native_attention_block(x, torch.ones(1, 1, dtype=torch.bool)) is None
    assert model.layers[0].native_attention_block(torch.zeros(1, 2, model.args.hidden_size), None) is None
