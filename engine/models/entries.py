"""What a model name stands for (catalog facts and/or a registry record), and its ModelEntry:
status computed from the disk, not trusted from the file, so a user who deletes the hub cache
by hand sees "not downloaded", not a stale "downloaded"."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine.checkpoint import CONFIG_FILE, read_quant_config_json
from mixtral_chat.engine.models.catalog import CATALOG, CatalogEntry, demo_dir
from mixtral_chat.engine.models.hub_cache import (
    directory_size,
    find_cached_snapshot,
    has_any_local_data,
    is_complete_model_dir,
    partial_bytes,
    repo_storage_dir,
    snapshot_dir,
)
from mixtral_chat.engine.models.pull_lock import pull_running

# Statuses (ModelEntry.status).
NOT_DOWNLOADED = "not downloaded"
DOWNLOADING = "downloading"  # a pull is running now
PARTIAL = "partial"  # a pull was interrupted; `pull` resumes it
DOWNLOADED = "downloaded"
QUANTIZED = "quantized"
BUNDLED = "bundled"
LOCAL = "local"  # a directory the user added
MISSING = "missing"  # registered, but its files are gone


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # "catalog" | "hub" | "local" | "bundled"
    status: str  # see the status constants above
    repo_id: str | None
    revision: str | None
    commit: str | None
    path: Path | None  # what would be loaded: the quantized dir if any, else the original
    original_path: Path | None
    quantized_path: Path | None
    scheme: str | None
    group_size: int | None
    size_on_disk: int
    is_default: bool
    catalog: CatalogEntry | None
    download_bytes: int | None  # catalog fact, or what the last pull listed
    partial_bytes: int = 0  # bytes kept from an interrupted pull

    @property
    def installed(self) -> bool:
        return self.status in (DOWNLOADED, QUANTIZED, BUNDLED, LOCAL)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("path", "original_path", "quantized_path"):
            data[key] = str(data[key]) if data[key] is not None else None
        return data


# ---------------------------------------------------------------------------------------------
# Looking models up.


@dataclass
class KnownModel:
    """What we know about one model name: catalog facts and/or a registry record."""

    name: str
    catalog: CatalogEntry | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def repo_id(self) -> str | None:
        return self.record.get("repo_id") or (self.catalog.repo_id if self.catalog else None)

    @property
    def revision(self) -> str:
        return self.record.get("revision") or (self.catalog.revision if self.catalog else "") or "main"

    @property
    def source(self) -> str:
        if self.catalog is not None and self.catalog.bundled:
            return "bundled"
        if self.record.get("source") == "local":
            return "local"
        return "catalog" if self.catalog is not None else "hub"


def all_known(data: dict[str, Any]) -> list[KnownModel]:
    known = [
        KnownModel(name, catalog=entry, record=dict(data["models"].get(name, {})))
        for name, entry in CATALOG.items()
    ]
    known += [
        KnownModel(name, record=dict(rec)) for name, rec in data["models"].items() if name not in CATALOG
    ]
    return known


def find_known(data: dict[str, Any], spec: str) -> KnownModel | None:
    """By name (case-insensitive), then by repo id (case-insensitive)."""
    lowered = spec.lower()
    known = all_known(data)
    for item in known:
        if item.name.lower() == lowered:
            return item
    for item in known:
        if item.repo_id and item.repo_id.lower() == lowered:
            return item
    return None


def looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or (os.sep in spec and Path(spec).expanduser().exists())


def find_original_dir(item: KnownModel) -> Path | None:
    """The complete original checkpoint: recorded snapshot, else whatever the hub cache holds."""
    recorded = item.record.get("original_path")
    if recorded and is_complete_model_dir(Path(recorded)):
        return Path(recorded)
    if item.repo_id:
        commit = item.record.get("commit")
        if commit:
            path = snapshot_dir(item.repo_id, commit)
            if is_complete_model_dir(path):
                return path
        return find_cached_snapshot(item.repo_id, item.revision)
    return None


def find_quantized_dir(item: KnownModel) -> Path | None:
    recorded = item.record.get("quantized_path")
    if recorded and (Path(recorded) / CONFIG_FILE).is_file():
        return Path(recorded)
    return None


def model_entry(item: KnownModel, default: str | None) -> ModelEntry:
    """`item` as it stands on disk now; `default` is the registry's default model name.

    With no default chosen the bundled demo is what runs, so it is the one marked default."""
    is_default = item.source == "bundled" if default is None else default == item.name
    if item.source == "bundled":
        return _bundled_entry(item, is_default)
    if item.source == "local":
        return _local_entry(item, is_default)
    return _hub_entry(item, is_default)


def _bundled_entry(item: KnownModel, is_default: bool) -> ModelEntry:
    path = demo_dir()
    exists = (path / CONFIG_FILE).is_file()
    return ModelEntry(
        name=item.name,
        source="bundled",
        status=BUNDLED if exists else MISSING,
        repo_id=None,
        revision=None,
        commit=None,
        path=path if exists else None,
        original_path=path if exists else None,
        quantized_path=None,
        scheme=None,
        group_size=None,
        size_on_disk=directory_size(path) if exists else 0,
        is_default=is_default,
        catalog=item.catalog,
        download_bytes=None,
    )


def _local_entry(item: KnownModel, is_default: bool) -> ModelEntry:
    path = Path(item.record["path"])
    exists = (path / CONFIG_FILE).is_file()
    quant = read_quant_config_json(path) if exists else None
    return ModelEntry(
        name=item.name,
        source="local",
        status=LOCAL if exists else MISSING,
        repo_id=None,
        revision=None,
        commit=None,
        path=path if exists else None,
        original_path=path,
        quantized_path=path if quant else None,
        scheme=(quant or {}).get("scheme") or (_prequantized_scheme(path) if exists else None),
        group_size=(quant or {}).get("group_size"),
        size_on_disk=directory_size(path) if exists else 0,
        is_default=is_default,
        catalog=None,
        download_bytes=None,
    )


def _hub_entry(item: KnownModel, is_default: bool) -> ModelEntry:
    """A catalog model or a hub repo: the original in the hub cache, the quantized copy in ours."""
    record = item.record
    original = find_original_dir(item)
    quantized = find_quantized_dir(item)
    partial = partial_bytes(item.repo_id) if item.repo_id else 0
    size = 0
    if original is not None:
        size += directory_size(original)
    elif item.repo_id:
        size += cached_repo_bytes(item.repo_id)
    if quantized is not None:
        size += directory_size(quantized)
    return ModelEntry(
        name=item.name,
        source=item.source,
        status=_hub_status(item, original, quantized),
        repo_id=item.repo_id,
        revision=item.revision,
        commit=record.get("commit") or (original.name if original is not None else None),
        path=quantized or original,
        original_path=original,
        quantized_path=quantized,
        scheme=record.get("scheme") if quantized is not None else _prequantized_scheme(original),
        group_size=record.get("group_size") if quantized is not None else None,
        size_on_disk=size,
        is_default=is_default,
        catalog=item.catalog,
        download_bytes=item.catalog.download_bytes if item.catalog else record.get("download_bytes"),
        partial_bytes=partial,
    )


def _hub_status(item: KnownModel, original: Path | None, quantized: Path | None) -> str:
    if quantized is not None:
        return QUANTIZED
    if original is not None:
        return DOWNLOADED
    if pull_running(item.name):
        return DOWNLOADING
    if item.record.get("state") == DOWNLOADING or (item.repo_id and has_any_local_data(item.repo_id)):
        return PARTIAL
    return NOT_DOWNLOADED


def cached_repo_bytes(repo_id: str) -> int:
    """Bytes in the repo's hub-cache folder (blobs and partials) when no complete snapshot exists."""
    return directory_size(repo_storage_dir(repo_id) / "blobs")


def _prequantized_scheme(path: Path | None) -> str | None:
    """ "nf4 (bitsandbytes)" for a checkpoint transformers saved 4-bit; None for a float one."""
    if path is None:
        return None
    found = ckpt.detect(path)
    return found.label if found.kind == ckpt.BNB_4BIT else None


def unknown_model_message(spec: str) -> str:
    names = ", ".join(CATALOG)
    return (
        f"unknown model '{spec}': not a catalog name ({names}), an installed model, a hub repo id "
        "(org/name) or a model directory; see `mixtral-chat models list`"
    )
