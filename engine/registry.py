"""Which models exist, which are on this machine, and which one to load.

Three kinds of model:
- the catalog: Mixtral-8x7B-Instruct-v0.1 (recommended), Mixtral-8x7B-v0.1, and the bundled demo;
- hub repos the user pulled or added by repo id (`org/name`);
- local directories the user added (never deleted by us, only forgotten).

The local registry is one JSON file in `data_dir()` (written atomically, under a file lock so the
TUI and the CLI can both write it). It records pulled/added models, where their files are (the
snapshot in the Hugging Face cache, the quantized directory), the quantization scheme, and the
default model. Status is computed from the disk, not trusted from the file: a user who deletes
the hub cache by hand sees "not downloaded", not a stale "downloaded".

Nothing heavy at import: `resolve_model` runs at CLI start-up. huggingface_hub is imported by
`hub.download_model_files`, only when a pull runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine import hub, paths
from mixtral_chat.engine.checkpoint import CONFIG_FILE, read_quant_config_json
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import ConfigError, MixtralChatError, ModelNotFoundError, QuantizationError
from mixtral_chat.engine.fileio import write_json_atomic

REGISTRY_FILE = "models.json"
REGISTRY_VERSION = 1
DEMO_NAME = "demo"
RECOMMENDED_NAME = "mixtral-8x7b-instruct"
DEFAULT_GROUP_SIZE = 64
FALLBACK_SCHEME = "int4"  # used when mixtral_chat.quant names no per-device default
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Statuses (ModelEntry.status).
NOT_DOWNLOADED = "not downloaded"
DOWNLOADING = "downloading"  # a pull is running now
PARTIAL = "partial"  # a pull was interrupted; `pull` resumes it
DOWNLOADED = "downloaded"
QUANTIZED = "quantized"
BUNDLED = "bundled"
LOCAL = "local"  # a directory the user added
MISSING = "missing"  # registered, but its files are gone


class RegistryError(MixtralChatError):
    """The local registry file is unreadable, or a registry operation is not allowed."""


class QuantizedCopyMissingError(ModelNotFoundError):
    """A model was quantized, and its quantized directory is gone."""


class UnsupportedArchitectureError(ConfigError):
    """A model's config.json describes something other than a Mixtral (MoE) model."""


# ---------------------------------------------------------------------------------------------
# The catalog.

# Mixtral-8x7B's shape (config.json of both v0.1 repos); sizes below are computed from it.
MIXTRAL_8X7B_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
}


def quantized_size_estimate(args: ModelArgs, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of a 4-bit model directory: attention and expert weights at 4 bits plus one 16-bit
    scale and one 16-bit zero (int4) or one fp32 absmax (nf4) per group; the rest stays 16-bit.
    An upper-side estimate for disk checks (the quantizer's metadata is small)."""
    d, h = args.hidden_size, args.head_dim
    attention = d * h * args.num_attention_heads * 2 + d * h * args.num_key_value_heads * 2
    experts = args.num_local_experts * 3 * d * args.intermediate_size
    quantized = args.num_hidden_layers * (attention + experts)
    bits_per_weight = 4 + 32 / group_size
    return int(quantized * bits_per_weight / 8 + (args.n_params - quantized) * 2)


def bf16_size(args: ModelArgs) -> int:
    return args.n_params * 2


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    description: str
    repo_id: str | None  # None: bundled with the package
    revision: str
    download_bytes: int  # what a pull fetches (approximate for the demo: its size on disk)
    quantized_bytes: int  # estimated 4-bit size (0 for the demo)
    parameters: int
    active_parameters: int
    license: str
    gated: bool
    recommended: bool = False
    bundled: bool = False


def _mixtral_catalog_entry(
    name: str, title: str, description: str, repo_id: str, recommended: bool
) -> CatalogEntry:
    args = ModelArgs.from_dict(MIXTRAL_8X7B_CONFIG, source=f"catalog:{name}")
    # 19 bf16 safetensors shards (their headers add ~0.1 MB) + tokenizer files (~2.3 MB).
    download = bf16_size(args) + 2_400_000
    return CatalogEntry(
        name=name,
        title=title,
        description=description,
        repo_id=repo_id,
        revision="main",  # no commit pinned: the repos are stable and a pin would need checking
        download_bytes=download,
        quantized_bytes=quantized_size_estimate(args),
        parameters=args.n_params,
        active_parameters=args.n_active_params,
        license="Apache-2.0",
        # Both repos ask users to accept sharing contact details before downloading: a token is needed.
        gated=True,
        recommended=recommended,
    )


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        _mixtral_catalog_entry(
            "mixtral-8x7b-instruct",
            "Mixtral-8x7B-Instruct-v0.1",
            "Mistral AI's instruction-tuned sparse mixture of experts: the model this app is for",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            recommended=True,
        ),
        _mixtral_catalog_entry(
            "mixtral-8x7b",
            "Mixtral-8x7B-v0.1",
            "The base (pretrained, not chat-tuned) Mixtral-8x7B: continues text rather than answering",
            "mistralai/Mixtral-8x7B-v0.1",
            recommended=False,
        ),
        CatalogEntry(
            name=DEMO_NAME,
            title="Demo (bundled)",
            description="A small Mixtral-architecture model shipped with the app so it works offline",
            repo_id=None,
            revision="",
            download_bytes=0,
            quantized_bytes=0,
            parameters=0,
            active_parameters=0,
            license="see MODEL_CARD.md in the demo folder",
            gated=False,
            bundled=True,
        ),
    )
}


