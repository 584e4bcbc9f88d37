"""The planner for 8-24 GB cards and `mixtral-chat plan`: from a config.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.models.catalog import MIXTRAL_8X7B_CONFIG, demo_dir
from mixtral_chat.engine.offload.bandwidth import PROFILES
from mixtral_chat.engine.offload.placement import COPY, CPU, SPLIT, place_layers
from mixtral_chat.engine.offload.planner import plan_placement, sizes_of_config, sizes_of_model
from mixtral_chat.engine.offload.store import choose_store
from mixtral_chat.engine.runtime import default_context
from mixtral_chat.engine.weights import load_model
from mixtral_chat.quant.int8 import quantize_vocab_weights
from tests.conftest import run_cli

MIXTRAL = ModelArgs.from_dict(MIXTRAL_8X7B_CONFIG, source="test")
BUDGETS_GB = (8, 12, 16, 24)


def mixtral_plan(budget_gb: float, profile: str, on_miss: str = "auto"):
    budget = int(budget_gb * 1e9)
    sizes = sizes_of_config(MIXTRAL, "nf4", default_context(MIXTRAL, 2, budget), dtype_bytes=2)
    return sizes, plan_placement(sizes, budget_bytes=budget, on_miss=on_miss, bandwidths=PROFILES[profile])


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_mixtral_gets_a_plan_on_every_card_and_more_memory_never_means_less_on_the_gpu(profile: str) -> None:
    shares = []
    for budget_gb in BUDGETS_GB:
        sizes, plan = mixtral_plan(budget_gb, profile)
        assert plan.device_bytes <= budget_gb * 1e9
        assert len(plan.layers) == 32
        # Attention and the KV cache are always on the GPU; experts fill what is left.
        assert plan.resident_bytes == sizes.resident_bytes and plan.kv_cache_bytes == sizes.kv_cache_bytes
        assert (
            budget_gb * 1e9 - plan.device_bytes < 32 * sizes.expert_bytes
        )  # no room for another slot per layer
        shares.append(plan.total_slots / (32 * 8))
        assert plan.decode_bound_s is not None and plan.decode_bound_s > 0
    assert shares == sorted(shares) and shares[0] < shares[-1]


def test_an_8_gb_card_works_though_copying_every_miss_cannot() -> None:
    """Defect 10: copying needs top_k slots in every layer, which 8 GB cannot give."""
    sizes, plan = mixtral_plan(8, "3060-ddr4")
    total = (8 * 10**9 - sizes.resident_bytes - sizes.kv_cache_bytes) // sizes.expert_bytes
    assert total < 32 * 2 and place_layers(total, 32, 8, 2, COPY) is None
    assert any(layer.on_miss in (CPU, SPLIT) for layer in plan.layers)
    assert sum(row["cpu_experts"] for row in plan.to_json()["layers"]) > 0


def test_the_chosen_placement_beats_copying_and_computing_every_miss() -> None:
    for profile in PROFILES:
        for budget_gb in BUDGETS_GB:
            _, chosen = mixtral_plan(budget_gb, profile)
            _, on_cpu = mixtral_plan(budget_gb, profile, on_miss=CPU)
            assert chosen.decode_bound_s <= on_cpu.decode_bound_s
            if budget_gb > 8:  # 8 GB cannot copy every miss at all
                _, copying = mixtral_plan(budget_gb, profile, on_miss=COPY)
                assert chosen.decode_bound_s <= copying.decode_bound_s


@pytest.mark.parametrize("scheme", ["none", "int4", "nf4"])
def test_sizes_from_the_config_are_those_of_the_loaded_model(scheme: str) -> None:
    model = load_model(demo_dir(), quant=scheme)
    assert sizes_of_config(model.args, scheme, 64, dtype_bytes=4) == sizes_of_model(model, 64)
    if scheme != "none" and quantize_vocab_weights(model):  # as the engine runs it on a CPU
        assert sizes_of_config(model.args, scheme, 64, 4, vocab_int8=True) == sizes_of_model(model, 64)


def plan_cli(*args: str, home: Path) -> tuple[int, str, str]:
    done = run_cli("plan", *args, env={"MIXTRAL_CHAT_HOME": str(home)})
    return done.returncode, done.stdout, done.stderr


def test_the_cli_plans_a_catalog_model_that_is_not_downloaded(tmp_path: Path) -> None:
    flags = ("--gpu-mem", "12", "--ram", "64", "--profile", "3060-ddr4")
    code, out, err = plan_cli("--model", "mixtral-8x7b-instruct", *flags, "--json", home=tmp_path)
    assert code == 0, err
    data = json.loads(out)
    assert data["device"] == "cuda" and data["scheme"] == "nf4" and data["store"] == "ram"
    assert len(data["layers"]) == 32
    for row in data["layers"]:
        off = 8 - row["gpu_slots"]  # experts not on the GPU: computed on the CPU, copied, or either (split)
        expected = {"copy": (0, off), "cpu": (off, 0), "split": (off, off)}[row["on_miss"]]
        assert (row["cpu_experts"], row["copied_experts"]) == expected
        assert row["disk_experts"] == 0
    assert sum(row["gpu_slots"] for row in data["layers"]) * data["expert_bytes"] == data["cache_bytes"]
    assert data["bandwidths"]["source"] == "profile 3060-ddr4"
    _, expected = mixtral_plan(12, "3060-ddr4")
    assert [row["gpu_slots"] for row in data["layers"]] == [layer.slots for layer in expected.layers]

    # A config.json given as a path plans the same; as text it names what goes where.
    config = tmp_path / "config.json"
    config.write_text(json.dumps(MIXTRAL_8X7B_CONFIG))
    code, text, err = plan_cli("--model", str(config), *flags, home=tmp_path)
    assert code == 0, err
    assert "decode bound:" in text and "layer  gpu slots  on a miss  cpu-computed" in text
    assert len([line for line in text.splitlines() if line.strip()[:2].strip().isdigit()]) == 32
    code, as_path, _ = plan_cli("--model", str(config), *flags, "--json", home=tmp_path)
    assert json.loads(as_path)["layers"] == data["layers"]

    # Less RAM than the store: the experts stay on disk.
    code, out, err = plan_cli(
        "--model", "mixtral-8x7b-instruct", "--gpu-mem", "12", "--ram", "16", "--json", home=tmp_path
    )
    assert code == 0, err
    assert json.loads(out)["store"] == "disk"


def test_the_cli_plans_the_demo_on_the_cpu(tmp_path: Path) -> None:
    code, out, err = plan_cli("--model", "demo", "--ram", "4", home=tmp_path)
    assert code == 0, err
    assert "no offloading" in out and "on the CPU" in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--model", "no-such-model"), 1, "plan also takes a path to a config.json"),
        (("--model", "mixtral-8x7b-instruct", "--gpu-mem", "1"), 1, "too small"),
        (("--model", "mixtral-8x7b-instruct", "--gpu-mem", "-3"), 2, "--gpu-mem must be > 0"),
        (("--model", "mixtral-8x7b-instruct", "--scheme", "int8"), 2, "invalid choice"),
        ((), 2, "--model"),
    ],
)
def test_bad_input_is_one_error_line(args: tuple[str, ...], code: int, message: str, tmp_path: Path) -> None:
    got, _, err = plan_cli(*args, home=tmp_path)
    assert got == code
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mixtral-chat: error:")


def test_a_broken_config_is_one_error_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = plan_cli("--model", str(empty), home=tmp_path)
    assert code == 1 and "holds no config.json" in err
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": "big"}')
    code, _, err = plan_cli("--model", str(bad), "--gpu-mem", "12", home=tmp_path)
    assert code == 1 and "Traceback" not in err and str(bad) in err


def test_ask_stats_prints_the_plan_the_engine_used(tmp_path: Path) -> None:
    done = run_cli(
        "ask",
        "--model",
        str(demo_dir()),
        "--experts-per-layer",
        "3",
        "--on-miss",
        "cpu",
        "--max-tokens",
        "4",
        "--stats",
        "hello",
        env={"MIXTRAL_CHAT_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split()[2:] for line in done.stderr.splitlines() if line.startswith("mixtral-chat: plan: ")]
    layers = [row for row in rows if row and row[0].isdigit()]
    assert [row[:3] for row in layers] == [[str(i), "3", "cpu"] for i in range(4)]
    assert any(row[:1] == ["decode"] for row in rows)
    assert "computed on the CPU" in done.stderr


def test_the_store_is_ram_only_with_room_to_spare() -> None:
    """Defect 2: next to a GPU the store was always RAM; now RAM only when it fits what is available."""
    store = 25_370_000_000  # Mixtral's nf4 experts
    assert choose_store(store, 64 * 10**9) == "ram"
    assert choose_store(store, 16 * 10**9) == "disk"
    assert choose_store(store, store) == "disk"  # nothing left for the process or the system
    reserve = store // 20  # 5% of a store that large, more than the 1 GB floor
    assert (
        choose_store(store, store + reserve) == "ram" and choose_store(store, store + reserve - 1) == "disk"
    )
    assert choose_store(10**8, 10**8 + 10**9) == "ram" and choose_store(10**8, 10**9) == "disk"  # 1 GB floor
