"""Defect 3: an offloaded float (or `--quant`) checkpoint streams its experts into the store one by
one, so host RAM never holds them twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_chat.engine.options import GenerationConfig, LoadOptions
from mixtral_chat.engine.runtime import Engine
from tests.conftest import save_tiny_checkpoint

MEASURE = """
import json, resource, sys
import torch
from mixtral_chat.engine.offload.bandwidth import measured
from mixtral_chat.engine.options import LoadOptions
from mixtral_chat.engine.runtime import Engine

measured(torch.device("cpu"))  # cached before the baseline: the probe's buffers are not the load's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
options = LoadOptions(device="cpu", dtype="float32", offload=True, experts_per_layer=2)
engine = Engine.load(sys.argv[1], options)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
plan = engine.offloader.plan
engine.close()
print(json.dumps({"growth": peak - before, "store": plan.store_bytes, "resident": plan.resident_bytes,
                  "slots": plan.cache_bytes, "kv": plan.kv_cache_bytes, "expert": plan.expert_bytes}))
"""


@pytest.fixture(scope="module")
def big_experts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16 experts of 12.6 MB (float32): the store (201 MB) dwarfs the noise of a process's RSS.
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("big-experts"),
        num_local_experts=8,
        num_hidden_layers=2,
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=2,
    )


def test_peak_rss_while_offloading_is_the_store_plus_one_expert(big_experts_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(big_experts_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout)
    # What must be in RAM: the resident weights, the KV cache, the slots (on a CPU device they are
    # RAM too) and the store. Loading then packing held every expert twice: a second store's worth.
    needed = m["resident"] + m["kv"] + m["slots"] + m["store"]
    assert m["growth"] <= needed + m["expert"] + 16 * 2**20, m  # one expert in flight, 16 MiB of Python
    assert m["growth"] < needed + m["store"] / 2, m


@pytest.mark.parametrize("quant", [None, "int4", "nf4"])
def test_streamed_experts_answer_as_the_resident_model(quant: str | None, tmp_path: Path) -> None:
    model_dir = save_tiny_checkpoint(
        tmp_path, seed=2, num_local_experts=8, num_hidden_layers=2, hidden_size=64, intermediate_size=128
    )
    messages = [{"role": "user", "content": "Once upon a time"}]
    config = GenerationConfig(max_tokens=12)
    resident = Engine.load(model_dir, LoadOptions(device="cpu", dtype="float32", quant=quant))
    expected = "".join(resident.chat(messages, config))
    for on_miss in ("copy", "cpu"):
        options = LoadOptions(
            device="cpu", dtype="float32", quant=quant, offload=True, experts_per_layer=2, on_miss=on_miss
        )
        engine = Engine.load(model_dir, options)
        try:
            assert "".join(engine.chat(messages, config)) == expected, on_miss
            assert engine.offloader.from_files is False
        finally:
            engine.close()
