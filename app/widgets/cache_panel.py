"""The expert cache drawn as a grid: one row per layer, one cell per expert.

Fed by `engine.cache_stats()`. The per-layer form it draws (offloading provides it):

    {"hit_rate": 0.62, "hits": 1234, "misses": 756, "plan": "...",
     "layers": [{"resident": [0, 3, 5], "hits": [3], "misses": [1], "prefetched": [5]}, ...]}

(engine/offload/offloader.py's `ExpertOffloader.stats()`). `hits` / `misses` are the experts the last step
used that were / were not resident; `prefetched` were loaded ahead of use. Without per-layer data
(no offloading) every expert is resident. `show_repeats` adds how often consecutive tokens chose the
same experts (engine/offload/locality.py): per layer after the grid, and overall below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.widgets import Static

# What a cell shows, most telling first: a miss beats a hit beats a prefetch beats residency.
CELL_STYLES: dict[str, tuple[str, str]] = {
    "miss": ("■", "bold red"),
    "hit": ("■", "bold green"),
    "prefetched": ("■", "bold blue"),
    "resident": ("■", "grey50"),
    "absent": ("·", "grey35"),
}


# Per-layer keys of the stats -> cell state, in drawing order (later ones win).
LAYER_KEYS: tuple[tuple[str, str], ...] = (
    ("resident", "resident"),
    ("prefetched", "prefetched"),
    ("hits", "hit"),
    ("misses", "miss"),
)


def cell_states(layer: dict[str, Any], n_experts: int) -> list[str]:
    """The state of each expert of one layer."""
    states = ["absent"] * n_experts
    for key, state in LAYER_KEYS:
        for expert in layer.get(key, ()) or ():
            if 0 <= int(expert) < n_experts:
                states[int(expert)] = state
    return states


def render_grid(
    layers: Sequence[dict[str, Any]], n_experts: int, repeats: Sequence[float | None] | None = None
) -> Text:
    """The grid; with `repeats` (each layer's first-choice repeat rate) a column after it."""
    text = Text()
    header = "layer " + "".join(f"{expert % 10}" for expert in range(n_experts))
    text.append(header + (" repeat" if repeats else "") + "\n", style="bold")
    for index, layer in enumerate(layers):
        text.append(f"{index:>5} ")
        for state in cell_states(layer, n_experts):
            glyph, style = CELL_STYLES[state]
            text.append(glyph, style=style)
        if repeats:
            rate = repeats[index] if index < len(repeats) else None
            text.append(f" {'-' if rate is None else f'{rate:.0%}':>6}", style="cyan")
        text.append("\n")
    for row in (("hit", "miss", "prefetched"), ("resident", "absent")):
        text.append("\n")
        for state in row:
            glyph, style = CELL_STYLES[state]
            text.append(glyph, style=style)
            text.append(f" {state}  ")
    return text


class ExpertCachePanel(Static):
    """Toggled with Ctrl+G; updated with every chunk of an answer."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.border_title = "Expert cache"
        self.n_layers = 0
        self.n_experts = 0
        self.last_stats: dict[str, Any] | None = None
        self.repeats: dict[str, Any] | None = None  # engine/offload/locality.py LiveRepeats.summary()

    def set_model_shape(self, n_layers: int, n_experts: int) -> None:
        self.n_layers, self.n_experts = n_layers, n_experts
        self.show_stats(self.last_stats)

    def show_repeats(self, repeats: dict[str, Any] | None) -> None:
        self.repeats = repeats
        self.show_stats(self.last_stats)

    def _repeat_line(self) -> Text:
        repeats = self.repeats
        if not repeats or repeats.get("first") is None:
            return Text()
        return Text(
            f"\n\nsame experts as the token before: first choice {repeats['first']:.0%} "
            f"(chance {repeats['chance_first']:.1%}), both {repeats['pair']:.0%} "
            f"(chance {repeats['chance_pair']:.1%}), over {repeats['tokens']} tokens",
            style="cyan",
        )

    def show_stats(self, stats: dict[str, Any] | None) -> None:
        self.last_stats = stats
        per_layer = (self.repeats or {}).get("per_layer_first")
        layers = (stats or {}).get("layers")
        if layers:
            n_experts = max(
                [self.n_experts]
                + [int(e) + 1 for layer in layers for key, _ in LAYER_KEYS for e in layer.get(key, ()) or ()]
            )
            grid = render_grid(layers, n_experts, per_layer)
            stats = stats or {}
            if stats.get("hit_rate") is not None:
                grid.append(f"\n\nhit rate {float(stats['hit_rate']) * 100:.1f}%")
                grid.append(f" ({stats.get('hits', 0)} hits, {stats.get('misses', 0)} misses)")
            if stats.get("prefetch_recall") is not None and stats.get("prefetch"):
                grid.append(f"\nprefetch recall {float(stats['prefetch_recall']) * 100:.1f}%")
            grid.append_text(self._repeat_line())
            if stats.get("plan"):
                grid.append(f"\n\n{stats['plan']}", style="dim")
            self.update(grid)
        elif self.n_layers and self.n_experts:
            # No offloading: every expert of every layer lives in memory.
            everything = [{"resident": list(range(self.n_experts))}] * self.n_layers
            grid = Text("no offloading:\nall experts resident\n\n", style="italic")
            grid.append_text(render_grid(everything, self.n_experts, per_layer))
            grid.append_text(self._repeat_line())
            self.update(grid)
        else:
            self.update(Text("no model loaded", style="italic"))
