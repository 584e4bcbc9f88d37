"""Lazy package attributes: a package names what it exports and from which submodule, and the
submodule (with torch, for most) is imported only when one of those names is first used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package_globals: dict[str, Any], exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for the package whose `globals()` these are: `exports` maps each
    public name to the submodule (relative to the package) that defines it. A name, once loaded,
    is stored in the package's globals, so later lookups do not come here again."""
    package = package_globals["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        package_globals[name] = value
        return value

    return __getattr__
