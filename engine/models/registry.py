"""Which models exist, which are on this machine, and which one to use: listing, looking up,
choosing the default, details, and registering a local directory or a hub repo id.

Three kinds of model:
- the catalog: Mixtral-8x7B-Instruct-v0.1 (recommended), Mixtral-8x7B-v0.1, and the bundled demo;
- hub repos the user pulled or added by repo id (`org/name`);
- local directories the user added (never deleted by us, only forgotten).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_chat.engine.checkpoint import CONFIG_FILE, read_quant_config_json
from mixtral_chat.engine.errors import ConfigError, MixtralChatError, ModelNotFoundError
from mixtral_chat.engine.models.catalog import MIXTRAL_8X7B_CONFIG, demo_dir
from mixtral_chat.engine.models.entries import (
    DOWNLOADED,
    ModelEntry,
    all_known,
    find_known,
    looks_like_path,
    model_entry,
    unknown_model_message,
)
from mixtral_chat.engine.models.errors import RegistryError
from mixtral_chat.engine.models.hub_cache import find_cached_snapshot, hub_cache_dir, hub_endpoint, is_repo_id
from mixtral_chat.engine.models.hub_errors import translate_hub_error
from mixtral_chat.engine.models.registry_file import read_registry, registry_update, timestamp_now
from mixtral_chat.engine.models.validation import validate_config, validate_model_dir

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelDetails:
    entry: ModelEntry
    architecture: dict[str, Any]  # layers, experts, hidden size, parameters (empty if unknown)
    files: list[tuple[str, int]]  # files of the directory that would be loaded, with sizes
    quant_config: dict[str, Any] | None


# ---------------------------------------------------------------------------------------------
# Listing, looking up, choosing the default, details.


def list_models() -> list[ModelEntry]:
    """Catalog models (installed or not), then user-added ones, in that order."""
    data = read_registry()
    return [model_entry(item, data.get("default")) for item in all_known(data)]


def get_model(name: str) -> ModelEntry:
    data = read_registry()
    item = find_known(data, name)
    if item is None:
        raise ModelNotFoundError(unknown_model_message(name))
    return model_entry(item, data.get("default"))


def set_default(name: str) -> ModelEntry:
    """Make `name` the model the app and `ask` use when none is given. It must be installed;
    a model directory path is added first."""
    spec = name.strip()
    if looks_like_path(spec) or (
        Path(spec).expanduser().is_dir() and find_known(read_registry(), spec) is None
    ):
        entry = add_model(spec)
        spec = entry.name
    data = read_registry()
    item = find_known(data, spec)
    if item is None and is_repo_id(spec):
        cached = find_cached_snapshot(spec, "main")
        if cached is not None:  # fetched by another hub client: register it as it is
            validate_model_dir(cached)
            with registry_update() as data:
                data["models"][spec] = {
                    "source": "hub",
                    "repo_id": spec,
                    "revision": "main",
                    "commit": cached.name,
                    "original_path": str(cached),
                    "state": DOWNLOADED,
                    "added": timestamp_now(),
                }
            item = find_known(data, spec)
    if item is None:
        raise ModelNotFoundError(unknown_model_message(spec))
    entry = model_entry(item, data.get("default"))
    if not entry.installed:
        raise ModelNotFoundError(
            f"model '{item.name}' is not installed ({entry.status}); "
            f"run `mixtral-chat models pull {item.name}` first"
        )
    with registry_update() as data:
        data["default"] = item.name
    return get_model(item.name)


def model_info(name: str) -> ModelDetails:
    entry = get_model(name)
    architecture: dict[str, Any] = {}
    config_source: Any = None
    if entry.path is not None and (entry.path / CONFIG_FILE).is_file():
        with contextlib.suppress(OSError, ValueError):
            config_source = json.loads((entry.path / CONFIG_FILE).read_text(encoding="utf-8"))
    elif entry.catalog is not None and entry.catalog.repo_id is not None:
        config_source = MIXTRAL_8X7B_CONFIG
    if config_source is not None:
        with contextlib.suppress(MixtralChatError):
            args = validate_config(config_source, "config.json")
            architecture = {
                "layers": args.num_hidden_layers,
                "experts": args.num_local_experts,
                "experts_per_token": args.num_experts_per_tok,
                "hidden_size": args.hidden_size,
                "vocab_size": args.vocab_size,
                "context": args.max_position_embeddings,
                "parameters": args.n_params,
                "active_parameters": args.n_active_params,
            }
    files: list[tuple[str, int]] = []
    if entry.path is not None:
        for file in sorted(entry.path.iterdir()):
            with contextlib.suppress(OSError):
                files.append((file.name, file.stat().st_size))
    quant = read_quant_config_json(entry.path) if entry.path is not None else None
    return ModelDetails(entry=entry, architecture=architecture, files=files, quant_config=quant)


# ---------------------------------------------------------------------------------------------
# Adding a local directory or a hub repo id.


def add_model(
    source: str, *, name: str | None = None, token: str | None = None, endpoint: str | None = None
) -> ModelEntry:
    """Register a local model directory, or a hub repo id (validated by fetching its config.json)."""
    source = source.strip()
    path = Path(source).expanduser()
    if looks_like_path(source) or path.is_dir():
        path = path.resolve()
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is not a directory")
        validate_model_dir(path)
        if path == demo_dir().resolve():
            raise RegistryError("the bundled demo model is always available as 'demo'")
        new_name = _check_new_name(name or path.name)
        with registry_update() as data:
            for existing, record in data["models"].items():
                if record.get("source") == "local" and record.get("path") == str(path):
                    raise RegistryError(f"{path} is already registered as '{existing}'")
            data["models"][new_name] = {"source": "local", "path": str(path), "added": timestamp_now()}
        return get_model(new_name)
    if not is_repo_id(source):
        raise ModelNotFoundError(f"'{source}' is neither a model directory nor a hub repo id (org/name)")
    data = read_registry()
    existing = find_known(data, source)
    if existing is not None:
        raise RegistryError(f"{source} is already known as '{existing.name}'")
    new_name = _check_new_name(name) if name else source
    _fetch_and_validate_config(source, "main", token=token, endpoint=endpoint)
    with registry_update() as data:
        data["models"][new_name] = {
            "source": "hub",
            "repo_id": source,
            "revision": "main",
            "added": timestamp_now(),
        }
    return get_model(new_name)


def _check_new_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name '{name}': use letters, digits, '.', '_' or '-' (give one with --name)"
        )
    data = read_registry()
    clash = find_known(data, name)
    if clash is not None:
        raise RegistryError(f"a model named '{clash.name}' already exists; choose another with --name")
    return name


def _fetch_and_validate_config(
    repo_id: str, revision: str, *, token: str | None, endpoint: str | None
) -> None:
    import tempfile

    from huggingface_hub import hf_hub_download

    endpoint = endpoint or hub_endpoint()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config_path = hf_hub_download(
                repo_id,
                "config.json",
                revision=revision,
                token=token,
                endpoint=endpoint,
                local_dir=tmp,
                cache_dir=hub_cache_dir(),  # only read; huggingface_hub fixes its default at import
            )
        except Exception as exc:
            raise translate_hub_error(
                exc, repo_id=repo_id, revision=revision, endpoint=endpoint, token=token
            ) from None
        try:
            raw = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{repo_id}/config.json: not valid JSON ({exc})") from None
    validate_config(raw, f"{repo_id}/config.json")
