"""`mixtral-chat plan`: what goes where for a model on this machine (or on a GPU it names), from the
model's config.json alone: per layer the GPU slots, the CPU-computed experts and the disk; memory
per device; the predicted decode bound with the bandwidths it assumed. Nothing is loaded.

The numbers are the engine's: the same planner (`engine/offload/planner.py`) that `Engine.load` runs,
fed with sizes computed from the shape and the scheme instead of a loaded model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mixtral_chat.app.argtypes import float_range, int_range
from mixtral_chat.app.commands.engine_flags import add_placement_flags
from mixtral_chat.engine.options import CONTEXT_MIN

if TYPE_CHECKING:
    from mixtral_chat.engine.config import ModelArgs

SCHEMES = ("int4", "nf4")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="show where a model's experts would go (GPU slots, CPU, disk) and the predicted speed",
        description="Plan expert placement from a model's config.json: nothing is loaded or downloaded.",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME|PATH",
        help="catalog name (downloaded or not), installed model, model directory or config.json",
    )
    parser.add_argument(
        "--gpu-mem",
        type=float_range("--gpu-mem", 0, low_open=True),
        metavar="GB",
        help="the GPU's memory budget (default: this machine's GPU; without one, a CPU-only plan)",
    )
    parser.add_argument(
        "--ram",
        type=float_range("--ram", 0, low_open=True),
        metavar="GB",
        help="host RAM for the expert store",
    )
    parser.add_argument(
        "--context", type=int_range("--context", CONTEXT_MIN), help="context length in tokens"
    )
    parser.add_argument(
        "--scheme", choices=SCHEMES, help="4-bit scheme (default: the model's, else the device's)"
    )
    placement = parser.add_argument_group("placement")
    add_placement_flags(placement)
    placement.add_argument(
        "--gpu-gbps",
        type=float_range("--gpu-gbps", 0, low_open=True),
        metavar="GBPS",
        help="GPU memory bandwidth the planner assumes",
    )
    placement.add_argument(
        "--profile",
        choices=["3060-ddr4", "4090-ddr5"],
        help="take every bandwidth from a simulated host (flags still override)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    name, args_of_model, stored_scheme, folder = read_model(args.model)
    report = make_plan(args, name, args_of_model, stored_scheme, folder)
    if args.json:
        print(json.dumps(report["json"]))
    else:
        for line in report["lines"]:
            print(line)
    return 0


def read_model(spec: str) -> tuple[str, ModelArgs, str | None, Path | None]:
    """The model's name, shape, stored scheme (None: float or unknown) and folder (None: the
    catalog's config alone), without its weights."""
    from mixtral_chat.engine.checkpoint import read_quant_config_json
    from mixtral_chat.engine.config import CONFIG_FILE, ModelArgs
    from mixtral_chat.engine.models.catalog import CATALOG, MIXTRAL_8X7B_CONFIG
    from mixtral_chat.engine.models.errors import ModelNotFoundError

    path = Path(spec).expanduser()
    if path.is_file() or (path.is_dir() and (path / CONFIG_FILE).is_file()):
        folder = path if path.is_dir() else path.parent
        quant = read_quant_config_json(folder) or {}
        label = path.name if path.is_dir() else str(path)
        return label, ModelArgs.from_hf_config(path), quant.get("scheme"), folder
    if path.is_dir():
        raise ModelNotFoundError(f"{path} holds no {CONFIG_FILE}")
    entry = CATALOG.get(spec) or next((e for e in CATALOG.values() if e.repo_id == spec), None)
    if entry is not None and entry.repo_id is not None:
        # Mixtral-8x7B's own config.json: the plan needs no download.
        catalog = ModelArgs.from_dict(MIXTRAL_8X7B_CONFIG, source=f"catalog:{entry.name}")
        return entry.title, catalog, None, None
    from mixtral_chat.engine.models.resolve import resolve_model

    try:
        resolved = resolve_model(spec)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{exc} (plan also takes a path to a config.json)") from None
    quant = read_quant_config_json(resolved.path) or {}
    return resolved.name, ModelArgs.from_hf_config(resolved.path), quant.get("scheme"), resolved.path


