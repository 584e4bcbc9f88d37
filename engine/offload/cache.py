"""One layer's expert cache on the compute device.

k preallocated slot buffers, each with a slot module whose tensors are views into it: loading
expert e into slot s is one copy, no allocation per token. Where the device's runtime form is not
views of the stored blob (int4 on CUDA: tinygemm's layout), each slot module holds its own runtime
tensors instead, and a load is a copy into one staging blob on the device followed by a pack into
the slot (`ExpertBlobLayout.repack`, on the copy thread and stream). Which expert sits where is
`slots.SlotMap`'s business; the copies are `transfers.Transfers`'.

A layer whose misses run on the CPU (`placement.CPU`) keeps its slots fixed (maybe none) and
serves every other expert from `cpu_experts.CpuExperts`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mixtral_chat.engine.offload.cpu_experts import CpuExperts
from mixtral_chat.engine.offload.placement import COPY, CPU, SPLIT, MissCosts, copies_for
from mixtral_chat.engine.offload.slots import Access, CacheCounters, SlotMap, make_policy
from mixtral_chat.engine.offload.stall_clock import StallClock
from mixtral_chat.engine.offload.store import ExpertStore
from mixtral_chat.engine.offload.transfers import DEMAND, PREFETCH, Transfer, Transfers


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
        on_miss: str = COPY,
        cpu_experts: CpuExperts | None = None,
        costs: MissCosts | None = None,
        staging: torch.Tensor | None = None,
    ) -> None:
        """`costs`: what a SPLIT layer weighs to share a step's misses (None: copy them all).
        `staging`: a blob on the device, shared by every layer (the copies run one at a time), where
        the slots repack from; `template` is then a meta shell of the device's runtime form."""
        if on_miss in (CPU, SPLIT) and cpu_experts is None:
            raise ValueError("a layer that computes its misses on the CPU needs the CPU experts")
        self.layer = layer
        self.on_miss = on_miss
        self.cpu_experts = cpu_experts
        self.costs = costs
        self.store = store
        self.transfers = transfers
        self.slots = SlotMap(capacity, make_policy(policy), CacheCounters(), store.layout.nbytes)
        self.stall = StallClock(device)
        self.staging = staging
        self.buffers: list[torch.Tensor] = []
        self.modules: list[nn.Module] = []
        for _ in range(capacity):
            module = copy.deepcopy(template)  # a meta shell: copying it costs nothing
            if staging is None:
                self.buffers.append(torch.empty(store.layout.nbytes, dtype=torch.uint8, device=device))
                store.layout.bind(module, self.buffers[-1])
            else:
                module.to_empty(device=device)  # its own runtime tensors, filled by each load
            self.modules.append(module)
        self.pending: dict[int, Transfer] = {}  # slot -> transfer in flight
        self.activity = LayerActivity()
        # Called once this step's own misses are queued, before waiting for them: the next layer's
        # speculative prefetch goes here, so it queues behind this layer's demand.
        self.after_demand: Callable[[], None] | None = None

    def counters(self) -> CacheCounters:
        """The slots' counters with the waits for copies so far (`stall.StallClock`)."""
        counters = self.slots.counters
        counters.stall_s, counters.host_wait_s = self.stall.device_s, self.stall.host_s
        return counters

    def warm_start(self, expert_ids: Sequence[int]) -> None:
        self.slots.start_warm(list(expert_ids))
        for expert, slot in self.slots.slot_of.items():
            self._load(expert, slot)

    def _load(self, expert: int, slot: int, priority: int = DEMAND) -> None:
        replaced = self.pending.get(slot)
        if replaced is not None:  # its expert was evicted before its copy finished
            self.transfers.cancel(replaced)
        if self.staging is None:
            out, then = self.buffers[slot], None
        else:
            pack = functools.partial(self.store.layout.repack, self.modules[slot], self.staging)
            out, then = self.staging, pack
        self.pending[slot] = self.transfers.submit(
            self.store, self.layer, expert, out, priority=priority, then=then
        )

    def experts_for(self, expert_ids: Sequence[int]) -> list[nn.Module]:
        if self.on_miss == CPU:
            return self._slots_or_cpu(expert_ids)
        if self.on_miss == COPY:
            self._cancel_wrong_prefetches(expert_ids)
            return self._copy_in(expert_ids)
        # SPLIT: the step's misses beyond what the cost model copies run on the CPU meanwhile: the
        # copies are started, not waited for; a copied expert waits for its copy when it runs,
        # which `model.run_experts` does after the CPU's share (placement.step_seconds' max).
        assert self.cpu_experts is not None
        on_cpu = self._misses_for_the_cpu(expert_ids)
        copied = [e for e in expert_ids if e not in on_cpu]
        by_expert = {}
        for access in self._start_copies(copied):
            module = self.modules[access.slot]
            if access.slot in self.pending:
                module = AfterCopy(module, functools.partial(self._wait_for, [access]))
            by_expert[access.expert] = module
        self.activity.misses += sorted(on_cpu)
        return [
            by_expert[e] if e in by_expert else self.cpu_experts.module(self.layer, e) for e in expert_ids
        ]

    def _misses_for_the_cpu(self, expert_ids: Sequence[int]) -> set[int]:
        """SPLIT: which of this step's misses run on the CPU while the others are copied."""
        misses = [e for e in expert_ids if e not in self.slots.slot_of]
        hits = len(expert_ids) - len(misses)
        room = self.slots.capacity - hits
        copies = copies_for(len(misses), hits, self.costs, room) if self.costs else min(len(misses), room)
        on_cpu = set(misses[copies:])
        self.slots.counters.misses += len(on_cpu)
        self.slots.counters.cpu_computed += len(on_cpu)
        return on_cpu

    def _copy_in(self, expert_ids: Sequence[int]) -> list[nn.Module]:
        """Make every expert resident (copying the misses), wait for them: their slot modules."""
        accesses = self._start_copies(expert_ids)
        self._wait_for(accesses)
        return [self.modules[a.slot] for a in accesses]

    def _start_copies(self, expert_ids: Sequence[int]) -> list[Access]:
        """Give every expert a slot and start copying the misses into theirs."""
        accesses = self.slots.access(expert_ids)
        self.activity.hits = [a.expert for a in accesses if a.hit]
        self.activity.misses = [a.expert for a in accesses if not a.hit]
        for access in accesses:
            if access.load:
                self._load(access.expert, access.slot)
        if self.after_demand is not None:
            self.after_demand()
        return accesses

    def _wait_for(self, accesses: Sequence[Access]) -> None:
        """Until these slots' copies (this step's or an earlier prefetch's) have landed."""
        transfers = [t for a in accesses if (t := self.pending.pop(a.slot, None)) is not None]
        if transfers:
            with self.stall.waiting():
                for transfer in transfers:
                    self.transfers.wait(transfer)

    def _slots_or_cpu(self, expert_ids: Sequence[int]) -> list[nn.Module]:
        """Fixed slots: a resident expert runs in its slot, any other on the CPU."""
        assert self.cpu_experts is not None
        found = self.slots.lookup(expert_ids)
        self.activity.hits = [e for e, slot in zip(expert_ids, found, strict=True) if slot is not None]
        self.activity.misses = [e for e, slot in zip(expert_ids, found, strict=True) if slot is None]
        if self.pending:  # the warm start's copies
            with self.stall.waiting():
                for transfer in self.pending.values():
                    self.transfers.wait(transfer)
            self.pending.clear()
        return [
            self.modules[slot] if slot is not None else self.cpu_experts.module(self.layer, e)
            for e, slot in zip(expert_ids, found, strict=True)
        ]

    def _cancel_wrong_prefetches(self, needed: Sequence[int]) -> None:
        """Drop predicted experts the step does not need unless their copy has completed.

        Otherwise wrong guesses hold the single copy thread while the step waits for its misses
        (measured: prefetch at 85% recall made decode 19-28% slower without this).
        """
        for expert in self.slots.prefetched_unused() - set(needed):
            slot = self.slots.slot_of[expert]
            transfer = self.pending.get(slot)
            if transfer is None or transfer.completed:
                continue  # already copied: keep it, it may be used later
            del self.pending[slot]
            # Not started: never runs. Running: ends at its next chunk. Either way the slot is
            # free, and a later copy into it runs after this one on the one copy thread.
            self.transfers.cancel(transfer)
            self.slots.cancel_prefetch(expert)
            # The grid must not show it as loaded ahead: it never arrives.
            self.activity.prefetched = [e for e in self.activity.prefetched if e != expert]

    def prefetch(self, expert_ids: Sequence[int]) -> None:
        if self.on_miss != COPY:
            return  # fixed slots, or a step's own split: nothing to load ahead
        loads = self.slots.prefetch(expert_ids)
        self.activity.prefetched = [a.expert for a in loads]
        for access in loads:
            self._load(access.expert, access.slot, PREFETCH)


class AfterCopy(nn.Module):
    """A slot whose copy may still be in flight: it waits for the copy when it runs
    (`model.run_experts` runs these last, after the CPU's share of the step)."""

    waits_for_copy = True

    def __init__(self, slot: nn.Module, wait: Callable[[], None]) -> None:
        super().__init__()
        self.slot = slot
        self._wait = wait

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._wait()
        return self.slot(x)
