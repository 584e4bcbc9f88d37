"""Decode attention as two matmuls (engine/model.py `decode_attention`), used on the CPU for one
query against a long cache: it must give what SDPA gives, and the engine must pick it only there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_chat.engine.model import DECODE_MATMUL_ATTENTION_MIN, decode_attention


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


def test_a_long_cache_decodes_alike_either_way(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose every decode step takes the matmul path gives SDPA's logits."""
    import mixtral_chat.engine.model as model_module
    from mixtral_chat.engine.weights import load_model

    model = load_model(tiny_model_dir)
    model.setup_cache(40)
    tokens = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(1))

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            model(tokens[:, :20], torch.arange(20))
            return torch.cat([model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(20, 30)], dim=1)

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
