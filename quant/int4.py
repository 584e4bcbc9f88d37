"""Group-wise asymmetric int4: a native AVX2/AVX-512 kernel on CPU, PyTorch's packed int4 kernels otherwise.

Stored form (device independent, what quantized directories hold), for a weight W [N, K]
(N = out_features, K = in_features) and group size g:

- `qweight` uint8 [N, Kp/2]: 4-bit codes q in 0..15, two per byte, the even column in the high
  nibble (the layout `_convert_weight_to_int4pack` takes on CUDA).
- `scales`, `zeros` bfloat16 [N, Kp/g]: W[n, k] ~= (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g],
  the convention of the kernels' `qScaleAndZeros` (the zero is the value of code 8).

Kp is K rounded up to a multiple of g: when K is not a multiple of g, the weight is padded by
repeating its last column (so the padding does not widen the last group's range) and the layer
pads its input with zeros, so padded columns never contribute. N may be anything (the ATen
backend pads rows to its kernels' multiple of 16 and drops the padded outputs). Group sizes: 32,
64, 128, 256 (what the kernels take); anything else is a QuantizationError.

Runtime (`Int4Linear`): on CPU the native kernel (`mixtral_chat.quant.native`, compiled on
first use) computes on the stored form directly; without it (no compiler, no AVX2,
MIXTRAL_CHAT_NO_NATIVE=1) and on CUDA, the codes are converted to PyTorch's packed layout of the
device (quant/int4_forms.py). A layer runs on the device its tensors are on: `.to()` rebuilds the
runtime form there from the stored parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant import native_fused
from mixtral_chat.quant.common import PartSpec
from mixtral_chat.quant.int4_forms import (
    ATEN,
    ATEN_TENSORS,
    NATIVE,
    STORED_PARTS,
    aten_cpu_stored_parts,
    runtime_tensors,
    unpack_int4_codes,
)
from mixtral_chat.quant.native import (
    MAX_MULTI,
    Int4Kernel,
    int4_kernel,
    kernel_input,
    kernel_output,
)
from mixtral_chat.quant.native_fused import ExpertOperand

INT4_GROUP_SIZES = (32, 64, 128, 256)
# Rows quantized at once: bounds the float32 temporaries to ~64 MB whatever the matrix size.
_CHUNK_ELEMENTS = 1 << 24


def padded_in_features(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def check_group_size(group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        sizes = ", ".join(map(str, INT4_GROUP_SIZES))
        raise QuantizationError(f"int4 group size must be one of {sizes}, got {group_size}")


def int4_part_specs(out_features: int, in_features: int, group_size: int) -> list[PartSpec]:
    kp = padded_in_features(in_features, group_size)
    groups = kp // group_size
    return [
        PartSpec("qweight", torch.uint8, (out_features, kp // 2)),
        PartSpec("scales", torch.bfloat16, (out_features, groups)),
        PartSpec("zeros", torch.bfloat16, (out_features, groups)),
    ]


@torch.no_grad()
def quantize_int4(weight: Tensor, group_size: int) -> dict[str, Tensor]:
    """W [N, K] (any float dtype, any device) -> {"qweight", "scales", "zeros"} on W's device.

    Computed in float32 from W's values, in chunks of rows, so the result does not depend on
    the chunking nor on W's dtype when its values are the same (bf16 loaded as fp32 included).
    """
    check_group_size(group_size)
    if weight.dim() != 2:
        raise QuantizationError(f"int4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise QuantizationError(f"cannot quantize an empty weight of shape {(n, k)}")
    kp = padded_in_features(k, group_size)
    groups = kp // group_size
    qweight = torch.empty(n, kp // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, groups, dtype=torch.bfloat16, device=weight.device)
    zeros = torch.empty(n, groups, dtype=torch.bfloat16, device=weight.device)
    rows = max(1, _CHUNK_ELEMENTS // kp)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = weight[r0:r1].to(torch.float32)  # [R, K]
        if kp != k:
            w = torch.cat([w, w[:, -1:].expand(r1 - r0, kp - k)], dim=1)  # [R, Kp]
        grouped = w.view(r1 - r0, groups, group_size)  # [R, G, g]
        lo = grouped.amin(dim=-1)  # [R, G]
        hi = grouped.amax(dim=-1)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise QuantizationError("cannot quantize a weight that contains NaN or infinity")
        # Codes are computed against the bf16-rounded scale and zero actually stored, so that
        # rounding them costs at most half a step, not a shifted grid.
        scale_b = ((hi - lo).clamp_(min=1e-6) / 15).to(torch.bfloat16)  # [R, G]
        zero_b = (lo + 8 * scale_b.float()).to(torch.bfloat16)
        scale, zero = scale_b.float().unsqueeze(-1), zero_b.float().unsqueeze(-1)  # [R, G, 1]
        # Out of place first: `w` may be the caller's own float32 tensor.
        codes = (grouped - zero).div_(scale).round_().add_(8).clamp_(0, 15).to(torch.uint8)
        codes = codes.view(r1 - r0, kp)  # [R, Kp]
        qweight[r0:r1] = (codes[:, 0::2] << 4) | codes[:, 1::2]
        scales[r0:r1] = scale_b
        zeros[r0:r1] = zero_b
    return {"qweight": qweight, "scales": scales, "zeros": zeros}


@torch.no_grad()
def dequantize_int4(
    parts: dict[str, Tensor], in_features: int, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The float weight [N, in_features] the kernels compute with: (q - 8) * scale + zero."""
    qweight, scales, zeros = parts["qweight"], parts["scales"], parts["zeros"]
    n = qweight.shape[0]
    codes = unpack_int4_codes(qweight).float()  # [N, Kp]
    groups = codes.shape[1] // group_size
    grouped = codes.view(n, groups, group_size)  # [N, G, g]
    w = (grouped - 8) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
    return w.view(n, groups * group_size)[:, :in_features].to(dtype)


