"""Expert offloading: identical output to the resident model, and exact cache bookkeeping."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from mixtral_chat.engine.errors import MixtralChatError, OutOfMemoryError
from mixtral_chat.engine.offload import ExpertOffloader, RoutingTrace, plan_offload
from mixtral_chat.engine.offload.slots import LFUPolicy, LRUPolicy, SlotMap
from mixtral_chat.engine.options import GenerationConfig, LoadOptions
from mixtral_chat.engine.runtime import Engine
from mixtral_chat.engine.weights import load_model
from mixtral_chat.quant.blob import ALIGNMENT, ExpertBlobLayout
from tests.conftest import run_cli, save_tiny_checkpoint


@pytest.fixture(scope="module")
def eight_expert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Hidden 64: every row holds whole nf4 blocks of 64, so nf4 runs on the native CPU kernel too.
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("eight"),
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=128,
    )


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    """A prefill of 10 tokens then single-token decode steps: both MoE paths run."""
    model.setup_cache(64)
    with torch.no_grad():
        steps = [model(tokens[:, :10], torch.arange(10))]
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(10, tokens.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("store", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_offloaded_logits_are_bit_identical(
    eight_expert_dir: Path, store: str, prefetch: bool, tmp_path
) -> None:
    tokens = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(3))
    expected = logits_of(load_model(eight_expert_dir), tokens)
    for k in range(2, 9):  # top_k .. num_experts
        model = load_model(eight_expert_dir)
        plan = plan_offload(model, 64, experts_per_layer=k, store=store)
        offloader = ExpertOffloader(model, plan, prefetch=prefetch, store_path=tmp_path / f"{k}.pack")
        try:
            got = logits_of(model, tokens)
        finally:
            offloader.close()
        assert torch.equal(got, expected), f"k={k}"
        counters = offloader.counters()
        if k == 8:
            assert counters.misses == 0  # everything fits: warm start loads all experts
        else:
            assert counters.hits + counters.misses > 0


def test_offloaded_generation_matches_and_reports_stats(eight_expert_dir: Path) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    config = GenerationConfig(max_tokens=16)
    resident = Engine.load(eight_expert_dir, LoadOptions(device="cpu", dtype="float32"))
    expected = "".join(resident.chat(messages, config))
    assert resident.cache_stats() is None
    engine = Engine.load(
        eight_expert_dir,
        LoadOptions(
            device="cpu", dtype="float32", offload=True, experts_per_layer=3, prefetch=True, on_miss="copy"
        ),
    )
    assert "".join(engine.chat(messages, config)) == expected
    stats = engine.cache_stats()
    assert stats is not None
    assert stats["hits"] + stats["misses"] > 0
    assert 0.0 <= stats["hit_rate"] <= 1.0
    assert stats["bytes_moved"] > 0
    assert len(stats["layers"]) == 3
    for layer in stats["layers"]:
        # The last step's experts (a miss that was copied in) and the prefetch issued after it are
        # in their slots.
        copied = layer["misses"] if layer["on_miss"] == "copy" else []
        assert set(layer["hits"] + copied + layer["prefetched"]) <= set(layer["resident"])
        assert len(layer["resident"]) <= 3
    # A slot is empty only after a wrong prediction was cancelled before its copy started (whether
    # the copy had started is a race with the copy thread) and no miss has refilled it since.
    empty_slots = sum(3 - len(layer["resident"]) for layer in stats["layers"])
    assert empty_slots <= stats["prefetch_cancelled"]
    assert engine.info.offload_plan and "3 experts/layer" in engine.info.offload_plan
    engine.close()


def test_scripted_routing_lru_counters_and_eviction_order() -> None:
    slots = SlotMap(3, LRUPolicy(), expert_bytes=100)
    script = [[0, 1], [2, 0], [3, 1], [0, 2], [3, 0]]
    results = [[(a.expert, a.hit) for a in slots.access(step)] for step in script]
    assert results == [
        [(0, False), (1, False)],
        [(2, False), (0, True)],
        [(3, False), (1, True)],  # 3 evicts 2: 1 is least recent but the step needs it
        [(0, True), (2, False)],  # 2 evicts 3 (0 is protected, 1 was used after 3)
        [(3, False), (0, True)],  # 3 evicts 1
    ]
    c = slots.counters
    assert (c.hits, c.misses, c.loads, c.bytes_moved) == (4, 6, 6, 600)
    assert slots.resident == [0, 2, 3]


def test_a_miss_never_evicts_an_expert_the_step_needs() -> None:
    slots = SlotMap(2, LRUPolicy())
    slots.access([0, 1])
    slots.access([1])  # 0 is now least recent
    accesses = slots.access([0, 2])  # 0 hits; 2 must evict 1, not 0
    assert [(a.expert, a.hit) for a in accesses] == [(0, True), (2, False)]
    assert slots.resident == [0, 2]
    with pytest.raises(ValueError, match="needs 3 experts but the layer has 2 slots"):
        slots.access([3, 4, 5])


def test_prefetch_counters() -> None:
    slots = SlotMap(3, LRUPolicy(), expert_bytes=10)
    slots.access([0, 1])
    loads = slots.prefetch([1, 2])  # 1 resident already; 2 loads into the free slot
    assert [a.expert for a in loads] == [2]
    slots.access([1, 2])  # both predicted, both needed: recall 1, one prefetch hit
    # 3 evicts 0; 4 finds no slot: speculation never evicts the last step's experts (1, 2).
    loads = slots.prefetch([3, 4])
    assert [a.expert for a in loads] == [3]
    slots.access([1, 5])  # 5 evicts 2, the least recent (3 came after it)
    c = slots.counters
    assert c.prefetch_hits == 1 and c.prefetches == 2
    assert c.predicted_needed == 2 and c.needed == 4  # step 1: {1,2} of {1,2}; step 2: none of {1,5}
    assert c.prefetch_recall == 0.5
    assert c.prefetch_wasted == 0
    assert slots.resident == [1, 3, 5]
    slots.access([0, 2])  # 3 leaves unused: a wasted prefetch
    assert slots.counters.prefetch_wasted == 1


def test_lfu_keeps_the_popular_expert() -> None:
    slots = SlotMap(2, LFUPolicy())
    for _ in range(3):
        slots.access([0])
    slots.access([1])
    slots.access([2])  # evicts 1 (used once), not 0 (used 3 times)
    assert slots.resident == [0, 2]


def test_planner_chooses_k_from_a_budget_and_refuses_too_little(eight_expert_dir: Path) -> None:
    model = load_model(eight_expert_dir)
    small = plan_offload(model, 64, experts_per_layer=2)
    per_expert = small.expert_bytes
    base = small.resident_bytes + small.kv_cache_bytes
    plan = plan_offload(model, 64, budget_bytes=base + 3 * 5 * per_expert + 10)
    assert plan.experts_per_layer == 5
    assert "5 experts/layer" in plan.describe()
    with pytest.raises(OutOfMemoryError, match="is too small: resident weights"):
        plan_offload(model, 64, budget_bytes=base + per_expert)
    with pytest.raises(MixtralChatError, match="experts per layer must be between 2"):
        plan_offload(model, 64, experts_per_layer=9)


def test_an_expert_module_round_trips_through_its_blob(eight_expert_dir: Path) -> None:
    expert = load_model(eight_expert_dir).layers[0].block_sparse_moe.experts[0]
    layout = ExpertBlobLayout.of_module(expert)
    assert [(p.linear, p.name) for p in layout.parts] == [(name, "weight") for name in ("w1", "w2", "w3")]
    assert all(p.offset % ALIGNMENT == 0 for p in layout.parts)
    assert layout.linears == {name: tuple(getattr(expert, name).weight.shape) for name in ("w1", "w2", "w3")}
    blob = layout.pack_module(expert)
    shell = type(expert)(expert.w1.in_features, expert.w1.out_features).to("meta")
    layout.bind(shell, blob)  # the shell now computes on views of the blob
    assert ExpertBlobLayout.viewing(shell, blob) == layout
    x = torch.randn(3, expert.w1.in_features)
    with torch.no_grad():
        assert torch.equal(shell(x), expert(x))


def test_routing_trace_records_every_generated_token_and_layer(eight_expert_dir: Path) -> None:
    engine = Engine.load(eight_expert_dir, LoadOptions(device="cpu", dtype="float32"))
    out = io.StringIO()
    RoutingTrace(engine.model, out)
    stream = engine.chat([{"role": "user", "content": "Hi"}], GenerationConfig(max_tokens=6))
    "".join(stream)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    fed = (
        stream.stats.completion_tokens - 1
        if stream.stats.finish_reason == "length"
        else stream.stats.completion_tokens
    )
    assert len(rows) == 3 * fed
    assert {r["layer"] for r in rows} == {0, 1, 2}
    for row in rows:
        assert len(row["experts"]) == 2 and len(row["gating_probs"]) == 2
        assert row["gating_probs"][0] >= row["gating_probs"][1]


def test_cli_offload_flags_and_stats(eight_expert_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    args = ["ask", "--model", str(eight_expert_dir), "--max-tokens", "8", "hello"]
    plain = run_cli(*args)
    offloaded = run_cli(
        *args,
        "--experts-per-layer",
        "2",
        "--offload",
        "disk",
        "--stats",
        "--trace-routing",
        str(trace),
        env={"MIXTRAL_CHAT_HOME": str(tmp_path / "home")},
    )
    assert offloaded.returncode == 0, offloaded.stderr
    assert offloaded.stdout == plain.stdout
    assert "hit rate" in offloaded.stderr and "bytes moved" in offloaded.stderr
    assert trace.read_text().count("\n") > 0
    as_json = run_cli(*args, "--experts-per-layer", "3", "--no-prefetch", "--json", "--stats")
    payload = json.loads(as_json.stdout)
    assert payload["cache"]["experts_per_layer"] == 3 and payload["cache"]["prefetch"] is False
    # The warm start is no prediction: without prefetch, nothing was predicted.
    assert payload["cache"]["prefetch_recall"] == 0.0 and payload["cache"]["prefetch_hits"] == 0


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_offloaded_quantized_experts_are_bit_identical(eight_expert_dir: Path, scheme: str) -> None:
    """Quantized experts keep all their state in buffers, so one blob copy moves them too."""
    tokens = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(5))
    expected = logits_of(load_model(eight_expert_dir, quant=scheme), tokens)
    model = load_model(eight_expert_dir, quant=scheme)
    offloader = ExpertOffloader(model, plan_offload(model, 64, experts_per_layer=3), prefetch=True)
    try:
        assert torch.equal(logits_of(model, tokens), expected)
    finally:
        offloader.close()
    assert offloader.counters().misses > 0


def test_a_cancelled_prefetch_frees_its_slot_and_uncounts_its_bytes() -> None:
    slots = SlotMap(3, LRUPolicy(), expert_bytes=10)
    slots.start_warm([0])
    slots.prefetch([1, 2])
    assert slots.counters.bytes_moved == 20
    slots.cancel_prefetch(2)  # the step needs 0 and 1 only; 2's copy had not started
    assert slots.resident == [0, 1]
    c = slots.counters
    assert (c.prefetches, c.loads, c.bytes_moved, c.prefetch_cancelled) == (1, 1, 10, 1)
    accesses = slots.access([0, 1, 3])  # 3 takes 2's freed slot: no eviction
    assert [(a.expert, a.hit) for a in accesses] == [(0, True), (1, True), (3, False)]
    assert slots.counters.prefetch_hits == 1 and slots.counters.prefetch_wasted == 0
    with pytest.raises(ValueError, match="no prefetch in flight"):
        slots.cancel_prefetch(0)


@pytest.fixture(scope="module")
def quantized_dirs(eight_expert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mixtral_chat.quant import quantize_model_dir

    base = tmp_path_factory.mktemp("q")
    return {scheme: quantize_model_dir(eight_expert_dir, base / scheme, scheme) for scheme in ("nf4", "int4")}


@pytest.fixture(scope="module")
def nf4_dir(quantized_dirs: dict[str, Path]) -> Path:
    return quantized_dirs["nf4"]


def warm_page_cache(directory: Path) -> None:
    """Read every shard of a model directory, so its pages are in the page cache."""
    for shard in directory.glob("*.safetensors"):
        with shard.open("rb") as file:
            while file.read(1 << 24):
                pass


def native_int4_available() -> bool:
    from mixtral_chat.quant.native import int4_kernel

    return int4_kernel() is not None


@pytest.mark.parametrize("store", ["ram", "disk"])
@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_experts_stream_from_the_quantized_files(
    quantized_dirs: dict[str, Path], scheme: str, store: str
) -> None:
    """nf4 experts, and int4 ones on the native CPU kernel, compute on their stored blobs in
    place: the store reads the shards, expert by expert, and the model never holds a loaded
    expert; output equals the resident model's."""
    from mixtral_chat.engine.offload import StoredExperts

    if scheme == "int4" and not native_int4_available():
        pytest.skip("no native int4 kernel here (no C compiler or no AVX2)")
    directory = quantized_dirs[scheme]
    tokens = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(7))
    expected = logits_of(load_model(directory), tokens)
    stored = StoredExperts.open(directory, torch.device("cpu"), torch.float32)
    assert stored is not None
    model = load_model(directory, skip_experts=True)
    assert all(t.is_meta for _, t in model.layers[0].block_sparse_moe.experts.named_parameters())
    assert not any(t.is_meta for n, t in model.named_parameters() if ".experts." not in n)
    if native_int4_available():
        assert model.layers[0].self_attn.q_proj.backend == "native"
    plan = plan_offload(model, 64, experts_per_layer=3, store=store, expert_bytes=stored.layout.nbytes)
    offloader = ExpertOffloader(model, plan, prefetch=True, stored=stored)
    try:
        assert torch.equal(logits_of(model, tokens), expected)
        assert offloader.stats()["store_from_files"] is True
        assert offloader.counters().misses > 0
    finally:
        offloader.close()


