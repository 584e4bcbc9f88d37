"""The import layers of pyproject.toml's [tool.importlinter] hold (function-local imports count),
and app/, engine/ and quant/ have no import cycle (scripts/import_graph.py reads every import
statement with `ast`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

# lint-imports run by this interpreter: the console script's shebang may name another checkout's
# venv (a copied venv), which would check that checkout's code instead of this one.
LINT_IMPORTS = (
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
)


def test_the_layer_contracts_are_kept() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


def test_the_whole_tree_has_no_import_cycle() -> None:
    script = REPO_ROOT / "scripts" / "import_graph.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    assert "no import cycles in app, engine, quant" in result.stdout


def test_the_cycle_script_sees_function_local_imports_and_skips_type_checking_ones(tmp_path: Path) -> None:
    """The script does report a cycle where there is one (the tree above has none to show it)."""
    spec = importlib.util.spec_from_file_location("import_graph", REPO_ROOT / "scripts" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    import_graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(import_graph)
    sources = {
        "pkg.low": "def later() -> None:\n    from pkg import high\n",
        "pkg.high": "from pkg.low import later\n",
        "pkg.typed": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import high\n",
    }
    paths = {}
    for name, source in sources.items():
        paths[name] = tmp_path / f"{name.rpartition('.')[2]}.py"
        paths[name].write_text(source)
    known = set(sources) | {"pkg"}
    graph = {name: import_graph._imports(name, path, known) & set(sources) for name, path in paths.items()}
    assert graph == {"pkg.low": {"pkg.high"}, "pkg.high": {"pkg.low"}, "pkg.typed": set()}
    assert import_graph.cycles(graph) == [["pkg.high", "pkg.low"]]


def test_the_file_map_in_architecture_md_is_current() -> None:
    """docs/ARCHITECTURE.md lists every module with its size and docstring (scripts/file_map.py)."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "file_map.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, "docs/ARCHITECTURE.md's file list is stale: run python scripts/file_map.py"
