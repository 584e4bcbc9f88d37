"""Print the import cycles among mixtral_chat modules (engine/, quant/, app/ by default).

Every import is counted, including those inside functions; imports under `if TYPE_CHECKING:`
are not (they never run). Usage: python scripts/import_graph.py [engine quant ...]
Exit status 1 when there is a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"app": "mixtral_chat.app", "engine": "mixtral_chat.engine", "quant": "mixtral_chat.quant"}


def _modules(dirs: list[str]) -> dict[str, Path]:
    found = {}
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            parts = list(path.relative_to(ROOT / d).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([PACKAGES[d], *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()

    def resolve(target: str) -> None:
        # The module itself, or the nearest package above it that is ours.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                resolve(full if full in known else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                result.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(result)


def main(argv: list[str]) -> int:
    dirs = argv or list(PACKAGES)
    # Imports are resolved against all our modules; cycles are reported within the chosen dirs.
    known_modules = _modules(list(PACKAGES))
    chosen = _modules(dirs)
    graph = {
        name: {m for m in _imports(name, path, set(known_modules)) if m in chosen}
        for name, path in chosen.items()
    }
    found = cycles(graph)
    for comp in found:
        members = set(comp)
        print(f"cycle ({len(comp)} modules): {', '.join(comp)}")
        for m in comp:
            inside = sorted(graph[m] & members)
            print(f"    {m} -> {', '.join(inside)}")
    if not found:
        print(f"no import cycles in {', '.join(dirs)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