def test_engine_offloads_a_quantized_directory_from_its_files(nf4_dir: Path) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    config = GenerationConfig(max_tokens=12)
    expected = "".join(Engine.load(nf4_dir, LoadOptions(device="cpu")).chat(messages, config))
    engine = Engine.load(
        nf4_dir, LoadOptions(device="cpu", offload=True, experts_per_layer=2, offload_store="disk")
    )
    try:
        assert "".join(engine.chat(messages, config)) == expected
        stats = engine.cache_stats()
        assert stats is not None and stats["store_from_files"] is True and stats["store"] == "disk"
    finally:
        engine.close()


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_cpu_computed_experts_read_the_mapped_shards_in_place(
    quantized_dirs: dict[str, Path], scheme: str
) -> None:
    """No copy of an expert on a CPU: its tensors are views of the shard's mapping (the page cache)."""
    from mixtral_chat.engine.offload.store import FileStore
    from mixtral_chat.quant.blob import module_tensors

    if scheme == "int4" and not native_int4_available():
        pytest.skip("int4 computes in place only on the native kernel")
    model_dir = quantized_dirs[scheme]
    messages = [{"role": "user", "content": "Tell me a story"}]
    config = GenerationConfig(max_tokens=8)
    expected = "".join(Engine.load(model_dir, LoadOptions(device="cpu")).chat(messages, config))
    engine = Engine.load(model_dir, LoadOptions(device="cpu", offload=True, offload_store="disk"))
    try:
        # In place is for pages in memory: the suite's files may have been evicted since they
        # were written (the page cache is shared), and an expert mostly out of memory is read
        # into a buffer first (the next test). Read the shards now, so every expert is in memory.
        warm_page_cache(model_dir)
        assert "".join(engine.chat(messages, config)) == expected
        offloader = engine.offloader
        assert offloader is not None and isinstance(offloader.store, FileStore)
        assert offloader.cpu_experts is not None
        assert offloader.store._mapped  # the steps above computed on them
        warm_page_cache(model_dir)
        views = [
            (layer, expert, tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size())
            for layer in range(3)
            for expert in range(8)
            for _, tensor in module_tensors(offloader.cpu_experts.bound(layer, expert))
        ]
        # The mappings once every expert was bound (a shard no step touched is mapped by `bound`).
        mappings = [(base, len(mapped)) for mapped, base in offloader.store._mapped.values()]
        for layer, expert, start, end in views:
            assert any(base <= start and end <= base + size for base, size in mappings), (
                f"layer {layer} expert {expert} is not a view of a mapping "
                f"(the scratch buffer holds {offloader.cpu_experts._scratch_holds})"
            )
    finally:
        engine.close()


