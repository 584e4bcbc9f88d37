"""Routing traces: the one writer, the one reader and the one error of the JSON-lines format.

A trace (written by `mixtral-chat ask --trace-routing FILE`) holds one JSON line per generated
token and layer: `{"token_idx": int, "layer": int, "experts": [ids in gate order],
"gating_probs": [their softmax probabilities]}`. Prefill is not traced.

Public trace sets hold several sequences in one file, each row marked with a `problem_id` (or
`sequence`) field and token_idx counting from 0 in each. Those replay as one stream: the sequences
one after another in the order they first appear, the caches kept between them (as a server
answering one prompt after another would), and `sequences_in` says how many there were.

`read_trace_records` parses and checks every line; the cache simulator reads it per layer
(`load_trace`), the routing replay per token with every layer present (`read_routing_trace`).
Importing this module is cheap: torch loads only when a model is traced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mixtral_chat.engine.errors import MixtralChatError
from mixtral_chat.engine.fileio import write_atomic

if TYPE_CHECKING:
    from torch import Tensor

    from mixtral_chat.engine.model import Mixtral, SparseMoE

# layer -> the expert sets its decode steps needed, in token order
Trace = dict[int, list[list[int]]]

SEQUENCE_FIELDS = ("problem_id", "sequence")  # the fields that say which sequence a row is of


class RoutingTraceError(MixtralChatError):
    """A routing trace file is missing, unreadable, malformed, or does not fit the model."""


def routing_record(token_idx: int, layer: int, experts: list[int], gating_probs: list[float]) -> dict:
    """One line of a trace, as a dict (keys in the file's order)."""
    return {"token_idx": token_idx, "layer": layer, "experts": experts, "gating_probs": gating_probs}


def _record_line(record: dict) -> str:
    return json.dumps(record) + "\n"


def write_routing_trace(records: Iterable[dict], path: str | Path) -> Path:
    """Write routing records as JSON lines, atomically (readers see all of it or none)."""
    path = Path(path)
    write_atomic(path, "".join(_record_line(record) for record in records))
    return path


class RoutingTrace:
    """Writes the chosen experts of every generated token and layer to `out` as they happen."""

    def __init__(self, model: Mixtral, out: TextIO) -> None:
        self.out = out
        self.token_idx = 0
        self.model = model
        self._layer_of = {id(layer.block_sparse_moe): i for i, layer in enumerate(model.layers)}
        for layer in model.layers:
            layer.block_sparse_moe.routing_hook = self._hook(layer.block_sparse_moe)

    def _hook(self, moe: SparseMoE) -> Callable[[Tensor, Tensor, Tensor], None]:
        import torch

        layer = self._layer_of[id(moe)]
        last_layer = len(self.model.layers) - 1

        def record(router_logits: Tensor, chosen: Tensor, weights: Tensor) -> None:
            if chosen.shape[0] != 1:
                return  # prefill: only generated tokens are traced
            probs = torch.softmax(router_logits.float(), dim=-1)[0]
            experts = chosen[0].tolist()
            gating_probs = [round(float(probs[e]), 6) for e in experts]
            self.out.write(_record_line(routing_record(self.token_idx, layer, experts, gating_probs)))
            if layer == last_layer:
                self.token_idx += 1

        return record


@dataclass(frozen=True)
class TraceRecord:
    line_no: int
    token_idx: int
    layer: int
    experts: list[int]
    gating_probs: list[float] | None  # optional for the simulator, required by the replay
    sequence: str | None = None  # a multi-sequence trace's problem_id / sequence, as text


def _fail(path: Path, line_no: int, what: str) -> RoutingTraceError:
    return RoutingTraceError(f"{path}:{line_no}: {what}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RoutingTraceError(f"{path}: no such routing trace (file not found)") from None
    except IsADirectoryError:
        raise RoutingTraceError(f"{path}: is a directory, not a routing trace") from None
    except UnicodeDecodeError:
        raise RoutingTraceError(f"{path}: not a routing trace (not UTF-8 text)") from None
    except OSError as exc:
        raise RoutingTraceError(f"{path}: cannot read routing trace: {exc.strerror}") from None


def _parse_line(path: Path, line_no: int, line: str) -> TraceRecord:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _fail(path, line_no, f"not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise _fail(path, line_no, "expected a JSON object with token_idx, layer and experts")
    for key in ("token_idx", "layer", "experts"):
        if key not in row:
            raise _fail(path, line_no, f"not a routing record (missing {key!r})")
    token_idx, layer, experts = row["token_idx"], row["layer"], row["experts"]
    if not _is_int(token_idx) or token_idx < 0:
        raise _fail(path, line_no, f"token_idx must be a non-negative integer, got {token_idx!r}")
    if not _is_int(layer) or layer < 0:
        raise _fail(path, line_no, f"layer must be a non-negative integer, got {layer!r}")
    if not isinstance(experts, list) or not experts:
        raise _fail(path, line_no, f"experts must be a non-empty list of expert ids, got {experts!r}")
    if not all(_is_int(e) and e >= 0 for e in experts):
        raise _fail(path, line_no, f"expert ids must be non-negative integers, got {experts!r}")
    if len(set(experts)) != len(experts):
        raise _fail(path, line_no, f"an expert is listed twice in {experts!r}")
    probs = row.get("gating_probs")
    if "gating_probs" in row and (
        not isinstance(probs, list)
        or len(probs) != len(experts)
        or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in probs)
    ):
        raise _fail(path, line_no, "gating_probs must be a list of numbers, one per expert")
    gating_probs = [float(p) for p in probs] if probs is not None else None
    sequence = next((str(row[key]) for key in SEQUENCE_FIELDS if row.get(key) is not None), None)
    return TraceRecord(line_no, token_idx, layer, experts, gating_probs, sequence)


def read_trace_records(path: str | Path) -> list[TraceRecord]:
    """Every record of a trace, in file order; each (sequence, token, layer) at most once, at
    least one."""
    path = Path(path)
    records, seen = [], set()
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_line(path, line_no, line)
        key = (record.sequence, record.token_idx, record.layer)
        if key in seen:
            where = f" of sequence {record.sequence}" if record.sequence is not None else ""
            raise _fail(path, line_no, f"token {record.token_idx} layer {record.layer}{where} appears twice")
        seen.add(key)
        records.append(record)
    if not records:
        raise RoutingTraceError(f"{path}: the routing trace is empty")
    return records


def _stream_order(records: list[TraceRecord]) -> dict[str | None, int]:
    """Each sequence's place in the one stream: the order they first appear in the file."""
    order: dict[str | None, int] = {}
    for record in records:
        order.setdefault(record.sequence, len(order))
    return order


def sequences_in(path: str | Path) -> int:
    """How many sequences the trace holds (1 without a problem_id / sequence field)."""
    return len(_stream_order(read_trace_records(path)))


def load_trace(path: str | Path) -> Trace:
    """Read a routing trace: per layer, the expert sets of its steps ordered by token_idx, several
    sequences as one stream (see the module's docstring).

    Traces concatenated from several runs without a sequence field are fine as long as their
    token_idx values do not collide (offset each run's token_idx past the previous run's).
    """
    records = read_trace_records(path)
    order = _stream_order(records)
    steps: dict[int, dict[tuple[int, int], list[int]]] = {}  # layer -> (sequence, token_idx) -> experts
    for record in records:
        steps.setdefault(record.layer, {})[(order[record.sequence], record.token_idx)] = record.experts
    return {layer: [per_token[t] for t in sorted(per_token)] for layer, per_token in sorted(steps.items())}


@dataclass(frozen=True)
class RoutingTraceData:
    """experts[t][l] (K ids, gate order) and probs[t][l] (their softmax probabilities)."""

    experts: list[list[list[int]]]
    probs: list[list[list[float]]]

    @property
    def num_tokens(self) -> int:
        return len(self.experts)

    @property
    def num_layers(self) -> int:
        return len(self.experts[0])

    @property
    def top_k(self) -> int:
        return len(self.experts[0][0])

    @property
    def max_expert(self) -> int:
        return max(e for token in self.experts for layer in token for e in layer)


def read_routing_trace(path: str | Path) -> RoutingTraceData:
    """Read a trace for replay: every token must have every layer, all with K experts and
    positive gating probabilities."""
    path = Path(path)
    records = read_trace_records(path)
    order = _stream_order(records)
    by_token: dict[tuple[int, int], dict[int, tuple[list[int], list[float]]]] = {}
    for record in records:
        if record.gating_probs is None:
            raise _fail(path, record.line_no, "not a routing record (missing 'gating_probs')")
        if any(not p > 0 for p in record.gating_probs):
            raise _fail(path, record.line_no, "negative ids or non-positive probabilities")
        token = (order[record.sequence], record.token_idx)
        by_token.setdefault(token, {})[record.layer] = (record.experts, record.gating_probs)
    num_layers = 1 + max(layer for token in by_token.values() for layer in token)
    top_k = len(next(iter(next(iter(by_token.values())).values()))[0])
    experts_out, probs_out = [], []
    for token in sorted(by_token):
        layers = by_token[token]
        if sorted(layers) != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(layers))
            raise RoutingTraceError(f"{path}: token {_token_name(token, order)} lacks layers {missing}")
        if any(len(layers[layer][0]) != top_k for layer in layers):
            raise RoutingTraceError(
                f"{path}: token {_token_name(token, order)} does not choose {top_k} experts in every layer"
            )
        experts_out.append([layers[layer][0] for layer in range(num_layers)])
        probs_out.append([layers[layer][1] for layer in range(num_layers)])
    return RoutingTraceData(experts_out, probs_out)


def _token_name(token: tuple[int, int], order: dict[str | None, int]) -> str:
    sequence = next(name for name, place in order.items() if place == token[0])
    return f"{token[1]}" if sequence is None else f"{token[1]} of sequence {sequence}"