def demo_dir() -> Path:
    return paths.assets_dir() / "demo"


# ---------------------------------------------------------------------------------------------
# Public data types.


@dataclass(frozen=True)
class PullProgress:
    phase: str  # "download" | "quantize"
    bytes_done: int
    bytes_total: int
    speed: float  # bytes per second
    eta_s: float | None
    file: str | None = None

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0


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


@dataclass(frozen=True)
class ModelDetails:
    entry: ModelEntry
    architecture: dict[str, Any]  # layers, experts, hidden size, parameters (empty if unknown)
    files: list[tuple[str, int]]  # files of the directory that would be loaded, with sizes
    quant_config: dict[str, Any] | None


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    is_demo: bool
    scheme: str | None = None
    repo_id: str | None = None
    source: str = "local"


# ---------------------------------------------------------------------------------------------
# The registry file.


def registry_path() -> Path:
    return paths.data_dir() / REGISTRY_FILE


def models_dir() -> Path:
    """Quantized model directories live here: `<name>-<scheme>`."""
    return paths.data_dir() / "models"


def _empty_registry() -> dict[str, Any]:
    return {"version": REGISTRY_VERSION, "default": None, "models": {}}


def _read_registry() -> dict[str, Any]:
    path = registry_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _empty_registry()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RegistryError(
            f"{path} is unreadable ({' '.join(str(exc).split())}); fix or move it away (models stay on disk)"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise RegistryError(f"{path} is not a mixtral-chat model registry; fix or move it away")
    version = raw.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise RegistryError(
            f"{path}: 'version' must be a number, not {_json_type(version)}; fix or move it away"
        )
    if version > REGISTRY_VERSION:
        raise RegistryError(f"{path} was written by a newer mixtral-chat (version {raw['version']})")
    raw.setdefault("default", None)
    if raw["default"] is not None and not isinstance(raw["default"], str):
        raise RegistryError(
            f"{path}: 'default' must be a model name, not {_json_type(raw['default'])}; fix or remove it"
        )
    for name, record in raw["models"].items():
        problem = _record_problem(record)
        if problem is not None:
            raise RegistryError(
                f"{path}: entry '{name}' {problem}; fix or remove that entry (its model files stay on disk)"
            )
    return raw


# The fields a registry entry may have, with their JSON types (each may also be null).
_RECORD_FIELDS: dict[str, type] = {
    "source": str,
    "repo_id": str,
    "revision": str,
    "commit": str,
    "original_path": str,
    "quantized_path": str,
    "path": str,
    "scheme": str,
    "group_size": int,
    "state": str,
    "added": str,
    "download_bytes": int,
}
_SOURCES = ("catalog", "hub", "local")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    for kind, name in ((str, "a string"), (int, "a number"), (float, "a number"), (list, "a list")):
        if isinstance(value, kind):
            return name
    return "an object" if isinstance(value, dict) else type(value).__name__


def _record_problem(record: Any) -> str | None:
    """What is wrong with one entry of models.json, or None."""
    if not isinstance(record, dict):
        return f"must be a JSON object, not {_json_type(record)}"
    for key, kind in _RECORD_FIELDS.items():
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = "a number" if kind is int else "a string"
            return f"has '{key}' {_json_type(value)} ({value!r:.40}) where {expected} belongs"
    if record.get("source") is not None and record["source"] not in _SOURCES:
        return f"has an unknown source '{record['source']}' (one of {', '.join(_SOURCES)})"
    if record.get("source") == "local" and not record.get("path"):
        return "is a local model without a 'path'"
    return None


def _write_registry(data: dict[str, Any]) -> None:
    write_json_atomic(registry_path(), data, sort_keys=True)


@contextlib.contextmanager
def _registry_update() -> Iterator[dict[str, Any]]:
    """Read-modify-write under a lock shared by every process that uses this data folder."""
    from filelock import FileLock

    lock_path = paths.data_dir() / f"{REGISTRY_FILE}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path, timeout=30):
        data = _read_registry()
        yield data
        _write_registry(data)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Pull locks: one pull per model at a time; a held lock means "downloading".


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-") or "model"


def _pull_lock_path(name: str) -> Path:
    return paths.data_dir() / "locks" / f"{_safe_name(name)}.pull.lock"


def _pull_running(name: str) -> bool:
    from filelock import FileLock, Timeout

    lock_path = _pull_lock_path(name)
    if not lock_path.exists():
        return False
    lock = FileLock(lock_path, timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


# ---------------------------------------------------------------------------------------------
# Config validation.


def validate_config(raw: Any, source: str) -> ModelArgs:
    """A Mixtral (MoE) config or a clear error; returns the parsed shape."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    architectures = [str(a) for a in raw.get("architectures") or []]
    model_type = raw.get("model_type")
    is_mixtral = model_type == "mixtral" or any(a.startswith("Mixtral") for a in architectures)
    if not is_mixtral and (model_type is not None or architectures or "num_local_experts" not in raw):
        what = model_type or (architectures[0] if architectures else "no model_type/architectures")
        raise UnsupportedArchitectureError(
            f"{source}: unsupported architecture '{what}' (mixtral-chat runs Mixtral models: "
            "model_type 'mixtral', MixtralForCausalLM)"
        )
    return ModelArgs.from_dict(raw, source=source)


def _validate_model_dir(path: Path) -> ModelArgs:
    config = path / CONFIG_FILE
    if not config.is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a model directory")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{config}: not valid JSON ({exc})") from None
    args = validate_config(raw, str(config))
    if not (path / hub.TOKENIZER_FILE).is_file():
        raise ModelNotFoundError(f"{path} has no tokenizer.model (mixtral-chat needs the sentencepiece file)")
    quantized = ckpt.detect(path).kind == ckpt.QUANTIZED
    if not quantized and not hub.weight_files(path):
        raise ModelNotFoundError(f"{path} has no safetensors weights")
    return args


# ---------------------------------------------------------------------------------------------
# Looking models up.


@dataclass
class _Known:
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


def _all_known(data: dict[str, Any]) -> list[_Known]:
    known = [
        _Known(name, catalog=entry, record=dict(data["models"].get(name, {})))
        for name, entry in CATALOG.items()
    ]
    known += [_Known(name, record=dict(rec)) for name, rec in data["models"].items() if name not in CATALOG]
    return known


def _find(data: dict[str, Any], spec: str) -> _Known | None:
    """By name (case-insensitive), then by repo id (case-insensitive)."""
    lowered = spec.lower()
    known = _all_known(data)
    for item in known:
        if item.name.lower() == lowered:
            return item
    for item in known:
        if item.repo_id and item.repo_id.lower() == lowered:
            return item
    return None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or (os.sep in spec and Path(spec).expanduser().exists())


def _original_path(item: _Known) -> Path | None:
    """The complete original checkpoint: recorded snapshot, else whatever the hub cache holds."""
    recorded = item.record.get("original_path")
    if recorded and hub.is_complete_model_dir(Path(recorded)):
        return Path(recorded)
    if item.repo_id:
        commit = item.record.get("commit")
        if commit:
            path = hub.snapshot_dir(item.repo_id, commit)
            if hub.is_complete_model_dir(path):
                return path
        return hub.find_cached_snapshot(item.repo_id, item.revision)
    return None


def _quantized_path(item: _Known) -> Path | None:
    recorded = item.record.get("quantized_path")
    if recorded and (Path(recorded) / CONFIG_FILE).is_file():
        return Path(recorded)
    return None


def _entry(item: _Known, default: str | None) -> ModelEntry:
    record = item.record
    is_default = default is not None and default == item.name
    if item.source == "bundled":
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
            size_on_disk=hub.directory_size(path) if exists else 0,
            is_default=is_default,
            catalog=item.catalog,
            download_bytes=None,
        )
    if item.source == "local":
        path = Path(record["path"])
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
            size_on_disk=hub.directory_size(path) if exists else 0,
            is_default=is_default,
            catalog=None,
            download_bytes=None,
        )
    original = _original_path(item)
    quantized = _quantized_path(item)
    partial = hub.partial_bytes(item.repo_id) if item.repo_id else 0
    if quantized is not None:
        status = QUANTIZED
    elif original is not None:
        status = DOWNLOADED
    elif _pull_running(item.name):
        status = DOWNLOADING
    elif record.get("state") == DOWNLOADING or (item.repo_id and hub.has_any_local_data(item.repo_id)):
        status = PARTIAL
    else:
        status = NOT_DOWNLOADED
    size = 0
    if original is not None:
        size += hub.directory_size(original)
    elif item.repo_id:
        size += _cached_repo_bytes(item.repo_id)
    if quantized is not None:
        size += hub.directory_size(quantized)
    return ModelEntry(
        name=item.name,
        source=item.source,
        status=status,
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


def _cached_repo_bytes(repo_id: str) -> int:
    """Bytes in the repo's hub-cache folder (blobs and partials) when no complete snapshot exists."""
    return hub.directory_size(hub.repo_storage_dir(repo_id) / "blobs")


def _prequantized_scheme(path: Path | None) -> str | None:
    """ "nf4 (bitsandbytes)" for a checkpoint transformers saved 4-bit; None for a float one."""
    if path is None:
        return None
    found = ckpt.detect(path)
    return found.label if found.kind == ckpt.BNB_4BIT else None


# ---------------------------------------------------------------------------------------------
# Public API: listing, resolving, choosing.


def list_models() -> list[ModelEntry]:
    """Catalog models (installed or not), then user-added ones, in that order."""
    data = _read_registry()
    return [_entry(item, data.get("default")) for item in _all_known(data)]


def get_model(name: str) -> ModelEntry:
    data = _read_registry()
    item = _find(data, name)
    if item is None:
        raise ModelNotFoundError(_unknown_message(name))
    return _entry(item, data.get("default"))


def resolve_model(spec: str | None) -> ResolvedModel:
    """The directory to load for `spec`: a catalog name, a pulled/added name or repo id, or a
    path to a model directory. None: the user's default model, else the bundled demo.

    A path is resolved without the registry, so a damaged models.json never blocks
    `--model <dir>`."""
    if spec is not None and spec.strip() and _looks_like_path(spec.strip()):
        return _resolve_path(Path(spec.strip()).expanduser())
    try:
        data = _read_registry()
    except RegistryError:
        if spec is not None and spec.strip() and Path(spec.strip()).expanduser().is_dir():
            return _resolve_path(Path(spec.strip()).expanduser())  # a directory name: no registry needed
        raise
    if spec is None:
        default = data.get("default")
        if default:
            item = _find(data, default)
            if item is None:
                raise ModelNotFoundError(
                    f"the default model '{default}' is no longer registered; choose one with "
                    "`mixtral-chat models use NAME`"
                )
            return _resolved(item, data, spec=default)
        return _resolve_demo(no_default=True)
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError("empty model name; see `mixtral-chat models list`")
    item = _find(data, spec)
    if item is not None:
        return _resolved(item, data, spec=spec)
    candidate = Path(spec).expanduser()
    if candidate.exists():
        return _resolve_path(candidate)
    if hub.is_repo_id(spec):
        cached = hub.find_cached_snapshot(spec, "main")
        if cached is not None:  # fetched by transformers or another hub client: reuse it
            _validate_model_dir(cached)
            return ResolvedModel(name=spec, path=cached, is_demo=False, repo_id=spec, source="hub")
        raise ModelNotFoundError(f"model '{spec}' is not installed; run `mixtral-chat models pull {spec}`")
    raise ModelNotFoundError(_unknown_message(spec))


def _unknown_message(spec: str) -> str:
    names = ", ".join(CATALOG)
    return (
        f"unknown model '{spec}': not a catalog name ({names}), an installed model, a hub repo id "
        "(org/name) or a model directory; see `mixtral-chat models list`"
    )


def _resolve_demo(no_default: bool = False) -> ResolvedModel:
    path = demo_dir()
    if not (path / CONFIG_FILE).is_file():
        hint = "no model is installed and " if no_default else ""
        raise ModelNotFoundError(
            f"{hint}the bundled demo model is missing from {path}; reinstall mixtral-chat or run "
            f"`mixtral-chat models pull {RECOMMENDED_NAME}`"
        )
    return ResolvedModel(name=DEMO_NAME, path=path, is_demo=True, source="bundled")


def _resolve_path(path: Path) -> ResolvedModel:
    path = path.resolve()
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a directory (a model directory holds config.json)")
    _validate_model_dir(path)
    quant = read_quant_config_json(path)
    is_demo = path == demo_dir().resolve()
    return ResolvedModel(
        name=DEMO_NAME if is_demo else path.name,
        path=path,
        is_demo=is_demo,
        scheme=(quant or {}).get("scheme"),
        source="bundled" if is_demo else "local",
    )


def _resolved(item: _Known, data: dict[str, Any], spec: str) -> ResolvedModel:
    if item.source == "bundled":
        return _resolve_demo()
    entry = _entry(item, data.get("default"))
    recorded_quantized = item.record.get("quantized_path")
    if recorded_quantized and entry.quantized_path is None and entry.source != "local":
        # Quantized once, the copy is gone: say so rather than load the float original unasked.
        scheme = item.record.get("scheme")
        redo = f"mixtral-chat models pull {item.name}" + (f" --scheme {scheme}" if scheme else "")
        float_hint = (
            f" (or run the float original with `--model {entry.original_path}`)"
            if entry.original_path is not None
            else ""
        )
        raise QuantizedCopyMissingError(
            f"model '{item.name}': its {scheme or '4-bit'} quantized copy {recorded_quantized} is missing; "
            f"run `{redo}` to quantize it again{float_hint}"
        )
    if entry.path is None:
        if entry.source == "local":
            raise ModelNotFoundError(
                f"model '{item.name}' was added from {item.record.get('path')}, which no longer holds "
                f"a model; remove it with `mixtral-chat models rm {item.name}`"
            )
        more = " (a previous pull was interrupted; pulling resumes it)" if entry.status == PARTIAL else ""
        raise ModelNotFoundError(
            f"model '{spec}' is not installed{more}; run `mixtral-chat models pull {item.name}`"
        )
    return ResolvedModel(
        name=item.name,
        path=entry.path,
        is_demo=False,
        scheme=entry.scheme,
        repo_id=entry.repo_id,
        source=entry.source,
    )


def set_default(name: str) -> ModelEntry:
    """Make `name` the model the app and `ask` use when none is given. It must be installed;
    a model directory path is added first."""
    spec = name.strip()
    if _looks_like_path(spec) or (Path(spec).expanduser().is_dir() and _find(_read_registry(), spec) is None):
        entry = add_model(spec)
        spec = entry.name
    data = _read_registry()
    item = _find(data, spec)
    if item is None and hub.is_repo_id(spec):
        cached = hub.find_cached_snapshot(spec, "main")
        if cached is not None:  # fetched by another hub client: register it as it is
            _validate_model_dir(cached)
            with _registry_update() as data:
                data["models"][spec] = {
                    "source": "hub",
                    "repo_id": spec,
                    "revision": "main",
                    "commit": cached.name,
                    "original_path": str(cached),
                    "state": DOWNLOADED,
                    "added": _now(),
                }
            item = _find(data, spec)
    if item is None:
        raise ModelNotFoundError(_unknown_message(spec))
    entry = _entry(item, data.get("default"))
    if not entry.installed:
        raise ModelNotFoundError(
            f"model '{item.name}' is not installed ({entry.status}); "
            f"run `mixtral-chat models pull {item.name}` first"
        )
    with _registry_update() as data:
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
# Adding and removing.


def add_model(
    source: str, *, name: str | None = None, token: str | None = None, endpoint: str | None = None
) -> ModelEntry:
    """Register a local model directory, or a hub repo id (validated by fetching its config.json)."""
    source = source.strip()
    path = Path(source).expanduser()
    if _looks_like_path(source) or path.is_dir():
        path = path.resolve()
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is not a directory")
        _validate_model_dir(path)
        if path == demo_dir().resolve():
            raise RegistryError("the bundled demo model is always available as 'demo'")
        new_name = _check_new_name(name or path.name)
        with _registry_update() as data:
            for existing, record in data["models"].items():
                if record.get("source") == "local" and record.get("path") == str(path):
                    raise RegistryError(f"{path} is already registered as '{existing}'")
            data["models"][new_name] = {"source": "local", "path": str(path), "added": _now()}
        return get_model(new_name)
    if not hub.is_repo_id(source):
        raise ModelNotFoundError(f"'{source}' is neither a model directory nor a hub repo id (org/name)")
    data = _read_registry()
    existing = _find(data, source)
    if existing is not None:
        raise RegistryError(f"{source} is already known as '{existing.name}'")
    new_name = _check_new_name(name) if name else source
    _fetch_and_validate_config(source, "main", token=token, endpoint=endpoint)
    with _registry_update() as data:
        data["models"][new_name] = {"source": "hub", "repo_id": source, "revision": "main", "added": _now()}
    return get_model(new_name)


def _check_new_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name '{name}': use letters, digits, '.', '_' or '-' (give one with --name)"
        )
    data = _read_registry()
    clash = _find(data, name)
    if clash is not None:
        raise RegistryError(f"a model named '{clash.name}' already exists; choose another with --name")
    return name


def _fetch_and_validate_config(
    repo_id: str, revision: str, *, token: str | None, endpoint: str | None
) -> None:
    import tempfile

    from huggingface_hub import hf_hub_download

    endpoint = endpoint or hub.hub_endpoint()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config_path = hf_hub_download(
                repo_id,
                "config.json",
                revision=revision,
                token=token,
                endpoint=endpoint,
                local_dir=tmp,
                cache_dir=hub.hub_cache_dir(),  # only read; huggingface_hub fixes its default at import
            )
        except Exception as exc:
            raise hub.translate_hub_error(
                exc, repo_id=repo_id, revision=revision, endpoint=endpoint, token=token
            ) from None
        try:
            raw = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{repo_id}/config.json: not valid JSON ({exc})") from None
    validate_config(raw, f"{repo_id}/config.json")


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


def _removal_target(data: dict[str, Any], name: str) -> _Known:
    item = _find(data, name)
    if item is not None:
        return item
    spec = name.strip()
    if hub.is_repo_id(spec) and hub.repo_storage_dir(spec).exists():
        # Not registered (never pulled, or already removed): only its Hugging Face cache copy is left.
        return _Known(spec, record={"repo_id": spec, "revision": "main"})
    raise ModelNotFoundError(_unknown_message(name))


def _hf_copy_of(item: _Known, entry: ModelEntry | None = None) -> HfCacheCopy | None:
    repo_id = item.repo_id
    if not repo_id or item.source in ("local", "bundled"):
        return None
    storage = hub.repo_storage_dir(repo_id)
    if not storage.exists():
        return None
    commit = (entry.commit if entry is not None else None) or item.record.get("commit")
    commit = commit or hub.cached_commit(repo_id, item.revision)
    snapshot = hub.snapshot_dir(repo_id, commit) if commit else None
    if snapshot is not None and snapshot.is_dir():
        size = hub.directory_size(snapshot) + hub.partial_bytes(repo_id)
        return HfCacheCopy(repo_id, commit, snapshot, size)
    return HfCacheCopy(repo_id, commit, storage, _cached_repo_bytes(repo_id))


def hf_cache_copy(name: str) -> HfCacheCopy | None:
    """What `remove_model(name, delete_hf_cache=True)` would delete from the Hugging Face cache."""
    data = _read_registry()
    item = _removal_target(data, name)
    return _hf_copy_of(item, _entry(item, data.get("default")))


def remove_model(name: str, *, delete_hf_cache: bool = False) -> Removal:
    """Forget a model and delete what mixtral-chat made for it (its quantized directory).

    Its copy in the Hugging Face cache (the original checkpoint, which transformers and other hub
    clients share) is left alone unless `delete_hf_cache`; then it goes through huggingface_hub's
    own `scan_cache_dir(...).delete_revisions(...)`, keeping any blob another cached repo links.
    Local directories are only forgotten, never deleted.
    """
    data = _read_registry()
    item = _removal_target(data, name)
    if item.source == "bundled":
        raise RegistryError("the bundled demo model cannot be removed (it ships with mixtral-chat)")
    if _pull_running(item.name):
        raise RegistryError(f"a pull of '{item.name}' is running; cancel it first")
    entry = _entry(item, data.get("default"))
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
        quantized_freed = hub.directory_size(Path(recorded))
        shutil.rmtree(recorded)
    hf_freed = 0
    spared: tuple[Path, ...] = ()
    if delete_hf_cache and copy is not None:
        deletion = hub.delete_cached_revision(copy.repo_id, copy.commit)
        hf_freed, spared = deletion.freed, deletion.spared
    if registered:
        _forget(item.name)
    kept = copy if not delete_hf_cache else None
    return Removal(
        item.name, item.source, quantized_freed + hf_freed, quantized_freed, hf_freed, kept, spared
    )


def _forget(name: str) -> None:
    with _registry_update() as data:
        data["models"].pop(name, None)
        if data.get("default") == name:
            data["default"] = None


def delete_original(name: str) -> int:
    """Delete the bf16 original of a quantized model from the hub cache (the user asked for it);
    returns bytes freed. Blobs other cached repos link to are kept."""
    data = _read_registry()
    item = _find(data, name)
    if item is None or item.repo_id is None:
        raise ModelNotFoundError(f"'{name}' has no downloaded original to delete")
    entry = _entry(item, data.get("default"))
    if entry.quantized_path is None:
        raise RegistryError(
            f"'{item.name}' is not quantized: deleting its original would leave nothing to load"
        )
    commit = entry.commit or hub.cached_commit(item.repo_id, item.revision)
    freed = hub.delete_cached_revision(item.repo_id, commit).freed
    with _registry_update() as data:
        record = data["models"].get(item.name)
        if record is not None:
            record["original_path"] = None
    return freed


# ---------------------------------------------------------------------------------------------
# Pulling.


def default_quant_settings(scheme: str | None = None) -> tuple[str, int]:
    """The quantization scheme (the quantizer's measured default for this machine's device) and
    group size a pull uses unless told otherwise."""
    try:
        from mixtral_chat import quant

        if scheme is None:
            import torch

            scheme = str(quant.default_scheme("cuda" if torch.cuda.is_available() else "cpu"))
        groups = quant.DEFAULT_GROUP_SIZE
        group = groups.get(scheme, DEFAULT_GROUP_SIZE) if isinstance(groups, dict) else int(groups)
    except (ImportError, AttributeError):
        return scheme or FALLBACK_SCHEME, DEFAULT_GROUP_SIZE
    return scheme, int(group)


def _load_quantizer() -> Callable[..., Any]:
    try:
        from mixtral_chat.quant import quantize_model_dir
    except ImportError:
        raise QuantizationError(
            "quantization is not available in this build (mixtral_chat.quant.quantize_model_dir is "
            "missing); pull with --no-quantize"
        ) from None
    return quantize_model_dir


def _pull_target(data: dict[str, Any], spec: str) -> _Known:
    spec = spec.strip()
    item = _find(data, spec)
    if item is not None:
        if item.source == "bundled":
            raise RegistryError("the demo model is bundled with mixtral-chat: nothing to download")
        if item.source == "local":
            raise RegistryError(
                f"'{item.name}' is a local directory ({item.record.get('path')}): nothing to download"
            )
        return item
    if hub.is_repo_id(spec):
        return _Known(spec, record={"source": "hub", "repo_id": spec, "revision": "main"})
    if _looks_like_path(spec) or Path(spec).expanduser().exists():
        raise RegistryError(f"'{spec}' is a local path: register it with `mixtral-chat models add {spec}`")
    raise ModelNotFoundError(_unknown_message(spec))


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
) -> ModelEntry:
    """Download a catalog model or any Mixtral repo id into the hub cache, then (by default)
    quantize it into `data_dir()/models/<name>-<scheme>`. Resumes interrupted pulls; a model
    already in the hub cache is not downloaded again. Raises DownloadCancelled when `cancel`
    is set (partial files are kept)."""
    from filelock import FileLock, Timeout

    data = _read_registry()
    item = _pull_target(data, name)
    repo_id = item.repo_id
    assert repo_id is not None
    revision = revision or item.revision
    existing_quantized = _quantized_path(item)
    if (
        quantize
        and existing_quantized is not None
        and scheme in (None, item.record.get("scheme"))
        and group_size in (None, item.record.get("group_size"))
        and revision == item.revision
    ):
        # Already quantized as asked (or with whatever scheme was chosen before): nothing to fetch,
        # even if the bf16 original was deleted; `--no-quantize` is how to get the original back.
        if not keep_original and _original_path(item) is not None:
            delete_original(item.name)
        return get_model(item.name)
    quantizer = None
    if quantize:
        quantizer = _load_quantizer()  # fail before downloading 90 GB, not after
        scheme, default_group = default_quant_settings(scheme)
        group_size = group_size or default_group
    estimate_group = group_size or DEFAULT_GROUP_SIZE
    quant_dir = models_dir() / f"{_safe_name(item.name)}-{scheme}" if quantize else None

    prequantized = False  # a repo saved already 4-bit (bitsandbytes) is used as it is

    lock_path = _pull_lock_path(item.name)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        raise RegistryError(f"a pull of '{item.name}' is already running") from None
    try:

        def before_weights(config: dict[str, Any], to_download: int) -> None:
            # The repo exists, its config is a Mixtral and the pull fits: from here it is ours.
            nonlocal prequantized
            args = validate_config(config, f"{repo_id}/config.json")
            prequantized = config.get("quantization_config") is not None
            needs = [(hub.hub_cache_dir(), to_download, "to download")]
            if quant_dir is not None and not prequantized and not (quant_dir / CONFIG_FILE).is_file():
                needs.append(
                    (quant_dir.parent, quantized_size_estimate(args, estimate_group), "for the 4-bit copy")
                )
            hub.check_disk_space(needs)
            _record_pull_started(item, repo_id, revision)

        download_progress = None
        if progress is not None:
            callback = progress

            def download_progress(p: hub.DownloadProgress) -> None:
                callback(PullProgress("download", p.bytes_done, p.bytes_total, p.speed, p.eta_s, p.file))

        snapshot = hub.download_model_files(
            repo_id,
            revision,
            token=token,
            endpoint=endpoint,
            progress=download_progress,
            cancel=cancel,
            before_weights=before_weights,
        )
        # A cached copy used offline skipped before_weights: validate it here.
        _validate_model_dir(snapshot.path)
        _record_pull_started(item, repo_id, revision)  # also when an offline cached copy skipped the hook
        with _registry_update() as data:
            record = data["models"].setdefault(item.name, {})
            record.update(
                commit=snapshot.commit,
                original_path=str(snapshot.path),
                download_bytes=snapshot.total_bytes,
                state=record.get("state") if record.get("state") == QUANTIZED else DOWNLOADED,
            )
            if not data.get("default"):
                data["default"] = item.name  # the first real model becomes the default

        prequantized = prequantized or ckpt.detect(snapshot.path).quantization_config is not None
        if quantizer is not None and quant_dir is not None and scheme is not None and not prequantized:
            _quantize(
                item.name, quantizer, snapshot.path, quant_dir, scheme, estimate_group, progress, cancel
            )
            if not keep_original:
                delete_original(item.name)
        return get_model(item.name)
    finally:
        lock.release()


