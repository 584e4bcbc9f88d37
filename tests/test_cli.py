"""The CLI's own surface: --version and usage errors, through the real CLI in a subprocess."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import run_cli


def test_version_prints_the_installed_version(isolated_home: Path) -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"mixtral-chat {version('mixtral-chat')}\n"


WRONG_FLAGS = [
    (["ask", "--bogus", "hi"], "usage: mixtral-chat ask "),
    (["models", "list", "--bogus"], "usage: mixtral-chat models list "),
    (["models", "--bogus"], "usage: mixtral-chat models "),
    (["--bogus"], "usage: mixtral-chat [-h] [--version]"),
]


@pytest.mark.parametrize(("argv", "usage"), WRONG_FLAGS, ids=[" ".join(a) for a, _ in WRONG_FLAGS])
def test_a_wrong_flag_prints_the_usage_of_the_command_it_was_given_to(
    isolated_home: Path, argv: list[str], usage: str
) -> None:
    result = run_cli(*argv)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(usage)
    assert result.stderr.splitlines()[-1] == "mixtral-chat: error: unrecognized arguments: --bogus"


def test_models_list_stars_the_demo_when_no_default_was_chosen(isolated_home: Path) -> None:
    result = run_cli("models", "list")
    assert result.returncode == 0, result.stderr
    starred = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("*  ")]
    assert starred == ["demo"]  # what runs is what is starred


def test_models_info_says_parameter_counts_in_units_that_fit(isolated_home: Path) -> None:
    mixtral = run_cli("models", "info", "mixtral-8x7b-instruct")
    assert mixtral.returncode == 0, mixtral.stderr
    assert "46.7 B total, 12.9 B per token" in mixtral.stdout  # 46,702,792,704 parameters
    demo = run_cli("models", "info", "demo")
    line = next(line for line in demo.stdout.splitlines() if line.startswith("parameters"))
    assert re.fullmatch(r"parameters +\d\.\d\d M total, \d\.\d\d M per token", line), line


def test_a_diff_longer_than_the_demo_context_says_what_to_do(isolated_home: Path) -> None:
    diff = "".join(f"+    line {i}: a changed line of code\n" for i in range(200))  # ~2,000 tokens
    result = run_cli("ask", "review this", input=diff)
    assert result.returncode == 1 and result.stdout == ""
    notice, line = result.stderr.strip().splitlines()  # "using the bundled demo model ...", then the error
    assert "demo" in notice and line.startswith("mixtral-chat: error: the prompt is ")
    assert "over the context of 512 tokens (demo's maximum)" in line
    assert line.endswith("shorten the prompt or use a model with a longer context")
