"""A decode token's layers replayed as CUDA graphs (issue 14, defect 8).

Eager decode on a GPU is launch-bound: each op costs a few microseconds of host time whatever its
size. Captured once, each layer takes two graph launches:
- its attention half (the input norm, q|k|v, rope, the cache row, attention, o, the residual, the
  post-attention norm and, where the layer routes with its gate, the routing);
- its chosen experts' weighted sum, where every chosen expert is on the device (resident, or in
  a slot whose copy has landed). Which experts run is read on the host in between (one sync per
  layer, what the expert cache needs); a miss computed on the CPU, or one whose copy is still in
  flight, keeps the layer's experts eager.

A graph replays fixed shapes at fixed addresses, so each layer reads its input from a static
buffer, the position from one static tensor shared by all layers, and writes its outputs (the
residual stream, its norm, the route, the experts' sum) into static buffers; attention covers a
fixed number of cache positions, a bucket (a power of two of at least BUCKET_MIN, at most the
cache), masked to those written so far. A body runs eagerly at its first use and is captured
at its second (CAPTURE_AT_USE): per (layer, bucket) for attention, per (layer, expert modules,
their places in the route) for experts (a slot module keeps its tensors while its contents
change, so a slot's graph serves every expert copied in). A pair of experts a layer chooses
once in an answer never costs a capture.

Without capture (a CPU, or `capture=False`) the same bodies run as they are, so the suite runs
this path on the CPU. Graphs are made anew when anything they read was rebound (`Bindings`: a
moved or requantized layer, a replaced module, a new cache, a replayed route), and a failed
capture turns that kind of graph off for good, with its reason in `state()`: its bodies then run
eagerly, with the same results.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixtral_chat.engine.bindings import Bindings
from mixtral_chat.engine.model import Mixtral

BUCKET_MIN = 256  # cache positions; attention over fewer costs no less on a GPU
ATTENTION, EXPERTS = "attention", "experts"  # the two kinds of graph
# A capture costs a warm-up run, the capture and its instantiation; bodies used once are not worth it.
CAPTURE_AT_USE = 2


def bucket_for(end: int, max_seq_len: int, smallest: int = BUCKET_MIN) -> int:
    """Cache positions a token at position end - 1 attends over: the smallest power of two that
    holds `end`, at least `smallest`, at most the cache."""
    bucket = smallest
    while bucket < end:
        bucket *= 2
    return min(bucket, max_seq_len)


@dataclass
class LayerBuffers:
    """One layer's static tensors, read and written by its graphs."""

    x: Tensor  # [1, 1, D]: the layer's input
    h: Tensor  # [1, 1, D]: x + attention, the residual stream after attention
    normed: Tensor  # [1, 1, D]: post_attention_layernorm(h), the experts' input
    route: tuple[Tensor, Tensor, Tensor] | None  # router logits [1, E], chosen [1, K], weights [1, K]
    weights: Tensor  # [1, K] float32: the route's weights, as the experts' graphs read them
    experts_out: Tensor  # [1, D]: the chosen experts' weighted sum


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    # An experts' graph's own modules (its key holds their ids) and their tensors as captured.
    modules: tuple[nn.Module, ...] = ()
    made_for: Bindings | None = None

    def reads(self, modules: Sequence[nn.Module]) -> bool:
        """Still the graph of these very modules, with nothing under them rebound."""
        return (
            all(map(operator.is_, self.modules, modules))
            and self.made_for is not None
            and self.made_for.hold()
        )


