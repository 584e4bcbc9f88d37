"""Pulling a model: download a catalog model or any Mixtral repo id into the hub cache, then (by
default) quantize it into `data_dir()/models/<name>-<scheme>`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mixtral_chat import quant
from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine.checkpoint import CONFIG_FILE
from mixtral_chat.engine.errors import ModelNotFoundError
from mixtral_chat.engine.models.catalog import DEFAULT_GROUP_SIZE, quantized_size_estimate
from mixtral_chat.engine.models.download import Snapshot, check_disk_space, download_model_files
from mixtral_chat.engine.models.entries import (
    DOWNLOADED,
    DOWNLOADING,
    QUANTIZED,
    KnownModel,
    ModelEntry,
    find_known,
    find_original_dir,
    find_quantized_dir,
    looks_like_path,
    unknown_model_message,
)
from mixtral_chat.engine.models.errors import RegistryError
from mixtral_chat.engine.models.hub_cache import hub_cache_dir, is_repo_id
from mixtral_chat.engine.models.progress import DownloadProgress, PullProgress
from mixtral_chat.engine.models.pull_lock import hold_pull_lock, safe_name
from mixtral_chat.engine.models.quantize_step import quantize_snapshot
from mixtral_chat.engine.models.registry import get_model
from mixtral_chat.engine.models.registry_file import models_dir, read_registry, registry_update, timestamp_now
from mixtral_chat.engine.models.removal import delete_original
from mixtral_chat.engine.models.validation import validate_config, validate_model_dir


def default_quant_settings(scheme: str | None = None) -> tuple[str, int]:
    """The quantization scheme (the quantizer's measured default for this machine's device) and
    group size a pull uses unless told otherwise."""
    if scheme is None:
        import torch

        scheme = str(quant.default_scheme("cuda" if torch.cuda.is_available() else "cpu"))
    return scheme, int(quant.DEFAULT_GROUP_SIZE.get(scheme, DEFAULT_GROUP_SIZE))


def pull_model(
    name: str,
    *,
    quantize: bool = True,
    scheme: str | None = None,
    group_size: int | None = None,
    keep_original: bool = True,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Callable[[PullProgress], None] | None = None,
    cancel: threading.Event | None = None,
    make_default: bool = True,
) -> ModelEntry:
    """Download a catalog model or any Mixtral repo id into the hub cache, then (by default)
    quantize it into `data_dir()/models/<name>-<scheme>`. Resumes interrupted pulls; a model
    already in the hub cache is not downloaded again. Raises DownloadCancelled when `cancel`
    is set (partial files are kept). `make_default`: the first model pulled becomes the default
    (the CLI's `pull`; the TUI leaves that to its Use button)."""
    item = _pull_target(read_registry(), name)
    revision = revision or item.revision
    if quantize and _quantized_as_asked(item, scheme, group_size, revision):
        # Already quantized as asked (or with whatever scheme was chosen before): nothing to fetch,
        # even if the bf16 original was deleted; `--no-quantize` is how to get the original back.
        if not keep_original and find_original_dir(item) is not None:
            delete_original(item.name)
        return get_model(item.name)
    plan = _PullPlan.make(item, revision, quantize, scheme, group_size)
    with hold_pull_lock(item.name):
        relay = partial(_relay_download_progress, progress) if progress is not None else None
        snapshot = download_model_files(
            plan.repo_id,
            revision,
            token=token,
            endpoint=endpoint,
            progress=relay,
            cancel=cancel,
            before_weights=plan.before_weights,
        )
        # A cached copy used offline skipped before_weights: validate and record it here.
        validate_model_dir(snapshot.path)
        _record_pull_started(item, plan.repo_id, revision)
        _record_downloaded(item.name, snapshot, make_default)
        quant = plan.quant
        if quant is not None and ckpt.detect(snapshot.path).quantization_config is None:
            # A repo saved already 4-bit (bitsandbytes) is used as it is: only float ones are quantized.
            quantize_snapshot(
                item.name, snapshot.path, quant.directory, quant.scheme, quant.group_size, progress, cancel
            )
            if not keep_original:
                delete_original(item.name)
        return get_model(item.name)


@dataclass(frozen=True)
class _QuantTarget:
    """Where a pull's quantize step writes, and how."""

    scheme: str
    group_size: int
    directory: Path  # `data_dir()/models/<name>-<scheme>`


@dataclass(frozen=True)
class _PullPlan:
    """What one pull fetches and makes: the repo at a revision, and the 4-bit copy (if asked)."""

    item: KnownModel
    repo_id: str
    revision: str
    quant: _QuantTarget | None

    @classmethod
    def make(
        cls, item: KnownModel, revision: str, quantize: bool, scheme: str | None, group_size: int | None
    ) -> _PullPlan:
        assert item.repo_id is not None
        quant = None
        if quantize:
            scheme, default_group = default_quant_settings(scheme)
            directory = models_dir() / f"{safe_name(item.name)}-{scheme}"
            quant = _QuantTarget(scheme, group_size or default_group, directory)
        return cls(item, item.repo_id, revision, quant)

    def before_weights(self, config: dict[str, Any], to_download: int) -> None:
        """The repo exists, its config is a Mixtral and the pull fits: from here it is ours."""
        args = validate_config(config, f"{self.repo_id}/config.json")
        prequantized = config.get("quantization_config") is not None
        needs = [(hub_cache_dir(), to_download, "to download")]
        quant = self.quant
        if quant is not None and not prequantized and not (quant.directory / CONFIG_FILE).is_file():
            estimate = quantized_size_estimate(args, quant.group_size)
            needs.append((quant.directory.parent, estimate, "for the 4-bit copy"))
        check_disk_space(needs)
        _record_pull_started(self.item, self.repo_id, self.revision)


def _relay_download_progress(progress: Callable[[PullProgress], None], report: DownloadProgress) -> None:
    progress(
        PullProgress(
            "download", report.bytes_done, report.bytes_total, report.speed, report.eta_s, report.file
        )
    )


def _quantized_as_asked(item: KnownModel, scheme: str | None, group_size: int | None, revision: str) -> bool:
    return (
        find_quantized_dir(item) is not None
        and scheme in (None, item.record.get("scheme"))
        and group_size in (None, item.record.get("group_size"))
        and revision == item.revision
    )


def _pull_target(data: dict[str, Any], spec: str) -> KnownModel:
    spec = spec.strip()
    item = find_known(data, spec)
    if item is not None:
        if item.source == "bundled":
            raise RegistryError("the demo model is bundled with mixtral-chat: nothing to download")
        if item.source == "local":
            raise RegistryError(
                f"'{item.name}' is a local directory ({item.record.get('path')}): nothing to download"
            )
        return item
    if is_repo_id(spec):
        return KnownModel(spec, record={"source": "hub", "repo_id": spec, "revision": "main"})
    if looks_like_path(spec) or Path(spec).expanduser().exists():
        raise RegistryError(f"'{spec}' is a local path: register it with `mixtral-chat models add {spec}`")
    raise ModelNotFoundError(unknown_model_message(spec))


def _record_pull_started(item: KnownModel, repo_id: str, revision: str) -> None:
    with registry_update() as data:
        record = data["models"].setdefault(item.name, {})
        state = record.get("state")
        record.update(
            source="catalog" if item.catalog else "hub",
            repo_id=repo_id,
            revision=revision,
            state=state if state in (DOWNLOADED, QUANTIZED) else DOWNLOADING,
        )
        record.setdefault("added", timestamp_now())


def _record_downloaded(name: str, snapshot: Snapshot, make_default: bool) -> None:
    with registry_update() as data:
        record = data["models"].setdefault(name, {})
        record.update(
            commit=snapshot.commit,
            original_path=str(snapshot.path),
            download_bytes=snapshot.total_bytes,
            state=record.get("state") if record.get("state") == QUANTIZED else DOWNLOADED,
        )
        if make_default and not data.get("default"):
            data["default"] = name  # the first real model becomes the default
