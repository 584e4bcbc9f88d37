"""Which experts sit in which cache slots: the bookkeeping of the expert cache, without data.

The engine's expert caches (offload/cache.py) and the cache simulator (offload/simulate.py,
`mixtral-chat bench cache`) share these classes, so a replayed trace measures exactly the policy
the engine runs.
Pure Python: no torch.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


class EvictionPolicy:
    """Chooses which resident expert leaves when a slot is needed. One instance per layer."""

    name = "base"

    def touch(self, expert: int) -> None:
        """The expert was used (a hit, or a load for this step)."""

    def inserted(self, expert: int) -> None:
        """The expert was loaded into a slot (by a miss or a prefetch)."""
        self.touch(expert)

    def evicted(self, expert: int) -> None:
        """The expert left its slot."""

    def victim(self, resident: Iterable[int], protected: set[int]) -> int | None:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used leaves first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def touch(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def evicted(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victim(self, resident: Iterable[int], protected: set[int]) -> int | None:
        resident = set(resident)
        for expert in self._order:
            if expert in resident and expert not in protected:
                return expert
        return next(iter(sorted(resident - protected)), None)


class LFUPolicy(EvictionPolicy):
    """Least frequently used leaves first (counts survive eviction); ties go to the older use."""

    name = "lfu"

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self._last: dict[int, int] = {}
        self._clock = 0

    def touch(self, expert: int) -> None:
        self._clock += 1
        self._counts[expert] += 1
        self._last[expert] = self._clock

    def inserted(self, expert: int) -> None:
        # A load is not a use: a prefetch that is never used must not look popular.
        self._last[expert] = self._clock

    def victim(self, resident: Iterable[int], protected: set[int]) -> int | None:
        candidates = [e for e in resident if e not in protected]
        if not candidates:
            return None
        return min(candidates, key=lambda e: (self._counts[e], self._last.get(e, 0), e))


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r} (choose from {', '.join(POLICIES)})") from None


@dataclass
class CacheCounters:
    hits: int = 0  # needed and already resident (prefetched ones included)
    misses: int = 0  # needed, not resident: the step waits for a load
    prefetch_hits: int = 0  # needed, resident only because a prefetch brought it
    prefetches: int = 0  # loads started by prefetch
    prefetch_wasted: int = 0  # prefetched, then evicted before any use
    prefetch_cancelled: int = 0  # wrong predictions dropped before their copy started
    predicted: int = 0  # experts the prefetcher predicted for a step
    predicted_needed: int = 0  # ...of which the step then needed
    needed: int = 0  # experts needed by steps that had a prediction
    loads: int = 0  # all loads: misses + prefetches
    cpu_computed: int = 0  # misses computed on the CPU from the host store (no load)
    bytes_moved: int = 0
    stall_s: float = 0.0  # time the compute waited for loads (the GPU's on CUDA: stall_clock.py)
    host_wait_s: float = 0.0  # time the host thread waited for them (stall_s on the CPU)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Share of the needed experts that the prefetcher had predicted."""
        return self.predicted_needed / self.needed if self.needed else 0.0

    def add(self, other: CacheCounters) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Access:
    expert: int
    slot: int
    hit: bool  # resident before this step
    load: bool  # a load into `slot` must run (a miss)


