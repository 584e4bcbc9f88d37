"""One set of sampling bounds and one set of load options, the same in the engine, the settings
file and the CLI (engine/options.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mixtral_chat.app.settings import (
    CONFIG_FILENAME,
    NEW_CHAT_GENERATION,
    Settings,
    SettingsError,
    load_settings,
    save_settings,
)
from mixtral_chat.engine.options import (
    TEMPERATURE_MAX,
    GenerationConfig,
    GenerationConfigError,
    LoadOptions,
    LoadOptionsError,
)
from tests.conftest import run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# field, a value outside its bounds, the one-line message (the settings file's wording).
OUT_OF_BOUNDS = [
    ("temperature", -1.0, "temperature must be between 0 and 5, got -1.0"),
    ("temperature", 5.5, "temperature must be between 0 and 5, got 5.5"),
    ("temperature", float("nan"), "temperature must be between 0 and 5, got nan"),
    ("temperature", float("inf"), "temperature must be between 0 and 5, got inf"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("top_p", float("nan"), "top_p must be in (0, 1], got nan"),
    ("top_k", -1, "top_k must be 0 (off) or positive, got -1"),
    ("max_tokens", 0, "max_tokens must be at least 1, got 0"),
    ("seed", 2**64, f"seed must be between {-(2**63)} and {2**64 - 1}, got {2**64}"),
]
IDS = [f"{name}={value}" for name, value, _ in OUT_OF_BOUNDS]


@pytest.mark.parametrize(("name", "value", "message"), OUT_OF_BOUNDS, ids=IDS)
def test_the_engine_refuses_each_bound_with_one_line(name: str, value: float, message: str) -> None:
    with pytest.raises(GenerationConfigError) as info:
        GenerationConfig(**{name: value})
    assert str(info.value) == message


def test_the_bounds_themselves_are_accepted() -> None:
    GenerationConfig(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1)
    GenerationConfig(temperature=TEMPERATURE_MAX, top_p=1e-6)


# TOML writes nan and inf as they are: a hand-written file can hold them.
@pytest.mark.parametrize(("name", "value", "message"), OUT_OF_BOUNDS, ids=IDS)
def test_the_settings_file_refuses_each_bound_naming_the_file(
    tmp_path: Path, name: str, value: float, message: str
) -> None:
    path = tmp_path / CONFIG_FILENAME
    path.write_text(f"[generation]\n{name} = {value}\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: {message}"


def test_missing_generation_keys_keep_the_new_chat_defaults(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_FILENAME
    path.write_text("[generation]\ntemperature = 0.2\n")
    generation = load_settings(path).generation
    assert generation == GenerationConfig(temperature=0.2, top_p=0.95, top_k=0, max_tokens=1024)
    assert Settings().generation == NEW_CHAT_GENERATION != GenerationConfig()  # the engine is greedy


CLI_OUT_OF_BOUNDS = [
    (["--temperature", "9"], "--temperature must be <= 5, got 9"),
    (["--temperature", "5.01"], "--temperature must be <= 5, got 5.01"),
    (["--temperature", "-1"], "--temperature must be >= 0 and finite, got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0, got -1"),
    (["--max-tokens", "0"], "--max-tokens must be a positive integer, got 0"),
    (["--seed", str(2**64)], f"--seed must be an integer from {-(2**63)} to {2**64 - 1}, got {2**64}"),
]


CLI_IDS = [" ".join(flags) for flags, _ in CLI_OUT_OF_BOUNDS]


@pytest.mark.parametrize(("flags", "message"), CLI_OUT_OF_BOUNDS, ids=CLI_IDS)
def test_the_cli_refuses_each_bound_with_exit_2(isolated_home: Path, flags: list[str], message: str) -> None:
    result = run_cli("ask", *flags, "hi")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: mixtral-chat ask ")
    assert result.stderr.splitlines()[-1] == f"mixtral-chat: error: {message}"


def test_the_cli_accepts_the_temperature_cap(isolated_home: Path) -> None:
    result = run_cli("ask", "--temperature", "5", "--seed", "1", "--max-tokens", "2", "--json", "hi")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["usage"]["completion_tokens"] <= 2


# key, a value outside its bounds (as the settings file writes it), the one-line message.
LOAD_OUT_OF_BOUNDS = [
    ("context_length", "-5", "context_length must be at least 16, got -5"),
    ("context_length", "8", "context_length must be at least 16, got 8"),
    ("experts_per_layer", "-1", "experts_per_layer must be at least 0, got -1"),
    ("gpu_budget_gb", "-3.0", "gpu_budget_gb must be a finite number of GB >= 0, got -3.0"),
    ("gpu_budget_gb", "inf", "gpu_budget_gb must be a finite number of GB >= 0, got inf"),
    ("gpu_budget_gb", "nan", "gpu_budget_gb must be a finite number of GB >= 0, got nan"),
    ("h2d_gbps", "0.0", "h2d_gbps must be a finite number of GB/s > 0, got 0.0"),
    ("device", '"tpu"', "device must be one of auto, cpu, cuda, got 'tpu'"),
    ("device", '"cuda:x"', "device must be one of auto, cpu, cuda, got 'cuda:x'"),
    ("on_miss", '"never"', "on_miss must be one of auto, copy, cpu, split, got 'never'"),
    ("offload_store", '"tape"', "offload_store must be one of ram, disk, got 'tape'"),
]
LOAD_IDS = [f"{key}={value}" for key, value, _ in LOAD_OUT_OF_BOUNDS]


@pytest.mark.parametrize(("key", "value", "message"), LOAD_OUT_OF_BOUNDS, ids=LOAD_IDS)
def test_load_options_out_of_bounds_are_one_line_in_the_settings_file_and_the_engine(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    path = tmp_path / CONFIG_FILENAME
    path.write_text(f"[engine]\n{key} = {value}\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: engine.{message}"
    # What Engine.load checks first, for options from anywhere (a caller of the engine, the screen).
    options = LoadOptions(**{key: tomllib.loads(f"v = {value}")["v"]})
    with pytest.raises(LoadOptionsError) as raised:
        options.check()
    assert str(raised.value) == message


def test_load_options_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    LoadOptions(context_length=16, experts_per_layer=1, gpu_budget_gb=0.0, device="cuda:1").check()
    LoadOptions(quant="nf4", dtype="float16", h2d_gbps=1e-3).check()


def test_engine_load_checks_the_options_before_reading_anything(tiny_model_dir: Path) -> None:
    from mixtral_chat.engine.runtime import Engine

    with pytest.raises(LoadOptionsError, match=r"^context_length must be at least 16, got 4$"):
        Engine.load(tiny_model_dir, LoadOptions(context_length=4))


def test_an_existing_engine_table_loads_into_the_load_options(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_FILENAME
    path.write_text(
        '[engine]\ndevice = "cpu"\ndtype = "float32"\nquant = "nf4"\noffload = true\nexperts_per_layer = 3\n'
        'gpu_budget_gb = 12\nprefetch = true\noffload_store = "disk"\ncontext_length = 2048\n'
    )
    options = load_settings(path).engine
    assert options == LoadOptions(
        device="cpu",
        dtype="float32",
        quant="nf4",
        offload=True,
        experts_per_layer=3,
        gpu_budget_gb=12.0,
        prefetch=True,
        offload_store="disk",
        context_length=2048,
    )


def test_the_engine_table_keeps_its_keys(isolated_home: Path) -> None:
    settings = Settings()
    settings.engine.offload = True
    settings.engine.experts_per_layer = 2
    path = save_settings(settings)
    text = path.read_text()
    engine_table = text[text.index("[engine]") :].split("\n\n")[0].splitlines()[1:]
    keys = [line.split(" = ")[0] for line in engine_table]
    # The keys the settings have always written, then the one the CLI also sets, then what a
    # missed expert does (issue 14; the bandwidths stay unset: measured per host), then the
    # vocabulary weights' form (issue 16), then whether CUDA replays decode graphs (issue 14).
    assert keys == [
        "device",
        "dtype",
        "offload",
        "experts_per_layer",
        "prefetch",
        "offload_store",
        "cache_policy",
        "on_miss",
        "vocab_weights",
        "cuda_graphs",
    ]
    assert load_settings() == settings
