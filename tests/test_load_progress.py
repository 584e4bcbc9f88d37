"""Model-load progress (issue 17 item 9): Engine.load reports the weight bytes read, `ask` draws
a row on a terminal's stderr when loading takes over a second (tests/test_progress_terminal.py),
and the TUI shows a bar."""

from __future__ import annotations

from pathlib import Path

from mixtral_chat.engine.load_progress import LoadProgress, weight_bytes
from mixtral_chat.engine.options import LoadOptions


def test_engine_load_reports_the_weight_bytes_read(tiny_model_dir: Path) -> None:
    from mixtral_chat.engine.runtime import Engine

    seen: list[LoadProgress] = []
    Engine.load(tiny_model_dir, LoadOptions(device="cpu"), progress=seen.append)
    total = weight_bytes(tiny_model_dir)
    assert seen and all(p.bytes_total == total for p in seen)
    done = [p.bytes_done for p in seen]
    assert done == sorted(done) and 0 < done[-1] <= total
    last = seen[-1]
    assert last.finished and last.fraction == 1.0 and last.eta_s == 0.0 and last.tensors > 0
    # A resident float model reads every tensor of its files (the headers are the rest).
    assert done[-1] > 0.99 * total


def test_engine_load_reports_while_offloading_from_a_disk_store(tiny_model_dir: Path) -> None:
    from mixtral_chat.engine.runtime import Engine

    seen: list[LoadProgress] = []
    options = LoadOptions(device="cpu", offload=True, experts_per_layer=2, offload_store="disk")
    Engine.load(tiny_model_dir, options, progress=seen.append)
    assert seen[-1].finished and seen[-1].bytes_done > 0
