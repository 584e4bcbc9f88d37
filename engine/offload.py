"""Expert offloading: every expert in a host store, k per layer in slots on the compute device.

- Expert store: one contiguous byte blob per expert (all its weights and scales), in host RAM
  (pinned when CUDA is used) or on disk read with pread, so a miss is one copy. When the runtime
  experts are plain views of the blobs a quantized directory stores (`StoredExperts`), the store
  is filled from those files directly, and the disk tier is the quantized shards themselves:
  no expert is ever materialised outside the cache.
- Expert cache: per layer, k preallocated slot buffers on the compute device, each with a slot
  module whose tensors are views into it: loading expert e into slot s is one copy, no
  allocation per token. Which expert sits where is `expert_cache.SlotMap`'s business.
- Transfers: on CUDA a dedicated copy stream with one event per slot; on CPU a background
  thread. The compute waits only for the slot it needs.
- Speculative prefetch: the hidden state entering layer l's MoE goes through layer l+1's router,
  and the predicted experts start loading while layer l computes.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor, nn

from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import MixtralChatError, OutOfMemoryError
from mixtral_chat.engine.expert_cache import CacheCounters, SlotMap, make_policy
from mixtral_chat.engine.model import Expert, Mixtral, SparseMoE
from mixtral_chat.engine.paths import data_dir
from mixtral_chat.quant.blob import expert_linears_from_blob
from mixtral_chat.quant.load import ExpertBlobReader

_ALIGN = 64  # bytes: every tensor inside a blob starts on a 64-byte boundary


@dataclass(frozen=True)
class TensorSpec:
    name: str  # dotted path inside the expert module, e.g. "w1.weight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertLayout:
    """Where each tensor of an expert module lies inside its byte blob (same for all experts)."""

    specs: tuple[TensorSpec, ...]
    nbytes: int

    @classmethod
    def of(cls, expert: nn.Module) -> ExpertLayout:
        specs, offset = [], 0
        for name, tensor in _module_tensors(expert):
            nbytes = tensor.numel() * tensor.element_size()
            specs.append(TensorSpec(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        return cls(tuple(specs), offset)

    @classmethod
    def viewing(cls, expert: nn.Module, blob: Tensor) -> ExpertLayout | None:
        """The layout of an expert whose tensors all are views into `blob`; None if any is not."""
        specs = []
        for name, tensor in _module_tensors(expert):
            offset = tensor.data_ptr() - blob.data_ptr()
            nbytes = tensor.numel() * tensor.element_size()
            inside = tensor.device == blob.device and offset >= 0 and offset + nbytes <= blob.numel()
            if not (inside and tensor.is_contiguous()):
                return None
            specs.append(TensorSpec(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        return cls(tuple(specs), blob.numel())

    def pack(self, expert: nn.Module, out: Tensor) -> Tensor:
        """Copy an expert's tensors into `out` (uint8 [nbytes])."""
        tensors = dict(_module_tensors(expert))
        for spec in self.specs:
            src = tensors[spec.name].detach().contiguous().reshape(-1).view(torch.uint8)
            out[spec.offset : spec.offset + spec.nbytes].copy_(src)
        return out

    def bind(self, module: nn.Module, blob: Tensor) -> None:
        """Point the module's tensors at views into `blob`: the module computes whatever it holds."""
        for spec in self.specs:
            view = blob[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
            owner_name, _, attr = spec.name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(view, requires_grad=False)
            else:
                owner._buffers[attr] = view


def _module_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


class ExpertStore:
    """Every expert's blob in host memory or on disk."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int) -> None:
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts

    def copy_into(
        self, layer: int, expert: int, out: Tensor, start: int, end: int, non_blocking: bool
    ) -> None:
        """Copy bytes [start, end) of the expert's blob into the same bytes of `out`."""
        raise NotImplementedError

    def put(self, layer: int, expert: int, module: nn.Module) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release files and memory."""


class RamStore(ExpertStore):
    """One host buffer per expert, pinned when the compute device is a GPU."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, pin: bool) -> None:
        super().__init__(layout, num_layers, num_experts)
        # One allocation sliced per expert: the pinned allocator rounds each allocation up to a
        # power of two, which would cost ~30% more pinned memory for 99 MB experts.
        total = num_layers * num_experts * layout.nbytes
        self.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)

    def _blob(self, layer: int, expert: int) -> Tensor:
        start = (layer * self.num_experts + expert) * self.layout.nbytes
        return self.buffer[start : start + self.layout.nbytes]

    def put(self, layer: int, expert: int, module: nn.Module) -> None:
        self.layout.pack(module, self._blob(layer, expert))

    def copy_into(
        self, layer: int, expert: int, out: Tensor, start: int, end: int, non_blocking: bool
    ) -> None:
        out[start:end].copy_(self._blob(layer, expert)[start:end], non_blocking=non_blocking)

    def fill_from(self, source: ExpertStore) -> None:
        """Every expert's blob read from another store (the quantized files)."""
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                source.copy_into(layer, expert, self._blob(layer, expert), 0, self.layout.nbytes, False)

    def close(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)


