"""A decode token's attention halves replayed as CUDA graphs (issue 14, defect 8).

Eager decode on a GPU is launch-bound: each op costs a few microseconds of host time whatever its
size, and a layer's attention half (the input norm, q|k|v, rope, the cache row, attention, o, the
residual, the post-attention norm and the routing) is most of a layer's ops. Captured once, each
layer's half is one graph launch. The experts stay eager: which ones run is read on the host (one
sync per layer, what the expert cache needs), and each may be a slot, a miss or computed on the
CPU.

A graph replays fixed shapes at fixed addresses, so each layer reads its input from a static
buffer, the position from one static tensor shared by all layers, and writes its outputs (the
residual stream, its norm and the route) into static buffers; attention covers a fixed number of
cache positions, a bucket (a power of two of at least BUCKET_MIN, at most the cache), masked to
those written so far. A graph is captured per (layer, bucket) on first use.

Without capture (a CPU, or `capture=False`) the same bodies run as they are, so the suite runs
this path on the CPU. A graph is made anew when anything it reads was rebound (`Bindings`: a
moved or requantized layer, a new cache, a replayed route), and a failed capture turns capture off
for good, with its reason in `state()`: the bodies then run eagerly, with the same results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixtral_chat.engine.bindings import Bindings
from mixtral_chat.engine.model import Mixtral

BUCKET_MIN = 256  # cache positions; attention over fewer costs no less on a GPU


def bucket_for(end: int, max_seq_len: int, smallest: int = BUCKET_MIN) -> int:
    """Cache positions a token at position end - 1 attends over: the smallest power of two that
    holds `end`, at least `smallest`, at most the cache."""
    bucket = smallest
    while bucket < end:
        bucket *= 2
    return min(bucket, max_seq_len)


@dataclass
class LayerBuffers:
    """One layer's static tensors (each [1, 1, D] but the route's), read and written by its graphs."""

    x: Tensor  # the layer's input
    h: Tensor  # x + attention: the residual stream after attention
    normed: Tensor  # post_attention_layernorm(h): the experts' input
    route: tuple[Tensor, Tensor, Tensor] | None  # router logits [1, E], chosen [1, K], weights [1, K]


class DecodeGraphs:
    """Every layer's attention half for one decode token, captured per bucket (see the module)."""

    def __init__(self, model: Mixtral, capture: bool, smallest_bucket: int = BUCKET_MIN) -> None:
        self.model = model
        self.capture = capture
        self.smallest_bucket = smallest_bucket
        self.failure: str | None = None  # why capture was turned off
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._made_for: Bindings | None = None
        self._pool = None
        self._position: Tensor | None = None  # [1] long: the token's position, every layer's
        self._key_positions: Tensor | None = None  # [max_seq_len] long: 0, 1, 2, ...
        self._buffers: list[LayerBuffers] = []

    def state(self) -> str:
        """What the stats say: on (how many graphs), eager (no capture), or off with the reason."""
        if self.failure is not None:
            return f"eager: capture failed ({self.failure})"
        return f"on ({len(self._graphs)} captured)" if self.capture else "eager (no capture)"

    def forward(self, x: Tensor, input_pos: Tensor, end: int) -> Tensor:
        """One token x [1, 1, D] at input_pos [1] (end = its position + 1) through every layer."""
        self._hold()
        assert self._position is not None
        self._position.copy_(input_pos)
        bucket = bucket_for(end, self.model.max_seq_len, self.smallest_bucket)
        for index, layer in enumerate(self.model.layers):
            buffers = self._buffers[index]
            buffers.x.copy_(x)
            self._run(index, bucket)
            x = buffers.h + layer.block_sparse_moe(buffers.normed, buffers.route)
        return x

    def current(self) -> bool:
        """The static tensors and graphs made so far still read the model as it is (nothing they
        read was rebound since)."""
        return self._made_for is not None and self._made_for.hold()

    def _hold(self) -> None:
        """Static tensors and graphs for the model as it is now: made anew if anything was rebound."""
        if self.current():
            return
        model = self.model
        self._graphs.clear()
        self._pool = None
        like = model.norm.weight
        D = model.args.hidden_size
        self._position = torch.zeros(1, dtype=torch.long, device=like.device)
        self._key_positions = torch.arange(model.max_seq_len, device=like.device)
        self._buffers = []
        for layer in model.layers:
            moe = layer.block_sparse_moe
            route = None
            if moe.routes_with_gate:  # a replayed route reads the host per token: it stays outside
                E, K = model.args.num_local_experts, moe.top_k
                route = (
                    torch.zeros(1, E, dtype=like.dtype, device=like.device),
                    torch.zeros(1, K, dtype=torch.long, device=like.device),
                    torch.zeros(1, K, dtype=torch.float32, device=like.device),
                )
            static = [torch.zeros(1, 1, D, dtype=like.dtype, device=like.device) for _ in range(3)]
            self._buffers.append(LayerBuffers(*static, route))
        # What the graphs read, and where each of it hangs: a replaced module is a rebinding too.
        read, entries = [], [(model, "rope_cos"), (model, "rope_sin")]
        for index, layer in enumerate(model.layers):
            moe = layer.block_sparse_moe
            read += [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, moe.gate]
            entries += [(model.layers, str(index)), (moe, "gate"), (moe, "route")]
            entries += [
                (layer, name) for name in ("input_layernorm", "self_attn", "post_attention_layernorm")
            ]
            entries.append((layer, "block_sparse_moe"))
        self._made_for = Bindings(read, entries)

    def _body(self, index: int, bucket: int) -> None:
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

    def _run(self, index: int, bucket: int) -> None:
        if not self.capture:
            self._body(index, bucket)
            return
        graph = self._graphs.get((index, bucket))
        if graph is None:
            graph = self._captured(index, bucket)
            if graph is None:  # capture failed: run eagerly from now on
                self._body(index, bucket)
                return
        graph.replay()

    def _captured(self, index: int, bucket: int) -> torch.cuda.CUDAGraph | None:
        """The graph of `_body(index, bucket)`, after a warm-up run on a side stream (as capture
        requires; it computes what the replay then computes again). None, capture off, on failure."""
        device = self.model.norm.weight.device
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._body(index, bucket)
            torch.cuda.current_stream(device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # One pool for every graph: each replays alone, and keeps nothing past its end but
            # what it writes into the static buffers.
            with torch.cuda.graph(graph, pool=self._pool):
                self._body(index, bucket)
        except Exception as exc:  # any capture error: the eager bodies give the same results
            self.capture = False
            self.failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            self._graphs.clear()
            return None
        self._graphs[(index, bucket)] = graph
        return graph
