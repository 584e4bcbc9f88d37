#!/usr/bin/env bash
# The GEMV table of bench/bench_quant.py on CUDA (issue 3): int4 and nf4 against bf16, batch 1
# and 8, next to the measured device memory bandwidth. One short run (< 3 minutes on an H200).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python3 -c "import mixtral_chat.quant" 2>/dev/null || python3 -m pip install -q --no-deps -e .
export PYTHONUNBUFFERED=1
timeout 300 python3 bench/bench_quant.py --mode gemv --device cuda "$@"