def _record_pull_started(item: _Known, repo_id: str, revision: str) -> None:
    with _registry_update() as data:
        record = data["models"].setdefault(item.name, {})
        state = record.get("state")
        record.update(
            source="catalog" if item.catalog else "hub",
            repo_id=repo_id,
            revision=revision,
            state=state if state in (DOWNLOADED, QUANTIZED) else DOWNLOADING,
        )
        record.setdefault("added", _now())


def _quantize(
    name: str,
    quantizer: Callable[..., Any],
    src: Path,
    dst: Path,
    scheme: str,
    group_size: int,
    progress: Callable[[PullProgress], None] | None,
    cancel: threading.Event | None,
) -> None:
    data = _read_registry()
    record = data["models"].get(name, {})
    previous = record.get("quantized_path")
    already = (
        previous == str(dst)
        and (dst / CONFIG_FILE).is_file()
        and record.get("scheme") == scheme
        and record.get("group_size") == group_size
    )
    existing = read_quant_config_json(dst) if (dst / CONFIG_FILE).is_file() else None
    if not already and existing is not None:
        # Quantized earlier (the registry lost track, or another pull finished it): reuse it if it
        # matches, refuse to overwrite it if not.
        if existing.get("scheme") == scheme and existing.get("group_size") == group_size:
            already = True
        else:
            raise QuantizationError(
                f"{dst} already holds a {existing.get('scheme')} model with group size "
                f"{existing.get('group_size')}; remove it or pull with those options"
            )
    if not already:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            result = quantizer(
                src, dst, scheme, group_size, progress=_quant_progress_adapter(progress), cancel=cancel
            )
        except QuantizationError as exc:
            if cancel is not None and cancel.is_set():  # one cancellation type for pull_model's callers
                raise hub.DownloadCancelled(str(exc)) from None
            raise
        if isinstance(result, (str, Path)):
            dst = Path(result)
    with _registry_update() as data:
        record = data["models"].setdefault(name, {})
        record.update(quantized_path=str(dst), scheme=scheme, group_size=group_size, state=QUANTIZED)
    if previous and previous != str(dst) and Path(previous).exists():
        shutil.rmtree(previous, ignore_errors=True)  # one quantized copy per model: the newest


