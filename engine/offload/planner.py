"""How many experts each layer keeps on the compute device and what a miss does there: from a memory
budget and the host's bandwidths, or the user's k. Works from a loaded model or from sizes alone.

The placement and its cost model are `placement`'s (pure); this module turns a model (or a
config.json and a scheme, for `mixtral-chat plan`) into the sizes they need, and checks the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import MixtralChatError, OutOfMemoryError
from mixtral_chat.engine.model import Mixtral
from mixtral_chat.engine.offload.placement import (
    COPY,
    CPU,
    ON_MISS,
    SPLIT,
    Bandwidths,
    LayerPlacement,
    MissCosts,
    decode_seconds,
    disk_read_share,
    host_reserve_bytes,
    min_slots,
    mixed_layers,
    place_layers,
)
from mixtral_chat.engine.units import format_bytes
from mixtral_chat.quant.blob import ExpertBlobLayout, module_tensors
from mixtral_chat.quant.int8 import int8_matrix_bytes
from mixtral_chat.quant.schemes import get_scheme

AUTO = "auto"


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs to know of a model, in bytes."""

    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int  # one expert's blob
    resident_bytes: int  # everything but the experts and the KV cache, on the device
    kv_cache_bytes: int
    dense_read_bytes: int  # of the resident bytes, those a decode step reads (not the embedding table)
    # One expert's blob on the device that each copy lands in before it is packed into its slot,
    # where the device computes another form than the store's (int4 on CUDA); else 0.
    staging_bytes: int = 0


