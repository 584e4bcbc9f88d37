"""bench/gpu_check.sh --dry-run: the GPU check's logic on a small model on the CPU, in the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# What the GPU machines' image lacks of this project's dependencies (their torch, safetensors,
# sentencepiece and numpy are there; gpu_check.sh installs this checkout with --no-deps).
NOT_ON_THE_GPU_IMAGE = (
    "bitsandbytes", "mistral_common", "textual", "platformdirs", "starlette", "uvicorn", "httpx2",
    "huggingface_hub",  # there, but 1.x: this project needs 2.4 or later
)  # fmt: skip

ABSENT = """import sys


class Absent:
    \"\"\"Imports of these fail as an uninstalled package's do.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Absent())
"""


@pytest.mark.parametrize("packages", ["this venv's", "the GPU image's"])
def test_the_gpu_check_dry_run_passes(tmp_path: Path, packages: str) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "MIXTRAL_CHAT_HOME": str(tmp_path / "home")}
    on_the_image = packages == "the GPU image's"
    if on_the_image:  # a sitecustomize on the path makes them absent, in every process it starts
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(ABSENT.format(names=set(NOT_ON_THE_GPU_IMAGE)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        env["GPU_CARRY"] = str(tmp_path / "nothing carried")  # not bench/gpu_carry.sh's folder either
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
    schemes = ["int4"] if on_the_image else ["int4", "nf4"]
    assert f"gpu_check: the figures' model is {schemes[-1]}" in lines
    # Mixtral's tokenizer comes with mistral-common; without it the demo's, and a vocabulary cut to it.
    tokenizer = next(line for line in lines if line.startswith("gpu_check: tokenizer "))
    demo = str(REPO_ROOT / "assets" / "demo" / "tokenizer.model")
    assert tokenizer.endswith(f"{demo}, vocabulary 8192" if on_the_image else ".v1, vocabulary 32000")
    if on_the_image:  # nf4 needs bitsandbytes: its rows say so, and the figures are int4's
        skipped = "| correctness | nf4 | every row | SKIP | bitsandbytes does not import "
        assert any(line.startswith(skipped) for line in lines)
    correctness = [line for line in lines if line.startswith("| correctness |") and "| SKIP |" not in line]
    assert len(correctness) == 5 * len(schemes) and all("| PASS |" in line for line in correctness)
    # Bit for bit on the CPU, but the graph bodies' attention: a masked bucket of positions, summed
    # in another order.
    graphs = [line for line in correctness if "| CUDA graphs == eager |" in line]
    assert len(graphs) == len(schemes) and all("bit-identical" not in line for line in graphs)
    assert all("| PASS | bit-identical |" in line for line in correctness if line not in graphs)
    assert sum("| loaded on CPU, moved to the device | PASS" in line for line in correctness) == len(schemes)
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