def _quant_progress_adapter(progress: Callable[[PullProgress], None] | None) -> Callable[..., None] | None:
    """Turn the quantizer's progress reports into PullProgress("quantize", ...).

    Accepts `(done, total)` numbers or one object with `bytes_done`/`bytes_total` (or `done`/
    `total`) attributes, so the two modules can evolve independently.
    """
    if progress is None:
        return None
    started = time.monotonic()

    def report(*args: Any, **kwargs: Any) -> None:
        done = total = None
        speed: float | None = None
        eta: float | None = None
        current: str | None = None
        if len(args) >= 2 and all(isinstance(a, (int, float)) for a in args[:2]):
            done, total = args[0], args[1]
        elif args:
            obj = args[0]
            for d_name, t_name in (("bytes_done", "bytes_total"), ("done", "total"), ("n", "total")):
                if hasattr(obj, d_name) and hasattr(obj, t_name):
                    done, total = getattr(obj, d_name), getattr(obj, t_name)
                    break
            speed = getattr(obj, "bytes_per_s", None)
            eta = getattr(obj, "eta_s", None)
            current = getattr(obj, "current", None) or None
        done = kwargs.get("done", done)
        total = kwargs.get("total", total)
        if done is None or total is None:
            return
        if speed is None:
            speed = done / max(time.monotonic() - started, 1e-6)
        if eta is None and speed > 0:
            eta = (total - done) / speed
        progress(PullProgress("quantize", int(done), int(total), float(speed), eta, current))

    return report