def make_plan(
    args: argparse.Namespace, name: str, model: ModelArgs, stored_scheme: str | None, folder: Path | None
) -> dict:
    """The plan as text lines and as JSON. A store on disk is timed on `folder`'s shards (the rate
    is assumed without them)."""
    import torch

    from mixtral_chat.engine.host_ram import available_ram_bytes
    from mixtral_chat.engine.offload import bandwidth
    from mixtral_chat.engine.offload.planner import plan_placement, sizes_of_config
    from mixtral_chat.engine.offload.store import choose_store
    from mixtral_chat.engine.runtime import default_context, default_memory_budget_gb
    from mixtral_chat.quant.int8 import vocab_weights_form

    has_gpu = torch.cuda.is_available()
    on_gpu = args.gpu_mem is not None or has_gpu
    device = torch.device("cuda" if has_gpu else "cpu")
    ram_bytes = int(args.ram * 1e9) if args.ram is not None else available_ram_bytes()
    if args.gpu_mem is not None:
        budget = int(args.gpu_mem * 1e9)
    elif has_gpu:
        budget = int(default_memory_budget_gb(device) * 1e9)
    else:
        budget = int(ram_bytes * 0.8)
    scheme = args.scheme or stored_scheme or ("nf4" if on_gpu else "int4")
    if scheme not in SCHEMES:
        scheme = "nf4" if on_gpu else "int4"
    dtype_bytes = 2 if on_gpu else 4  # bfloat16 on a GPU, float32 on a CPU (resolve_dtype's auto)
    context = min(args.context, model.max_position_embeddings) if args.context else None
    context = context or default_context(model, dtype_bytes, budget)
    # On a CPU the engine keeps a 4-bit model's embeddings and lm_head in int8 (its "auto").
    vocab_int8 = vocab_weights_form("auto", "cuda" if on_gpu else "cpu", True, model) == "int8"
    # int4 slots on a GPU are packed for tinygemm from a staging blob (engine/offload/offloader.py).
    sizes = sizes_of_config(
        model, scheme, context, dtype_bytes, vocab_int8, staging=on_gpu and scheme == "int4"
    )

    if args.profile:
        rates = bandwidth.PROFILES[args.profile]
    elif on_gpu and not has_gpu:
        rates = bandwidth.for_planned_gpu(bandwidth.measured(torch.device("cpu")))
    else:
        rates = bandwidth.measured(device)
    if not on_gpu:
        rates = bandwidth.Bandwidths(None, rates.cpu_gbps, rates.cpu_gbps, rates.source)
    everything = (
        sizes.resident_bytes
        + sizes.kv_cache_bytes
        + sizes.num_layers * sizes.num_experts * sizes.expert_bytes
    )
    store_bytes = sizes.num_layers * sizes.num_experts * sizes.expert_bytes
    # As the engine decides (runtime.decide_offload): on a CPU a model that fits is not offloaded,
    # else the slots are the RAM and the others stay in the files; next to a GPU they are in RAM
    # where it has room.
    fits = not on_gpu and everything <= budget
    store = "ram" if fits else choose_store(store_bytes, ram_bytes) if on_gpu else "disk"
    if store == "disk" and args.disk_gbps is None:
        rates = bandwidth.with_disk(rates, sorted(folder.glob("*.safetensors")) if folder else [])
    rates = bandwidth.with_overrides(
        rates,
        h2d_gbps=args.h2d_gbps if on_gpu else None,
        cpu_gbps=args.cpu_gbps,
        device_gbps=args.gpu_gbps,
        disk_gbps=args.disk_gbps if store == "disk" else None,
    )
    if fits:
        plan = plan_placement(sizes, experts_per_layer=sizes.num_experts, store="ram", bandwidths=rates)
        note = "everything fits in RAM: no offloading"
    else:
        plan = plan_placement(
            sizes,
            budget_bytes=budget,
            store=store,
            on_miss=args.on_miss,
            bandwidths=rates,
            host_ram_bytes=ram_bytes,
        )
        note = None
    where = f"a {budget / 1e9:.2f} GB GPU" if on_gpu else f"the CPU ({budget / 1e9:.2f} GB of RAM)"
    header = f"plan for {name} ({scheme}, context {context}) on {where}"
    lines = [header, *([note] if note else []), *plan.summary_lines()]
    share = plan.total_slots / (sizes.num_layers * sizes.num_experts)
    data = {
        "model": name,
        "scheme": scheme,
        "context": context,
        "device": "cuda" if on_gpu else "cpu",
        "gpu_share": round(share, 4),
        "ram_bytes": ram_bytes,
        **plan.to_json(),
    }
    return {"lines": lines, "json": data}
