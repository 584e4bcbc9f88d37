"""Where each layer's experts run: GPU slots, copied misses or CPU-computed misses, and the cost model
that chooses (pure Python: no torch, so `mixtral-chat plan` works from a config.json alone).

Per MoE layer an expert that sits in a device slot runs there. A miss is either copied over the
link into a slot (then it runs on the device, and the slot keeps it for later steps) or computed on
the CPU from the host store (the [1, D] hidden state goes to the CPU and back).

The choice is per layer (static), and in a SPLIT layer per step: every expert has the same size and
the bandwidths do not change between tokens, so comparing one miss against another gives the same
answer every time; what changes from step to step is how many misses there are, and with two the
link and the CPU can each take one at the same time. A CPU layer keeps its slots fixed (as
llama.cpp's `--n-cpu-moe` and Fiddler do), so its CPU experts run while the device computes the
resident ones.

Hit rates are estimated as slots / experts (routing spread evenly): the planner has no trace. A
trace makes it better (`mixtral-chat bench cache` measures LRU), but the estimate keeps the bound
honest rather than flattering: LRU does somewhat better than k/E on real Mixtral routing.

A store on disk (RAM short of the experts) reads each miss from its files first: from the page
cache where the kernel kept it, else from the disk. The share that comes from the disk is what the
RAM left over cannot cache (`disk_read_share`, routing spread evenly again); those reads come one
after another whichever way the miss then runs, so a step also takes at least its misses' reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

COPY = "copy"  # a miss is copied into a slot, then runs on the device
CPU = "cpu"  # a miss runs on the CPU from the host store; the layer's slots stay fixed
# A step's misses are shared: some copied into slots (the link busy) while the CPU computes the
# others at the same time, as many each way as makes the step shortest (`copies_for`).
SPLIT = "split"
ON_MISS = (COPY, CPU, SPLIT)

# The hidden state to the CPU and back, and the CPU's call overhead, per CPU-computed expert.
CPU_CALL_OVERHEAD_S = 50e-6


@dataclass(frozen=True)
class Bandwidths:
    """The rates the cost model assumes, in GB/s, each with where it came from."""

    h2d_gbps: float | None  # host -> device copies (pinned); None: the device is the CPU
    cpu_gbps: float  # CPU memory read bandwidth: how fast the CPU computes a 4-bit expert
    device_gbps: float  # the device's memory bandwidth: how fast it computes one
    source: str = "assumed"  # "measured", "flags", "assumed", or a mix ("measured + flags")
    disk_gbps: float | None = None  # reading the store's files past the page cache; None: no disk store

    def describe(self) -> str:
        h2d = f"H2D {self.h2d_gbps:.1f} GB/s, " if self.h2d_gbps else ""
        device = f"device memory {self.device_gbps:.1f} GB/s"
        disk = f", disk {self.disk_gbps:.2f} GB/s" if self.disk_gbps else ""
        return f"{h2d}CPU memory {self.cpu_gbps:.1f} GB/s, {device}{disk} ({self.source})"

    def to_json(self) -> dict:
        return {
            "h2d_gbps": self.h2d_gbps,
            "cpu_gbps": self.cpu_gbps,
            "device_gbps": self.device_gbps,
            "disk_gbps": self.disk_gbps,
            "source": self.source,
        }


@dataclass(frozen=True)
class LayerPlacement:
    slots: int  # experts this layer keeps on the device
    on_miss: str  # COPY or CPU


@dataclass(frozen=True)
class MissCosts:
    """Seconds per expert for each way of running it."""

    device_s: float  # a resident expert on the device
    copy_s: float  # copying a missed expert into a slot (then device_s on top)
    cpu_s: float  # computing a missed expert on the CPU
    read_s: float = 0.0  # reading a missed expert's share past the page cache from a disk store, first

    @classmethod
    def of(cls, expert_bytes: int, bandwidths: Bandwidths, disk_share: float = 0.0) -> MissCosts:
        """`disk_share`: of a missed expert's bytes, those read from the disk (`disk_read_share`);
        0 for a store in RAM, or where the disk's rate is not known."""
        device_s = expert_bytes / (bandwidths.device_gbps * 1e9)
        if bandwidths.h2d_gbps is None:  # a CPU device: the "copy" is a host memcpy
            copy_s = expert_bytes / (bandwidths.cpu_gbps * 1e9)
        else:
            copy_s = expert_bytes / (bandwidths.h2d_gbps * 1e9)
        # On a CPU device a CPU-computed expert is the device's own call: no hidden state to move.
        overhead = CPU_CALL_OVERHEAD_S if bandwidths.h2d_gbps is not None else 0.0
        cpu_s = expert_bytes / (bandwidths.cpu_gbps * 1e9) + overhead
        read_s = disk_share * expert_bytes / (bandwidths.disk_gbps * 1e9) if bandwidths.disk_gbps else 0.0
        return cls(device_s, copy_s, cpu_s, read_s)

    def cheaper_on_miss(self) -> str:
        """What a miss should do: computing on the CPU against copying then computing (a read
        from the disk comes first either way)."""
        return CPU if self.cpu_s < self.copy_s + self.device_s else COPY