def check_int4_parts(
    parts: dict[str, Tensor], out_features: int, in_features: int, group_size: int, where: str
) -> None:
    """Clear errors for a missing part or one whose shape does not fit the layer and group size."""
    for spec in int4_part_specs(out_features, in_features, group_size):
        tensor = parts.get(spec.name)
        if tensor is None:
            raise QuantizationError(f"{where}: missing '{spec.name}' tensor (incomplete quantized model)")
        if tensor.dtype != spec.dtype:
            raise QuantizationError(
                f"{where}: '{spec.name}' has dtype {tensor.dtype}, int4 stores {spec.dtype}"
            )
        if tuple(tensor.shape) != spec.shape:
            hint = (
                f" (was it quantized with another group size than {group_size}?)"
                if tensor.dim() == 2 and tensor.shape[0] == out_features
                else ""
            )
            raise QuantizationError(
                f"{where}: '{spec.name}' has shape {tuple(tensor.shape)}, expected {spec.shape}{hint}"
            )


def int4_backend(device: torch.device) -> str:
    """The backend an int4 layer uses on `device`: "native" on a CPU with the native kernel (asked
    on every call, so MIXTRAL_CHAT_NO_NATIVE is read each time), else "aten"."""
    return NATIVE if device.type == "cpu" and int4_kernel() is not None else ATEN


