"""Removing a model: forget it, delete what mixtral-chat made for it, and (asked) its copy in the
Hugging Face cache; or delete only the float original of a quantized model."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_chat.engine.errors import ModelNotFoundError
from mixtral_chat.engine.models.cache_deletion import delete_cached_revision
from mixtral_chat.engine.models.entries import (
    KnownModel,
    ModelEntry,
    cached_repo_bytes,
    find_known,
    model_entry,
    unknown_model_message,
)
from mixtral_chat.engine.models.errors import RegistryError
from mixtral_chat.engine.models.hub_cache import (
    cached_commit,
    directory_size,
    is_repo_id,
    partial_bytes,
    repo_storage_dir,
    snapshot_dir,
)
from mixtral_chat.engine.models.pull_lock import pull_running
from mixtral_chat.engine.models.registry_file import read_registry, registry_update


@dataclass(frozen=True)
class HfCacheCopy:
    """A model's copy in the Hugging Face cache: huggingface_hub's (and transformers'), not ours."""

    repo_id: str
    commit: str | None
    path: Path  # the snapshot folder, or the repo folder when no snapshot is complete
    size: int


@dataclass(frozen=True)
class Removal:
    name: str
    source: str
    freed: int  # bytes freed in all
    quantized_freed: int  # of which the quantized copy
    hf_cache_freed: int  # of which the Hugging Face cache copy
    hf_cache_kept: HfCacheCopy | None  # left in place (not asked to delete it)
    spared: tuple[Path, ...] = ()  # cache files kept because another cached repo links to them
    forgotten_path: Path | None = None  # a local model's directory, never deleted


def _removal_target(data: dict[str, Any], name: str) -> KnownModel:
    item = find_known(data, name)
    if item is not None:
        return item
    spec = name.strip()
    if is_repo_id(spec) and repo_storage_dir(spec).exists():
        # Not registered (never pulled, or already removed): only its Hugging Face cache copy is left.
        return KnownModel(spec, record={"repo_id": spec, "revision": "main"})
    raise ModelNotFoundError(unknown_model_message(name))


def _hf_copy_of(item: KnownModel, entry: ModelEntry | None = None) -> HfCacheCopy | None:
    repo_id = item.repo_id
    if not repo_id or item.source in ("local", "bundled"):
        return None
    storage = repo_storage_dir(repo_id)
    if not storage.exists():
        return None
    commit = (entry.commit if entry is not None else None) or item.record.get("commit")
    commit = commit or cached_commit(repo_id, item.revision)
    snapshot = snapshot_dir(repo_id, commit) if commit else None
    if snapshot is not None and snapshot.is_dir():
        size = directory_size(snapshot) + partial_bytes(repo_id)
        return HfCacheCopy(repo_id, commit, snapshot, size)
    return HfCacheCopy(repo_id, commit, storage, cached_repo_bytes(repo_id))


def hf_cache_copy(name: str) -> HfCacheCopy | None:
    """What `remove_model(name, delete_hf_cache=True)` would delete from the Hugging Face cache."""
    data = read_registry()
    item = _removal_target(data, name)
    return _hf_copy_of(item, model_entry(item, data.get("default")))


def remove_model(name: str, *, delete_hf_cache: bool = False) -> Removal:
    """Forget a model and delete what mixtral-chat made for it (its quantized directory).

    Its copy in the Hugging Face cache (the original checkpoint, which transformers and other hub
    clients share) is left alone unless `delete_hf_cache`; then it goes through huggingface_hub's
    own `scan_cache_dir(...).delete_revisions(...)`, keeping any blob another cached repo links.
    Local directories are only forgotten, never deleted.
    """
    data = read_registry()
    item = _removal_target(data, name)
    if item.source == "bundled":
        raise RegistryError("the bundled demo model cannot be removed (it ships with mixtral-chat)")
    if pull_running(item.name):
        raise RegistryError(f"a pull of '{item.name}' is running; cancel it first")
    entry = model_entry(item, data.get("default"))
    registered = item.name in data["models"]
    copy = _hf_copy_of(item, entry)
    if item.source == "local":
        forgotten = Path(item.record["path"])
        _forget(item.name)
        return Removal(item.name, "local", 0, 0, 0, None, forgotten_path=forgotten)
    if not registered and copy is None:
        raise ModelNotFoundError(f"model '{item.name}' is not installed; nothing to remove")
    quantized_freed = 0
    recorded = item.record.get("quantized_path")
    if recorded and Path(recorded).exists():
        quantized_freed = directory_size(Path(recorded))
        shutil.rmtree(recorded)
    hf_freed = 0
    spared: tuple[Path, ...] = ()
    if delete_hf_cache and copy is not None:
        deletion = delete_cached_revision(copy.repo_id, copy.commit)
        hf_freed, spared = deletion.freed, deletion.spared
    if registered:
        _forget(item.name)
    kept = copy if not delete_hf_cache else None
    return Removal(
        item.name, item.source, quantized_freed + hf_freed, quantized_freed, hf_freed, kept, spared
    )


def _forget(name: str) -> None:
    with registry_update() as data:
        data["models"].pop(name, None)
        if data.get("default") == name:
            data["default"] = None


def delete_original(name: str) -> int:
    """Delete the bf16 original of a quantized model from the hub cache (the user asked for it);
    returns bytes freed. Blobs other cached repos link to are kept."""
    data = read_registry()
    item = find_known(data, name)
    if item is None or item.repo_id is None:
        raise ModelNotFoundError(f"'{name}' has no downloaded original to delete")
    entry = model_entry(item, data.get("default"))
    if entry.quantized_path is None:
        raise RegistryError(
            f"'{item.name}' is not quantized: deleting its original would leave nothing to load"
        )
    commit = entry.commit or cached_commit(item.repo_id, item.revision)
    freed = delete_cached_revision(item.repo_id, commit).freed
    with registry_update() as data:
        record = data["models"].get(item.name)
        if record is not None:
            record["original_path"] = None
    return freed
