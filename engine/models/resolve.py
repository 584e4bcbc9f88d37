"""Which directory to load: `resolve_model` turns a model name, repo id or path (or nothing: the
default) into a ResolvedModel. It runs at CLI start-up, so nothing heavy is imported here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_chat.engine.checkpoint import CONFIG_FILE, read_quant_config_json
from mixtral_chat.engine.errors import ModelNotFoundError
from mixtral_chat.engine.models.catalog import DEMO_NAME, RECOMMENDED_NAME, demo_dir
from mixtral_chat.engine.models.entries import (
    PARTIAL,
    KnownModel,
    find_known,
    looks_like_path,
    model_entry,
    unknown_model_message,
)
from mixtral_chat.engine.models.errors import QuantizedCopyMissingError, RegistryError
from mixtral_chat.engine.models.hub_cache import find_cached_snapshot, is_repo_id
from mixtral_chat.engine.models.registry_file import read_registry
from mixtral_chat.engine.models.validation import validate_model_dir


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    is_demo: bool
    scheme: str | None = None
    repo_id: str | None = None
    source: str = "local"


def resolve_model(spec: str | None) -> ResolvedModel:
    """The directory to load for `spec`: a catalog name, a pulled/added name or repo id, or a
    path to a model directory. None: the user's default model, else the bundled demo.

    A path is resolved without the registry, so a damaged models.json never blocks
    `--model <dir>`."""
    if spec is not None and spec.strip() and looks_like_path(spec.strip()):
        return _resolve_path(Path(spec.strip()).expanduser())
    try:
        data = read_registry()
    except RegistryError:
        if spec is not None and spec.strip() and Path(spec.strip()).expanduser().is_dir():
            return _resolve_path(Path(spec.strip()).expanduser())  # a directory name: no registry needed
        raise
    if spec is None:
        default = data.get("default")
        if default:
            item = find_known(data, default)
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
    item = find_known(data, spec)
    if item is not None:
        return _resolved(item, data, spec=spec)
    candidate = Path(spec).expanduser()
    if candidate.exists():
        return _resolve_path(candidate)
    if is_repo_id(spec):
        cached = find_cached_snapshot(spec, "main")
        if cached is not None:  # fetched by transformers or another hub client: reuse it
            validate_model_dir(cached)
            return ResolvedModel(name=spec, path=cached, is_demo=False, repo_id=spec, source="hub")
        raise ModelNotFoundError(f"model '{spec}' is not installed; run `mixtral-chat models pull {spec}`")
    raise ModelNotFoundError(unknown_model_message(spec))


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
    validate_model_dir(path)
    quant = read_quant_config_json(path)
    is_demo = path == demo_dir().resolve()
    return ResolvedModel(
        name=DEMO_NAME if is_demo else path.name,
        path=path,
        is_demo=is_demo,
        scheme=(quant or {}).get("scheme"),
        source="bundled" if is_demo else "local",
    )


def _resolved(item: KnownModel, data: dict[str, Any], spec: str) -> ResolvedModel:
    if item.source == "bundled":
        return _resolve_demo()
    entry = model_entry(item, data.get("default"))
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
