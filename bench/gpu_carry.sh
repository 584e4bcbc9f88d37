#!/usr/bin/env bash
# What bench/gpu_check.sh uses that the GPU machines' image lacks, made here (where PyPI is
# reachable) into .gpu_carry/ (ignored by git, ~10 MB) to travel with a device run:
# - site/bitsandbytes: the wheel's package with only the CPU library and those for CUDA 13 (the
#   image's torch is built for CUDA 13.0; the whole wheel, 43 MB, would not fit a run's 64 MiB
#   beside the checkout). Without it gpu_check skips nf4 and measures int4.
# - tokenizer.model: Mixtral's, from this venv's mistral-common. Without it gpu_check takes the
#   demo's 8192 pieces and cuts the synthetic model's vocabulary to them.
#
#   bash bench/gpu_carry.sh                                      # here
#   run(command="bash bench/gpu_check.sh", carry=[".gpu_carry"])  # there: gpu_check.sh finds it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BNB_VERSION=${BNB_VERSION:-0.50.2}
rm -rf .gpu_carry.partial
mkdir -p .gpu_carry.partial/wheel .gpu_carry.partial/site
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .gpu_carry.partial/wheel "bitsandbytes==$BNB_VERSION"
"$PYTHON" - <<'PY'
import re
import zipfile
from pathlib import Path

import mistral_common

root = Path(".gpu_carry.partial")
(wheel,) = (root / "wheel").glob("bitsandbytes-*.whl")
kept = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith("bitsandbytes/") and (not name.endswith(".so") or kept.search(name)):
            archive.extract(name, root / "site")
source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
(root / "tokenizer.model").write_bytes(source.read_bytes())
PY
rm -rf .gpu_carry.partial/wheel .gpu_carry
mv .gpu_carry.partial .gpu_carry
du -sh .gpu_carry
