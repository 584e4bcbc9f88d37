"""The quantization schemes: one small handler class each (`none`, `int4`, `nf4`).

A handler knows, for one linear layer of shape [out_features, in_features]:
- `part_specs`: the tensors it stores (suffix, dtype, shape), for planning and validation;
- `quantize_weight` / `dequantize_weight`: the pure functions (round trip in tests);
- `build_linear`: the runtime module (same forward as nn.Linear) on a device and dtype;
and, for whole models, `quantize_state_dict` (HF keys in, quantized HF keys out) and
`load_for_runtime` (swap a model's linears using such a state dict).

Stored keys: an attention projection `P.weight` becomes `P.<part>` for each part (`none` keeps
`P.weight`); the three linears of an expert become one blob `...experts.E.packed` (see
`mixtral_chat.quant.blob`). Every other tensor keeps its key and float dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant.assemble import RuntimeAssembler, quantize_state_dict
from mixtral_chat.quant.common import DeviceLike, Parts, PartSpec, dtype_name, nf4_part_specs
from mixtral_chat.quant.int4 import (
    INT4_GROUP_SIZES,
    Int4Linear,
    check_group_size,
    check_int4_parts,
    dequantize_int4,
    int4_part_specs,
    quantize_int4,
)
from mixtral_chat.quant.nf4 import (
    NF4_BLOCKSIZES,
    NF4_DEFAULT_BLOCKSIZE,
    Nf4Linear,
    check_blocksize,
    check_nf4_parts,
    dequantize_nf4,
    quantize_nf4,
)

SCHEME_NAMES = ("none", "int4", "nf4")
DEFAULT_GROUP_SIZE = {"int4": 64, "nf4": NF4_DEFAULT_BLOCKSIZE}
GROUP_SIZES = {"int4": INT4_GROUP_SIZES, "nf4": NF4_BLOCKSIZES}


class QuantScheme:
    """Base handler. Subclasses set `name` and implement the per-layer methods."""

    name: ClassVar[str]
    # Quantizable weights are stored (and run) in float: the `none` scheme.
    keeps_float: ClassVar[bool] = False
    group_size: int | None = None
    double_quant: bool = False

    # --- per layer -------------------------------------------------------------------------
    def part_specs(self, out_features: int, in_features: int) -> list[PartSpec]:
        raise NotImplementedError

    def quantize_weight(self, weight: Tensor) -> Parts:
        raise NotImplementedError

    def dequantize_weight(
        self, parts: Parts, out_features: int, in_features: int, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        raise NotImplementedError

    def check_parts(self, parts: Parts, out_features: int, in_features: int, where: str) -> None:
        raise NotImplementedError

    def build_linear(
        self, parts: Parts, out_features: int, in_features: int, device: DeviceLike, dtype: torch.dtype
    ) -> nn.Module:
        raise NotImplementedError

    # --- description -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What quant_config.json records about the scheme."""
        return {"scheme": self.name, "group_size": self.group_size, "double_quant": self.double_quant}

    def describe(self) -> str:
        if self.name == "none":
            return "none (float)"
        extra = ", double quantization" if self.double_quant else ""
        return f"{self.name} (group size {self.group_size}{extra})"

    def bits_per_weight(self, out_features: int = 4096, in_features: int = 4096) -> float:
        nbytes = sum(spec.nbytes for spec in self.part_specs(out_features, in_features))
        return 8 * nbytes / (out_features * in_features)

    # --- whole models ----------------------------------------------------------------------
    def quantize_state_dict(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """HF-keyed float state dict -> HF-keyed quantized state dict (as stored on disk).

        Attention projections become their parts, each complete expert one `.packed` blob;
        everything else is passed through unchanged.
        """
        return quantize_state_dict(self, state_dict)

    def load_for_runtime(
        self,
        model: nn.Module,
        tensors: Mapping[str, Tensor],
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        """Assign a quantized state dict (from `quantize_state_dict` or a quantized directory)
        into `model` (built on the meta device or not): quantized linears are swapped for
        runtime modules, other tensors assigned in `dtype` on `device`."""
        assembler = RuntimeAssembler(model, self, torch.device(device), dtype)
        for key, tensor in tensors.items():
            assembler.add(key, tensor)
        assembler.finish()


class NoneScheme(QuantScheme):
    """Keep weights in float (the reference). Experts are still stored as one blob each."""

    name = "none"
    keeps_float = True

    def __init__(self, float_dtype: torch.dtype | None = None) -> None:
        # The stored dtype of quantizable weights; None: whatever the source has.
        self.float_dtype = float_dtype

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["float_dtype"] = dtype_name(self.float_dtype) if self.float_dtype else None
        return cfg

    def part_specs(self, out_features: int, in_features: int) -> list[PartSpec]:
        return [PartSpec("weight", self.float_dtype or torch.bfloat16, (out_features, in_features))]

    def quantize_weight(self, weight: Tensor) -> Parts:
        if weight.dim() != 2:
            raise QuantizationError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        return {"weight": weight.to(self.float_dtype) if self.float_dtype else weight}

    def dequantize_weight(
        self, parts: Parts, out_features: int, in_features: int, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return parts["weight"].to(dtype)

    def check_parts(self, parts: Parts, out_features: int, in_features: int, where: str) -> None:
        weight = parts.get("weight")
        if weight is None:
            raise QuantizationError(f"{where}: missing 'weight' tensor")
        if tuple(weight.shape) != (out_features, in_features):
            raise QuantizationError(
                f"{where}: 'weight' has shape {tuple(weight.shape)}, expected {(out_features, in_features)}"
            )

    def build_linear(
        self, parts: Parts, out_features: int, in_features: int, device: DeviceLike, dtype: torch.dtype
    ) -> nn.Module:
        self.check_parts(parts, out_features, in_features, "float layer")
        linear = nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(parts["weight"].to(device=device, dtype=dtype), requires_grad=False)
        return linear


class Int4Scheme(QuantScheme):
    """Group-wise asymmetric int4 (see `mixtral_chat.quant.int4`)."""

    name = "int4"

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE["int4"]) -> None:
        check_group_size(group_size)
        self.group_size = group_size

    def part_specs(self, out_features: int, in_features: int) -> list[PartSpec]:
        return int4_part_specs(out_features, in_features, self.group_size)

    def quantize_weight(self, weight: Tensor) -> Parts:
        return quantize_int4(weight, self.group_size)

    def dequantize_weight(
        self, parts: Parts, out_features: int, in_features: int, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return dequantize_int4(parts, in_features, self.group_size, dtype)

    def check_parts(self, parts: Parts, out_features: int, in_features: int, where: str) -> None:
        check_int4_parts(parts, out_features, in_features, self.group_size, where)

    def build_linear(
        self, parts: Parts, out_features: int, in_features: int, device: DeviceLike, dtype: torch.dtype
    ) -> nn.Module:
        return Int4Linear.from_parts(parts, out_features, in_features, self.group_size, device, dtype)


class Nf4Scheme(QuantScheme):
    """bitsandbytes NF4, `group_size` being bnb's block size (see `mixtral_chat.quant.nf4`)."""

    name = "nf4"

    def __init__(self, group_size: int = NF4_DEFAULT_BLOCKSIZE, double_quant: bool = False) -> None:
        check_blocksize(group_size)
        self.group_size = group_size
        self.double_quant = double_quant

    def part_specs(self, out_features: int, in_features: int) -> list[PartSpec]:
        return nf4_part_specs(out_features, in_features, self.group_size, self.double_quant)

    def quantize_weight(self, weight: Tensor) -> Parts:
        return quantize_nf4(weight, self.group_size, self.double_quant)

    def dequantize_weight(
        self, parts: Parts, out_features: int, in_features: int, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return dequantize_nf4(parts, out_features, in_features, self.group_size, dtype)

    def check_parts(self, parts: Parts, out_features: int, in_features: int, where: str) -> None:
        check_nf4_parts(parts, out_features, in_features, self.group_size, self.double_quant, where)

    def build_linear(
        self, parts: Parts, out_features: int, in_features: int, device: DeviceLike, dtype: torch.dtype
    ) -> nn.Module:
        return Nf4Linear.from_parts(
            parts, out_features, in_features, self.group_size, self.double_quant, device, dtype
        )


def get_scheme(
    name: str,
    group_size: int | None = None,
    double_quant: bool = False,
    float_dtype: torch.dtype | None = None,
) -> QuantScheme:
    """The handler for a scheme name; QuantizationError for unknown names or bad options."""
    if double_quant and name in ("none", "int4"):
        raise QuantizationError("double quantization applies to nf4 only")
    if name == "none":
        return NoneScheme(float_dtype)
    if name == "int4":
        return Int4Scheme(DEFAULT_GROUP_SIZE["int4"] if group_size is None else group_size)
    if name == "nf4":
        return Nf4Scheme(DEFAULT_GROUP_SIZE["nf4"] if group_size is None else group_size, double_quant)
    raise QuantizationError(f"unknown quantization scheme {name!r} (known: {', '.join(SCHEME_NAMES)})")


def default_scheme(device: torch.device | str) -> str:
    """The 4-bit scheme to use on a device, chosen by measured GEMV speed (bench/bench_quant.py).

    CPU: int4 (on the native kernel a 14336x4096 g64 GEMV reads a median 95% of the copy
    bandwidth, 1.2-1.4 ms; nf4 on the native kernel's code-book path 1.5-1.9 ms, ~2x int4's
    error from rounding; ATen's int4 kernel, where the native one cannot be built, 4.2-4.7 ms;
    bnb's NF4 CPU path 89-112 ms: docs/BENCHMARKS.md). CUDA: nf4 (bitsandbytes' CUDA
    kernels; its stored blocks are the runtime form, so offloaded experts compute on the copied
    blobs as they are, where int4 is packed for tinygemm after each copy) until the GEMV benchmark
    has been run on a GPU (bench/gpu_quant.sh); update this when it has.
    """
    return "nf4" if torch.device(device).type == "cuda" else "int4"
