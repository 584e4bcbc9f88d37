"""The local Hugging Face hub cache, read without huggingface_hub: where it is, the layout
huggingface_hub writes (`<cache>/models--org--name/{blobs,snapshots,refs}`), complete snapshots
and sizes. Cheap to import: `resolve_model` uses it at CLI start-up."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from mixtral_chat.engine.checkpoint import CONFIG_FILE, SINGLE_FILE, TOKENIZER_FILE, read_weight_map
from mixtral_chat.engine.errors import WeightsError

DEFAULT_ENDPOINT = "https://huggingface.co"
PARTIAL_SUFFIX = ".incomplete"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ---------------------------------------------------------------------------------------------
# Where things are. Read from the environment at call time (huggingface_hub reads it at import),
# with the same precedence as huggingface_hub.constants.


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    default_home = os.path.join(os.path.expanduser("~"), ".cache")
    hf_home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", default_home), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(hf_home))) / "hub"


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID_RE.match(text))


def repo_storage_dir(repo_id: str, cache_dir: Path | None = None) -> Path:
    """`<cache>/models--org--name`, as huggingface_hub's `repo_folder_name` names it."""
    return (cache_dir or hub_cache_dir()) / "--".join(["models", *repo_id.split("/")])


# ---------------------------------------------------------------------------------------------
# The local cache, read without huggingface_hub.


def cached_commit(repo_id: str, revision: str, cache_dir: Path | None = None) -> str | None:
    """The commit a branch/tag last resolved to in the cache (or `revision` if it is a commit)."""
    if COMMIT_RE.match(revision):
        return revision
    ref = repo_storage_dir(repo_id, cache_dir) / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if COMMIT_RE.match(commit) else None


def snapshot_dir(repo_id: str, commit: str, cache_dir: Path | None = None) -> Path:
    return repo_storage_dir(repo_id, cache_dir) / "snapshots" / commit


def weight_files(model_dir: Path) -> list[str] | None:
    """The safetensors files a model directory needs (from its index), or None if it cannot say."""
    try:
        weight_map = read_weight_map(model_dir)
    except WeightsError:
        return None
    if weight_map is not None:
        return sorted(set(weight_map.values()))
    if (model_dir / SINGLE_FILE).exists():
        return [SINGLE_FILE]
    names = sorted(p.name for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    return names or None


def is_complete_model_dir(model_dir: Path) -> bool:
    """config.json, tokenizer.model and every weight shard present (symlinks resolving)."""
    if not (model_dir / CONFIG_FILE).is_file() or not (model_dir / TOKENIZER_FILE).is_file():
        return False
    shards = weight_files(model_dir)
    return bool(shards) and all((model_dir / name).is_file() for name in shards)


def find_cached_snapshot(repo_id: str, revision: str, cache_dir: Path | None = None) -> Path | None:
    """A complete snapshot of `repo_id@revision` already in the hub cache, or None."""
    commit = cached_commit(repo_id, revision, cache_dir)
    if commit is None:
        return None
    path = snapshot_dir(repo_id, commit, cache_dir)
    return path if is_complete_model_dir(path) else None


def directory_size(path: Path) -> int:
    """Bytes used by the files under `path`, following symlinks to blobs, each blob counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    if not path.exists():
        return 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:
                continue  # a dangling symlink
            key = (stat.st_dev, stat.st_ino)
            if key not in seen:
                seen.add(key)
                total += stat.st_size
    return total


def partial_bytes(repo_id: str, cache_dir: Path | None = None) -> int:
    """Bytes already fetched into resumable partial files for this repo."""
    blobs = repo_storage_dir(repo_id, cache_dir) / "blobs"
    total = 0
    for partial_file in blobs.glob(f"*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(OSError):
            total += partial_file.stat().st_size
    return total


def has_any_local_data(repo_id: str, cache_dir: Path | None = None) -> bool:
    blobs = repo_storage_dir(repo_id, cache_dir) / "blobs"
    return blobs.is_dir() and any(blobs.iterdir())