def test_an_expert_mostly_on_disk_is_read_whole_before_it_is_computed(
    quantized_dirs: dict[str, Path],
) -> None:
    """Page faults on the mapping read slower than one pread of the blob: a CPU expert whose pages
    are not in memory is read into the scratch buffer, and computes the same output."""
    import os

    from mixtral_chat.engine.offload.cpu_experts import CpuExperts
    from mixtral_chat.engine.offload.store import StoredExperts
    from mixtral_chat.quant.blob import module_tensors

    stored = StoredExperts.open(quantized_dirs["nf4"], torch.device("cpu"), torch.float32)
    assert stored is not None
    store = stored.file_store(3, 8)
    experts = CpuExperts(store, stored.template)
    try:
        fd, _ = store._location[(1, 2)]
        os.fsync(fd)  # written just now: dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if store.resident_share(1, 2) > 0:
            pytest.skip("this filesystem keeps its pages (tmpfs?): nothing is on disk to read")
        x = torch.randn(3, 64)
        from_disk = experts.bound(1, 2)
        (mapped, base), size = next(iter(store._mapped.values())), store.layout.nbytes
        tensors = [t for _, t in module_tensors(from_disk)]
        assert all(not (base <= t.data_ptr() < base + len(mapped)) for t in tensors)  # the scratch
        assert torch.equal(experts._scratch, store.blob(1, 2)) and size == experts._scratch.numel()
        read_first = from_disk(x)
        store.blob(1, 2).sum()  # now in the page cache
        assert store.resident_share(1, 2) == 1.0
        assert experts.bound(1, 2) is from_disk  # the scratch still holds it: nothing is read
        experts.close()  # forget it
        in_place = experts.bound(1, 2)
        assert in_place is not from_disk and torch.equal(in_place(x), read_first)
        assert all(base <= t.data_ptr() < base + len(mapped) for _, t in module_tensors(in_place))
    finally:
        experts.close()
        store.close()


