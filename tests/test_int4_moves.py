"""int4 layers run where their tensors are: `.to()` rebuilds the runtime form from the stored parts.

A model quantized by the project's quantizer and loaded on the CPU is moved between the two CPU
backends (the native kernel on the stored parts, ATen's CPU int4 pack) exactly as `.to("cuda")`
moves it to tinygemm: the same `runtime_tensors(stored parts, device, backend)`, only the final
pack op differs. Each move must give the logits of a model built directly for that backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.weights import load_model
from mixtral_chat.quant import native
from mixtral_chat.quant.int4 import Int4Linear, quantize_int4
from tests.conftest import REPO_ROOT, save_tiny_checkpoint
from tests.test_offload import logits_of


def native_kernel_here() -> bool:
    return native.int4_kernel() is not None


needs_native = pytest.mark.skipif(not native_kernel_here(), reason="no native int4 kernel here")


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixtral_chat.quant import quantize_model_dir

    source = save_tiny_checkpoint(
        tmp_path_factory.mktemp("float"),
        num_local_experts=4,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=120,  # w1 and w3 rows pad to 128 in ATen's form, w2's inputs to 128
    )
    return quantize_model_dir(source, tmp_path_factory.mktemp("int4") / "m", "int4", 32)


def use_native(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    if on:
        monkeypatch.delenv(native.NO_NATIVE_ENV, raising=False)
    else:
        monkeypatch.setenv(native.NO_NATIVE_ENV, "1")


def int4_layers(model: torch.nn.Module) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def tokens() -> torch.Tensor:
    return torch.randint(0, 32000, (1, 14), generator=torch.Generator().manual_seed(11))


@needs_native
def test_a_cpu_loaded_model_moved_between_backends_matches_one_built_for_each(
    int4_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_native(monkeypatch, False)
    built_aten = load_model(int4_dir)
    expected_aten = logits_of(built_aten, tokens())
    use_native(monkeypatch, True)
    expected_native = logits_of(load_model(int4_dir), tokens())
    assert not torch.equal(expected_aten, expected_native)  # the backends round differently

    model = load_model(int4_dir)  # native: the layers' buffers are the stored parts
    assert {layer.backend for layer in int4_layers(model)} == {"native"}
    use_native(monkeypatch, False)
    model.to("cpu")  # the device's backend is ATen now: repacked from the stored parts
    assert {layer.backend for layer in int4_layers(model)} == {"aten"}
    for moved, built in zip(int4_layers(model), int4_layers(built_aten), strict=True):
        assert torch.equal(moved.weight_packed, built.weight_packed)
        assert torch.equal(moved.scales_and_zeros, built.scales_and_zeros)
        assert not hasattr(moved, "qweight")  # one form held, not two
    assert torch.equal(logits_of(model, tokens()), expected_aten)

    use_native(monkeypatch, True)
    model.to("cpu")  # back: the stored parts read back from ATen's CPU layout, exactly
    assert {layer.backend for layer in int4_layers(model)} == {"native"}
    assert torch.equal(logits_of(model, tokens()), expected_native)


@needs_native
def test_a_move_to_the_same_device_and_backend_keeps_the_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    use_native(monkeypatch, True)
    blob = torch.zeros(4096, dtype=torch.uint8)
    parts = quantize_int4(torch.randn(32, 128, generator=torch.Generator().manual_seed(1)), 64)
    views, offset = {}, 0
    for name, tensor in parts.items():  # the parts as views into one blob, as an expert's are
        nbytes = tensor.numel() * tensor.element_size()
        views[name] = blob[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        views[name].copy_(tensor)
        offset += -(-nbytes // 64) * 64
    layer = Int4Linear.from_parts(views, 32, 128, 64, "cpu", torch.float32)
    layer.cpu()
    layer.to("cpu", torch.float32)
    assert all(layer._buffers[name] is views[name] for name in views)


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "aten"])
def test_a_dtype_only_move_keeps_the_layer_working(native_on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if native_on and not native_kernel_here():
        pytest.skip("no native int4 kernel here")
    use_native(monkeypatch, native_on)
    generator = torch.Generator().manual_seed(2)
    parts = quantize_int4(torch.randn(40, 96, generator=generator), 32)
    layer = Int4Linear.from_parts(parts, 40, 96, 32, "cpu", torch.float32)
    x = torch.randn(3, 96, generator=generator)
    before = layer(x)
    dtypes = {name: t.dtype for name, t in layer.named_buffers()}
    layer.to(torch.bfloat16)
    layer.half()
    layer.float()
    assert {name: t.dtype for name, t in layer.named_buffers()} == dtypes
    assert layer.backend == ("native" if native_on else "aten")
    assert torch.equal(layer(x), before)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_a_form_that_cannot_be_read_back_refuses_to_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """tinygemm's CUDA layout is not read back: an ATen form off the CPU (a meta shell here, where
    a GPU has its CUDA form) gives one clear error instead of moving codes it cannot read."""
    use_native(monkeypatch, False)
    parts = quantize_int4(torch.randn(16, 64, generator=torch.Generator().manual_seed(3)), 64)
    shell = Int4Linear.from_parts(parts, 16, 64, 64, "cpu", torch.float32).to("meta")
    assert shell.backend == "aten" and shell.weight_packed.is_meta  # a shell keeps its form
    with pytest.raises(QuantizationError, match=r"packed for meta's kernel cannot move: .*read back"):
        shell.stored_parts()


def test_a_cpu_layout_that_is_not_known_is_never_read_back() -> None:
    """Another architecture's ATen layout (no inverse here) is refused, not guessed; this CPU's
    layout reads back only after the check against ATen's own pack op passed."""
    from mixtral_chat.quant.int4_forms import _aten_cpu_blocks

    assert _aten_cpu_blocks("SVE256") is None
    assert _aten_cpu_blocks(torch.backends.cpu.get_cpu_capability()) is not None


CAPABILITY_CHECK = """
import torch
from mixtral_chat.quant.int4 import quantize_int4
from mixtral_chat.quant.int4_forms import aten_cpu_stored_parts, runtime_tensors
print(torch.backends.cpu.get_cpu_capability())
for rows in (16, 40, 64, 100, 128, 200):  # full blocks and every tail size
    parts = quantize_int4(torch.randn(rows, 192), 64)
    form = runtime_tensors(parts, rows, torch.device("cpu"), "aten")
    back = aten_cpu_stored_parts(form["weight_packed"], form["scales_and_zeros"], rows)
    assert all(torch.equal(back[name], parts[name]) for name in parts), rows
"""


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_atens_cpu_layout_reads_back_exactly_at_each_capability(capability: str) -> None:
    """ATen's CPU pack lays codes out by the vector width it dispatches to (AVX-512, AVX2, none):
    each one, forced with ATEN_CPU_CAPABILITY, reads back to the very stored parts."""
    needed = {"avx2": {"avx2"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
    if not needed.get(capability, set()) <= cpu_flags():
        pytest.skip(f"this CPU cannot run ATen's {capability} code")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run(
        [sys.executable, "-c", CAPABILITY_CHECK], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == capability.upper()
