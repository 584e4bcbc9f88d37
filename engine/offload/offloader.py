"""The offloader: a model's experts in a store, served to its layers through per-layer caches.

Each layer follows its `placement.LayerPlacement`: k slots on the device, and misses copied into
them or computed on the CPU from the store (`cpu_experts`).

Speculative prefetch (off by default): the hidden state entering layer l's MoE goes through layer
l+1's router once layer l's own misses are queued, and the predicted experts load (behind any
demand copy) while layer l computes.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.model import Mixtral, SparseMoE
from mixtral_chat.engine.offload.cache import LayerExpertCache
from mixtral_chat.engine.offload.cpu_experts import CpuExperts
from mixtral_chat.engine.offload.placement import COPY, MissCosts
from mixtral_chat.engine.offload.planner import OffloadPlan
from mixtral_chat.engine.offload.slots import CacheCounters
from mixtral_chat.engine.offload.store import DiskStore, ExpertStore, RamStore, StoredExperts
from mixtral_chat.engine.offload.streamed import StreamedExperts
from mixtral_chat.engine.offload.transfers import Transfers
from mixtral_chat.engine.paths import data_dir
from mixtral_chat.quant.blob import ExpertBlobLayout


class ExpertOffloader:
    """Puts a model's experts in a store and serves them through per-layer caches."""

    def __init__(
        self,
        model: Mixtral,
        plan: OffloadPlan,
        *,
        policy: str = "lru",
        prefetch: bool = False,  # off by default: it measured slower (docs/BENCHMARKS.md)
        store_path: Path | None = None,
        simulate_link_gbps: float | None = None,
        stored: StoredExperts | None = None,
        cpu_template: nn.Module | None = None,
        streamed: StreamedExperts | None = None,
    ) -> None:
        """`stored`: the experts come from the quantized files (the model holds meta shells of
        them); otherwise the model's loaded experts are packed into the store. `cpu_template`: a
        meta shell of the experts' CPU form, for layers that compute misses on the CPU (by default
        the slots' own when it is a CPU form: a CPU device, or experts loaded on the CPU).
        `streamed`: a store already filled while the weights loaded."""
        self.model = model
        self.plan = plan
        self.prefetch_enabled = prefetch
        self.from_files = stored is not None
        if stored is not None:
            self.store, template = self._store_from_files(stored), stored.template
        elif streamed is not None:
            self.store, template = streamed.complete()
        else:
            self.store, template = self._store_from_loaded_experts(store_path)
        self._leave_meta_shells()
        self.cpu_experts = self._cpu_experts(cpu_template or self._cpu_form(template, stored))
        self.transfers = Transfers(model.device, simulate_link_gbps)
        self.caches = self._warm_caches(template, policy)
        self._serve_layers(prefetch)

    def _store_from_files(self, stored: StoredExperts) -> ExpertStore:
        """The quantized shards as the disk store, or read once into a RAM store."""
        L, E = len(self.model.layers), self.model.args.num_local_experts
        files = stored.file_store(L, E)
        if self.plan.store == "disk":
            return files
        store = RamStore(stored.layout, L, E, pin=self.model.device.type == "cuda")
        try:
            store.fill_from(files)
        finally:
            files.close()
        return store

    def _store_from_loaded_experts(self, store_path: Path | None) -> tuple[ExpertStore, nn.Module]:
        """The loaded experts packed into a new store; with a meta shell of one, for the slots."""
        layers = self.model.layers
        L, E = len(layers), self.model.args.num_local_experts
        template = layers[0].block_sparse_moe.experts[0]
        layout = ExpertBlobLayout.of_module(template)
        store: ExpertStore
        if self.plan.store == "disk":
            path = store_path or data_dir() / "offload" / f"experts-{os.getpid()}-{id(self)}.pack"
            store = DiskStore(layout, L, E, path)
        else:
            store = RamStore(layout, L, E, pin=self.model.device.type == "cuda")
        for li, layer in enumerate(layers):
            for e, expert in enumerate(layer.block_sparse_moe.experts):
                store.put(li, e, expert)
        return store, copy.deepcopy(template).to("meta")

    def _leave_meta_shells(self) -> None:
        """The experts now live in the store: the model keeps empty (meta) shells of them. A layer
        that copies its misses takes at most its slots at once; one that computes them on the
        CPU, any number."""
        E = self.model.args.num_local_experts
        for layer, placed in zip(self.model.layers, self.plan.layers, strict=True):
            layer.block_sparse_moe.experts.to("meta")
            layer.block_sparse_moe.experts_per_call = placed.slots if placed.on_miss == COPY else E

    def _cpu_form(self, template: nn.Module, stored: StoredExperts | None) -> nn.Module | None:
        """The slots' template where it is the CPU form too; else the stored experts' CPU form."""
        if self.model.device.type == "cpu" or stored is None:
            return template  # a CPU device, or experts loaded (on the CPU) then packed
        return stored.cpu_template()

    def _cpu_experts(self, cpu_template: nn.Module | None) -> CpuExperts | None:
        if all(layer.on_miss == COPY for layer in self.plan.layers):
            return None
        if cpu_template is None:
            raise MixtralChatError(
                f"this model's experts cannot be computed on the CPU next to {self.model.device.type} "
                "(their CPU form differs from the stored one); plan with misses copied (--on-miss copy)"
            )
        return CpuExperts(self.store, cpu_template)

    def _warm_caches(self, template: nn.Module, policy: str) -> list[LayerExpertCache]:
        """One cache per layer; warm start with each layer's first k experts, so the first token
        is not all misses (and a layer with fixed slots keeps those)."""
        device = self.model.device
        costs = MissCosts.of(self.store.layout.nbytes, self.plan.bandwidths) if self.plan.bandwidths else None
        caches = [
            LayerExpertCache(
                li,
                self.store,
                template,
                placed.slots,
                policy,
                device,
                self.transfers,
                placed.on_miss,
                self.cpu_experts,
                costs,
            )
            for li, placed in enumerate(self.plan.layers)
        ]
        for cache, placed in zip(caches, self.plan.layers, strict=True):
            cache.warm_start(range(placed.slots))
        return caches

    def _serve_layers(self, prefetch: bool) -> None:
        """Each layer takes its experts from its cache; with prefetch, warns the next layer's."""
        layers = self.model.layers
        for li, layer in enumerate(layers):
            moe = layer.block_sparse_moe
            moe.expert_source = self.caches[li].experts_for
            if prefetch and li + 1 < len(layers) and self.plan.layers[li + 1].on_miss == COPY:
                self._prefetch_after_demand(
                    moe, self.caches[li], layers[li + 1].block_sparse_moe, self.caches[li + 1]
                )

    @staticmethod
    def _prefetch_after_demand(
        moe: SparseMoE, cache: LayerExpertCache, next_moe: SparseMoE, next_cache: LayerExpertCache
    ) -> None:
        """The paper's speculative loading: layer l+1's router on layer l's MoE input. The hook
        before routing only keeps the input; the prediction runs once layer l's misses are queued."""
        held: list[Tensor] = []

        def keep_input(x: Tensor) -> None:
            held.clear()
            if x.shape[0] == 1:  # prefill touches most experts anyway; predict for decode steps
                held.append(x)

        def predict() -> None:
            if not held:
                return
            with torch.no_grad():
                _, chosen, _ = next_moe.route(held.pop())
            next_cache.prefetch(sorted(set(chosen.flatten().tolist())))

        moe.prefetch_hook = keep_input
        cache.after_demand = predict

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
            "cpu_computed": total.cpu_computed,
            "cpu_layers": self.plan.cpu_layers,
            "stall_s": round(total.stall_s, 4),
            "plan": self.plan.describe(),
            "layers": [
                {
                    "resident": cache.slots.resident,
                    "hits": cache.activity.hits,
                    "misses": cache.activity.misses,
                    "prefetched": cache.activity.prefetched,
                    "on_miss": cache.on_miss,
                }
                for cache in self.caches
            ],
        }

    def close(self) -> None:
        self.transfers.close()
        if self.cpu_experts is not None:
            self.cpu_experts.close()
        self.store.close()


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
