"""The planner for 8-24 GB cards and `mixtral-chat plan`: from a config.json alone."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.models.catalog import MIXTRAL_8X7B_CONFIG, demo_dir
from mixtral_chat.engine.offload.bandwidth import (
    ASSUMED_DISK_GBPS,
    CACHE_FILE,
    DISK_CHUNK,
    PROFILES,
    measure_disk_gbps,
    with_disk,
)
from mixtral_chat.engine.offload.placement import (
    COPY,
    CPU,
    SPLIT,
    Bandwidths,
    MissCosts,
    host_reserve_bytes,
    place_layers,
    step_seconds,
)
from mixtral_chat.engine.offload.planner import plan_placement, sizes_of_config, sizes_of_model
from mixtral_chat.engine.offload.store import choose_store
from mixtral_chat.engine.runtime import default_context
from mixtral_chat.engine.units import format_bytes
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


def test_int4_slots_on_a_gpu_count_their_staging_blob(tmp_path: Path) -> None:
    """int4 copies land in one expert-sized blob on the GPU and are packed for tinygemm from it
    (engine/offload/offloader.py): the plan counts that blob; nf4 slots bind the copied bytes."""
    flags = ("--model", "mixtral-8x7b-instruct", "--gpu-mem", "12", "--ram", "64", "--profile", "3060-ddr4")
    plans = {}
    for scheme in ("int4", "nf4"):
        code, out, err = plan_cli(*flags, "--scheme", scheme, "--json", home=tmp_path)
        assert code == 0, err
        plans[scheme] = json.loads(out)
    int4, nf4 = plans["int4"], plans["nf4"]
    assert nf4["staging_bytes"] == 0 and int4["staging_bytes"] == int4["expert_bytes"]
    assert int4["device_bytes"] == (
        int4["resident_bytes"] + int4["kv_cache_bytes"] + int4["cache_bytes"] + int4["staging_bytes"]
    )
    assert int4["device_bytes"] <= 12e9
    code, text, _ = plan_cli(*flags, "--scheme", "int4", home=tmp_path)
    assert f"a staging blob {format_bytes(int4['expert_bytes'])}" in text


def test_the_cli_plans_the_demo_on_the_cpu(tmp_path: Path) -> None:
    code, out, err = plan_cli("--model", "demo", "--ram", "4", home=tmp_path)
    assert code == 0, err
    assert "no offloading" in out and "on the CPU" in out
    assert "disk reads" not in out and ", disk " not in out  # nothing read from a disk store


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--model", "no-such-model"), 1, "plan also takes a path to a config.json"),
        (("--model", "mixtral-8x7b-instruct", "--gpu-mem", "1"), 1, "too small"),
        (("--model", "mixtral-8x7b-instruct", "--gpu-mem", "-3"), 2, "--gpu-mem must be > 0"),
        (("--model", "mixtral-8x7b-instruct", "--disk-gbps", "0"), 2, "--disk-gbps must be > 0"),
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


def ask_stats_plan(tmp_path: Path, *placement: str) -> tuple[str, list[str]]:
    """`ask --stats` on the demo with these placement flags: stderr, and the plan's lines."""
    done = run_cli(
        "ask",
        "--model",
        str(demo_dir()),
        *placement,
        "--max-tokens",
        "4",
        "--stats",
        "hello",
        env={"MIXTRAL_CHAT_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr
    prefix = "mixtral-chat: plan: "
    return done.stderr, [line[len(prefix) :] for line in done.stderr.splitlines() if line.startswith(prefix)]


def test_ask_stats_prints_the_plan_the_engine_used(tmp_path: Path) -> None:
    stderr, plan = ask_stats_plan(tmp_path, "--experts-per-layer", "3", "--on-miss", "cpu")
    rows = [line.split() for line in plan]
    layers = [row for row in rows if row and row[0].isdigit()]
    assert [row[:3] for row in layers] == [[str(i), "3", "cpu"] for i in range(4)]
    assert any(row[:1] == ["decode"] for row in rows)
    assert "computed on the CPU" in stderr


def test_ask_stats_counts_the_disk_reads_of_a_store_on_disk(tmp_path: Path) -> None:
    _, plan = ask_stats_plan(tmp_path, "--offload", "disk", "--experts-per-layer", "3")
    assert any(line.startswith("disk: ") for line in plan)  # the store's line
    bound = next(line for line in plan if "decode bound:" in line)
    assert "disk " in bound and "GB/s" in bound
    reads = next(line for line in plan if line.startswith("disk reads: "))
    assert "of RAM left to cache the" in reads  # the engine knows the RAM it has


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


# --- a store on disk: each miss is read from the files first (the page cache holds what RAM allows)


def test_a_store_on_disk_pays_for_the_misses_the_page_cache_cannot_hold() -> None:
    budget = 12 * 10**9
    sizes = sizes_of_config(MIXTRAL, "nf4", default_context(MIXTRAL, 2, budget), dtype_bytes=2)
    rates = dataclasses.replace(PROFILES["3060-ddr4"], disk_gbps=2.0)
    in_ram = plan_placement(sizes, budget_bytes=budget, bandwidths=rates)
    store = 32 * 8 * sizes.expert_bytes
    bounds, shares = [], []
    for ram_gb in (64, 24, 16, 8):
        ram = ram_gb * 10**9
        plan = plan_placement(sizes, budget_bytes=budget, store="disk", bandwidths=rates, host_ram_bytes=ram)
        assert plan.layers == in_ram.layers  # next to a GPU the page cache does not change the slots
        cacheable = ram - host_reserve_bytes(store)
        assert plan.page_cache_bytes == cacheable
        assert plan.disk_share == pytest.approx(max(0.0, 1 - cacheable / store))
        bounds.append(plan.decode_bound_s)
        shares.append(plan.disk_share)
    assert shares[0] == 0.0 and bounds[0] == pytest.approx(in_ram.decode_bound_s)  # all cached
    assert shares == sorted(shares) and 0 < shares[1] < shares[-1] < 1
    assert bounds == sorted(bounds) and bounds[-1] > 2 * bounds[0]
    # A faster disk, a shorter bound; RAM not known, every miss read from the disk.
    faster = dataclasses.replace(rates, disk_gbps=8.0)
    plan = plan_placement(
        sizes, budget_bytes=budget, store="disk", bandwidths=faster, host_ram_bytes=16 * 10**9
    )
    assert plan.decode_bound_s < bounds[2]
    unknown = plan_placement(sizes, budget_bytes=budget, store="disk", bandwidths=rates)
    assert unknown.disk_share == 1.0 and unknown.decode_bound_s > bounds[-1]


def test_on_a_cpu_the_page_cache_is_what_the_plan_leaves_of_the_ram() -> None:
    """On a CPU the slots, the resident weights and the KV cache are in the same RAM as the page
    cache: only the rest caches the store's files."""
    sizes = sizes_of_config(MIXTRAL, "int4", 4096, dtype_bytes=4, vocab_int8=True)
    rates = Bandwidths(None, 30.0, 30.0, disk_gbps=2.0)
    ram = 28 * 10**9
    plan = plan_placement(sizes, budget_bytes=20 * 10**9, store="disk", bandwidths=rates, host_ram_bytes=ram)
    store = 32 * 8 * sizes.expert_bytes
    assert plan.page_cache_bytes == ram - host_reserve_bytes(store) - plan.device_bytes
    assert plan.disk_share == pytest.approx(1 - plan.page_cache_bytes / store)


def test_a_step_reads_its_misses_from_the_disk_one_after_another() -> None:
    costs = MissCosts(device_s=0.001, copy_s=0.004, cpu_s=0.005, read_s=0.050)
    # One miss copied and one computed on the CPU: each waits for its read, and the disk reads
    # them one at a time.
    assert step_seconds(0, 1, 1, costs) == pytest.approx(0.100)
    assert step_seconds(2, 0, 0, costs) == pytest.approx(0.002)  # hits read nothing
    assert step_seconds(1, 1, 0, costs) == pytest.approx(0.050 + 0.004 + 0.001 + 0.001)
    assert MissCosts.of(10**8, Bandwidths(25.0, 40.0, 330.0, disk_gbps=2.0), 0.5).read_s == pytest.approx(
        0.025
    )
    assert MissCosts.of(10**8, Bandwidths(25.0, 40.0, 330.0), 0.5).read_s == 0.0  # a store in RAM


def test_the_disk_rate_is_measured_on_the_store_files_past_the_page_cache(tmp_path: Path) -> None:
    shard = tmp_path / "model-00001.safetensors"
    shard.write_bytes(os.urandom(2 * DISK_CHUNK))
    before = shard.read_bytes()
    base = Bandwidths(None, 30.0, 30.0, source="measured")
    found = measure_disk_gbps(shard)
    rates = with_disk(base, [tmp_path / "small.safetensors", shard], cache_dir=tmp_path)
    assert shard.read_bytes() == before  # read only
    if found is None:  # a filesystem without O_DIRECT: assumed, and said
        assert rates.disk_gbps == ASSUMED_DISK_GBPS and rates.source == "measured, disk assumed"
    else:
        assert found > 0 and rates.disk_gbps is not None and rates.disk_gbps > 0
        assert rates.source == "measured"
        cached = json.loads((tmp_path / CACHE_FILE).read_text())
        assert [entry["disk_gbps"] for key, entry in cached.items() if "| disk " in key] == [rates.disk_gbps]
        assert with_disk(base, [shard], cache_dir=tmp_path) == rates  # from the cache
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"x" * 4096)
    assert measure_disk_gbps(small) is None  # less than one chunk: nothing to time
    assert with_disk(base, [], cache_dir=tmp_path).disk_gbps == ASSUMED_DISK_GBPS  # nothing downloaded


def test_the_cli_counts_disk_reads_when_ram_is_short(tmp_path: Path) -> None:
    bounds = {}
    for disk in ("1.5", "15"):
        code, out, err = plan_cli(
            "--model", "mixtral-8x7b-instruct", "--ram", "16", "--disk-gbps", disk, "--json", home=tmp_path
        )
        assert code == 0, err
        data = json.loads(out)
        assert data["device"] == "cpu" and data["store"] == "disk"
        assert (
            data["bandwidths"]["disk_gbps"] == float(disk)
            and "flags (disk_gbps)" in data["bandwidths"]["source"]
        )
        assert 0 < data["disk_read_share"] < 1 and data["page_cache_bytes"] > 0
        assert all(row["disk_experts"] == 8 - row["gpu_slots"] for row in data["layers"])
        bounds[disk] = data["decode_bound_s"]
    assert bounds["1.5"] > 2 * bounds["15"]
    code, text, err = plan_cli(
        "--model", "mixtral-8x7b-instruct", "--ram", "16", "--disk-gbps", "1.5", home=tmp_path
    )
    assert code == 0, err
    assert "disk 1.50 GB/s" in text and "disk reads: " in text and "of RAM left to cache the" in text
