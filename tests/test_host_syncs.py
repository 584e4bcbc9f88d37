"""Defect 7: host syncs per decode token, counted on the CPU where every one of them is a call that
would wait for a GPU (`.item()`, `.tolist()`, `int()` / `bool()` of a tensor)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mixtral_chat.engine.generate import decode_one, prefill
from mixtral_chat.engine.offload import ExpertOffloader, plan_offload
from mixtral_chat.engine.offload.placement import CPU
from mixtral_chat.engine.weights import load_model
from tests.conftest import save_tiny_checkpoint

LAYERS = 3


@contextmanager
def counting_syncs() -> Iterator[list[str]]:
    """Every host sync made inside, by the Tensor method that made it."""
    made: list[str] = []
    saved = {
        name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__int__", "__bool__", "__index__")
    }

    def counting(name: str):
        original = saved[name]

        def call(tensor: torch.Tensor, *args, **kwargs):
            made.append(name)
            return original(tensor, *args, **kwargs)

        return call

    for name in saved:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield made
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("syncs"), num_local_experts=8, num_hidden_layers=LAYERS, hidden_size=64
    )


def syncs_per_token(model, steps: int = 6) -> list[list[str]]:
    model.setup_cache(64)
    logits = prefill(model, [1, 2, 3], 0)
    token, per_token = int(logits.argmax()), []
    for i in range(steps):
        with counting_syncs() as made:
            logits = decode_one(model, token, 3 + i)
        per_token.append(made)
        token = int(logits.argmax())  # the sampler's read: the one sync that delivers the token
    return per_token


@pytest.mark.parametrize("placement", ["resident", "copy", "cpu"])
def test_a_decode_step_syncs_once_per_moe_layer_at_most(model_dir: Path, placement: str) -> None:
    model = load_model(model_dir)
    offloader = None
    if placement != "resident":
        k, on_miss = (3, "copy") if placement == "copy" else (1, CPU)
        offloader = ExpertOffloader(model, plan_offload(model, 64, experts_per_layer=k, on_miss=on_miss))
    try:
        per_token = syncs_per_token(model)
    finally:
        if offloader:
            offloader.close()
    # The routing ids, once per MoE layer (the cache needs them on the host); nothing else: no
    # int(input_pos[-1]) (the caller passes `end`), no sync in the input copies.
    assert all(made == ["tolist"] * LAYERS for made in per_token), per_token
