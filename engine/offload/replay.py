"""Force a model's decode-step routing from a recorded routing trace (timing runs, random weights).

A model with random weights routes unlike a trained one (no temporal locality, no popular
experts), so an expert cache measured on it says nothing. Replaying a trace recorded on a real
model (`--trace-routing FILE`, JSON lines `{"token_idx", "layer", "experts", "gating_probs"}`)
makes every decode step use the experts the trained model chose, with its gating weights, while
the compute and the transfers stay the real ones.

- Decode steps (one token: the MoE input is [1, D]) take layer l's experts from the trace's
  token t, t cycling through the trace's tokens; weights are the trace's gating probabilities
  renormalised over the chosen experts (what `SparseMoE.route` does with the router's).
- Prefill (more than one token) keeps the model's own router.
- The speculative prefetcher calls layer l+1's `route` while layer l runs. With random weights
  that prediction would be noise, and answering it from the trace would be a perfect oracle;
  neither is the trained model's behaviour. So a call of `route` from outside the layer's own
  forward gets a *simulated predictor*: each expert of the upcoming token is predicted correctly
  with probability `prediction_recall`, otherwise a wrong expert is predicted in its place
  (seeded, so runs are repeatable). `prediction_recall=None` leaves those calls to the real router.

`install_routing_replay` overrides `route` and `forward` as instance attributes of each layer's
`block_sparse_moe`; `RoutingReplay.uninstall()` restores the class methods. The native attention
block and the one-call decode stack, which route with the gate's weight in C, see the override
(`SparseMoE.routes_with_gate`) and leave routing to it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mixtral_chat.engine.offload.trace import (
    RoutingTraceData,
    RoutingTraceError,
    read_routing_trace,
    routing_record,
)

if TYPE_CHECKING:
    from torch import Tensor

    from mixtral_chat.engine.model import Mixtral, SparseMoE

# Speculative loading (the next layer's router applied to the current hidden state) predicts
# "above 80-90%" of Mixtral's experts by secondary accounts of Eliseev & Mazur (arXiv 2312.17238);
# 0.85 is that range's middle, an assumption, not a measurement of this engine.
DEFAULT_PREDICTION_RECALL = 0.85

# Parameters of `synthetic_routing_trace`, calibrated (see its docstring) so that an LRU cache
# replaying it hits as often as on recorded Mixtral-8x7B-Instruct decoding.
SYNTHETIC_POPULARITY_ALPHA = 8.0
SYNTHETIC_STICKINESS = 0.16


def synthetic_routing_trace(
    num_layers: int,
    num_experts: int = 8,
    top_k: int = 2,
    num_tokens: int = 256,
    seed: int = 0,
    popularity_alpha: float = SYNTHETIC_POPULARITY_ALPHA,
    stickiness: float = SYNTHETIC_STICKINESS,
) -> list[dict]:
    """Routing records with a trained MoE's two kinds of locality, for when no recorded trace exists.

    Per layer, experts have a fixed popularity drawn from Dirichlet(popularity_alpha) (some
    experts are used more than others). Per token and per gate position i, with probability
    `stickiness` the expert at position i of the previous token is kept (consecutive tokens reuse
    experts), otherwise an expert not yet chosen is drawn by popularity.

    Calibration (8 experts, top-2, LRU via slots.SlotMap, 8 x 3000 tokens): alpha 8 and
    stickiness 0.16 give LRU hit rates 37.6% / 49.0% / 60.1% / 81.3% at 2 / 3 / 4 / 6 experts
    per layer, against 35-40 / 47-51 / 60-62 / 81% reported for recorded Mixtral-8x7B-Instruct
    decoding, and the first choice repeats for 28% of consecutive tokens (Mixtral paper: 14% at
    layer 0, 20-28% deeper). Gating probabilities are a softmax of N(0, 1.5^2) logits over all
    experts, the largest K assigned to the chosen experts in gate order.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    rng = random.Random(seed)
    records = []
    popularity = []
    for _ in range(num_layers):
        weights = [rng.gammavariate(popularity_alpha, 1.0) for _ in range(num_experts)]
        total = sum(weights)
        popularity.append([w / total for w in weights])
    previous: list[list[int] | None] = [None] * num_layers
    for token in range(num_tokens):
        for layer in range(num_layers):
            chosen: list[int] = []
            prev = previous[layer]
            for position in range(top_k):
                if prev is not None and prev[position] not in chosen and rng.random() < stickiness:
                    chosen.append(prev[position])
                    continue
                weights = [0.0 if e in chosen else popularity[layer][e] for e in range(num_experts)]
                chosen.append(rng.choices(range(num_experts), weights)[0])
            previous[layer] = chosen
            logits = [rng.gauss(0.0, 1.5) for _ in range(num_experts)]
            peak = max(logits)
            exps = sorted((math.exp(v - peak) for v in logits), reverse=True)
            total = sum(exps)
            records.append(
                routing_record(token, layer, chosen, [round(exps[i] / total, 6) for i in range(top_k)])
            )
    return records


