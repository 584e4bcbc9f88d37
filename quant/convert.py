"""Quantize a Hugging Face safetensors checkpoint directory into a quantized model directory.

Streams: each source tensor is read on its own, quantized in bounded chunks and appended to the
output shard being written, so peak memory is a few times the largest tensor, not a shard.

Output shard i holds what source shard i "owns": its non-expert tensors (attention quantized,
the rest copied as stored) and the experts whose last weight lives in it (an expert whose w1/w3
and w2 sit in two shards is read from both). Shards are therefore independent: the work goes
to `.<DST name>.partial/` next to DST, each finished shard is recorded in its `progress.json`,
a re-run with the same source and options skips finished shards, and the directory is renamed
to DST only when complete, so DST never holds half a model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    QUANT_CONFIG_FILE,
    read_weight_map,
    shard_files,
)
from mixtral_chat.engine.errors import QuantizationError, WeightsError
from mixtral_chat.engine.fileio import write_json_atomic
from mixtral_chat.engine.safetensors_io import (
    check_finite,
    read_header,
    read_tensor,
    tensor_dtype,
    tensor_nbytes,
)
from mixtral_chat.engine.units import format_bytes
from mixtral_chat.quant.blob import ExpertBlobLayout
from mixtral_chat.quant.common import (
    EXPERT_LINEARS,
    FLOAT_DTYPES,
    dtype_name,
    expert_blob_key,
    is_attention_weight,
    is_quantizable,
    parse_expert_key,
)
from mixtral_chat.quant.config import (
    FORMAT_VERSION,
    QuantConfig,
    library_versions,
    sha256_file,
    utc_now,
)
from mixtral_chat.quant.schemes import NoneScheme, QuantScheme, get_scheme
from mixtral_chat.quant.st_io import StreamWriter
from mixtral_chat.quant.workdir import PROGRESS_FILE, partial_dir

# Copied next to the weights so that DST is a complete model directory.
_AUX_EXACT = ("config.json", "generation_config.json", "README.md", "LICENSE", "LICENSE.txt")
_AUX_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template")
_HEADER_BYTES_PER_TENSOR = 256  # generous estimate of one tensor's JSON header entry


@dataclass(frozen=True)
class QuantProgress:
    """A snapshot of `quantize_model_dir`'s progress (bytes are source bytes)."""

    phase: str  # "quantizing", "finishing" or "done"
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    shards_done: int
    shards_total: int
    elapsed_s: float
    bytes_per_s: float  # this run's rate (shards finished by an earlier run excluded)
    current: str = ""

    @property
    def eta_s(self) -> float | None:
        if self.bytes_per_s <= 0:
            return None
        return max(0.0, (self.bytes_total - self.bytes_done) / self.bytes_per_s)

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


class QuantizationCancelled(QuantizationError):
    """The cancel event was set; finished shards are kept for a resume."""


@dataclass
class _Source:
    key: str
    file: Path
    info: dict
    data_start: int

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.info)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info["shape"])

    @property
    def dtype(self) -> torch.dtype:
        return tensor_dtype(self.info)


@dataclass
class _Item:
    kind: str  # "copy", "linear" (an attention projection) or "expert"
    key: str  # output key (copy), source key (linear) or blob key (expert)
    sources: list[_Source]
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]


@dataclass
class _OutShard:
    name: str
    items: list[_Item] = field(default_factory=list)

    @property
    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [spec for item in self.items for spec in item.specs]

    @property
    def data_bytes(self) -> int:
        total = 0
        for _, dtype, shape in self.specs:
            n = 1
            for d in shape:
                n *= d
            total += n * dtype.itemsize
        return total

    @property
    def source_bytes(self) -> int:
        return sum(s.nbytes for item in self.items for s in item.sources)

    @property
    def source_tensors(self) -> int:
        return sum(len(item.sources) for item in self.items)


