"""How often consecutive tokens get the same experts, as in the Mixtral paper's Table 5: the
locality an expert cache lives on. Counted from a routing trace (`bench routing`) or live from a
model's decode steps (the TUI's cache panel).

Legend: for each layer and each decode token after the first,
- first repeat: the token's first-choice expert is the previous token's first choice
  (chance: 1 / experts);
- pair repeat: the token's set of chosen experts is the previous token's set
  (chance: 1 / C(experts, top_k), for top-2 of 8: 1/28 = 3.6%).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from mixtral_chat.engine.model import Mixtral
    from mixtral_chat.engine.offload.trace import Trace


@dataclass
class LayerRepeats:
    """One layer's counts; `previous` is the last token's choice (gate order: first choice first)."""

    tokens: int = 0  # tokens compared with the one before them
    first: int = 0
    pair: int = 0
    previous: tuple[int, ...] | None = field(default=None, repr=False)

    def add(self, experts: Sequence[int]) -> None:
        current = tuple(int(expert) for expert in experts)
        if self.previous is not None and current:
            self.tokens += 1
            self.first += current[0] == self.previous[0]
            self.pair += set(current) == set(self.previous)
        self.previous = current

    @property
    def first_rate(self) -> float | None:
        return self.first / self.tokens if self.tokens else None

    @property
    def pair_rate(self) -> float | None:
        return self.pair / self.tokens if self.tokens else None


def chance_rates(num_experts: int, top_k: int) -> tuple[float, float]:
    """(first repeat, pair repeat) if each token chose its experts uniformly at random."""
    return 1 / num_experts, 1 / math.comb(num_experts, top_k)


def trace_repeats(trace: Trace) -> dict[int, LayerRepeats]:
    """Per layer of a trace (`load_trace`): its decode steps in token order, counted."""
    layers: dict[int, LayerRepeats] = {}
    for layer, steps in sorted(trace.items()):
        counts = layers[layer] = LayerRepeats()
        for experts in steps:
            counts.add(experts)
    return layers


def overall(layers: Sequence[LayerRepeats]) -> tuple[float | None, float | None]:
    """(first, pair) repeat rates over all layers' comparisons."""
    tokens = sum(layer.tokens for layer in layers)
    if not tokens:
        return None, None
    return sum(layer.first for layer in layers) / tokens, sum(layer.pair for layer in layers) / tokens


class LiveRepeats:
    """Counts a running model's decode steps (prefill is skipped). It takes the layers' routing
    hook and calls the one it found there first (a routing trace keeps working)."""

    def __init__(self, model: Mixtral) -> None:
        self.model = model
        args = model.args
        self.num_experts = args.num_local_experts
        self.top_k = args.num_experts_per_tok
        self.layers = [LayerRepeats() for _ in model.layers]
        for index, layer in enumerate(model.layers):
            moe = layer.block_sparse_moe
            moe.routing_hook = self._hook(self.layers[index], moe.routing_hook)

    @staticmethod
    def _hook(
        counts: LayerRepeats, earlier: Callable[[Tensor, Tensor, Tensor], None] | None
    ) -> Callable[[Tensor, Tensor, Tensor], None]:
        def hook(router_logits: Tensor, chosen: Tensor, weights: Tensor) -> None:
            if earlier is not None:
                earlier(router_logits, chosen, weights)
            if chosen.shape[0] == 1:  # chosen: [T, top_k]; one row is a decode step
                counts.add(chosen[0].tolist())

        return hook

    def new_sequence(self) -> None:
        """A new answer: its first token is not compared with the last answer's last one."""
        for counts in self.layers:
            counts.previous = None

    def summary(self) -> dict[str, object]:
        first, pair = overall(self.layers)
        chance_first, chance_pair = chance_rates(self.num_experts, self.top_k)
        return {
            "first": first,
            "pair": pair,
            "chance_first": chance_first,
            "chance_pair": chance_pair,
            "tokens": max((counts.tokens for counts in self.layers), default=0),
            "per_layer_first": [counts.first_rate for counts in self.layers],
        }
