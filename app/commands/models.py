"""`mixtral-chat models`: list, pull, rm, info, use, add.

Registering is cheap (argparse only); the registry and huggingface_hub load when a command runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import TYPE_CHECKING, Any

from mixtral_chat.app.argtypes import one_of
from mixtral_chat.app.commands.quantize import GROUP_SIZES
from mixtral_chat.app.progress import PhaseProgress, Row
from mixtral_chat.app.terminal import ask_yes_no
from mixtral_chat.engine.units import format_bytes, format_count, format_size

if TYPE_CHECKING:
    from mixtral_chat.engine.models.entries import ModelEntry
    from mixtral_chat.engine.models.progress import PullProgress


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list, download, remove and choose models",
        description="Manage models: the catalog, downloads from the Hugging Face hub, local directories.",
    )
    parser.set_defaults(handler=run, models_command=None)
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", parser_class=type(parser))

    list_parser = actions.add_parser(
        "list", help="models in the catalog and on this machine (default action)"
    )
    list_parser.add_argument("--json", action="store_true", help="machine-readable output")

    pull = actions.add_parser(
        "pull", help="download a model from the hub (resumable), then quantize it to 4-bit"
    )
    pull.add_argument(
        "name", metavar="NAME", help="catalog name (e.g. mixtral-8x7b-instruct) or hub repo id org/name"
    )
    pull.add_argument("--no-quantize", action="store_true", help="keep only the original bf16 weights")
    pull.add_argument(
        "--scheme", choices=("int4", "nf4"), help="4-bit scheme (default: the best for this device)"
    )
    pull.add_argument(
        "--group-size",
        type=one_of("--group-size", GROUP_SIZES),
        help="quantization group size (32/64/128/256)",
    )
    pull.add_argument(
        "--keep-original", action="store_true", help="keep the bf16 originals after quantizing without asking"
    )
    pull.add_argument(
        "--revision", metavar="R", help="branch, tag or commit (default: the catalog's, else main)"
    )

    rm = actions.add_parser(
        "rm",
        help="forget a model and delete its quantized copy (the Hugging Face cache copy only if asked)",
        description=(
            "Forget a model and delete what mixtral-chat made for it (its quantized copy). The "
            "original in the Hugging Face cache is shared with transformers and other tools: it is "
            "kept unless --hf-cache is given (on a terminal you are asked; the default is to keep it)."
        ),
    )
    rm.add_argument("name", metavar="NAME")
    hf_choice = rm.add_mutually_exclusive_group()
    hf_choice.add_argument(
        "--hf-cache",
        action="store_true",
        help="also delete the model's copy in the Hugging Face cache (huggingface_hub's own deletion)",
    )
    hf_choice.add_argument(
        "--keep-hf-cache", action="store_true", help="keep the Hugging Face cache copy without asking"
    )

    info = actions.add_parser("info", help="details of one model")
    info.add_argument("name", metavar="NAME")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    use = actions.add_parser("use", help="make a model the default for the app and `ask`")
    use.add_argument("name", metavar="NAME", help="an installed model's name, repo id or directory")

    add = actions.add_parser("add", help="register a local model directory or a hub repo id")
    add.add_argument("source", metavar="PATH|REPO_ID")
    add.add_argument("--name", help="the name to use for it (default: directory name or repo id)")


def run(args: argparse.Namespace) -> int:
    command = args.models_command or "list"
    handler = {
        "list": _list,
        "pull": _pull,
        "rm": _rm,
        "info": _info,
        "use": _use,
        "add": _add,
    }[command]
    return handler(args)


# ---------------------------------------------------------------------------------------------


def _freed(n: int) -> str:
    return format_bytes(n)


def _list(args: argparse.Namespace) -> int:
    from mixtral_chat.engine.models.entries import PARTIAL
    from mixtral_chat.engine.models.registry import list_models

    entries = list_models()
    if getattr(args, "json", False):
        print(json.dumps([_entry_json(e) for e in entries], indent=2))
        return 0
    rows = [("", "NAME", "STATUS", "SIZE", "SCHEME", "PATH")]
    for entry in entries:
        status = entry.status
        if entry.status == PARTIAL and entry.partial_bytes:
            status = f"partial ({format_size(entry.partial_bytes)})"
        size = format_size(entry.size_on_disk)
        if not entry.installed and entry.catalog is not None and entry.catalog.download_bytes:
            size = f"({format_size(entry.catalog.download_bytes)})"
        path = str(entry.path) if entry.path is not None else "-"
        rows.append(("*" if entry.is_default else "", entry.name, status, size, entry.scheme or "-", path))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False))
            + "  "
            + row[-1]
        )
    print("\n* default model: `mixtral-chat models use NAME` changes it.")
    print("(N GB): download size: `mixtral-chat models pull NAME` downloads it.")

    return 0


def _entry_json(entry: ModelEntry) -> dict[str, Any]:
    data = entry.to_json()
    catalog = data.pop("catalog", None)
    if catalog is not None:
        data["catalog"] = {
            k: catalog[k] for k in ("title", "license", "gated", "recommended", "quantized_bytes")
        }
    return data


def _info(args: argparse.Namespace) -> int:
    from mixtral_chat.engine.models.registry import model_info

    details = model_info(args.name)
    entry = details.entry
    if args.json:
        data = _entry_json(entry)
        data["architecture"] = details.architecture
        data["files"] = [{"name": name, "size": size} for name, size in details.files]
        data["quant_config"] = details.quant_config
        print(json.dumps(data, indent=2))
        return 0
    lines: list[tuple[str, str]] = [("name", entry.name + ("  (default)" if entry.is_default else ""))]
    if entry.catalog is not None:
        lines.append(("title", entry.catalog.title))
        lines.append(("about", entry.catalog.description))
    lines.append(("status", entry.status))
    if entry.repo_id:
        lines.append(
            ("repo", f"{entry.repo_id} @ {entry.revision}" + (f" ({entry.commit})" if entry.commit else ""))
        )
    if entry.catalog is not None and not entry.catalog.bundled:
        lines.append(
            ("license", entry.catalog.license + ("; gated: needs a hub token" if entry.catalog.gated else ""))
        )
        lines.append(("download", format_size(entry.catalog.download_bytes)))
        lines.append(("4-bit size", f"~{format_size(entry.catalog.quantized_bytes)} (estimate)"))
    elif entry.catalog is not None:
        lines.append(("license", entry.catalog.license))
    arch = details.architecture
    if arch:
        lines.append(
            (
                "architecture",
                f"{arch['layers']} layers, {arch['experts']} experts (top-{arch['experts_per_token']}), "
                f"hidden {arch['hidden_size']}, vocab {arch['vocab_size']}, context {arch['context']}",
            )
        )
        lines.append(
            (
                "parameters",
                f"{format_count(arch['parameters'])} total, "
                f"{format_count(arch['active_parameters'])} per token",
            )
        )
    lines.append(("on disk", format_size(entry.size_on_disk)))
    if entry.scheme:
        lines.append(
            ("scheme", f"{entry.scheme} (group {entry.group_size})" if entry.group_size else entry.scheme)
        )
    lines.append(("loads from", str(entry.path) if entry.path else "-"))
    if entry.original_path and entry.original_path != entry.path:
        lines.append(("original", str(entry.original_path)))
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return 0


def _use(args: argparse.Namespace) -> int:
    from mixtral_chat.engine.models.registry import set_default

    entry = set_default(args.name)
    print(f"default model: {entry.name} ({entry.path})")
    return 0


def _add(args: argparse.Namespace) -> int:
    from mixtral_chat.engine.models.registry import add_model

    entry = add_model(args.source, name=args.name)
    if entry.source == "local":
        print(f"added {entry.name}: {entry.path}")
    else:
        print(
            f"added {entry.name} ({entry.repo_id}); download it with `mixtral-chat models pull {entry.name}`"
        )
    return 0


def _rm(args: argparse.Namespace) -> int:
    from mixtral_chat.engine.models.removal import hf_cache_copy, remove_model

    delete_hf = bool(args.hf_cache)
    copy = hf_cache_copy(args.name)
    if copy is not None and not delete_hf and not args.keep_hf_cache:
        delete_hf = ask_yes_no(
            f"Also delete the Hugging Face cache copy ({format_size(copy.size)}, shared with other tools) "
            f"at {copy.path}? [y/N] "
        )
    removal = remove_model(args.name, delete_hf_cache=delete_hf)
    if removal.source == "local":
        print(
            f"removed {removal.name} from the list; its files at {removal.forgotten_path} were left in place"
        )
        return 0
    print(f"removed {removal.name}: {_freed(removal.freed)} freed")
    if removal.quantized_freed:
        print(f"  quantized copy: {format_size(removal.quantized_freed)}")
    if delete_hf:
        print(f"  Hugging Face cache copy: {_freed(removal.hf_cache_freed)}")
    for path in removal.spared:
        print(f"  kept {path}: another cached repo links to it")
    kept = removal.hf_cache_kept
    if kept is not None:
        print(
            f"kept the Hugging Face cache copy at {kept.path} ({format_size(kept.size)}; "
            "transformers and other "
            f"tools use it); delete it with `mixtral-chat models rm {removal.name} --hf-cache`"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# pull


def _show_pull_progress(rows: PhaseProgress, progress: PullProgress) -> None:
    """One row for the download, then one for quantizing (bytes of the original)."""
    finished = progress.bytes_total > 0 and progress.bytes_done >= progress.bytes_total
    label = "downloading" if progress.phase == "download" else "quantizing"
    row = Row(
        label,
        progress.bytes_done,
        progress.bytes_total or None,
        speed=progress.speed,
        eta_s=progress.eta_s,
        detail=progress.file or "",
    )
    rows.show(progress.phase, row, final=finished)


def _pull(args: argparse.Namespace) -> int:
    from mixtral_chat.engine.models.pull import pull_model
    from mixtral_chat.engine.models.removal import delete_original

    rows = PhaseProgress(sys.stderr, log_interval_s=5.0)
    try:
        entry = pull_model(
            args.name,
            quantize=not args.no_quantize,
            scheme=args.scheme,
            group_size=args.group_size,
            keep_original=True,  # asked below, after quantizing, when there is someone to ask
            revision=args.revision,
            progress=functools.partial(_show_pull_progress, rows),
        )
    except KeyboardInterrupt:
        rows.close()
        print(
            f"mixtral-chat: interrupted; run `mixtral-chat models pull {args.name}` again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        rows.close()
    if entry.original_path is not None:
        print(f"{entry.name}: original at {entry.original_path} ({format_size(_original_size(entry))})")
    if entry.quantized_path is not None:
        print(f"{entry.name}: {entry.scheme} model at {entry.quantized_path}")
        if not args.keep_original and entry.original_path is not None:
            question = (
                f"Delete the bf16 originals ({format_size(_original_size(entry))}) "
                "from the Hugging Face cache? The 4-bit model does not need them. [y/N] "
            )
            if ask_yes_no(question):
                freed = delete_original(entry.name)
                print(f"deleted the originals: {format_size(freed)} freed")
    if entry.is_default:
        print(f"{entry.name} is the default model (change it with `mixtral-chat models use NAME`)")
    return 0


def _original_size(entry: ModelEntry) -> int:
    from mixtral_chat.engine.models.hub_cache import directory_size

    return directory_size(entry.original_path) if entry.original_path is not None else 0