@dataclass(frozen=True)
class OffloadPlan:
    layers: tuple[LayerPlacement, ...]
    expert_bytes: int
    resident_bytes: int  # everything but the experts
    kv_cache_bytes: int
    budget_bytes: int | None
    store: str  # "ram" or "disk"
    num_experts: int
    top_k: int
    bandwidths: Bandwidths | None = None
    decode_bound_s: float | None = None  # predicted seconds per token (None: no bandwidths)
    staging_bytes: int = 0  # ModelSizes.staging_bytes
    disk_share: float = 0.0  # of a miss's bytes, those read from the disk (a store on disk)
    page_cache_bytes: int | None = None  # the RAM the disk store's pages were counted on

    @property
    def experts_per_layer(self) -> int:
        """The most slots any layer has (every layer's, in a uniform plan)."""
        return max(layer.slots for layer in self.layers)

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) == 1

    @property
    def total_slots(self) -> int:
        return sum(layer.slots for layer in self.layers)

    @property
    def cache_bytes(self) -> int:
        """The slots of all layers."""
        return self.total_slots * self.expert_bytes

    @property
    def cpu_layers(self) -> int:
        return sum(layer.on_miss == CPU for layer in self.layers)

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.kv_cache_bytes + self.cache_bytes + self.staging_bytes

    @property
    def store_bytes(self) -> int:
        return len(self.layers) * self.num_experts * self.expert_bytes

    def describe(self) -> str:
        budget = f"budget {format_bytes(self.budget_bytes)}: " if self.budget_bytes else ""
        if self.uniform and self.layers[0].on_miss == COPY:
            slots = f"{self.experts_per_layer} experts/layer"
        else:
            counts = sorted({layer.slots for layer in self.layers})
            span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            slots = f"{span} experts/layer ({self.total_slots} slots)"
        text = (
            f"{budget}resident weights {format_bytes(self.resident_bytes)} + KV cache "
            f"{format_bytes(self.kv_cache_bytes)} + {slots} x {format_bytes(self.expert_bytes)} = "
            f"{format_bytes(self.cache_bytes)} expert cache; other experts in {self.store}"
        )
        if self.cpu_layers:
            text += f"; misses computed on the CPU in {self.cpu_layers} of {len(self.layers)} layers"
        split = sum(layer.on_miss == SPLIT for layer in self.layers)
        if split:
            text += f"; misses shared between the link and the CPU in {split} of {len(self.layers)} layers"
        if self.store == "disk":
            text += f"; {self.disk_share:.0%} of each miss read from the disk"
            if 0 < self.disk_share < 1:
                text += " (the page cache holds the rest)"
        # The predicted bound depends on measured bandwidths: `summary_lines` says it, with them.
        return text

    def summary_lines(self) -> list[str]:
        """What goes where, as `mixtral-chat plan` and `ask --stats` print it: memory per device,
        the predicted bound with the bandwidths assumed, then one row per layer."""
        host = "host RAM" if self.store == "ram" else "disk"
        lines = [
            f"device: {format_bytes(self.device_bytes)} "
            f"(resident weights {format_bytes(self.resident_bytes)}, "
            f"KV cache {format_bytes(self.kv_cache_bytes)}, {self.total_slots} expert slots "
            f"{format_bytes(self.cache_bytes)}"
            + (f", a staging blob {format_bytes(self.staging_bytes)}" if self.staging_bytes else "")
            + ")"
            + (f" of a {format_bytes(self.budget_bytes)} budget" if self.budget_bytes else ""),
            f"{host}: {format_bytes(self.store_bytes)} "
            f"(every expert, {format_bytes(self.expert_bytes)} each)",
        ]
        if self.decode_bound_s and self.bandwidths:
            lines.append(
                f"decode bound: {self.decode_bound_s * 1e3:.1f} ms/token = "
                f"{1 / self.decode_bound_s:.1f} tok/s "
                f"(hit rate estimated as slots/experts; {self.bandwidths.describe()})"
            )
        if self.store == "disk":
            cache = (
                f"{format_bytes(self.page_cache_bytes)} of RAM left to cache the "
                f"{format_bytes(self.store_bytes)} store"
                if self.page_cache_bytes is not None
                else "RAM left for the page cache not known"
            )
            lines.append(f"disk reads: {self.disk_share:.0%} of each missed expert ({cache})")
        lines.append("layer  gpu slots  on a miss  cpu-computed  copied  from disk")
        for row in self.to_json()["layers"]:
            lines.append(
                f"{row['layer']:>5}  {row['gpu_slots']:>9}  {row['on_miss']:>9}  {row['cpu_experts']:>12}  "
                f"{row['copied_experts']:>6}  {row['disk_experts']:>9}"
            )
        return lines

    def to_json(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "expert_bytes": self.expert_bytes,
            "resident_bytes": self.resident_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "cache_bytes": self.cache_bytes,
            "staging_bytes": self.staging_bytes,
            "device_bytes": self.device_bytes,
            "store": self.store,
            "store_bytes": self.store_bytes,
            "decode_bound_s": self.decode_bound_s,
            "bandwidths": self.bandwidths.to_json() if self.bandwidths else None,
            "disk_read_share": self.disk_share,
            "page_cache_bytes": self.page_cache_bytes,
            "layers": [
                {
                    "layer": index,
                    "gpu_slots": layer.slots,
                    "on_miss": layer.on_miss,
                    # SPLIT: the experts off the device go either way, step by step
                    "cpu_experts": self.num_experts - layer.slots if layer.on_miss != COPY else 0,
                    "copied_experts": self.num_experts - layer.slots if layer.on_miss != CPU else 0,
                    "disk_experts": self.num_experts - layer.slots if self.store == "disk" else 0,
                }
                for index, layer in enumerate(self.layers)
            ],
        }


def sizes_of_model(
    model: Mixtral, context_length: int, expert_bytes: int | None = None, staging: bool = False
) -> ModelSizes:
    """The sizes of a loaded model. `expert_bytes`: one expert's blob size, when the experts are
    not loaded (`StoredExperts`). `staging`: slots are packed from a staging blob
    (`offloader.needs_staging`)."""
    args = model.args
    if expert_bytes is None:
        expert_bytes = ExpertBlobLayout.of_module(model.layers[0].block_sparse_moe.experts[0]).nbytes
    expert_ids = {
        id(t) for layer in model.layers for e in layer.block_sparse_moe.experts for _, t in module_tensors(e)
    }
    resident = sum(  # the KV cache is counted on its own, also when it already exists
        t.numel() * t.element_size()
        for name, t in _distinct(module_tensors(model))
        if id(t) not in expert_ids and ".kv_cache." not in name
    )
    embedding = sum(t.numel() * t.element_size() for _, t in module_tensors(model.embed_tokens))
    return ModelSizes(
        num_layers=args.num_hidden_layers,
        num_experts=args.num_local_experts,
        top_k=args.num_experts_per_tok,
        expert_bytes=expert_bytes,
        resident_bytes=resident,
        kv_cache_bytes=args.kv_cache_bytes(context_length, model.dtype.itemsize),
        dense_read_bytes=resident - embedding,  # a token reads one row of it
        staging_bytes=expert_bytes if staging else 0,
    )


