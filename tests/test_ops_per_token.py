"""ATen ops per decode token (bench/bench_ops.py): each is one dispatch, and on CPU often one
parallel region, whatever its size, so at small widths they are what a token costs. The bounds
hold the cuts of issue 16 (docs/BENCHMARKS.md records the counts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_ops import DEMO_DIR, count_decode_ops
from mixtral_chat.quant.native import int4_kernel
from tests.conftest import save_tiny_checkpoint

# Per layer, one decode token (62.5 float32, 63.5 int4 after the cuts; 89.5 and 87.5 before;
# then 64.5 / 65.5: the routing ids and weights come to the host in one read, one sync per layer
# instead of two, for two small ops).
OPS_PER_LAYER_BOUND = 66
# The demo model (4 layers): embedding, final norm, lm_head and the rope lookup on top.
DEMO_OPS_BOUND = 280


def test_demo_model_ops_per_decode_token_stay_under_the_bound() -> None:
    ops = count_decode_ops(DEMO_DIR)
    total = sum(ops.values())
    assert 0 < total <= DEMO_OPS_BOUND, ops.most_common(12)
    # Every layer runs its router and both chosen experts: the op list covers the whole model.
    assert ops["topk"] == 4


@pytest.mark.parametrize("quant", [None, "int4"])
def test_ops_per_decode_token_grow_linearly_with_layers(tmp_path: Path, quant: str | None) -> None:
    totals = {}
    for layers in (2, 4, 8):
        directory = save_tiny_checkpoint(
            tmp_path / f"l{layers}",
            num_hidden_layers=layers,
            num_local_experts=8,
            vocab_size=512,
            with_tokenizer=False,
        )
        totals[layers] = sum(count_decode_ops(directory, quant).values())
    per_layer = (totals[4] - totals[2]) / 2
    # The same ops in every layer, and a constant outside them (embedding, norm, lm_head).
    assert totals[8] - totals[4] == 4 * per_layer
    assert totals[2] - 2 * per_layer == totals[8] - 8 * per_layer > 0
    if quant == "int4" and int4_kernel() is not None:
        # The native kernel runs every layer of a decode token in one call (decode_stack.c):
        # no ATen op is a layer's; those left are the embedding's, the final norm's and the lm_head's.
        assert per_layer == 0, totals
    else:
        assert 0 < per_layer <= OPS_PER_LAYER_BOUND, totals
