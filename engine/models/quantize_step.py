"""A pull's quantize step: the downloaded float checkpoint becomes the model's one 4-bit copy
in `data_dir()/models`, reused when a matching one is already there."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtral_chat.engine.checkpoint import CONFIG_FILE, read_quant_config_json
from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.models.entries import QUANTIZED
from mixtral_chat.engine.models.errors import DownloadCancelled
from mixtral_chat.engine.models.progress import PullProgress
from mixtral_chat.engine.models.registry_file import read_registry, registry_update

if TYPE_CHECKING:
    from mixtral_chat.quant.convert import QuantProgress


def quantize_snapshot(
    name: str,
    src: Path,
    dst: Path,
    scheme: str,
    group_size: int,
    progress: Callable[[PullProgress], None] | None,
    cancel: threading.Event | None,
) -> None:
    """Quantize `src` into `dst` (unless a matching copy is there), record it, and delete the
    model's previous quantized copy."""
    record = read_registry()["models"].get(name, {})
    previous = record.get("quantized_path")
    if not _reusable(record, dst, scheme, group_size):
        dst = _run_quantizer(src, dst, scheme, group_size, progress, cancel)
    with registry_update() as data:
        record = data["models"].setdefault(name, {})
        record.update(quantized_path=str(dst), scheme=scheme, group_size=group_size, state=QUANTIZED)
    if previous and previous != str(dst) and Path(previous).exists():
        shutil.rmtree(previous, ignore_errors=True)  # one quantized copy per model: the newest


def _reusable(record: dict[str, Any], dst: Path, scheme: str, group_size: int) -> bool:
    """Whether `dst` already holds this quantization; QuantizationError when it holds another."""
    if not (dst / CONFIG_FILE).is_file():
        return False
    recorded = record.get("quantized_path") == str(dst)
    if recorded and record.get("scheme") == scheme and record.get("group_size") == group_size:
        return True
    existing = read_quant_config_json(dst)
    if existing is None:
        return False
    # Quantized earlier (the registry lost track, or another pull finished it): reuse it if it
    # matches, refuse to overwrite it if not.
    if existing.get("scheme") == scheme and existing.get("group_size") == group_size:
        return True
    raise QuantizationError(
        f"{dst} already holds a {existing.get('scheme')} model with group size "
        f"{existing.get('group_size')}; remove it or pull with those options"
    )


def _run_quantizer(
    src: Path,
    dst: Path,
    scheme: str,
    group_size: int,
    progress: Callable[[PullProgress], None] | None,
    cancel: threading.Event | None,
) -> Path:
    from mixtral_chat.quant import quantize_model_dir  # imports torch

    dst.parent.mkdir(parents=True, exist_ok=True)
    relay = partial(_relay_quant_progress, progress) if progress is not None else None
    try:
        return Path(quantize_model_dir(src, dst, scheme, group_size, progress=relay, cancel=cancel))
    except QuantizationError as exc:
        if cancel is not None and cancel.is_set():  # one cancellation type for pull_model's callers
            raise DownloadCancelled(str(exc)) from None
        raise


def _relay_quant_progress(progress: Callable[[PullProgress], None], report: QuantProgress) -> None:
    progress(
        PullProgress(
            "quantize",
            int(report.bytes_done),
            int(report.bytes_total),
            float(report.bytes_per_s),
            report.eta_s,
            report.current or None,
        )
    )
