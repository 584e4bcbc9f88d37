"""bitsandbytes NF4: 4-bit NormalFloat codes with one absmax per block of `blocksize` values.

Stored form for a weight W [N, K] (flattened row-major into N*K values, blocks of `blocksize`):

- `qweight` uint8 [(N*K+1)//2]: codes, two per byte, the first value in the high nibble (bnb's).
- `absmax` float32 [ceil(N*K / blocksize)]: each block's absolute maximum; with double
  quantization uint8 codes of (absmax - absmax_offset) instead, plus
  `nested_absmax` float32 [ceil(blocks / 256)], `nested_quant_map` float32 [256] and
  `absmax_offset` float32 [1] (bnb's `compress_statistics`).
- `quant_map` float32 [16]: the NF4 code book.

Any shape works (bnb pads the last block). The form is bnb's own, so it runs on bnb's CPU and
CUDA kernels as is: the runtime layer keeps the stored tensors (views of an expert's blob
included) and builds a `QuantState` around them per call. On CPU, where each row holds whole
blocks (Mixtral's shapes do), the native kernel computes on the same tensors instead
(`Nf4Linear`, `mixtral_chat.quant.native`): bitsandbytes' CPU path is ~50x slower.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mixtral_chat.engine.checkpoint import BNB_QUANT_TYPES
from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant.bnb import bitsandbytes, bnb_functional
from mixtral_chat.quant.common import NESTED_BLOCKSIZE, nf4_part_specs
from mixtral_chat.quant.native import codebook_fits, int4_kernel, kernel_input, kernel_output

NF4_BLOCKSIZES = (32, 64, 128, 256)
NF4_DEFAULT_BLOCKSIZE = 64
# bnb's 4-bit code books: ours is always nf4; bitsandbytes checkpoints may also hold fp4.
QUANT_TYPES = BNB_QUANT_TYPES
# Values quantized per bnb call: bounds the float32 copy to ~64 MB whatever the matrix size.
_CHUNK_ELEMENTS = 1 << 24


def check_blocksize(blocksize: int) -> None:
    if blocksize not in NF4_BLOCKSIZES:
        sizes = ", ".join(map(str, NF4_BLOCKSIZES))
        raise QuantizationError(f"nf4 block size must be one of {sizes}, got {blocksize}")


@torch.no_grad()
def quantize_nf4(
    weight: Tensor, blocksize: int = NF4_DEFAULT_BLOCKSIZE, double_quant: bool = False
) -> dict[str, Tensor]:
    """W [N, K] (any float dtype) -> the stored NF4 parts, computed from W's values in float32.

    Quantized in chunks of whole blocks: identical to one `bnb.functional.quantize_4bit` call
    on the whole float32 matrix (a test checks it), with bounded temporary memory.
    """
    bnbf = bnb_functional()

    check_blocksize(blocksize)
    if weight.dim() != 2:
        raise QuantizationError(f"nf4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise QuantizationError(f"cannot quantize an empty weight of shape {tuple(weight.shape)}")
    flat = weight.contiguous().view(-1)
    n = flat.numel()
    chunk = max(1, _CHUNK_ELEMENTS // blocksize) * blocksize  # whole blocks, an even count
    codes: list[Tensor] = []
    absmaxes: list[Tensor] = []
    for start in range(0, n, chunk):
        values = flat[start : start + chunk].to(torch.float32)
        if not torch.isfinite(values).all():
            raise QuantizationError("cannot quantize a weight that contains NaN or infinity")
        packed, state = bnbf.quantize_4bit(values, blocksize=blocksize, quant_type="nf4")
        codes.append(packed.view(-1))
        absmaxes.append(state.absmax.view(-1).float())
    absmax = torch.cat(absmaxes)
    parts = {
        "qweight": torch.cat(codes),
        "absmax": absmax,
        "quant_map": bnbf.get_4bit_type("nf4", device=weight.device).float(),
    }
    if double_quant:
        # What bnb's quantize_4bit(compress_statistics=True) does, on the whole absmax vector.
        offset = absmax.mean()
        qabsmax, nested = bnbf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        parts.update(
            absmax=qabsmax,
            nested_absmax=nested.absmax.float(),
            nested_quant_map=nested.code.float(),
            absmax_offset=offset.reshape(1).float(),
        )
    return parts


def check_nf4_parts(
    parts: dict[str, Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    double_quant: bool,
    where: str,
) -> None:
    for spec in nf4_part_specs(out_features, in_features, blocksize, double_quant):
        tensor = parts.get(spec.name)
        if tensor is None:
            raise QuantizationError(f"{where}: missing '{spec.name}' tensor (incomplete quantized model)")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            hint = (
                f" (was it quantized with another block size than {blocksize}?)"
                if spec.name == "absmax" and tensor.dim() == 1
                else ""
            )
            raise QuantizationError(
                f"{where}: '{spec.name}' is {tensor.dtype} {tuple(tensor.shape)}, expected "
                f"{spec.dtype} {spec.shape}{hint}"
            )


def _quant_state(
    parts: dict[str, Tensor],
    shape: tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
    quant_type: str = "nf4",
):
    """bnb's QuantState of the parts, for a weight of `shape` ([N, K], or [N * K] flat)."""
    bnbf = bnb_functional()

    nested = None
    offset = None
    if "nested_absmax" in parts:
        nested = bnbf.QuantState(
            absmax=parts["nested_absmax"],
            code=parts["nested_quant_map"],
            blocksize=NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )
        offset = parts["absmax_offset"].view(())
    return bnbf.QuantState(
        absmax=parts["absmax"],
        shape=torch.Size(shape),
        code=parts["quant_map"],
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
        offset=offset,
        state2=nested,
    )


