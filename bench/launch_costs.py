"""What a decode step's launches and host syncs cost on a device, and what routing on the device
would add: the figures behind issue 14's last two steps.

- Device-side routing as gpt-fast does it (defect 7's all-resident path) gathers each chosen
  expert's weights by a device index, a copy of the expert, to save one host sync per layer:
  not built; these rows decide whether it would pay.
- CUDA graphs (defect 8, engine/decode_graphs.py) replay launches at a graph's cost per op
  instead of an eager launch's: these rows say what that saves a token.

Rows, each printed as measured:
- one eager op (a 1-element `add_`), back to back: the device's time per op (CUDA events around
  the loop, no sync per call) and the host's per launch;
- the same ops replayed from one CUDA graph (CUDA only);
- one host sync: `.item()` after a 1-element op;
- one expert at the model's width for one token: its three int4 GEMVs (`Int4Linear`, the app's
  layer), and the gather of its int4 bytes from a layer's stacked experts (`index_select` by a
  device index: what routing on the device adds per chosen expert).

Then the per-token arithmetic for a model of L layers, K experts per token and N ops per token:
the gathers' cost against the syncs they save, and the launches a graph would save.
`bench/gpu_check.py` runs it; on the CPU (`--dry-run`) the same code runs with the host's clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

EAGER_OPS = 2000
GRAPH_OPS = 256
SYNCS = 300


def per_call_s(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    """(device seconds, host seconds) per call over `calls` back-to-back calls of fn, after one."""
    fn()
    synchronize(device)
    if device.type != "cuda":
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - began) / calls
        return host, host
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - began) / calls
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls, host


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_op_s(device: torch.device) -> float | None:
    """Device seconds per op of GRAPH_OPS 1-element adds replayed from one CUDA graph."""
    if device.type != "cuda":
        return None
    x = torch.zeros(1, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        x.add_(1)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_OPS):
            x.add_(1)
    device_s, _ = per_call_s(graph.replay, 20, device)
    return device_s / GRAPH_OPS


def int4_expert(dim: int, hidden: int, device: torch.device, dtype: torch.dtype) -> list[torch.nn.Module]:
    """w1, w3, w2 of one random expert as the app's int4 layers (group 64) on `device`."""
    from mixtral_chat.quant.int4 import Int4Linear, quantize_int4

    generator = torch.Generator().manual_seed(0)
    layers = []
    for out_features, in_features in ((hidden, dim), (hidden, dim), (dim, hidden)):
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        parts = quantize_int4(weight, 64)
        layers.append(Int4Linear.from_parts(parts, out_features, in_features, 64, device, dtype))
    return layers


def expert_bytes(layers: list[torch.nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for layer in layers for t in layer.buffers())


def measure(
    dim: int, hidden: int, experts: int, device: torch.device, say: Callable[[str], None]
) -> dict[str, float | None]:
    """Each row's figure (seconds), printed as it is measured."""

    def row(what: str, device_s: float | None, host_s: float | None = None) -> None:
        cells = [f"{t * 1e6:.2f} us" if t is not None else "-" for t in (device_s, host_s)]
        say(f"| launch costs | {what} | {cells[0]} | {cells[1]} |")

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    figures: dict[str, float | None] = {}
    say("| launch costs | what | device per call | host per call |")
    say("|---|---|---|---|")
    one = torch.zeros(1, device=device)
    figures["op_s"], op_host = per_call_s(lambda: one.add_(1), EAGER_OPS, device)
    row("eager op (1-element add_)", figures["op_s"], op_host)
    figures["graph_op_s"] = graph_op_s(device)
    row("the same op in a CUDA graph (CUDA only)", figures["graph_op_s"])
    _, figures["sync_s"] = per_call_s(lambda: one.add_(1).item(), SYNCS, device)
    row("host sync (.item() after an op)", None, figures["sync_s"])
    w1, w3, w2 = layers = int4_expert(dim, hidden, device, dtype)
    x = torch.randn(1, dim, device=device, dtype=dtype)

    def expert() -> torch.Tensor:
        return w2(torch.nn.functional.silu(w1(x)) * w3(x))

    with torch.no_grad():
        figures["expert_s"], _ = per_call_s(expert, 20, device)
    nbytes = expert_bytes(layers)
    row(f"one int4 expert, one token ({dim}x{hidden}, {nbytes / 1e6:.1f} MB)", figures["expert_s"])
    stacked = torch.zeros(experts, nbytes, dtype=torch.uint8, device=device)
    chosen = torch.tensor([experts - 1], device=device)
    figures["gather_s"], _ = per_call_s(lambda: stacked.index_select(0, chosen), 20, device)
    row("gather of that expert's bytes by a device index", figures["gather_s"])
    return figures


def per_token(figures: dict[str, float | None], layers: int, top_k: int, ops: int) -> str:
    """The arithmetic for one decode token: what routing on the device costs and saves, and what
    graphs would save on `ops` launches."""
    gathers = layers * top_k * (figures["gather_s"] or 0.0)
    syncs = layers * (figures["sync_s"] or 0.0)
    line = (
        f"per token at {layers} layers, top-{top_k}: gathering the chosen experts costs "
        f"{gathers * 1e3:.2f} ms against {syncs * 1e3:.2f} ms for the {layers} syncs it saves"
    )
    if figures["graph_op_s"] is not None:
        saved = ops * ((figures["op_s"] or 0.0) - figures["graph_op_s"])
        line += f"; a graph of all {ops} ops would save {saved * 1e3:.2f} ms of launches"
    return line
