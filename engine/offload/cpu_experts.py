"""Missed experts computed on the CPU, straight from the host store: the hidden state goes to the CPU
and back (16 KB for Mixtral's [1, 4096] in bf16) instead of the expert's ~99 MB coming over the link.

Every store holds an expert's blob in host memory: a RAM store's buffer, or a file store's mapping
of its file (the page cache). A CPU module bound to views of the blob computes in place, no copy,
where the blob is mostly in memory; a file store's blob mostly on disk is read into one scratch
buffer first (SparseMoE runs its experts one after the other, so one buffer serves every call):
a read of the whole blob ran at 1.6x the speed of the page faults of computing on the mapping
(docs/BENCHMARKS.md, `bench/bench_ram_short.py`). The module class and blob layout are those of
the device's slots, so on a CPU-only host a CPU-computed expert runs exactly the code a slot runs
(the suite checks bit-identical output for every placement).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mixtral_chat.engine.offload.store import ExpertStore

# Computed on the mapping when at least this share of the blob is in memory, else read first.
# Break-even of the two with the rates measured under a memory limit (docs/BENCHMARKS.md): page
# faults ~1.9 GB/s, a pread ~3 GB/s from the disk and ~7.5 from the page cache, the GEMV ~27 GB/s
# (bench_ram_short.py, bench_mapped_expert.py).
IN_PLACE_FROM = 0.6


class CpuExperts:
    """Serves any (layer, expert) of a store as a module that computes on the CPU."""

    def __init__(self, store: ExpertStore, template: nn.Module) -> None:
        """`template`: a meta shell of the CPU form of an expert, laid out as the store's blobs."""
        self.store = store
        self.template = template
        self._bound: dict[tuple[int, int], nn.Module] = {}  # one module per expert, made on first use
        self._scratch: Tensor | None = None  # a blob read from the disk, one at a time
        self._scratch_module: nn.Module | None = None
        self._scratch_holds: tuple[int, int] | None = None

    def module(self, layer: int, expert: int) -> nn.Module:
        """The expert as a step's CPU-computed miss. Its blob is not asked for ahead: a
        posix_fadvise WILLNEED on a thread, tried, evicted pages still wanted under a memory limit,
        and decode ran 3-18% slower (medians; docs/BENCHMARKS.md, 2026-12-07 late)."""
        return CpuExpert(self, layer, expert)

    def bound(self, layer: int, expert: int) -> nn.Module:
        """The CPU module computing this expert, its tensors views of the blob's bytes (or of the
        scratch buffer they were read into)."""
        key = (layer, expert)
        if self._scratch_holds == key or self.store.resident_share(layer, expert) < IN_PLACE_FROM:
            return self._read_into_scratch(key)
        if key not in self._bound:
            module = copy.deepcopy(self.template)  # a meta shell: copying it costs nothing
            self.store.layout.bind(module, self.store.blob(layer, expert))
            self._bound[key] = module
        return self._bound[key]

    def _read_into_scratch(self, key: tuple[int, int]) -> nn.Module:
        if self._scratch is None or self._scratch_module is None:
            self._scratch = torch.empty(self.store.layout.nbytes, dtype=torch.uint8)
            self._scratch_module = copy.deepcopy(self.template)
            self.store.layout.bind(self._scratch_module, self._scratch)
        if self._scratch_holds != key:
            self._scratch_holds = None  # a failed read leaves nothing that looks whole
            self.store.copy_into(*key, self._scratch, 0, self.store.layout.nbytes, False)
            self._scratch_holds = key
        return self._scratch_module

    def close(self) -> None:
        self._bound.clear()
        self._scratch = self._scratch_module = self._scratch_holds = None


class CpuExpert(nn.Module):
    """One expert as SparseMoE calls it, computed on the CPU whatever device the input is on."""

    runs_on_cpu = True

    def __init__(self, experts: CpuExperts, layer: int, expert: int) -> None:
        super().__init__()
        self._experts = experts
        self.layer = layer
        self.expert = expert

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_on_host(x.to("cpu")).to(x.device)  # no-ops when the device is the CPU

    def forward_on_host(self, x: Tensor) -> Tensor:
        """x on the CPU -> the output on the CPU (`model.run_experts` runs these after queuing the
        device's experts, so both compute at once)."""
        return self._experts.bound(self.layer, self.expert)(x)