class FileStore(ExpertStore):
    """Blobs at known offsets in open files, read with pread straight into the slot (or into a
    pinned staging buffer for a GPU slot).

    pread rather than mmap: the file's pages then stay in the kernel's page cache, which it can
    drop under pressure, instead of counting as this process's memory.
    """

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, where: str) -> None:
        super().__init__(layout, num_layers, num_experts)
        self.where = where
        self._location: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, expert) -> (fd, offset)
        self._fd_of: dict[Path, int] = {}  # every open file
        self._staging: dict[int, Tensor] = {}  # per thread, for GPU targets

    def copy_into(
        self, layer: int, expert: int, out: Tensor, start: int, end: int, non_blocking: bool
    ) -> None:
        fd, offset = self._location[(layer, expert)]
        if out.device.type == "cpu":
            target = out[start:end]
        else:
            key = threading.get_ident()
            if key not in self._staging:
                self._staging[key] = torch.empty(self.layout.nbytes, dtype=torch.uint8, pin_memory=True)
            target = self._staging[key][: end - start]
        read = os.preadv(fd, [memoryview(target.numpy())], offset + start)
        if read != end - start:
            raise MixtralChatError(f"{self.where}: expert {expert} of layer {layer} is truncated")
        if out.device.type != "cpu":
            out[start:end].copy_(target, non_blocking=False)

    def place(self, layer: int, expert: int, path: Path, offset: int) -> None:
        """The expert's blob is at `offset` in `path` (each file opened once, read-only)."""
        if path not in self._fd_of:
            self._fd_of[path] = os.open(path, os.O_RDONLY)
        self._location[(layer, expert)] = (self._fd_of[path], offset)

    @property
    def fds(self) -> list[int]:
        """The open files the blobs are read from."""
        return list(self._fd_of.values())

    def close(self) -> None:
        for fd in self._fd_of.values():
            os.close(fd)
        self._fd_of.clear()