def _native_kernel(parts: dict[str, Tensor], out_features: int, in_features: int, blocksize: int):
    """The native kernel when it can run these parts (on the CPU, whole blocks per row), else None."""
    if not parts["qweight"].is_cpu:
        return None
    if not codebook_fits(parts, out_features, in_features, blocksize):
        return None
    return int4_kernel()


@torch.no_grad()
def dequantize_nf4(
    parts: dict[str, Tensor],
    out_features: int,
    in_features: int,
    blocksize: int = NF4_DEFAULT_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
) -> Tensor:
    """The float weight [N, K] that the stored NF4 (or fp4) parts stand for.

    Dequantized as one flat [N * K] vector, which is what bnb's blocks run over: bitsandbytes
    0.50's CPU kernel for a 2-D shape is wrong on AVX-512 hosts wherever K is not a multiple of
    the block size (relative error 0.40 instead of 0.09 at [64, 32] with blocks of 64; the flat
    form matches a decode by hand exactly on every host, tests/test_nf4_native.py).
    """
    bnbf = bnb_functional()

    state = _quant_state(parts, (out_features * in_features,), blocksize, dtype, quant_type)
    flat = bnbf.dequantize_4bit(parts["qweight"].view(-1, 1), state)
    return flat.view(out_features, in_features)  # [N, K]


class Nf4Linear(nn.Module):
    """A bias-free linear layer on NF4 weights (or fp4: bnb's other code book, only found in
    bitsandbytes checkpoints), on the stored parts as they are. Two backends (`backend`):

    - "native" (CPU, when `mixtral_chat.quant.native.int4_kernel()` is available and each row
      holds whole blocks): the native kernel's code-book path, in float32 with x rounded to int8
      per 32 columns and the 16 code values to 1/63 of the largest: 1.2-1.5% relative error
      against the exact product with the dequantized weight (fp4 1.7-2.3%), next to NF4's own
      ~9%. 14336x4096 b64 at batch 1: ~1.5 ms (1.7 ms with double quantization), where
      bitsandbytes' CPU path takes ~90 ms (docs/BENCHMARKS.md).
    - "bnb": `bitsandbytes.matmul_4bit` on CUDA; on a CPU without the native kernel, bnb's
      dequantization then a dense product (what bnb's CPU path does, see `dequantize_nf4`),
      computing in the dtype the layer was built for (float32, bfloat16 or float16).

    Inputs of another float dtype are cast in and the result cast back.
    """

    _PART_NAMES = ("qweight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "absmax_offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocksize: int,
        parts: dict[str, Tensor],
        compute_dtype: torch.dtype,
        quant_type: str = "nf4",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.compute_dtype = compute_dtype
        self.quant_type = quant_type
        self.double_quant = "nested_absmax" in parts
        for name in self._PART_NAMES:
            if name in parts:
                self.register_buffer(name, parts[name])
        self._kernel = _native_kernel(parts, out_features, in_features, blocksize)
        self.backend = "native" if self._kernel is not None else "bnb"

    @classmethod
    def from_parts(
        cls,
        parts: dict[str, Tensor],
        out_features: int,
        in_features: int,
        blocksize: int,
        double_quant: bool,
        device: torch.device | str,
        dtype: torch.dtype,
        quant_type: str = "nf4",
    ) -> Nf4Linear:
        """Parts already on `device` are used in place (no copy): views of a blob stay views."""
        check_nf4_parts(parts, out_features, in_features, blocksize, double_quant, f"{quant_type} layer")
        if quant_type not in QUANT_TYPES:
            raise QuantizationError(f"unknown 4-bit quant type {quant_type!r} (nf4 or fp4)")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise QuantizationError(f"nf4 computes in float32, bfloat16 or float16, not {dtype}")
        on_device = {name: t.to(device) for name, t in parts.items() if name in cls._PART_NAMES}
        on_device["qweight"] = on_device["qweight"].view(-1, 1)  # bnb's [(N*K+1)//2, 1]
        return cls(in_features, out_features, blocksize, on_device, dtype, quant_type)

    def _parts(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._PART_NAMES if hasattr(self, name)}

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel is not None and self._buffers["qweight"].is_cpu:  # (moved with .to(): bnb)
            return self._forward_native(x)
        parts = self._parts()
        if self.qweight.is_cpu:
            # What bnb's CPU matmul_4bit does (dequantize, then a dense product), with the
            # dequantization that is right on every host (see `dequantize_nf4`).
            weight = dequantize_nf4(
                parts,
                self.out_features,
                self.in_features,
                self.blocksize,
                self.compute_dtype,
                self.quant_type,
            )
            return nn.functional.linear(x.to(self.compute_dtype), weight).to(x.dtype)
        shape = (self.out_features, self.in_features)
        state = _quant_state(parts, shape, self.blocksize, self.compute_dtype, self.quant_type)
        y = bitsandbytes().matmul_4bit(x.to(self.compute_dtype), self.qweight.t(), quant_state=state)
        return y.to(x.dtype)

    def _forward_native(self, x: Tensor) -> Tensor:
        x2 = kernel_input(x, self.in_features, self.in_features)  # [M, K]
        y = x2.new_empty((x2.shape[0], self.out_features))
        self._kernel.codebook_linear(self._buffers, x2, y, self.blocksize)
        return kernel_output(y, x, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
            + (f", quant_type={self.quant_type}" if self.quant_type != "nf4" else "")
            + f", backend={self.backend}"
        )
