"""Whether anything in a module tree was rebound since it was read: the check behind a native
operand cached across decode steps (engine/model.py `Mixtral.native_decode_stack`), or behind
a decode step's CUDA graphs (engine/decode_graphs.py).

An operand holds raw pointers to the tensors it was made from. Loading, moving, quantizing or
offloading a model rebinds tensors or modules (a new object under the same name), while an
in-place change of values keeps them, and the pointers stay right. So an operand stays valid
while every child module, parameter and buffer of the tree is the very object it was, and the
plain attributes it depends on are unchanged: one identity check each, ~800 for a small model's
6 layers, read through the modules' own dictionaries (no `nn.Module.__getattr__`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

from torch import nn


class Bindings:
    """Where each object of a module tree was found: (dictionary, key, object) triples."""

    def __init__(
        self, root: nn.Module | Iterable[nn.Module], attributes: Iterable[tuple[nn.Module, str]] = ()
    ) -> None:
        """Every child module, parameter and buffer under `root` (or under each of several), and
        the (module, name) attributes given (hooks, a bound method; a child module, where `name`
        is one: the entry in its parent), as they are now."""
        containers: list[dict] = []
        keys: list[str] = []
        roots = [root] if isinstance(root, nn.Module) else list(root)
        for module in (m for r in roots for m in r.modules()):
            for table in (module._modules, module._parameters, module._buffers):
                containers += [table] * len(table)
                keys += table
        for module, name in attributes:
            containers.append(module._modules if name in module._modules else module.__dict__)
            keys.append(name)
        self._containers, self._keys = containers, keys
        self._objects = list(map(dict.get, containers, keys))

    def hold(self) -> bool:
        """Each object is still the one found there."""
        return all(map(operator.is_, map(dict.get, self._containers, self._keys), self._objects))

    def __len__(self) -> int:
        return len(self._keys)