class DiskStore(FileStore):
    """A pack file of runtime blobs, written at start-up from the loaded experts."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, path: Path) -> None:
        super().__init__(layout, num_layers, num_experts, str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        # Unlinked at once: the open descriptor keeps the data, and a crash leaves no
        # gigabytes behind.
        path.unlink()
        self._fd_of[path] = self._fd
        for layer in range(num_layers):
            for expert in range(num_experts):
                self._location[(layer, expert)] = (self._fd, (layer * num_experts + expert) * layout.nbytes)

    def put(self, layer: int, expert: int, module: nn.Module) -> None:
        blob = self.layout.pack(module, torch.empty(self.layout.nbytes, dtype=torch.uint8))
        written = os.pwrite(self._fd, memoryview(blob.numpy()), self._location[(layer, expert)][1])
        if written != self.layout.nbytes:
            raise MixtralChatError(f"{self.where}: short write while building the expert store (disk full?)")


class StoredExperts:
    """The expert blobs of a quantized directory, when the runtime experts are views of them.

    True for nf4 (CPU and CUDA) and int4 with the native CPU kernel: their runtime modules
    compute on the stored parts in place. Then an expert moves as the stored bytes, and the
    store is filled from (RAM) or is (disk) the quantized shards, read expert by expert.
    `open` returns None when the runtime form differs (int4 on CUDA repacks for tinygemm, a
    float model converts dtypes): the experts are then loaded and packed as before.
    """

    def __init__(
        self, model_dir: Path, reader: ExpertBlobReader, layout: ExpertLayout, template: nn.Module
    ) -> None:
        self.model_dir = model_dir
        self.reader = reader
        self.layout = layout
        self.template = template  # a meta shell of the runtime expert, for the cache's slots

    @classmethod
    def open(cls, model_dir: Path, device: torch.device, dtype: torch.dtype) -> StoredExperts | None:
        reader = ExpertBlobReader(model_dir)
        args = ModelArgs.from_hf_config(model_dir)
        if not reader.experts():
            return None
        with torch.device("meta"):
            template = Expert(args.hidden_size, args.intermediate_size)
        blob = reader.read(*reader.experts()[0]).to(device)
        linears = expert_linears_from_blob(blob, reader.layout, reader.scheme, device, dtype)
        for name, module in linears.items():
            setattr(template, name, module)
        layout = ExpertLayout.viewing(template, blob)
        if layout is None:
            return None
        return cls(model_dir, reader, layout, template.to("meta"))

    def file_store(self, num_layers: int, num_experts: int) -> FileStore:
        """The quantized shards as a store: every expert's blob where the file has it."""
        store = FileStore(self.layout, num_layers, num_experts, str(self.model_dir))
        try:
            for layer in range(num_layers):
                for expert in range(num_experts):
                    file, offset, nbytes = self.reader.location(layer, expert)
                    if nbytes != self.layout.nbytes:
                        raise MixtralChatError(
                            f"{file}: expert {expert} of layer {layer} is {nbytes} bytes, "
                            f"quant_config.json says {self.layout.nbytes}"
                        )
                    store.place(layer, expert, file, offset)
        except BaseException:
            store.close()
            raise
        return store


@dataclass
class Transfer:
    future: Future
    stop: threading.Event  # set: the copy ends at its next chunk (a wrong prefetch)


class Transfers:
    """Runs copies off the compute path: a CUDA copy stream, or one background thread on CPU.

    Copies go in chunks so a wrong prefetch can be stopped part-way instead of holding the queue
    for a whole expert. `simulate_gbps` makes each chunk take at least bytes / bandwidth, so the
    overlap of prefetch and compute can be measured on a machine without a GPU link.
    """

    CHUNK = 8 << 20  # bytes

    def __init__(self, device: torch.device, simulate_gbps: float | None = None) -> None:
        self.device = device
        self.simulate_gbps = simulate_gbps
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-copy")

    def submit(self, store: ExpertStore, layer: int, expert: int, out: Tensor) -> Transfer:
        compute_stream = torch.cuda.current_stream(self.device) if self.cuda else None
        stop = threading.Event()

        def copy_chunks(non_blocking: bool) -> None:
            for start in range(0, store.layout.nbytes, self.CHUNK):
                if stop.is_set():
                    return
                began = time.perf_counter()
                end = min(start + self.CHUNK, store.layout.nbytes)
                store.copy_into(layer, expert, out, start, end, non_blocking)
                if self.simulate_gbps:
                    remaining = (end - start) / (self.simulate_gbps * 1e9) - (time.perf_counter() - began)
                    if remaining > 0:
                        time.sleep(remaining)

        def run() -> object:
            if self._stream is None:
                copy_chunks(non_blocking=False)
                return None
            with torch.cuda.stream(self._stream):
                # The slot may still be read by compute queued earlier: wait for it first.
                self._stream.wait_stream(compute_stream)
                copy_chunks(non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            return event

        return Transfer(self._pool.submit(run), stop)

    def wait(self, transfer: Transfer) -> None:
        event = transfer.future.result()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class LayerActivity:
    """What the last step did in one layer, for the TUI's expert grid."""

    hits: list[int] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)
    prefetched: list[int] = field(default_factory=list)


