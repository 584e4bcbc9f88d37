"""A store filled expert by expert while the weights load (`weights.load_model(expert_sink=)`), so a
float or `--quant` checkpoint that is offloaded never holds its experts twice in host RAM: each one
is packed into the store as soon as it is read (and quantized), then dropped.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from mixtral_chat.engine.offload.store import DiskStore, ExpertStore, RamStore
from mixtral_chat.quant.blob import ExpertBlobLayout


class StreamedExperts:
    """The sink for `load_model`: the store is made at the first expert (its layout is that expert's)."""

    def __init__(self, num_layers: int, num_experts: int, store: str, pin: bool, path: Path) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.kind = store  # "ram" or "disk"
        self.pin = pin
        self.path = path
        self.store: ExpertStore | None = None
        self.template: nn.Module | None = None  # a meta shell of the runtime expert
        self.received = 0

    def put(self, layer: int, expert: int, module: nn.Module) -> None:
        if self.store is None:
            layout = ExpertBlobLayout.of_module(module)
            if self.kind == "disk":
                self.store = DiskStore(layout, self.num_layers, self.num_experts, self.path)
            else:
                self.store = RamStore(layout, self.num_layers, self.num_experts, pin=self.pin)
            self.template = copy.deepcopy(module).to("meta")  # once: a copy of one expert
        with torch.no_grad():
            self.store.put(layer, expert, module)
        self.received += 1

    def complete(self) -> tuple[ExpertStore, nn.Module]:
        """The filled store and the template; every expert must have arrived."""
        expected = self.num_layers * self.num_experts
        if self.store is None or self.template is None or self.received != expected:
            raise RuntimeError(f"the expert store received {self.received} of {expected} experts")
        return self.store, self.template