class Int4Linear(nn.Module):
    """A bias-free linear layer on int4 weights: forward(x [..., in]) -> [..., out].

    Two backends, chosen for the device the layer is on (`int4_backend`; `backend` says which):

    - "native" (CPU, when `mixtral_chat.quant.native.int4_kernel()` is available: a C compiler
      and an AVX2 CPU): the layer's buffers are the stored parts themselves, `qweight`, `scales`,
      `zeros` (given contiguous CPU tensors are kept as they are, not copied: views into an
      expert's blob stay views), and the kernel computes on them in float32 with x rounded to
      int8 per 32 columns (llama.cpp's Q4 x Q8 scheme): ~0.6% relative error against the exact
      product with the dequantized weight, next to 4-bit quantization's ~9%. Measured on a
      2-core AVX2 machine (Zen 3, ~28-36 GB/s copy bandwidth), g64 at batch 1: 1.2-1.4 ms, a
      median 95% (14336x4096) and 90% (4096x14336) of the copy bandwidth measured beside it,
      against 4.2-4.7 ms for ATen's kernel; batch 8: 4.4-5.3 ms, 2.1-2.7x faster than ATen
      (docs/BENCHMARKS.md; OpenMP threads must sleep, not spin, beside it: app/cli.py). It is
      faster than ATen, and than dequantizing tiles for F.linear, at every batch size measured
      (up to 256), so it serves prefill too.
      On AVX-512 CPUs it runs AVX-512 code (vpdpbusd where VNNI is present), chosen at run
      time and bit-identical to the AVX2 path (`Int4Kernel.isa`); `forward_concat` runs
      several layers on one input in one call (an expert's w1|w3, attention's q|k|v).
    - "aten" (CUDA, or CPU without the native kernel): PyTorch's packed int4 kernels, tinygemm
      on CUDA and `_weight_int4pack_mm_for_cpu` on CPU, in bfloat16 (tinygemm takes nothing
      else, and ATen's CPU kernel is vectorized for bfloat16 only: float32 activations run 6x
      slower). The bfloat16 rounding of x adds ~0.3% relative error. The codes are converted to
      the device's packed layout (`weight_packed`, `scales_and_zeros`, quant/int4_forms.py).

    Both take float32 and bfloat16 inputs like nn.Linear and return x's dtype.

    Moving (`.to()`, `.cuda()`, `.cpu()`: `_apply`) rebuilds the target device's runtime form from
    the stored parts and drops the old one, so a layer holds one form, one copy, where it is (a
    CPU-loaded model moved to a GPU keeps nothing on the host). The stored parts are the native
    form, or are read back from ATen's CPU layout; tinygemm's CUDA layout cannot be read back, so
    moving a layer off CUDA is a QuantizationError. The quantized tensors keep their dtypes:
    `.to(torch.bfloat16)` changes nothing here. `.to("meta")` keeps the form as a shell (the
    offloader's templates). `repack_from` refills the runtime form in place (offload slots).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        tensors: dict[str, Tensor],
        kernel: Int4Kernel | None = None,
    ) -> None:
        """`tensors`: qweight, scales, zeros (the stored parts) with `kernel`; else the ATen
        layout, weight_packed and scales_and_zeros [Kp/g, Np, 2]."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.padded_in = padded_in_features(in_features, group_size)
        self._set_form(tensors, kernel)

    def _set_form(self, tensors: dict[str, Tensor], kernel: Int4Kernel | None) -> None:
        """Hold `tensors` (a backend's whole runtime form) instead of the current ones."""
        for name in (*STORED_PARTS, *ATEN_TENSORS):
            self._buffers.pop(name, None)
        self._kernel = kernel
        self.backend = NATIVE if kernel is not None else ATEN
        names = STORED_PARTS if kernel is not None else ATEN_TENSORS
        for name in names:
            self.register_buffer(name, tensors[name])
        self.padded_out = self.out_features if kernel is not None else tensors["scales_and_zeros"].shape[1]

    @classmethod
    @torch.no_grad()
    def from_parts(
        cls,
        parts: dict[str, Tensor],
        out_features: int,
        in_features: int,
        group_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> Int4Linear:
        """`dtype` is the model's dtype, accepted for a uniform interface (see the backends)."""
        device = torch.device(device)
        check_int4_parts(parts, out_features, in_features, group_size, "int4 layer")
        backend = int4_backend(device)
        tensors = runtime_tensors(parts, out_features, device, backend)
        kernel = int4_kernel() if backend == NATIVE else None
        return cls(in_features, out_features, group_size, tensors, kernel)

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    @torch.no_grad()
    def stored_parts(self) -> dict[str, Tensor]:
        """The device-independent parts this layer computes (on its device): its own buffers for
        the native form, read back from ATen's CPU layout; QuantizationError for tinygemm's."""
        if self.backend == NATIVE:
            return {name: self._buffers[name] for name in STORED_PARTS}
        if self.device.type == "cpu":
            return aten_cpu_stored_parts(self.weight_packed, self.scales_and_zeros, self.out_features)
        raise QuantizationError(
            f"an int4 layer packed for {self.device.type}'s kernel cannot move: its layout cannot be "
            "read back to the stored parts; build the model on the device it runs on"
        )

    @torch.no_grad()
    def repack_from(self, parts: dict[str, Tensor]) -> None:
        """Refill this layer's runtime form in place from stored parts (on its device): an offload
        slot after the expert's blob was copied in. Its tensors stay the same objects."""
        for name, tensor in runtime_tensors(parts, self.out_features, self.device, self.backend).items():
            self._buffers[name].copy_(tensor)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int4Linear:
        """What `.to()`, `.cuda()`, `.cpu()`, `.float()` call: the layer follows a device change
        (rebuilt there from its stored parts) and ignores dtype changes."""
        here = self.device
        there = fn(torch.empty(0, dtype=torch.uint8, device=here)).device
        if "meta" not in (here.type, there.type):
            backend = int4_backend(there)
            if there != here or backend != self.backend:
                with torch.no_grad():
                    tensors = runtime_tensors(self.stored_parts(), self.out_features, there, backend)
                self._set_form(tensors, int4_kernel() if backend == NATIVE else None)
                return self
        for name, tensor in self._buffers.items():
            if tensor is not None:
                moved = fn(tensor)
                if moved.dtype == tensor.dtype:  # a shell keeps its form; quantized dtypes are fixed
                    self._buffers[name] = moved
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self._kernel is not None else self.scales_and_zeros.dtype

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel is not None:
            return self._forward_native(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # [M, K]
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))  # [M, Kp]
        x2 = x2.contiguous()
        if self.weight_packed.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(
                x2, self.weight_packed, self.group_size, self.scales_and_zeros
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.weight_packed, self.group_size, self.scales_and_zeros
            )  # [M, Np]
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _forward_native(self, x: Tensor) -> Tensor:
        x2 = kernel_input(x, self.in_features, self.padded_in)  # [M, Kp]
        y = x2.new_empty((x2.shape[0], self.out_features))
        buffers = self._buffers  # not through nn.Module.__getattr__: hundreds of calls per token
        self._kernel.linear(buffers["qweight"], buffers["scales"], buffers["zeros"], x2, y, self.group_size)
        return kernel_output(y, x, self.out_features)

    def forward_concat(self, others: Sequence[nn.Module], x: Tensor) -> Tensor | None:
        """x [..., in] through this layer and `others` in one kernel call: [..., out + theirs],
        each layer's columns bit-identical to its own forward. None when they cannot share a
        call (another backend or input size, over 4 layers): then run them one by one."""
        kernel = self._kernel
        if kernel is None or len(others) >= MAX_MULTI:
            return None
        layers = (self, *others)
        for layer in others:
            if not (
                type(layer) is Int4Linear
                and layer._kernel is kernel
                and layer.in_features == self.in_features
                and layer.group_size == self.group_size
            ):
                return None
        x2 = kernel_input(x, self.in_features, self.padded_in)  # [M, Kp]
        total = sum(layer.out_features for layer in layers)
        y = x2.new_empty((x2.shape[0], total))  # [M, out + theirs]
        weights = [(b["qweight"], b["scales"], b["zeros"]) for b in (layer._buffers for layer in layers)]
        kernel.linear_multi(weights, x2, y, self.group_size)
        return kernel_output(y, x, total)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, backend={self.backend}, compute_dtype={self.compute_dtype}"
        )