def test_a_truncated_quantized_shard_is_a_clear_error(nf4_dir: Path, tmp_path: Path) -> None:
    import shutil

    broken = Path(shutil.copytree(nf4_dir, tmp_path / "broken"))
    shard = max(broken.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 4096)
    cut_off = r"truncated safetensors file \(tensor '.*experts\.\d+\.packed' is cut off"
    with pytest.raises(MixtralChatError, match=cut_off):
        Engine.load(
            broken, LoadOptions(device="cpu", offload=True, experts_per_layer=2, offload_store="disk")
        )


def test_a_model_that_does_not_fit_is_offloaded_automatically(nf4_dir: Path) -> None:
    from mixtral_chat.engine.weights import loaded_weight_bytes

    need = loaded_weight_bytes(nf4_dir, torch.float32)
    assert need == sum(t.numel() * t.element_size() for t in load_model(nf4_dir).state_dict().values())
    messages = [{"role": "user", "content": "Hi"}]
    config = GenerationConfig(max_tokens=8)
    roomy = Engine.load(nf4_dir, LoadOptions(device="cpu", gpu_budget_gb=10))
    assert roomy.offloader is None and roomy.info.offload_plan is None
    expected = "".join(roomy.chat(messages, config))
    # Room for the resident part, the KV cache and 3.5 experts per layer, not for all 8.
    from mixtral_chat.engine.offload import StoredExperts
    from mixtral_chat.quant.int8 import quantize_vocab_weights

    stored = StoredExperts.open(nf4_dir, torch.device("cpu"), torch.float32)
    assert stored is not None
    shell = load_model(nf4_dir, skip_experts=True)
    quantize_vocab_weights(shell)  # as the engine does with a 4-bit model on the CPU (where it can)
    plan = plan_offload(shell, 64, experts_per_layer=3, expert_bytes=stored.layout.nbytes)
    budget = (plan.resident_bytes + plan.kv_cache_bytes + 3.5 * 3 * plan.expert_bytes) / 1e9
    tight = Engine.load(nf4_dir, LoadOptions(device="cpu", context_length=64, gpu_budget_gb=budget))
    try:
        assert tight.info.offload_plan and tight.info.offload_plan.startswith("auto (the model needs")
        stats = tight.cache_stats()
        assert stats is not None and stats["store"] == "disk" and stats["store_from_files"] is True
        # On a CPU every expert computes in place from the mapped shards: no slots, no copies.
        assert stats["experts_per_layer"] == 0
        assert "".join(tight.chat(messages, config)) == expected
        stats = tight.cache_stats()
        assert stats is not None and stats["bytes_moved"] == 0
        assert stats["cpu_computed"] == stats["misses"] > 0
    finally:
        tight.close()