def expected_hit_rate(slots: int, num_experts: int) -> float:
    return min(1.0, slots / num_experts)


def disk_read_share(store_bytes: int, cacheable_bytes: int) -> float:
    """Of the misses of a store on disk, the share read from the disk: what `cacheable_bytes` of
    page cache cannot hold of the store (experts used evenly)."""
    if store_bytes <= 0:
        return 0.0
    return 1.0 - min(1.0, max(0, cacheable_bytes) / store_bytes)


def host_reserve_bytes(store_bytes: int) -> int:
    """RAM kept for the rest of the process and the system beside an expert store: 1 GB or 5% of
    the store, whichever is more."""
    return max(1_000_000_000, store_bytes // 20)


def step_seconds(hits: int, copies: int, on_cpu: int, costs: MissCosts) -> float:
    """One step of one layer: the device runs its hits and the copied misses (after their reads and
    copies), while the CPU runs its share (after their reads); the disk reads one miss at a time."""
    device = hits * costs.device_s + copies * (costs.read_s + costs.copy_s + costs.device_s)
    cpu = on_cpu * (costs.read_s + costs.cpu_s)
    return max(device, cpu, (copies + on_cpu) * costs.read_s)


def copies_for(misses: int, hits: int, costs: MissCosts, room: int | None = None) -> int:
    """How many of a step's misses a SPLIT layer copies (the rest run on the CPU, concurrently):
    the count that makes the step shortest, fewest copies on a tie; at most `room` (free slots)."""
    most = misses if room is None else max(0, min(misses, room))
    return min(range(most + 1), key=lambda j: (step_seconds(hits, j, misses - j, costs), j))


def layer_seconds(placement: LayerPlacement, num_experts: int, top_k: int, costs: MissCosts) -> float:
    """Expected time of one layer's experts per decode token: each of the top_k experts a hit with
    probability slots / experts, independently, and each step timed by `step_seconds`."""
    hit = expected_hit_rate(placement.slots, num_experts)
    total = 0.0
    for misses in range(top_k + 1):
        chance = math.comb(top_k, misses) * (1 - hit) ** misses * hit ** (top_k - misses)
        hits = top_k - misses
        if placement.on_miss == COPY:
            copies = misses
        elif placement.on_miss == CPU:
            copies = 0
        else:
            copies = copies_for(misses, hits, costs)
        total += chance * step_seconds(hits, copies, misses - copies, costs)
    return total


def spread_slots(total: int, num_layers: int, num_experts: int) -> list[int]:
    """`total` slots over the layers as evenly as they go (earlier layers get the extra ones)."""
    total = min(total, num_layers * num_experts)
    base, extra = divmod(total, num_layers)
    return [base + (1 if layer < extra else 0) for layer in range(num_layers)]


def place_layers(
    total_slots: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    on_miss: str,
) -> list[LayerPlacement] | None:
    """Slots and miss handling per layer for `total_slots` slots on the device.

    on_miss CPU: the slots spread evenly (a layer may get none: all its experts on the CPU);
    SPLIT: spread evenly too, at least one per layer. COPY: every layer needs top_k slots to copy
    into; the same k everywhere, as the cache always had. None: there are not that many slots.
    """
    if on_miss in (CPU, SPLIT):
        spread = spread_slots(total_slots, num_layers, num_experts)
        if min(spread) < min_slots(on_miss, top_k):
            return None
        return [LayerPlacement(slots, on_miss) for slots in spread]
    k = min(num_experts, total_slots // num_layers)
    if k >= min_slots(on_miss, top_k):
        return [LayerPlacement(k, on_miss) for _ in range(num_layers)]
    return None


def min_slots(on_miss: str, top_k: int) -> int:
    """COPY needs a slot for every expert of a step; SPLIT one to copy into; CPU none."""
    return {COPY: top_k, SPLIT: 1, CPU: 0}[on_miss]


def mixed_layers(total_slots: int, num_layers: int, num_experts: int, top_k: int) -> list[LayerPlacement]:
    """Copy where misses are cheaper copied but the slots are short: as many layers as the slots
    allow get top_k slots and copy, the others compute every expert on the CPU."""
    copying = min(num_layers, total_slots // top_k)
    return [
        LayerPlacement(top_k, COPY) if layer < copying else LayerPlacement(0, CPU)
        for layer in range(num_layers)
    ]


def decode_seconds(
    layers: list[LayerPlacement], num_experts: int, top_k: int, costs: MissCosts, dense_s: float
) -> float:
    """The predicted decode bound per token: the dense part plus every layer's experts."""
    return dense_s + sum(layer_seconds(layer, num_experts, top_k, costs) for layer in layers)
