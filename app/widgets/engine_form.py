"""The Engine tab's form: the load and offload options (`LoadOptions`) as inputs, read back with
their bounds checked. It edits the options the app holds only when `apply_to` succeeds."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid
from textual.widgets import Input, Label, Select, Switch

from mixtral_chat.engine.options import LoadOptions

DEVICES = [("auto", "auto"), ("CPU", "cpu"), ("CUDA GPU", "cuda")]
DTYPES = [("auto", "auto"), ("float32", "float32"), ("bfloat16", "bfloat16")]
LOAD_SCHEMES = [("as stored", "stored"), ("none", "none"), ("int4", "int4"), ("nf4", "nf4")]
STORES = [("RAM", "ram"), ("disk", "disk")]
MIN_CONTEXT = 16


class EngineForm(Grid):
    """Labels and inputs, two columns. `context_hint` is what an empty context means (the loaded
    model's own context, or the rule when none is loaded)."""

    def __init__(self, options: LoadOptions, context_hint: str, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="engine-grid")
        self.options = options
        self.context_hint = context_hint

    def compose(self) -> ComposeResult:
        options = self.options
        yield Label("Device")
        yield _select(DEVICES, options.device, "device")
        yield Label("Weights dtype")
        yield _select(DTYPES, options.dtype, "dtype")
        yield Label("Quantize at load (float models)")
        yield _select(LOAD_SCHEMES, options.quant or "stored", "quant")
        yield Label("Offload experts")
        yield Switch(options.offload, id="offload")
        yield Label("Experts on device per layer")
        yield Input(
            _text(options.experts_per_layer),
            placeholder="planner decides",
            type="integer",
            id="experts-per-layer",
        )
        yield Label("Device memory budget (GB)")
        yield Input(_text(options.gpu_budget_gb), placeholder="free memory", type="number", id="gpu-budget")
        yield Label("Prefetch experts")
        yield Switch(options.prefetch, id="prefetch")
        yield Label("CUDA graphs (GPU decode)")
        yield Switch(options.cuda_graphs, id="cuda-graphs")
        yield Label("Offloaded experts live in")
        yield _select(STORES, options.offload_store, "offload-store")
        yield Label("Context length (tokens)")
        yield Input(
            _text(options.context_length), placeholder=self.context_hint, type="integer", id="context-length"
        )

    def apply_to(self, options: LoadOptions) -> None:
        """Write the form into `options`. Raises ValueError (one line, naming the field) and then
        changes nothing."""
        experts = _optional_int(self.query_one("#experts-per-layer", Input).value, "experts per layer", 1)
        budget = _optional_float(self.query_one("#gpu-budget", Input).value, "memory budget")
        context = _optional_int(self.query_one("#context-length", Input).value, "context length", MIN_CONTEXT)
        quant = str(self.query_one("#quant", Select).value)
        options.device = str(self.query_one("#device", Select).value)
        options.dtype = str(self.query_one("#dtype", Select).value)
        options.quant = None if quant == "stored" else quant
        options.offload = self.query_one("#offload", Switch).value
        options.experts_per_layer = experts
        options.gpu_budget_gb = budget
        options.prefetch = self.query_one("#prefetch", Switch).value
        options.cuda_graphs = self.query_one("#cuda-graphs", Switch).value
        options.offload_store = str(self.query_one("#offload-store", Select).value)
        options.context_length = context


def _select(choices: list[tuple[str, str]], value: str, id: str) -> Select[str]:
    # A value the form does not offer (say "cuda:1" from the config file) shows as the first choice.
    known = {choice for _, choice in choices}
    return Select(choices, value=value if value in known else choices[0][1], allow_blank=False, id=id)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _optional_int(text: str, what: str, minimum: int) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}")
    return value


def _optional_float(text: str, what: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{what} must be positive")
    return value
