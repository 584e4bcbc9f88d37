#!/usr/bin/env bash
# Expert offloading at full size on one CUDA GPU (issue 4, "Benchmarks: GPU"), in one command.
#
# Builds a Mixtral-8x7B-shaped model (hidden 4096, intermediate 14336, 32 layers, 8 experts,
# top-2) with random weights on the GPU one layer at a time, quantized to int4 (PyTorch's
# tinygemm kernels, no bitsandbytes) as it goes: ~25 GB of experts, which then move to pinned host
# RAM. Measures the pinned host->device bandwidth and the all-resident decode time, then caps the
# expert budget at 12 GB and at 20 GB (LoadOptions(gpu_budget_gb=...) -> plan_offload) and
# decodes 64 tokens with and without prefetch, routing replayed from a trace (--replay-routing
# FILE; default tests/data/demo_routing_trace.jsonl if present, else a synthetic trace with
# Mixtral's measured cache behaviour). Prints a markdown table: tokens/s, hit rate, bytes moved
# per token, the bound max(bytes / bandwidth, all-resident time) per token and measured/bound
# (goal <= 1.25).
#
# Needs: python3 with a CUDA build of torch (nothing else; nothing is installed or downloaded; the
# repository is imported in place). Host memory: ~35 GB (pinned store + build). GPU memory: ~50 GB
# at most. Expected wall time: 3-5 minutes on an H200 (limit 8).
#
#   bash bench/gpu_offload.sh                       # as specified
#   bash bench/gpu_offload.sh --tokens 32 --budgets-gb 12   # shorter
#   PYTHON=/path/to/python bash bench/gpu_offload.sh
#
# The same code on a small model, on CPU (what was tested without a GPU):
#   python bench/bench_offload.py gpu --device cpu --small
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Spinning OpenMP threads starve the offloader's copy thread on a busy CPU (bench_offload threads).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

"$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_offload.sh: torch " + torch.__version__ + " sees no CUDA GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} GB")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true
free -g 2>/dev/null | head -2 || true

# The 8-minute budget is enforced, so a hang cannot eat a device lease.
exec timeout --signal=INT --kill-after=20 480 "$PYTHON" bench/bench_offload.py gpu --device cuda --threads 4 "$@"
