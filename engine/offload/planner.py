"""How many experts per layer the compute device holds: from a memory budget, or the user's k."""

from __future__ import annotations

from dataclasses import dataclass

from mixtral_chat.engine.errors import MixtralChatError, OutOfMemoryError
from mixtral_chat.engine.model import Mixtral
from mixtral_chat.quant.blob import ExpertBlobLayout, module_tensors


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
        expert_bytes = ExpertBlobLayout.of_module(model.layers[0].block_sparse_moe.experts[0]).nbytes
    expert_ids = {
        id(t) for layer in model.layers for e in layer.block_sparse_moe.experts for _, t in module_tensors(e)
    }
    resident = sum(  # the KV cache is counted on its own, also when it already exists
        t.numel() * t.element_size()
        for name, t in module_tensors(model)
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