@dataclass
class _Plan:
    scheme: QuantScheme
    layout: ExpertBlobLayout | None
    shards: list[_OutShard]
    source_identity: dict[str, Any]
    source_mtimes: dict[str, int]
    aux_files: list[Path]


def _source_identity(src: Path, files: list[Path]) -> tuple[dict[str, Any], dict[str, int]]:
    sizes = {f.name: f.stat().st_size for f in files}
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    identity = {
        "path": str(src.resolve()),
        "config_sha256": sha256_file(src / CONFIG_FILE),
        "index_sha256": sha256_file(src / INDEX_FILE),
        "files": sizes,
        "total_bytes": sum(sizes.values()),
    }
    return identity, mtimes


def _aux_files(src: Path) -> list[Path]:
    return sorted(
        p for p in src.iterdir() if p.is_file() and (p.name in _AUX_EXACT or p.name.startswith(_AUX_PREFIXES))
    )


def _plan(src: Path, scheme_name: str, group_size: int | None, double_quant: bool) -> _Plan:
    files = shard_files(src)
    sources: list[list[_Source]] = []
    for file in files:
        header, data_start = read_header(file)
        sources.append([_Source(k, file, info, data_start) for k, info in sorted(header.items())])

    quantizable = [s for shard in sources for s in shard if is_quantizable(s.key)]
    for s in quantizable:
        if len(s.shape) != 2 or s.dtype not in FLOAT_DTYPES:
            raise WeightsError(
                f"{s.file}: '{s.key}' is {dtype_name(s.dtype)} {s.shape}, expected a 2-D float weight"
            )
    float_dtypes = {s.dtype for s in quantizable}
    if scheme_name == "none" and len(float_dtypes) > 1:
        raise WeightsError(f"{src}: linear weights mix dtypes {sorted(map(dtype_name, float_dtypes))}")
    scheme = get_scheme(scheme_name, group_size, double_quant, float_dtype=next(iter(float_dtypes), None))

    # Experts: all three weights, one shape for all; owned by the shard holding the last one.
    experts: dict[tuple[int, int], dict[str, tuple[int, _Source]]] = {}
    for index, shard in enumerate(sources):
        for s in shard:
            parsed = parse_expert_key(s.key)
            if parsed is not None:
                experts.setdefault(parsed[:2], {})[parsed[2]] = (index, s)
    layout = None
    if experts:
        first = min(experts)
        if "w1" not in experts[first]:
            raise WeightsError(f"{src}: expert {first[1]} of layer {first[0]} has no w1 weight")
        intermediate, hidden = experts[first]["w1"][1].shape
        layout = ExpertBlobLayout.build(scheme, hidden, intermediate)
        for (layer, expert), weights in experts.items():
            for linear in EXPERT_LINEARS:
                if linear not in weights:
                    raise WeightsError(f"{src}: expert {expert} of layer {layer} has no {linear} weight")
                shape = weights[linear][1].shape
                if shape != layout.linears[linear]:
                    raise WeightsError(
                        f"{weights[linear][1].file}: '{weights[linear][1].key}' has shape {shape}, "
                        f"other experts {layout.linears[linear]}"
                    )

    out_shards: list[_OutShard] = [_OutShard("") for _ in files]
    for index, shard in enumerate(sources):
        for s in shard:
            if parse_expert_key(s.key) is not None:
                continue
            if is_attention_weight(s.key) and not isinstance(scheme, NoneScheme):
                out_features, in_features = s.shape
                prefix = s.key.removesuffix(".weight")
                specs = [
                    (f"{prefix}.{p.name}", p.dtype, p.shape)
                    for p in scheme.part_specs(out_features, in_features)
                ]
                out_shards[index].items.append(_Item("linear", s.key, [s], specs))
            else:
                out_shards[index].items.append(_Item("copy", s.key, [s], [(s.key, s.dtype, s.shape)]))
    for (layer, expert), weights in sorted(experts.items()):
        owner = max(weights[w][0] for w in EXPERT_LINEARS)
        blob_key = expert_blob_key(layer, expert)
        assert layout is not None
        out_shards[owner].items.append(
            _Item(
                "expert",
                blob_key,
                [weights[w][1] for w in EXPERT_LINEARS],
                [(blob_key, torch.uint8, (layout.nbytes,))],
            )
        )
    non_empty = [s for s in out_shards if s.items]
    for number, shard in enumerate(non_empty, start=1):
        shard.name = f"model-{number:05d}-of-{len(non_empty):05d}.safetensors"

    if not (src / CONFIG_FILE).exists():
        raise QuantizationError(f"{src}: no config.json (not a model directory)")
    identity, mtimes = _source_identity(src, files)
    return _Plan(scheme, layout, non_empty, identity, mtimes, _aux_files(src))


