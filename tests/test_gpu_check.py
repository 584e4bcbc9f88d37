"""bench/gpu_check.sh --dry-run: the GPU check's logic on a small model on the CPU, in the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_the_gpu_check_dry_run_passes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "MIXTRAL_CHAT_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "gpu_check: all checks passed"
    correctness = [line for line in lines if line.startswith("| correctness |")]
    assert len(correctness) == 10 and all("| PASS |" in line for line in correctness)
    # Bit for bit on the CPU, but the graph bodies' attention: a masked bucket of positions, summed
    # in another order.
    graphs = [line for line in correctness if "| CUDA graphs == eager |" in line]
    assert len(graphs) == 2 and all("bit-identical" not in line for line in graphs)
    assert all("| PASS | bit-identical |" in line for line in correctness if line not in graphs)
    assert sum("| loaded on CPU, moved to the device | PASS" in line for line in correctness) == 2
    asks = [line for line in lines if line.startswith("| ask end to end |")]
    assert len(asks) == 3 and all("| PASS |" in line for line in asks)
    # The smallest budget cannot copy every miss: some experts are computed on the CPU there.
    assert " 0 CPU-computed" not in asks[0]
    rows = [line for line in lines if line.startswith(("| 8 GB-like", "| 12 GB-like", "| 24 GB-like"))]
    assert len(rows) == 4 and rows[3].startswith("| 24 GB-like, eager |")  # the largest, without graphs
    hit_rates = [float(row.split("|")[3]) for row in rows]
    assert hit_rates[:3] == sorted(hit_rates[:3])  # more memory, more hits
    header_line = next(line for line in lines if line.startswith("| budget |"))
    header = [cell.strip() for cell in header_line.split("|")]
    for row in rows:
        cells = dict(zip(header, (cell.strip() for cell in row.split("|")), strict=True))
        assert int(cells["ops/token"]) > 0
        # On the CPU the compute is the thread that waits: the stall and the host's wait are one.
        assert cells["stall ms/token"] == cells["host wait ms/token"]
        assert cells["decode graphs"] == "-"  # CUDA only
    costs = [line for line in lines if line.startswith("| launch costs |")]
    assert len(costs) == 6  # the header and five rows
    assert "| the same op in a CUDA graph (CUDA only) | - | - |" in costs[2]  # not on the CPU
    assert any(
        line.startswith("per token at 4 layers, top-2: gathering the chosen experts costs") for line in lines
    )
