"""The offloader: a model's experts in a store, served to its layers through per-layer caches.

Each layer follows its `placement.LayerPlacement`: k slots on the device, and misses copied into
them or computed on the CPU from the store (`cpu_experts`).

The store always holds the experts' stored (or CPU-loaded) form. Where the device computes another
form (int4 on CUDA: tinygemm's layout, or ATen's on a CPU without the native kernel), the slots
hold the device's form and each load is a copy into one staging blob on the device and a pack into
the slot (`cache.LayerExpertCache`, `ExpertBlobLayout.repack`).

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
from mixtral_chat.quant.int4 import Int4Linear, int4_backend
from mixtral_chat.quant.int4_forms import NATIVE


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
        self._check_plan_staging(stored, streamed)
        if stored is not None:
            self.store, template = self._store_from_files(stored), stored.template
        elif streamed is not None:
            self.store, template = streamed.complete()
        else:
            self.store, template = self._store_from_loaded_experts(store_path)
        self._leave_meta_shells()
        self.cpu_experts = self._cpu_experts(cpu_template or self._cpu_form(template, stored))
        template, self.staging = self._slot_form(template, stored)
        self.transfers = Transfers(model.device, simulate_link_gbps)
        self.caches = self._warm_caches(template, policy)
        self._serve_layers(prefetch)

    def _check_plan_staging(self, stored: StoredExperts | None, streamed: StreamedExperts | None) -> None:
        """Before anything moves: the plan counts a staging blob exactly where the slots use one."""
        repack = needs_staging(self.model, stored, streamed)
        if bool(self.plan.staging_bytes) != repack:
            raise ValueError(
                f"the plan {'counts' if self.plan.staging_bytes else 'lacks'} a staging blob that these "
                f"slots {'need' if repack else 'do not use'} (plan_offload(staging=needs_staging(...)))"
            )

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
        """The store's template where it is the CPU form too; else the stored experts' CPU form."""
        if stored is None:
            return template  # experts loaded (on the CPU) then packed
        if self.model.device.type == "cpu" and not stored.repacked:
            return template
        return stored.cpu_template()

    def _slot_form(
        self, template: nn.Module, stored: StoredExperts | None
    ) -> tuple[nn.Module, Tensor | None]:
        """The slots' template, and the staging blob on the device that loads land in where the
        device computes a form other than views of the store's blobs (else None: slots bind views)."""
        device = self.model.device
        if not slots_repacked(template, stored, device):
            return template, None
        if stored is None:  # else the template already is the device's form
            template = self._device_form(template)
        return template, torch.empty(self.store.layout.nbytes, dtype=torch.uint8, device=device)

    def _device_form(self, template: nn.Module) -> nn.Module:
        """A meta shell of the device's runtime form of the store's experts: one expert's blob bound
        to the store's template, moved to the device (`Int4Linear` repacks), emptied."""
        blob = torch.empty(self.store.layout.nbytes, dtype=torch.uint8)
        self.store.copy_into(0, 0, blob, 0, blob.numel(), False)  # any expert: only the form matters
        module = copy.deepcopy(template)
        self.store.layout.bind(module, blob)
        return module.to(self.model.device).to("meta")

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
        plan = self.plan
        costs = None
        if plan.bandwidths:
            costs = MissCosts.of(self.store.layout.nbytes, plan.bandwidths, plan.disk_share)
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
                self.staging,
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
            total.add(cache.counters())
        return total

    def stats(self) -> dict:
        total = self.counters()
        return {
            "experts_per_layer": self.plan.experts_per_layer,
            "store": self.plan.store,
            "store_from_files": self.from_files,
            "slots_repacked": self.staging is not None,  # packed for the device after each copy
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
            "host_wait_s": round(total.host_wait_s, 4),
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


def needs_staging(model: Mixtral, stored: StoredExperts | None, streamed: StreamedExperts | None) -> bool:
    """Whether an offloader made from these (on the model's device, where the non-experts already
    are) packs its slots from a staging blob: what `plan_offload(staging=)` must be told."""
    if stored is not None:
        template = stored.template  # the experts' form as the store gets them
    elif streamed is not None:
        template = streamed.complete()[1]
    else:
        template = model.layers[0].block_sparse_moe.experts[0]
    return slots_repacked(template, stored, model.device)


def slots_repacked(template: nn.Module, stored: StoredExperts | None, device: torch.device) -> bool:
    """Whether slots on `device` hold another form than the store's blobs, so that each copy lands
    in a staging blob there and is packed into its slot (the planner counts that blob)."""
    return stored.repacked if stored is not None else _loaded_int4_needs_repack(template, device)


def _loaded_int4_needs_repack(template: nn.Module, device: torch.device) -> bool:
    """Experts loaded on the CPU hold the CPU's int4 form (their stored parts on the native
    kernel): another device, or another backend here, computes another form, packed from those
    parts after each copy. ATen's CPU form is no stored form to pack from: a clear error."""
    int4 = [module for module in template.modules() if isinstance(module, Int4Linear)]
    backend = int4_backend(device)
    if not int4 or (device.type == "cpu" and all(module.backend == backend for module in int4)):
        return False
    if any(module.backend != NATIVE for module in int4):
        raise MixtralChatError(
            f"int4 experts loaded in ATen's CPU form cannot be offloaded to {device.type}: quantize the "
            "model (mixtral-chat quantize) so that they stream from its files"
        )
    return True


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