class LayerExpertCache:
    """k slots of one layer on the compute device; the layer's `expert_source`."""

    def __init__(
        self,
        layer: int,
        store: ExpertStore,
        template: nn.Module,
        capacity: int,
        policy: str,
        device: torch.device,
        transfers: Transfers,
    ) -> None:
        self.layer = layer
        self.store = store
        self.transfers = transfers
        self.slots = SlotMap(capacity, make_policy(policy), CacheCounters(), store.layout.nbytes)
        self.buffers = [
            torch.empty(store.layout.nbytes, dtype=torch.uint8, device=device) for _ in range(capacity)
        ]
        self.modules: list[nn.Module] = []
        for buffer in self.buffers:
            module = copy.deepcopy(template)  # a meta shell: copying it costs nothing
            store.layout.bind(module, buffer)
            self.modules.append(module)
        self.pending: dict[int, Transfer] = {}  # slot -> transfer in flight
        self.activity = LayerActivity()

    def warm_start(self, expert_ids: Sequence[int]) -> None:
        self.slots.start_warm(list(expert_ids))
        for expert, slot in self.slots.slot_of.items():
            self._load(expert, slot)

    def _load(self, expert: int, slot: int) -> None:
        self.pending[slot] = self.transfers.submit(self.store, self.layer, expert, self.buffers[slot])

    def experts_for(self, expert_ids: Sequence[int]) -> list[nn.Module]:
        self._cancel_wrong_prefetches(expert_ids)
        accesses = self.slots.access(expert_ids)
        self.activity.hits = [a.expert for a in accesses if a.hit]
        self.activity.misses = [a.expert for a in accesses if not a.hit]
        for access in accesses:
            if access.load:
                self._load(access.expert, access.slot)
        started = time.perf_counter()
        for access in accesses:
            transfer = self.pending.pop(access.slot, None)
            if transfer is not None:
                self.transfers.wait(transfer)
        self.slots.counters.stall_s += time.perf_counter() - started
        return [self.modules[a.slot] for a in accesses]

    def _cancel_wrong_prefetches(self, needed: Sequence[int]) -> None:
        """Drop predicted experts the step does not need if their copy has not started yet.

        Otherwise wrong guesses hold the single copy queue ahead of the misses that the step
        waits for (measured: prefetch at 85% recall made decode 19-28% slower without this).
        """
        for expert in self.slots.prefetched_unused() - set(needed):
            slot = self.slots.slot_of[expert]
            transfer = self.pending.get(slot)
            if transfer is None or transfer.future.done():
                continue  # already copied: keep it, it may be used later
            del self.pending[slot]
            # Not started: never runs. Running: ends at its next chunk. Either way the slot is
            # free, and a later copy into it queues behind this one.
            transfer.stop.set()
            transfer.future.cancel()
            self.slots.cancel_prefetch(expert)

    def prefetch(self, expert_ids: Sequence[int]) -> None:
        loads = self.slots.prefetch(expert_ids)
        self.activity.prefetched = [a.expert for a in loads]
        for access in loads:
            self._load(access.expert, access.slot)


@dataclass(frozen=True)
class OffloadPlan:
    experts_per_layer: int
    expert_bytes: int
    resident_bytes: int  # everything but the experts
    kv_cache_bytes: int
    cache_bytes: int  # the slots of all layers
    budget_bytes: int | None
    store: str  # "ram" or "disk"

    def describe(self) -> str:
        gb = 1e9
        budget = f"budget {self.budget_bytes / gb:.2f} GB: " if self.budget_bytes else ""
        return (
            f"{budget}resident weights {self.resident_bytes / gb:.2f} GB + KV cache "
            f"{self.kv_cache_bytes / gb:.2f} GB + {self.experts_per_layer} experts/layer x "
            f"{self.expert_bytes / 1e6:.1f} MB = {self.cache_bytes / gb:.2f} GB expert cache; "
            f"other experts in {self.store}"
        )


