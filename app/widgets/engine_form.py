"""The Engine tab's form: the load and offload options (`LoadOptions`) as inputs, read back with
their bounds checked. It edits the options the app holds only when `apply_to` succeeds."""

from __future__ import annotations

import dataclasses

from textual.app import ComposeResult
from textual.containers import Grid
from textual.widgets import Input, Label, Select, Switch

from mixtral_chat.engine.options import LoadOptions

DEVICES = [("auto", "auto"), ("CPU", "cpu"), ("CUDA GPU", "cuda")]
DTYPES = [("auto", "auto"), ("float32", "float32"), ("bfloat16", "bfloat16")]
LOAD_SCHEMES = [("as stored", "stored"), ("none", "none"), ("int4", "int4"), ("nf4", "nf4")]
STORES = [("RAM", "ram"), ("disk", "disk")]


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
        read = self.read(options)
        read.check()  # LoadOptionsError is a ValueError
        for item in dataclasses.fields(read):
            setattr(options, item.name, getattr(read, item.name))

    def edited(self, options: LoadOptions) -> bool:
        """The form no longer shows `options` (a field changed, or holds what is not a number)."""
        try:
            return self.read(options) != options
        except ValueError:
            return True

    def show(self, options: LoadOptions) -> None:
        """The form anew, showing `options`."""
        self.options = options
        self.refresh(recompose=True)

    def read(self, options: LoadOptions) -> LoadOptions:
        """A copy of `options` with the form's values; ValueError for text that is not a number."""
        return dataclasses.replace(
            options,
            experts_per_layer=_optional_int(
                self.query_one("#experts-per-layer", Input).value, "experts per layer"
            ),
            gpu_budget_gb=_optional_float(self.query_one("#gpu-budget", Input).value, "memory budget"),
            context_length=_optional_int(self.query_one("#context-length", Input).value, "context length"),
            device=str(self.query_one("#device", Select).value),
            dtype=str(self.query_one("#dtype", Select).value),
            quant=None if (quant := str(self.query_one("#quant", Select).value)) == "stored" else quant,
            offload=self.query_one("#offload", Switch).value,
            prefetch=self.query_one("#prefetch", Switch).value,
            cuda_graphs=self.query_one("#cuda-graphs", Switch).value,
            offload_store=str(self.query_one("#offload-store", Select).value),
        )


def _select(choices: list[tuple[str, str]], value: str, id: str) -> Select[str]:
    # A value the form does not offer (say "cuda:1" from the config file) is offered too: shown
    # as it is in effect, and kept by a save.
    if value not in {choice for _, choice in choices}:
        choices = [*choices, (value, value)]
    return Select(choices, value=value, allow_blank=False, id=id)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _optional_int(text: str, what: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a whole number") from None


def _optional_float(text: str, what: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
