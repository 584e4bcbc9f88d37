"""Expert offloading: every expert in a host store, some per layer in slots on the compute device.

- `store`: one contiguous blob per expert (`quant.blob.ExpertBlobLayout`) in RAM or on disk.
- `transfers`: copies off the compute path (a CUDA copy stream, or a thread on CPU).
- `slots`: which expert sits in which slot, eviction policies, counters (pure Python).
- `cache`: one layer's k slot buffers on the compute device, fed by the store; `stall_clock`:
  its waits for copies, the GPU's own on CUDA (events).
- `placement`: where a layer's misses go (copied, computed on the CPU, or split) and the cost
  model (pure); `bandwidth`: the host's rates it uses, measured once and cached;
  `cpu_experts`: experts computed on the CPU from the store; `streamed`: a store filled while
  the weights load.
- `planner`: each layer's slots and misses from a memory budget (or k), from a model or a
  config.json; `offloader`: the whole of it on a model.
- `trace`: the routing-trace format (writer, reader, error); `simulate` replays a trace through
  the cache classes (`mixtral-chat bench cache`); `replay` forces a model's routing from a trace.

Importing this package is cheap; the names below load their module (and torch) on first use,
so the simulator and the trace reader stay free of torch.
"""

from __future__ import annotations

from mixtral_chat.engine.lazy import lazy_exports

_EXPORTS = {
    "ExpertOffloader": "offloader",
    "move_non_experts": "offloader",
    "needs_staging": "offloader",
    "slots_repacked": "offloader",
    "OffloadPlan": "planner",
    "plan_offload": "planner",
    "StoredExperts": "store",
    "RoutingTrace": "trace",
    "RoutingTraceError": "trace",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(globals(), _EXPORTS)