def test_a_float_model_too_big_for_ram_asks_to_be_quantized(eight_expert_dir: Path) -> None:
    with pytest.raises(OutOfMemoryError, match=r"the model needs .* GB.*mixtral-chat quantize"):
        Engine.load(eight_expert_dir, LoadOptions(device="cpu", gpu_budget_gb=0.0001))


def test_int4_without_the_native_kernel_is_packed_from_loaded_experts(
    quantized_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's int4 kernels repack the codes, so the stored blobs are not the runtime form:
    the experts are loaded and packed as before, with the same output."""
    from mixtral_chat.engine.offload import StoredExperts
    from mixtral_chat.quant import native

    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    directory = quantized_dirs["int4"]
    assert StoredExperts.open(directory, torch.device("cpu"), torch.float32) is None
    messages, config = [{"role": "user", "content": "Hi"}], GenerationConfig(max_tokens=8)
    expected = "".join(Engine.load(directory, LoadOptions(device="cpu")).chat(messages, config))
    engine = Engine.load(
        directory, LoadOptions(device="cpu", offload=True, experts_per_layer=2, offload_store="disk")
    )
    try:
        assert engine.cache_stats()["store_from_files"] is False
        assert "".join(engine.chat(messages, config)) == expected
    finally:
        engine.close()
