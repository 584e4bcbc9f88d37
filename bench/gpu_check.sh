#!/usr/bin/env bash
# The GPU path proven in one command (issue 14), under 8 minutes on one GPU, nothing downloaded:
# correctness (CUDA vs CPU float32, offloaded == resident, a CPU-quantized model on CUDA),
# `mixtral-chat ask` end to end at --gpu-mem 8, 12 and 24 on a synthetic full-size Mixtral-8x7B,
# and per budget: tok/s, hit rate, bytes moved and CPU-computed experts per token, the measured
# bandwidths, the plan's bound and measured/bound, host syncs and ATen ops per token, the GPU's
# stall (CUDA events), with CUDA graphs and once without; what a launch, a sync and gathering an
# expert cost (bench/gpu_check.py, bench/launch_costs.py).
# Every row prints as it is measured; record them with the date in docs/BENCHMARKS.md.
#
#   bash bench/gpu_check.sh             # on a CUDA machine (installs this checkout, no deps)
#   bash bench/gpu_check.sh --dry-run   # the same logic on a small model on the CPU (the suite runs it)
#
# On a lent device: `bash bench/gpu_carry.sh` here first, then one run with carry [".gpu_carry"],
# timeout_s 590 and the command `set -o pipefail; bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log`
# (the log comes back even if the run is cut off). Run again at once if it was: the machine stays
# warm 30 s, and the models built under .bench/gpu_check are reused.
#
# bitsandbytes is optional: without it the nf4 rows are skipped and the figures are int4's. The GPU
# machines' image has neither it nor Mixtral's tokenizer: bench/gpu_carry.sh makes both, here, into
# .gpu_carry/ to carry there (GPU_CARRY names another folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export GPU_CARRY=${GPU_CARRY:-$PWD/.gpu_carry}
if [[ -d "$GPU_CARRY/site" ]]; then
    export PYTHONPATH="$GPU_CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [[ "${1:-}" != "--dry-run" ]]; then
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >/dev/null
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true
fi
exec "$PYTHON" bench/gpu_check.py "$@"