def plan_offload(
    model: Mixtral,
    context_length: int,
    *,
    budget_bytes: int | None = None,
    experts_per_layer: int | None = None,
    store: str = "ram",
    expert_bytes: int | None = None,
) -> OffloadPlan:
    """Choose k per layer from a memory budget (or take the user's k), with the numbers.

    `expert_bytes`: one expert's blob size, when the experts are not loaded (`StoredExperts`).
    """
    args = model.args
    if expert_bytes is None:
        expert_bytes = ExpertLayout.of(model.layers[0].block_sparse_moe.experts[0]).nbytes
    expert_ids = {
        id(t) for layer in model.layers for e in layer.block_sparse_moe.experts for _, t in _module_tensors(e)
    }
    resident = sum(  # the KV cache is counted on its own, also when it already exists
        t.numel() * t.element_size()
        for name, t in _module_tensors(model)
        if id(t) not in expert_ids and ".kv_cache." not in name
    )
    kv = args.kv_cache_bytes(context_length, model.dtype.itemsize)
    if experts_per_layer is None:
        if budget_bytes is None:
            raise ValueError("give a memory budget or experts per layer")
        available = budget_bytes - resident - kv
        experts_per_layer = min(args.num_local_experts, available // (args.num_hidden_layers * expert_bytes))
        if experts_per_layer < args.num_experts_per_tok:
            need = resident + kv + args.num_hidden_layers * args.num_experts_per_tok * expert_bytes
            raise OutOfMemoryError(
                f"a memory budget of {budget_bytes / 1e9:.2f} GB is too small: resident weights "
                f"{resident / 1e9:.2f} GB + KV cache {kv / 1e9:.2f} GB + {args.num_experts_per_tok} "
                f"experts/layer need {need / 1e9:.2f} GB"
            )
    if not args.num_experts_per_tok <= experts_per_layer <= args.num_local_experts:
        raise MixtralChatError(
            f"experts per layer must be between {args.num_experts_per_tok} (experts per token) and "
            f"{args.num_local_experts}, got {experts_per_layer}"
        )
    return OffloadPlan(
        experts_per_layer=int(experts_per_layer),
        expert_bytes=expert_bytes,
        resident_bytes=resident,
        kv_cache_bytes=kv,
        cache_bytes=int(experts_per_layer) * args.num_hidden_layers * expert_bytes,
        budget_bytes=budget_bytes,
        store=store,
    )


class ExpertOffloader:
    """Puts a model's experts in a store and serves them through per-layer caches."""

    def __init__(
        self,
        model: Mixtral,
        plan: OffloadPlan,
        *,
        policy: str = "lru",
        prefetch: bool = True,
        store_path: Path | None = None,
        simulate_link_gbps: float | None = None,
        stored: StoredExperts | None = None,
    ) -> None:
        """`stored`: the experts come from the quantized files (the model holds meta shells of
        them); otherwise the model's loaded experts are packed into the store."""
        self.model = model
        self.plan = plan
        self.prefetch_enabled = prefetch
        self.from_files = stored is not None
        device = model.device
        layers = model.layers
        L, E = len(layers), model.args.num_local_experts
        if stored is not None:
            layout, template = stored.layout, stored.template
            files = stored.file_store(L, E)
            if plan.store == "disk":
                self.store: ExpertStore = files
            else:
                self.store = RamStore(layout, L, E, pin=device.type == "cuda")
                try:
                    self.store.fill_from(files)
                finally:
                    files.close()
        else:
            template = layers[0].block_sparse_moe.experts[0]
            layout = ExpertLayout.of(template)
            if plan.store == "disk":
                path = store_path or data_dir() / "offload" / f"experts-{os.getpid()}-{id(self)}.pack"
                self.store = DiskStore(layout, L, E, path)
            else:
                self.store = RamStore(layout, L, E, pin=device.type == "cuda")
            for li, layer in enumerate(layers):
                for e, expert in enumerate(layer.block_sparse_moe.experts):
                    self.store.put(li, e, expert)
            template = copy.deepcopy(template).to("meta")
        # The experts now live in the store: the model keeps empty (meta) shells of them.
        for layer in layers:
            layer.block_sparse_moe.experts.to("meta")
            layer.block_sparse_moe.experts_per_call = plan.experts_per_layer
        self.transfers = Transfers(device, simulate_link_gbps)
        self.caches = [
            LayerExpertCache(li, self.store, template, plan.experts_per_layer, policy, device, self.transfers)
            for li in range(L)
        ]
        # Warm start: each layer's first k experts, so the first token is not all misses.
        for cache in self.caches:
            cache.warm_start(range(plan.experts_per_layer))
        for li, layer in enumerate(layers):
            moe = layer.block_sparse_moe
            moe.expert_source = self.caches[li].experts_for
            if prefetch and li + 1 < L:
                moe.prefetch_hook = self._prefetcher(layers[li + 1].block_sparse_moe, self.caches[li + 1])

    @staticmethod
    def _prefetcher(next_moe: SparseMoE, next_cache: LayerExpertCache):
        def hook(x: Tensor) -> None:
            # The paper's speculative loading: layer l+1's router on layer l's MoE input.
            if x.shape[0] != 1:
                return  # prefill touches most experts anyway; predict for decode steps
            with torch.no_grad():
                _, chosen, _ = next_moe.route(x)
            next_cache.prefetch(sorted(set(chosen.flatten().tolist())))

        return hook

    def counters(self) -> CacheCounters:
        total = CacheCounters()
        for cache in self.caches:
            total.add(cache.slots.counters)
        return total

    def stats(self) -> dict:
        total = self.counters()
        return {
            "experts_per_layer": self.plan.experts_per_layer,
            "store": self.plan.store,
            "store_from_files": self.from_files,
            "prefetch": self.prefetch_enabled,
            "hit_rate": round(total.hit_rate, 4),
            "hits": total.hits,
            "misses": total.misses,
            "prefetch_hits": total.prefetch_hits,
            "prefetch_recall": round(total.prefetch_recall, 4),
            "prefetch_wasted": total.prefetch_wasted,
            "prefetch_cancelled": total.prefetch_cancelled,
            "bytes_moved": total.bytes_moved,
            "stall_s": round(total.stall_s, 4),
            "plan": self.plan.describe(),
            "layers": [
                {
                    "resident": cache.slots.resident,
                    "hits": cache.activity.hits,
                    "misses": cache.activity.misses,
                    "prefetched": cache.activity.prefetched,
                }
                for cache in self.caches
            ],
        }

    def close(self) -> None:
        self.transfers.close()
        self.store.close()


class RoutingTrace:
    """Writes the chosen experts of every generated token and layer as JSON lines."""

    def __init__(self, model: Mixtral, out: TextIO) -> None:
        self.out = out
        self.token_idx = 0
        self.model = model
        self._layer_of = {id(layer.block_sparse_moe): i for i, layer in enumerate(model.layers)}
        for layer in model.layers:
            layer.block_sparse_moe.routing_hook = self._hook(layer.block_sparse_moe)

    def _hook(self, moe: SparseMoE):
        layer = self._layer_of[id(moe)]
        last_layer = len(self.model.layers) - 1

        def record(router_logits: Tensor, chosen: Tensor, weights: Tensor) -> None:
            if chosen.shape[0] != 1:
                return  # prefill: only generated tokens are traced
            probs = torch.softmax(router_logits.float(), dim=-1)[0]
            experts = chosen[0].tolist()
            self.out.write(
                json.dumps(
                    {
                        "token_idx": self.token_idx,
                        "layer": layer,
                        "experts": experts,
                        "gating_probs": [round(float(probs[e]), 6) for e in experts],
                    }
                )
                + "\n"
            )
            if layer == last_layer:
                self.token_idx += 1

        return record


def move_non_experts(model: Mixtral, device: torch.device) -> None:
    """Everything but the experts to the compute device (the experts go to the store)."""
    for name, child in model.named_children():
        if name != "layers":
            child.to(device)
    for layer in model.layers:
        for name, child in layer.named_children():
            if name == "block_sparse_moe":
                child.gate.to(device)
            else:
                child.to(device)
