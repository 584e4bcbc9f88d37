"""Offload slots that repack (issue 14, defect 1): where the device computes another int4 form than the
stored blobs (tinygemm on CUDA), the store keeps the stored form, every load lands in one staging
blob on the device and is packed into its slot's runtime tensors after the copy.

On CPU the same path runs with ATen's CPU int4 form as the device's form (MIXTRAL_CHAT_NO_NATIVE=1):
only the final pack op differs from CUDA's. The offloaded logits must be bit-identical to the
resident model's of the same backend.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral_chat.engine.offload import ExpertOffloader, StoredExperts, plan_offload
from mixtral_chat.engine.weights import load_model
from mixtral_chat.quant import native
from mixtral_chat.quant.int4 import Int4Linear
from tests.test_offload import eight_expert_dir, logits_of, quantized_dirs  # noqa: F401 (fixtures)
from tests.test_transfers import filled_store, slow_transfers

CPU = torch.device("cpu")


def tokens() -> torch.Tensor:
    return torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(7))


def native_kernel_here() -> bool:
    return native.int4_kernel() is not None


def int4_backends(model: torch.nn.Module) -> set[str]:
    return {m.backend for m in model.modules() if isinstance(m, Int4Linear)}


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_int4_streams_from_the_files_into_slots_packed_after_each_copy(
    quantized_dirs: dict[str, Path],  # noqa: F811 (a fixture)
    store: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")  # the device's form: ATen's, not the stored parts
    directory = quantized_dirs["int4"]
    expected = logits_of(load_model(directory), tokens())
    # By default only a device other than the CPU repacks (~2 s per Mixtral expert on a CPU).
    assert StoredExperts.open(directory, CPU, torch.float32) is None
    stored = StoredExperts.open(directory, CPU, torch.float32, repack=True)
    assert stored is not None and stored.repacked
    assert stored.layout == stored.reader.layout  # the slots copy the very bytes of the files
    assert int4_backends(stored.template) == {"aten"}
    model = load_model(directory, skip_experts=True)
    plan = plan_offload(model, 64, experts_per_layer=3, store=store, expert_bytes=stored.layout.nbytes)
    offloader = ExpertOffloader(model, plan, prefetch=True, stored=stored)
    try:
        assert torch.equal(logits_of(model, tokens()), expected)
        stats = offloader.stats()
        assert stats["store_from_files"] and stats["slots_repacked"]
        assert offloader.counters().misses > 0
        cache = offloader.caches[0]
        assert cache.buffers == [] and cache.staging is offloader.staging  # one blob, not one per slot
        assert all(int4_backends(module) == {"aten"} for module in cache.modules)
    finally:
        offloader.close()


def test_the_cpu_form_next_to_repacking_slots_reads_the_same_blobs(
    quantized_dirs: dict[str, Path],  # noqa: F811 (a fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDA's case: slots packed for the device, misses computed on the CPU by the native kernel
    on the store's blobs. The CPU form must lay out the blob exactly as the stored layout does."""
    if not native_kernel_here():
        pytest.skip("no native int4 kernel here")
    directory = quantized_dirs["int4"]
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    stored = StoredExperts.open(directory, CPU, torch.float32, repack=True)
    assert stored is not None and stored.repacked
    assert stored.cpu_template() is None  # no native kernel: ATen's CPU form needs a repack too
    monkeypatch.delenv(native.NO_NATIVE_ENV)
    cpu_form = stored.cpu_template()
    assert cpu_form is not None and int4_backends(cpu_form) == {"native"}


def test_experts_loaded_on_the_cpu_repack_for_the_devices_form(
    quantized_dirs: dict[str, Path],  # noqa: F811 (a fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offloading loads a model on the CPU, moves all but the experts, then stores the experts in
    their loaded form: the native kernel's, i.e. the stored parts. A device that computes another
    form (tinygemm; ATen's here) gets slots of its form, packed from those parts after each copy."""
    if not native_kernel_here():
        pytest.skip("no native int4 kernel here")
    directory = quantized_dirs["int4"]
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    expected = logits_of(load_model(directory), tokens())
    monkeypatch.delenv(native.NO_NATIVE_ENV)
    model = load_model(directory)
    assert int4_backends(model) == {"native"}
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    for layer in model.layers:  # what move_non_experts does for a GPU
        layer.self_attn.to(CPU)
    offloader = ExpertOffloader(model, plan_offload(model, 64, experts_per_layer=3), prefetch=True)
    try:
        assert offloader.stats()["slots_repacked"] and not offloader.stats()["store_from_files"]
        assert torch.equal(logits_of(model, tokens()), expected)
        assert offloader.counters().misses > 0
    finally:
        offloader.close()


def test_a_copys_final_step_runs_after_its_bytes_and_not_when_stopped() -> None:
    store = filled_store()
    transfers = slow_transfers(store, 0.2)
    staged = torch.zeros(store.layout.nbytes, dtype=torch.uint8)
    seen: list[int] = []
    try:
        done = transfers.submit(store, 0, 1, staged, then=lambda: seen.append(int(staged.sum())))
        transfers.wait(done)
        assert done.completed and seen == [int(store.blob(0, 1).sum())]  # ran on the whole blob
        stopped = transfers.submit(store, 0, 2, staged, then=lambda: seen.append(-1))
        while not stopped.started:
            stopped.done.wait(0.001)
        transfers.cancel(stopped)
        transfers.wait(stopped)
        assert not stopped.completed and seen == [int(store.blob(0, 1).sum())]
    finally:
        transfers.close()