def native_parts(layer: nn.Module) -> tuple[Int4Kernel, tuple[Tensor, Tensor, Tensor]] | None:
    """A native int4 layer's kernel and stored parts (qweight, scales, zeros); None for any other."""
    if type(layer) is not Int4Linear or layer._kernel is None:
        return None
    buffers = layer._buffers
    return layer._kernel, (buffers["qweight"], buffers["scales"], buffers["zeros"])


def same_tensors(cached: Sequence[Tensor], tensors: Sequence[Tensor]) -> bool:
    """Each of `tensors` is the very object in `cached` (an operand's check: in place changes of
    their values are fine, rebinding or a move makes new objects)."""
    return len(cached) == len(tensors) and all(a is b for a, b in zip(cached, tensors, strict=True))


def expert_operand(
    w1: nn.Module, w3: nn.Module, w2: nn.Module, cached: ExpertOperand | None = None
) -> ExpertOperand | None:
    """The native kernel's operand (`native_fused.moe`) for an expert whose three layers are native
    int4 layers of one kernel and group size; None otherwise. `cached` comes back while the layers
    still hold its tensors (a slot refilled in place keeps them)."""
    found = [native_parts(layer) for layer in (w1, w3, w2)]
    if any(f is None for f in found):
        return None
    kernels = {f[0] for f in found}
    tensors = tuple(t for f in found for t in f[1])
    if cached is not None and same_tensors(cached.tensors, tensors):
        return cached
    if not (
        len(kernels) == 1
        and w2.in_features == w1.out_features == w3.out_features
        and w1.in_features == w3.in_features
        and w1.group_size == w3.group_size == w2.group_size
    ):
        return None
    try:
        kernel, group_size = found[0][0], w1.group_size
        return native_fused.expert_operand(kernel, tensors[0:3], tensors[3:6], tensors[6:9], group_size)
    except QuantizationError:  # parts the call does not take: the per-layer path
        return None