def _distinct(named: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """Each tensor's memory once: tied embeddings load as two Parameters over one storage."""
    seen: set[tuple[int, int]] = set()
    kept = []
    for name, tensor in named:
        key = (tensor.data_ptr(), tensor.numel()) if tensor.data_ptr() else (id(tensor), 0)
        if key not in seen:
            seen.add(key)
            kept.append((name, tensor))
    return kept


def sizes_of_config(
    args: ModelArgs,
    scheme_name: str,
    context_length: int,
    dtype_bytes: int = 2,
    vocab_int8: bool = False,
    staging: bool = False,
) -> ModelSizes:
    """The sizes of a model quantized with `scheme_name` ("none" for float), from its shape alone:
    attention and experts in the scheme's parts, every other weight (and the KV cache) in a float
    of `dtype_bytes`, as `mixtral-chat quantize` stores them and the engine loads them; with
    `vocab_int8` the embeddings and lm_head in int8 (quant/int8.py), as a 4-bit model on a CPU;
    with `staging` one expert's staging blob on the device (int4 slots on CUDA)."""
    float_dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    scheme = get_scheme(scheme_name, float_dtype=float_dtype if scheme_name == "none" else None)
    expert_bytes = ExpertBlobLayout.build(scheme, args.hidden_size, args.intermediate_size).nbytes
    d, h = args.hidden_size, args.head_dim
    projections = [
        (args.num_attention_heads * h, d),  # q_proj
        (args.num_key_value_heads * h, d),  # k_proj
        (args.num_key_value_heads * h, d),  # v_proj
        (d, args.num_attention_heads * h),  # o_proj
    ]
    attention = sum(spec.nbytes for shape in projections for spec in scheme.part_specs(*shape))
    per_layer_float = (2 * d + args.num_local_experts * d) * dtype_bytes  # two norms, the router
    vocab_matrix = int8_matrix_bytes(args.vocab_size, d) if vocab_int8 else args.vocab_size * d * dtype_bytes
    embedding = vocab_matrix
    head = 0 if args.tie_word_embeddings else vocab_matrix
    resident = args.num_hidden_layers * (attention + per_layer_float) + embedding + head + d * dtype_bytes
    return ModelSizes(
        num_layers=args.num_hidden_layers,
        num_experts=args.num_local_experts,
        top_k=args.num_experts_per_tok,
        expert_bytes=expert_bytes,
        resident_bytes=resident,
        kv_cache_bytes=args.kv_cache_bytes(context_length, dtype_bytes),
        dense_read_bytes=resident - embedding,
        staging_bytes=expert_bytes if staging else 0,
    )


def plan_offload(
    model: Mixtral,
    context_length: int,
    *,
    budget_bytes: int | None = None,
    experts_per_layer: int | None = None,
    store: str = "ram",
    expert_bytes: int | None = None,
    on_miss: str = COPY,
    bandwidths: Bandwidths | None = None,
    layers: Sequence[LayerPlacement] | None = None,
    staging: bool = False,
    available_ram_bytes: int | None = None,
) -> OffloadPlan:
    """`plan_placement` for a loaded model. `available_ram_bytes`: RAM free now (the resident
    weights already taken, on a CPU device, where they count in the plan's host RAM)."""
    sizes = sizes_of_model(model, context_length, expert_bytes, staging)
    host_ram = available_ram_bytes
    if host_ram is not None and _on_the_cpu(bandwidths):
        host_ram += sizes.resident_bytes
    return plan_placement(
        sizes,
        budget_bytes=budget_bytes,
        experts_per_layer=experts_per_layer,
        store=store,
        on_miss=on_miss,
        bandwidths=bandwidths,
        layers=layers,
        host_ram_bytes=host_ram,
    )


def _on_the_cpu(bandwidths: Bandwidths | None) -> bool:
    """The compute device is the CPU (no host-to-device link): its plan lives in host RAM."""
    return bandwidths is None or bandwidths.h2d_gbps is None


def plan_placement(
    sizes: ModelSizes,
    *,
    budget_bytes: int | None = None,
    experts_per_layer: int | None = None,
    store: str = "ram",
    on_miss: str = COPY,
    bandwidths: Bandwidths | None = None,
    layers: Sequence[LayerPlacement] | None = None,
    host_ram_bytes: int | None = None,
) -> OffloadPlan:
    """Choose each layer's slots and miss handling from a budget (or take the user's k, or an
    explicit placement per layer), with the numbers and the predicted decode bound.

    host_ram_bytes: the host RAM for what the plan keeps there (everything, on a CPU device) and
    the page cache of a store on disk; unknown (None), every miss of a disk store is read from the
    disk.

    on_miss: COPY (every layer copies its misses; the cache as it always was), CPU (every layer
    computes its misses on the CPU, a layer may have no slots), SPLIT (a step's misses shared
    between the link and the CPU), or AUTO: the cost model picks the placement with the lowest
    predicted bound. AUTO without a host-to-device link (the device is the CPU) is CPU, with no
    slots unless `experts_per_layer` asks for them: there a "copy" is a memcpy from the store
    before the same GEMV, and a slot holds again what the page cache holds of a store on disk,
    from the same RAM (the model's disk reads, (store - cache) / store of the misses, come out
    the same with or without slots), so every expert computes in place from the store.
    """
    if on_miss not in (*ON_MISS, AUTO):
        raise MixtralChatError(f"unknown miss handling {on_miss!r} (copy, cpu or auto)")
    L, E, K = sizes.num_layers, sizes.num_experts, sizes.top_k
    store_bytes = L * E * sizes.expert_bytes
    # The page cache left beside the plan's host memory; next to a GPU the choice of slots does
    # not change it, so the placement is chosen with the share it ends with.
    page_cache = None
    if store == "disk" and host_ram_bytes is not None:
        page_cache = max(0, host_ram_bytes - host_reserve_bytes(store_bytes))
    share = _disk_share(store, store_bytes, page_cache)
    costs = MissCosts.of(sizes.expert_bytes, bandwidths, share) if bandwidths else None
    if on_miss == AUTO and _on_the_cpu(bandwidths):
        on_miss = CPU
        if layers is None and experts_per_layer is None:
            if budget_bytes is not None:
                _check_fixed_part_fits(sizes, budget_bytes)
            experts_per_layer = 0
    if layers is not None:
        chosen = list(layers)
        if len(chosen) != L:
            raise MixtralChatError(f"a placement needs {L} layers, got {len(chosen)}")
    elif experts_per_layer is not None:
        chosen = _uniform(experts_per_layer, L, E, K, on_miss, costs)
    else:
        if budget_bytes is None:
            raise ValueError("give a memory budget or experts per layer")
        chosen = _from_budget(sizes, budget_bytes, on_miss, costs)
    for layer in chosen:
        _check_layer(layer, E, K)
    if page_cache is not None and _on_the_cpu(bandwidths):  # the slots and the rest take RAM first
        slots = sum(layer.slots for layer in chosen) * sizes.expert_bytes
        host_bytes = sizes.resident_bytes + sizes.kv_cache_bytes + sizes.staging_bytes + slots
        page_cache = max(0, page_cache - host_bytes)
        share = _disk_share(store, store_bytes, page_cache)
        costs = MissCosts.of(sizes.expert_bytes, bandwidths, share) if bandwidths else None
    dense_s = sizes.dense_read_bytes / (bandwidths.device_gbps * 1e9) if bandwidths else 0.0
    bound = decode_seconds(chosen, E, K, costs, dense_s) if costs else None
    return OffloadPlan(
        layers=tuple(chosen),
        expert_bytes=sizes.expert_bytes,
        resident_bytes=sizes.resident_bytes,
        kv_cache_bytes=sizes.kv_cache_bytes,
        budget_bytes=budget_bytes,
        store=store,
        num_experts=E,
        top_k=K,
        bandwidths=bandwidths,
        decode_bound_s=bound,
        staging_bytes=sizes.staging_bytes,
        disk_share=share,
        page_cache_bytes=page_cache,
    )


def _disk_share(store: str, store_bytes: int, page_cache: int | None) -> float:
    if store != "disk":
        return 0.0
    return 1.0 if page_cache is None else disk_read_share(store_bytes, page_cache)


def _uniform(k: int, L: int, E: int, K: int, on_miss: str, costs: MissCosts | None) -> list[LayerPlacement]:
    if on_miss == AUTO:
        assert costs is not None
        on_miss = costs.cheaper_on_miss() if k >= K else CPU
    return [LayerPlacement(int(k), on_miss) for _ in range(L)]


def _from_budget(
    sizes: ModelSizes, budget_bytes: int, on_miss: str, costs: MissCosts | None
) -> list[LayerPlacement]:
    L, E, K = sizes.num_layers, sizes.num_experts, sizes.top_k
    base = _check_fixed_part_fits(sizes, budget_bytes)
    total = max(0, budget_bytes - base) // sizes.expert_bytes
    if on_miss == AUTO:
        assert costs is not None
        candidates = [
            place_layers(total, L, E, K, CPU),
            place_layers(total, L, E, K, COPY),
            place_layers(total, L, E, K, SPLIT),
            mixed_layers(total, L, E, K),
        ]
        dense = 0.0  # the same in every candidate
        return min(
            (c for c in candidates if c is not None),
            key=lambda c: decode_seconds(c, E, K, costs, dense),
        )
    placed = place_layers(total, L, E, K, on_miss)
    if placed is None:
        need = base + L * K * sizes.expert_bytes
        raise OutOfMemoryError(
            f"a memory budget of {budget_bytes / 1e9:.2f} GB is too small: {_fixed_part(sizes)} + {K} "
            f"experts/layer need {need / 1e9:.2f} GB (computing misses on the CPU needs no slots)"
        )
    return placed


def _check_fixed_part_fits(sizes: ModelSizes, budget_bytes: int) -> int:
    """The bytes the plan keeps on the device before any expert; OutOfMemoryError past the budget."""
    base = sizes.resident_bytes + sizes.kv_cache_bytes + sizes.staging_bytes
    if budget_bytes < base:
        raise OutOfMemoryError(
            f"a memory budget of {budget_bytes / 1e9:.2f} GB is too small: {_fixed_part(sizes)} "
            f"need {base / 1e9:.2f} GB before any expert"
        )
    return base


def _fixed_part(sizes: ModelSizes) -> str:
    """What the device holds before any slot, as the errors name it."""
    text = (
        f"resident weights {sizes.resident_bytes / 1e9:.2f} GB + KV cache {sizes.kv_cache_bytes / 1e9:.2f} GB"
    )
    return text + (f" + staging blob {sizes.staging_bytes / 1e9:.2f} GB" if sizes.staging_bytes else "")


def _check_layer(layer: LayerPlacement, E: int, K: int) -> None:
    if layer.on_miss not in ON_MISS:
        raise MixtralChatError(f"unknown miss handling {layer.on_miss!r} (copy or cpu)")
    low = min_slots(layer.on_miss, K)
    if not low <= layer.slots <= E:
        why = {COPY: "experts per token", SPLIT: "one to copy into", CPU: "all on the CPU"}[layer.on_miss]
        raise MixtralChatError(f"experts per layer must be between {low} ({why}) and {E}, got {layer.slots}")