@dataclass
class SlotMap:
    """One layer's k slots: expert -> slot, an eviction policy, counters.

    `access` is called once per step with every expert that step needs, so a miss never evicts an
    expert the same step needs.
    """

    capacity: int
    policy: EvictionPolicy = field(default_factory=LRUPolicy)
    counters: CacheCounters = field(default_factory=CacheCounters)
    expert_bytes: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError("an expert cache cannot have fewer than zero slots")
        self.slot_of: dict[int, int] = {}
        self._free = list(range(self.capacity - 1, -1, -1))
        self._prefetched_unused: set[int] = set()
        self._predicted: set[int] | None = None
        self.last_needed: list[int] = []  # the last step's experts: speculation never evicts them

    @property
    def resident(self) -> list[int]:
        return sorted(self.slot_of)

    def _take_slot(self, protected: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        victim = self.policy.victim(self.slot_of, protected)
        if victim is None:
            return None
        slot = self.slot_of.pop(victim)
        self.policy.evicted(victim)
        if victim in self._prefetched_unused:
            self._prefetched_unused.discard(victim)
            self.counters.prefetch_wasted += 1
        return slot

    def access(self, needed: Sequence[int]) -> list[Access]:
        """Make every needed expert resident; returns one Access per needed expert, in order."""
        if len(set(needed)) > self.capacity:
            raise ValueError(
                f"a step needs {len(set(needed))} experts but the layer has {self.capacity} slots"
            )
        if self._predicted is not None:
            self.counters.needed += len(needed)
            self.counters.predicted_needed += len(self._predicted.intersection(needed))
            self._predicted = None
        protected = set(needed)
        self.last_needed = list(needed)
        accesses = []
        for expert in needed:
            if expert in self.slot_of:
                self.counters.hits += 1
                if expert in self._prefetched_unused:
                    self._prefetched_unused.discard(expert)
                    self.counters.prefetch_hits += 1
                self.policy.touch(expert)
                accesses.append(Access(expert, self.slot_of[expert], hit=True, load=False))
                continue
            slot = self._take_slot(protected)
            assert slot is not None, "capacity >= needed experts guarantees a slot"
            self.slot_of[expert] = slot
            self.policy.inserted(expert)
            self.policy.touch(expert)
            self.counters.misses += 1
            self.counters.loads += 1
            self.counters.bytes_moved += self.expert_bytes
            accesses.append(Access(expert, slot, hit=False, load=True))
        return accesses

    def lookup(self, needed: Sequence[int]) -> list[int | None]:
        """A layer whose misses run on the CPU: its slots never change. The slot of each needed
        expert, None for a miss (counted as computed on the CPU, nothing loaded)."""
        found: list[int | None] = []
        for expert in needed:
            slot = self.slot_of.get(expert)
            if slot is None:
                self.counters.misses += 1
                self.counters.cpu_computed += 1
            else:
                self.counters.hits += 1
                self.policy.touch(expert)
            found.append(slot)
        return found

    def start_warm(self, experts: Sequence[int]) -> None:
        """Fill slots before the first step (no counters, no prediction)."""
        for expert in experts[: len(self._free)]:
            self.slot_of[expert] = self._free.pop()
            self.policy.inserted(expert)

    def cancel_prefetch(self, expert: int) -> None:
        """A prefetched expert whose copy never started: its slot is free again."""
        if expert not in self._prefetched_unused:
            raise ValueError(f"expert {expert} has no prefetch in flight")
        self._prefetched_unused.discard(expert)
        self._free.append(self.slot_of.pop(expert))
        self.policy.evicted(expert)
        self.counters.prefetches -= 1
        self.counters.loads -= 1
        self.counters.bytes_moved -= self.expert_bytes
        self.counters.prefetch_cancelled += 1

    def prefetched_unused(self) -> set[int]:
        return set(self._prefetched_unused)

    def prefetch(self, predicted: Sequence[int], keep: Iterable[int] = ()) -> list[Access]:
        """Start loading predicted experts that are not resident; never evicts `keep`, them, or
        the experts of the layer's last step (the likeliest to be needed again)."""
        self._predicted = set(predicted)
        self.counters.predicted += len(self._predicted)
        protected = set(predicted) | set(keep) | set(self.last_needed)
        loads = []
        for expert in predicted:
            if expert in self.slot_of:
                continue
            slot = self._take_slot(protected)
            if slot is None:
                break
            self.slot_of[expert] = slot
            self.policy.inserted(expert)
            self._prefetched_unused.add(expert)
            self.counters.prefetches += 1
            self.counters.loads += 1
            self.counters.bytes_moved += self.expert_bytes
            loads.append(Access(expert, slot, hit=False, load=True))
        return loads