class RoutingReplay:
    """Installed on a model: decode steps route as the trace says (see the module docstring)."""

    def __init__(
        self,
        model: Mixtral,
        trace: RoutingTraceData,
        *,
        prediction_recall: float | None = DEFAULT_PREDICTION_RECALL,
        wrap_layers: bool = False,
        seed: int = 0,
    ) -> None:
        import torch

        args = model.args
        layers = len(model.layers)
        if trace.top_k != args.num_experts_per_tok:
            raise RoutingTraceError(
                f"the trace chooses {trace.top_k} experts per token, the model {args.num_experts_per_tok}"
            )
        if trace.max_expert >= args.num_local_experts:
            raise RoutingTraceError(
                f"the trace uses expert {trace.max_expert}, the model has {args.num_local_experts} per layer"
            )
        if trace.num_layers < layers and not wrap_layers:
            raise RoutingTraceError(
                f"the trace has {trace.num_layers} layers, the model {layers} "
                "(wrap_layers=True reuses trace layer l % trace layers for model layer l)"
            )
        if prediction_recall is not None and not 0.0 <= prediction_recall <= 1.0:
            raise ValueError(f"prediction_recall must be in [0, 1] or None, got {prediction_recall}")
        self.model = model
        self.trace = trace
        self.prediction_recall = prediction_recall
        self.step = 0  # decode steps replayed so far; token step % trace.num_tokens is next
        self._active_layer: int | None = None  # the layer whose own forward is running
        T, E, K = trace.num_tokens, args.num_local_experts, args.num_experts_per_tok
        source = [[t[layer % trace.num_layers] for layer in range(layers)] for t in trace.experts]
        probs = [[t[layer % trace.num_layers] for layer in range(layers)] for t in trace.probs]
        device = model.device
        # Tables on the compute device, so a step indexes views and copies nothing from the host.
        chosen = torch.tensor(source, dtype=torch.long)  # [T, L, K]
        p = torch.tensor(probs, dtype=torch.float32)  # [T, L, K]
        # Router logits whose softmax gives back the trace's probabilities: log p for the chosen
        # experts, the remaining mass shared by the others (a RoutingTrace then records them).
        rest = ((1.0 - p.sum(-1, keepdim=True)).clamp(min=1e-6) / max(E - K, 1)).log()  # [T, L, 1]
        logits = rest.expand(T, layers, E).clone()  # [T, L, E]
        logits.scatter_(-1, chosen, p.log())
        self._chosen = chosen.to(device)
        self._weights = (p / p.sum(-1, keepdim=True)).to(device)  # renormalised over the K, [T, L, K]
        self._logits = logits.to(device=device, dtype=model.dtype)
        # The simulated predictor's answers, fixed in advance (seeded): one per token and layer.
        rng = random.Random(seed)
        predicted = []
        for t in range(T):
            row = []
            for layer in range(layers):
                true = source[t][layer]
                wrong = [e for e in range(E) if e not in true]
                rng.shuffle(wrong)
                guess = []
                for e in true:
                    missed = prediction_recall is not None and rng.random() >= prediction_recall
                    # A missed expert is replaced by a wrong one (if the layer has any to spare).
                    guess.append(wrong.pop() if missed and wrong else e)
                row.append(guess)
            predicted.append(row)
        self._predicted = torch.tensor(predicted, dtype=torch.long).to(device)  # [T, L, K]
        self._installed: list[SparseMoE] = []

    def install(self) -> RoutingReplay:
        for index, layer in enumerate(self.model.layers):
            moe = layer.block_sparse_moe
            moe.route = self._route(moe, index)  # instance attributes shadow the methods
            moe.forward = self._forward(moe, index)
            self._installed.append(moe)
        return self

    def uninstall(self) -> None:
        for moe in self._installed:
            for name in ("route", "forward"):
                moe.__dict__.pop(name, None)
        self._installed.clear()

    def _forward(self, moe: SparseMoE, index: int) -> Callable[..., Tensor]:
        forward = type(moe).forward.__get__(moe)

        def replayed_forward(x: Tensor, routed: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
            outer, self._active_layer = self._active_layer, index
            try:
                return forward(x, routed)
            finally:
                self._active_layer = outer

        return replayed_forward

    def _route(self, moe: SparseMoE, index: int) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
        route = type(moe).route.__get__(moe)
        last_layer = len(self.model.layers) - 1

        def replayed_route(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            if x.shape[0] != 1:
                return route(x)  # prefill: the model's own router
            t = self.step % self.trace.num_tokens
            if self._active_layer != index:
                # Called from elsewhere (the prefetcher, during the layer before): a prediction.
                if self.prediction_recall is None:
                    return route(x)
                chosen = self._predicted[t, index][None]  # [1, K]
                return self._logits[t, index][None], chosen, self._weights[t, index][None]
            if index == last_layer:
                self.step += 1
            return self._logits[t, index][None], self._chosen[t, index][None], self._weights[t, index][None]

        return replayed_route


def install_routing_replay(
    model: Mixtral,
    trace_path: str | Path,
    *,
    prediction_recall: float | None = DEFAULT_PREDICTION_RECALL,
    wrap_layers: bool = False,
    seed: int = 0,
) -> RoutingReplay:
    """Make the model's decode steps route as the trace at `trace_path` says; returns the replay."""
    trace = read_routing_trace(trace_path)
    replay = RoutingReplay(
        model, trace, prediction_recall=prediction_recall, wrap_layers=wrap_layers, seed=seed
    )
    return replay.install()