class DecodeGraphs:
    """Every layer of one decode token through its graphs (see the module)."""

    def __init__(self, model: Mixtral, capture: bool, smallest_bucket: int = BUCKET_MIN) -> None:
        self.model = model
        self.capture = {ATTENTION: capture, EXPERTS: capture}
        self.smallest_bucket = smallest_bucket
        self.failures: dict[str, str] = {}  # kind -> why its capture was turned off
        self.captures = 0  # capture attempts so far (each costs a warm-up run and the capture)
        self.capture_s = 0.0  # host time they took
        self.frozen = False  # True: no new captures, bodies without a graph run eagerly
        self._graphs: dict[tuple, Captured] = {}
        self._uses: dict[tuple, int] = {}  # key -> runs without a graph so far
        self._made_for: Bindings | None = None
        self._pool = None
        self._side: torch.cuda.Stream | None = None  # the warm-up runs' stream
        self._position: Tensor | None = None  # [1] long: the token's position, every layer's
        self._key_positions: Tensor | None = None  # [max_seq_len] long: 0, 1, 2, ...
        self._buffers: list[LayerBuffers] = []

    def state(self) -> str:
        """What the stats say: on (how many graphs of each kind), or eager, and why."""
        if not any(self.capture.values()) and not self.failures:
            return "eager (no capture)"
        parts = [
            f"{kind} eager (capture failed: {self.failures[kind]})"
            if kind in self.failures
            else f"{sum(key[0] == kind for key in self._graphs)} {kind} graphs"
            for kind in (ATTENTION, EXPERTS)
        ]
        took = f" (capturing took {self.capture_s:.2f} s)" if self.captures else ""
        return ("on: " if any(self.capture.values()) else "eager: ") + ", ".join(parts) + took

    def current(self) -> bool:
        """The static tensors and graphs made so far still read the model as it is (nothing they
        read was rebound since)."""
        return self._made_for is not None and self._made_for.hold()

    def forward(self, x: Tensor, input_pos: Tensor, end: int) -> Tensor:
        """One token x [1, 1, D] at input_pos [1] (end = its position + 1) through every layer."""
        self._hold()
        assert self._position is not None
        self._position.copy_(input_pos)
        bucket = bucket_for(end, self.model.max_seq_len, self.smallest_bucket)
        for index, layer in enumerate(self.model.layers):
            buffers = self._buffers[index]
            buffers.x.copy_(x)
            self._replay((ATTENTION, index, bucket), functools.partial(self._attention, index, bucket))
            # The experts: graphed by `_experts` through SparseMoE.graphed_experts where they can be.
            x = buffers.h + layer.block_sparse_moe(buffers.normed, buffers.route)
        return x

    def _hold(self) -> None:
        """Static tensors and graphs for the model as it is now: made anew if anything was rebound."""
        if self.current():
            return
        model = self.model
        self._graphs.clear()
        self._uses.clear()
        self._pool = None
        like = model.norm.weight
        D, E = model.args.hidden_size, model.args.num_local_experts
        self._position = torch.zeros(1, dtype=torch.long, device=like.device)
        self._key_positions = torch.arange(model.max_seq_len, device=like.device)
        self._buffers = []
        for index, layer in enumerate(model.layers):
            moe = layer.block_sparse_moe
            K = moe.top_k
            route = None
            if moe.routes_with_gate:  # a replayed route reads the host per token: it stays outside
                route = (
                    torch.zeros(1, E, dtype=like.dtype, device=like.device),
                    torch.zeros(1, K, dtype=torch.long, device=like.device),
                    torch.zeros(1, K, dtype=torch.float32, device=like.device),
                )
            static = [torch.zeros(1, 1, D, dtype=like.dtype, device=like.device) for _ in range(3)]
            weights = route[2] if route is not None else torch.zeros(1, K, device=like.device)
            experts_out = torch.zeros(1, D, dtype=like.dtype, device=like.device)
            self._buffers.append(LayerBuffers(*static, route, weights, experts_out))
            moe.graphed_experts = functools.partial(self._experts, index)
        # What the attention graphs read, and where each of it hangs: a replaced module is a
        # rebinding too. (Each experts' graph watches its own modules.)
        read, entries = [], [(model, "rope_cos"), (model, "rope_sin")]
        for index, layer in enumerate(model.layers):
            moe = layer.block_sparse_moe
            read += [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, moe.gate]
            entries += [(model.layers, str(index)), (moe, "gate"), (moe, "route"), (moe, "graphed_experts")]
            entries += [
                (layer, name)
                for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "block_sparse_moe")
            ]
        self._made_for = Bindings(read, entries)

    def _attention(self, index: int, bucket: int) -> None:
        """Layer `index`'s attention half over `bucket` cache positions, buffers to buffers."""
        model, layer, buffers = self.model, self.model.layers[index], self._buffers[index]
        assert self._position is not None and self._key_positions is not None
        assert model.rope_cos is not None and model.rope_sin is not None
        position = self._position
        cos = model.rope_cos.index_select(0, position)  # [1, head dim]
        sin = model.rope_sin.index_select(0, position)  # [1, head dim]
        keys = self._key_positions[:bucket]  # [L]
        allowed = keys <= position  # [L]: the cache rows written so far, this token's included
        window = model.args.sliding_window
        if window is not None:
            allowed &= keys > position - window
        h = layer.attention_half(buffers.x, cos, sin, position, allowed.view(1, bucket), bucket)  # [1, 1, D]
        normed = layer.post_attention_layernorm(h)  # [1, 1, D]
        buffers.h.copy_(h)
        buffers.normed.copy_(normed)
        if buffers.route is not None:
            for static, value in zip(
                buffers.route, layer.block_sparse_moe.route(normed.view(1, -1)), strict=True
            ):
                static.copy_(value)

    def _experts(
        self, index: int, x: Tensor, experts: Sequence[nn.Module], order: list[int], weights: Tensor
    ) -> Tensor | None:
        """SparseMoE.graphed_experts for layer `index`: the weighted sum [1, D] of `experts` (in
        ascending id order; expert i has the route's weight order[i]) on this layer's normed
        input, from one graph; None where that cannot be (another input; an expert computed on
        the CPU or waiting for its copy: see model.run_experts)."""
        buffers = self._buffers[index]
        if x.data_ptr() != buffers.normed.data_ptr() or any(
            hasattr(e, "forward_on_host") or getattr(e, "waits_for_copy", False) for e in experts
        ):
            return None
        if weights is not buffers.weights:  # a replayed route's: into the buffer the graph reads
            buffers.weights.copy_(weights)
        key = (EXPERTS, index, tuple(map(id, experts)), tuple(order))
        captured = self._graphs.get(key)
        if captured is not None and not captured.reads(experts):
            del self._graphs[key]  # another module under the same id, or one of them rebound
        body = functools.partial(self._experts_body, buffers, tuple(experts), tuple(order))
        self._replay(key, body, lambda graph: Captured(graph, tuple(experts), Bindings(experts)))
        return buffers.experts_out

    @staticmethod
    def _experts_body(buffers: LayerBuffers, experts: Sequence[nn.Module], order: Sequence[int]) -> None:
        """What SparseMoE._token_experts computes eagerly, with the weights read on the device:
        each product in float32, rounded once to x's dtype (as a product with a float does)."""
        x = buffers.normed.view(1, -1)  # [1, D]
        out = None
        for expert, j in zip(experts, order, strict=True):
            y = expert(x)  # [1, D]
            y = (y.float() * buffers.weights[0, j]).to(y.dtype)
            out = y if out is None else out + y
        assert out is not None
        buffers.experts_out.copy_(out)

    def _replay(
        self,
        key: tuple,
        body: Callable[[], None],
        kept: Callable[[torch.cuda.CUDAGraph], Captured] = Captured,
    ) -> None:
        """Run `body` from its graph: captured now at its CAPTURE_AT_USE-th use, eagerly before
        that, when frozen, or if its kind does not capture."""
        kind = key[0]
        if not self.capture[kind]:
            body()
            return
        captured = self._graphs.get(key)
        if captured is None:
            self._uses[key] = uses = self._uses.get(key, 0) + 1
            if self.frozen or uses < CAPTURE_AT_USE:
                body()
                return
            captured = self._captured(key, body, kept)
            if captured is None:  # capture failed: this kind runs eagerly from now on
                body()
                return
        captured.graph.replay()

    def _captured(
        self, key: tuple, body: Callable[[], None], kept: Callable[[torch.cuda.CUDAGraph], Captured]
    ) -> Captured | None:
        """The graph of `body` (see _graph_of) kept as `kept` makes it. None, and its kind off, on
        failure."""
        began = time.perf_counter()
        try:
            graph = self._graph_of(body)
        except Exception as exc:  # any capture error: the eager bodies give the same results
            kind = key[0]
            self.capture[kind] = False
            self.failures[kind] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            for stale in [k for k in self._graphs if k[0] == kind]:
                del self._graphs[stale]
            return None
        finally:
            self.captures += 1
            self.capture_s += time.perf_counter() - began
        captured = kept(graph)
        self._graphs[key] = captured
        return captured

    def _graph_of(self, body: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """`body` captured on the side stream, after a warm-up run there (capture requires one:
        lazily made workspaces are made outside the capture; it computes what the replay then
        computes again).

        capture_begin and capture_end, not torch.cuda.graph: that one synchronizes the device and
        empties the device's and the pinned host memory's caches at each capture, which here
        (hundreds of captures over the first answers, expert copies in flight) would wait for
        every copy and hand back blocks the allocator then asks CUDA for again."""
        device = self.model.norm.weight.device
        if self._side is None:  # one for every capture: its freed blocks serve the next warm-up
            self._side = torch.cuda.Stream(device)
        if self._pool is None:
            # One pool for every graph: each replays alone, and keeps nothing past its end but
            # what it writes into the static buffers.
            self._pool = torch.cuda.graph_pool_handle()
        side, current = self._side, torch.cuda.current_stream(device)
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            body()
            # thread_local: the expert copy thread keeps using CUDA on its own stream meanwhile,
            # which the default ("global") mode would count as an error in this capture.
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                body()
            except BaseException:
                with contextlib.suppress(Exception):  # the body's error is the one to report
                    graph.capture_end()
                raise
            graph.capture_end()
        current.wait_stream(side)
        return graph