def _check_source(src: Path) -> None:
    if not src.is_dir():
        raise QuantizationError(f"{src}: source model directory not found")
    read_weight_map(src)  # a damaged index says so (WeightsError), before any planning
    found = ckpt.detect(src)
    if found.kind == ckpt.QUANTIZED:
        raise QuantizationError(
            f"{src}: already quantized (it has a {QUANT_CONFIG_FILE}); quantize a float model"
        )
    config = src / CONFIG_FILE
    if config.exists():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise QuantizationError(f"{config}: unreadable ({exc})") from None
        quantization = found.quantization_config
        if quantization:
            method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
            raise QuantizationError(
                f"{config}: the model is already quantized ({method}); quantize the original float checkpoint"
            )


def _resume_state(partial: Path, request: dict[str, Any]) -> dict[str, int] | None:
    """Shards an earlier run of the same request finished in `partial` (name -> size), or None
    when there is nothing to resume. Reads only."""
    progress_file = partial / PROGRESS_FILE
    if not partial.exists():
        return None
    if not progress_file.exists():
        raise QuantizationError(
            f"{partial} exists but is not an unfinished quantization (no {PROGRESS_FILE}); remove it"
        )
    try:
        state = json.loads(progress_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("request") != request:
        return None  # another source, scheme or group size: the old work is useless
    done = state.get("done") or {}
    return {
        name: size
        for name, size in done.items()
        if (partial / name).is_file() and (partial / name).stat().st_size == size
    }


def _prepare_partial(partial: Path, request: dict[str, Any], resume: dict[str, int] | None) -> None:
    """Start the partial directory afresh unless resuming from it."""
    if resume is not None:
        for leftover in partial.glob("*.tmp"):
            leftover.unlink()
        return
    if partial.exists():
        shutil.rmtree(partial)  # ours (it has a progress file), for another request
    partial.mkdir(parents=True)
    try:
        write_json_atomic(partial / PROGRESS_FILE, {"request": request, "done": {}})
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # without a progress file it would block a re-run
        raise


def _bytes_needed(plan: _Plan, done: dict[str, int]) -> int:
    """What is left to write: the shards not finished yet, the copied files, some slack."""
    remaining = [s for s in plan.shards if s.name not in done]
    need = sum(s.data_bytes + _HEADER_BYTES_PER_TENSOR * len(s.specs) for s in remaining)
    return need + sum(f.stat().st_size for f in plan.aux_files) + (1 << 20)


def _check_disk_space(plan: _Plan, done: dict[str, int], where: Path) -> None:
    need = _bytes_needed(plan, done)
    free = shutil.disk_usage(where).free
    if need > free:
        raise QuantizationError(
            f"not enough disk space in {where}: the quantized model needs {format_bytes(need)} "
            f"more, {format_bytes(free)} free"
        )


@contextmanager
def _writing(path: Path, plan: _Plan, done: dict[str, int], where: Path) -> Iterator[None]:
    """A full disk while writing `path` (ENOSPC, which the check before starting cannot rule
    out: other writers, inodes) becomes one line saying where and how much is still needed.
    What was half-written at `path` is removed; finished shards stay for a resume."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # write_atomic removes its own temp file; a shard written in place is removed here.
        if path.is_file() and path.name not in done and path.name != PROGRESS_FILE:
            path.unlink(missing_ok=True)
        usage = shutil.disk_usage(where)
        stat = os.statvfs(where)
        inodes = "; no free inodes" if stat.f_files and stat.f_favail == 0 else ""
        raise QuantizationError(
            f"no space left on device writing {path}: needs about {format_bytes(_bytes_needed(plan, done))} "
            f"more ({format_bytes(usage.free)} free{inodes})"
        ) from None


class _Tracker:
    def __init__(
        self, plan: _Plan, done: dict[str, int], callback: Callable[[QuantProgress], None] | None
    ) -> None:
        self.callback = callback
        self.tensors_total = sum(s.source_tensors for s in plan.shards)
        self.bytes_total = sum(s.source_bytes for s in plan.shards)
        self.shards_total = len(plan.shards)
        finished = [s for s in plan.shards if s.name in done]
        self.tensors_done = sum(s.source_tensors for s in finished)
        self.bytes_done = sum(s.source_bytes for s in finished)
        self.shards_done = len(finished)
        self.bytes_this_run = 0
        self.start = time.monotonic()

    def tensor_done(self, nbytes: int, current: str) -> None:
        self.tensors_done += 1
        self.bytes_done += nbytes
        self.bytes_this_run += nbytes
        self.emit("quantizing", current)

    def emit(self, phase: str, current: str = "") -> None:
        if self.callback is None:
            return
        elapsed = time.monotonic() - self.start
        self.callback(
            QuantProgress(
                phase=phase,
                tensors_done=self.tensors_done,
                tensors_total=self.tensors_total,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
                shards_done=self.shards_done,
                shards_total=self.shards_total,
                elapsed_s=elapsed,
                bytes_per_s=self.bytes_this_run / elapsed if elapsed > 0 else 0.0,
                current=current,
            )
        )


class _SourceReader:
    """Open source shards on demand (an expert may need the previous shard too)."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}

    def read(self, source: _Source) -> torch.Tensor:
        handle = self._handles.get(source.file)
        if handle is None:
            handle = self._handles[source.file] = open(source.file, "rb")  # noqa: SIM115
        tensor = read_tensor(handle, source.file, source.key, source.info, source.data_start)
        check_finite(tensor, source.file, source.key)  # a NaN weight is named, not quantized
        return tensor

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _write_shard(
    shard: _OutShard,
    path: Path,
    scheme: QuantScheme,
    layout: ExpertBlobLayout | None,
    tracker: _Tracker,
    cancel: threading.Event | None,
) -> int:
    reader = _SourceReader()
    writer = StreamWriter(path, shard.specs, {"format": "pt", "quantized_by": "mixtral-chat"})
    try:
        for item in shard.items:
            if cancel is not None and cancel.is_set():
                raise QuantizationCancelled("quantization cancelled")
            if item.kind == "copy":
                source = item.sources[0]
                writer.write(item.key, reader.read(source))
                tracker.tensor_done(source.nbytes, source.key)
            elif item.kind == "linear":
                source = item.sources[0]
                parts = scheme.quantize_weight(reader.read(source))
                prefix = source.key.removesuffix(".weight")
                for name, _, _ in item.specs:
                    writer.write(name, parts[name.removeprefix(prefix + ".")])
                tracker.tensor_done(source.nbytes, source.key)
            else:
                assert layout is not None
                parts_by_linear = {}
                for linear, source in zip(EXPERT_LINEARS, item.sources, strict=True):
                    if cancel is not None and cancel.is_set():
                        raise QuantizationCancelled("quantization cancelled")
                    parts_by_linear[linear] = scheme.quantize_weight(reader.read(source))
                    tracker.tensor_done(source.nbytes, source.key)
                writer.write(item.key, layout.pack(parts_by_linear))
                del parts_by_linear
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    return writer.total_bytes


def quantize_model_dir(
    src: str | Path,
    dst: str | Path,
    scheme: str = "int4",
    group_size: int | None = None,
    *,
    double_quant: bool = False,
    progress: Callable[[QuantProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Quantize the float safetensors model in `src` into a new model directory `dst`.

    `group_size`: int4 group (32/64/128/256, default 64) or nf4 block size (default 64).
    Uses torch's current thread count. Raises QuantizationError (bad options, DST exists, not
    enough disk space), WeightsError (unreadable source) or QuantizationCancelled; after a
    cancel or a crash, calling again with the same arguments resumes from finished shards.
    """
    src, dst = Path(src), Path(dst)
    _check_source(src)
    if dst.exists():
        raise QuantizationError(f"{dst} already exists; choose a new destination or remove it")
    if dst.resolve() == src.resolve():
        raise QuantizationError("the destination must differ from the source")
    plan = _plan(src, scheme, group_size, double_quant)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_dir(dst)
    request = {
        "format_version": FORMAT_VERSION,
        "scheme": plan.scheme.config(),
        "source": plan.source_identity,
        "source_mtimes": plan.source_mtimes,
    }
    resume = _resume_state(partial, request)
    done = dict(resume or {})
    _check_disk_space(plan, done, dst.parent)  # before anything is written
    with _writing(partial / PROGRESS_FILE, plan, done, dst.parent):
        _prepare_partial(partial, request, resume)

    tracker = _Tracker(plan, done, progress)
    tracker.emit("quantizing")
    for shard in plan.shards:
        if shard.name in done:
            continue
        tmp_path = partial / f"{shard.name}.tmp"
        try:
            with _writing(tmp_path, plan, done, dst.parent):
                size = _write_shard(shard, tmp_path, plan.scheme, plan.layout, tracker, cancel)
            os.replace(tmp_path, partial / shard.name)
        except QuantizationCancelled:
            raise QuantizationCancelled(
                f"quantization cancelled after {tracker.shards_done} of {tracker.shards_total} shards; "
                f"run it again to resume (work kept in {partial})"
            ) from None
        finally:
            # Gone after the rename. Else the write stopped: a Ctrl-C can land after the file was
            # made and before the writer's own clean-up took charge, or after it closed the file.
            tmp_path.unlink(missing_ok=True)
        with _writing(partial / PROGRESS_FILE, plan, done, dst.parent):
            write_json_atomic(
                partial / PROGRESS_FILE, {"request": request, "done": {**done, shard.name: size}}
            )
        done[shard.name] = size
        tracker.shards_done += 1
        tracker.emit("quantizing", shard.name)

    tracker.emit("finishing")
    for aux in plan.aux_files:
        with _writing(partial / aux.name, plan, done, dst.parent):
            shutil.copy2(aux, partial / aux.name)
    weight_map = {name: shard.name for shard in plan.shards for name, _, _ in shard.specs}
    total_size = sum(shard.data_bytes for shard in plan.shards)
    with _writing(partial / INDEX_FILE, plan, done, dst.parent):
        write_json_atomic(
            partial / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        )
    with _writing(partial / QUANT_CONFIG_FILE, plan, done, dst.parent):
        _write_quant_config(plan, partial)
    if dst.exists():
        raise QuantizationError(f"{dst} appeared while quantizing; the result is in {partial}")
    os.rename(partial, dst)
    (dst / PROGRESS_FILE).unlink(missing_ok=True)
    tracker.emit("done")
    return dst


def _write_quant_config(plan: _Plan, partial: Path) -> None:
    scheme_cfg = plan.scheme.config()
    QuantConfig(
        scheme=scheme_cfg["scheme"],
        group_size=scheme_cfg["group_size"],
        double_quant=scheme_cfg["double_quant"],
        float_dtype=scheme_cfg.get("float_dtype"),
        expert_layout=plan.layout,
        source=plan.source_identity,
        libraries=library_versions(),
        created=utc_now(),
    ).write(partial)
