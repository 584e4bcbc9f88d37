"""int4's runtime forms: built from the stored parts for a device and backend, read back where they can be.

The stored parts (`qweight` uint8 [N, Kp/2], `scales`/`zeros` bfloat16 [N, G]: quant/int4.py) are
device independent. What a layer computes on is a function of (stored parts, device, backend):

- "native" (CPU): the stored parts themselves (quant/native.py's kernel reads them).
- "aten": PyTorch's packed int4, rows padded to `ROW_MULTIPLE`, `scales_and_zeros` [G, Np, 2]
  bfloat16, and `weight_packed` from the device's pack op, the only step that differs between
  devices: `_convert_weight_to_int4pack` (CUDA's tinygemm, uint8 [Np, Kp/2] in) or
  `_convert_weight_to_int4pack_for_cpu` (int32 codes [Np, Kp] in, a layout that depends on the
  CPU's vector width).

Reading back (to move a layer to another device or backend): the native form is the stored parts;
ATen's CPU layout is inverted here (`aten_cpu_stored_parts`), the inverse checked once per process
against PyTorch's own pack op, so a PyTorch whose layout differs gives a clear error, never wrong
codes; tinygemm's layout is not read back (`QuantizationError`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from mixtral_chat.engine.errors import QuantizationError

NATIVE, ATEN = "native", "aten"
STORED_PARTS = ("qweight", "scales", "zeros")
ATEN_TENSORS = ("weight_packed", "scales_and_zeros")
# CPU kernel: N must be a multiple of 16; CUDA kernel: a multiple of 8. Pad to 16 everywhere.
ROW_MULTIPLE = 16
# ATen's CPU pack (int4mm_kernel.cpp, weight_to_int4pack_kernel) by dispatched capability: rows per
# block (4 float vectors), and whether a full block splits its rows into low and high nibbles
# (vectorized builds) rather than pairing neighbouring rows (the default build, and tail blocks).
_ATEN_CPU_BLOCKS = {"AVX512": (64, True), "AVX2": (32, True), "DEFAULT": (32, False)}


def unpack_int4_codes(qweight: Tensor, dtype: torch.dtype = torch.uint8) -> Tensor:
    """uint8 [N, Kp/2] -> codes [N, Kp] in `dtype` (even column from the high nibble)."""
    n, half = qweight.shape
    codes = torch.empty(n, half, 2, dtype=dtype, device=qweight.device)  # [N, Kp/2, 2]
    codes[..., 0] = qweight >> 4
    codes[..., 1] = qweight & 0x0F
    return codes.view(n, half * 2)


def pack_int4_codes(codes: Tensor) -> Tensor:
    """codes [N, Kp] (0..15, any integer dtype) -> the stored uint8 [N, Kp/2]."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def inner_k_tiles(kp: int) -> int:
    # tinygemm (CUDA) wants K % (innerKTiles * 16) == 0; any group size >= 32 allows at least 2.
    for tiles in (8, 4, 2):
        if kp % (tiles * 16) == 0:
            return tiles
    raise QuantizationError(f"int4 needs in_features padded to a multiple of 32, got {kp}")


def runtime_tensors(
    parts: dict[str, Tensor], out_features: int, device: torch.device, backend: str
) -> dict[str, Tensor]:
    """The tensors an `Int4Linear` of `backend` on `device` computes on, from the stored parts
    (on any device). Native: the parts as given where they are contiguous CPU tensors (views into
    a blob stay views). ATen: new tensors on `device`."""
    if backend == NATIVE:
        if device.type != "cpu":
            raise QuantizationError(f"the native int4 kernel runs on the CPU, not on {device.type}")
        return {
            name: parts[name] if _is_cpu_contiguous(parts[name]) else parts[name].cpu().contiguous()
            for name in STORED_PARTS
        }
    if device.type not in ("cpu", "cuda"):
        raise QuantizationError(f"int4 runs on CPU and CUDA, not on {device.type}")
    qweight = parts["qweight"].to(device)
    scales_and_zeros = torch.stack([parts["scales"], parts["zeros"]], dim=-1).to(device)  # [N, G, 2]
    padded_out = -(-out_features // ROW_MULTIPLE) * ROW_MULTIPLE
    if padded_out != out_features:
        extra = padded_out - out_features
        qweight = F.pad(qweight, (0, 0, 0, extra))  # [Np, Kp/2]
        scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, 0, 0, extra))  # [Np, G, 2]
    kp = qweight.shape[1] * 2
    if device.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(qweight.contiguous(), inner_k_tiles(kp))
    else:
        codes = unpack_int4_codes(qweight, torch.int32)  # [Np, Kp] int32, as the CPU op takes
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        del codes
    # bfloat16: tinygemm takes nothing else, ATen's CPU kernel is vectorized for it only.
    scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, Np, 2]
    return {"weight_packed": packed, "scales_and_zeros": scales_and_zeros}


def aten_cpu_stored_parts(
    weight_packed: Tensor, scales_and_zeros: Tensor, out_features: int
) -> dict[str, Tensor]:
    """The stored parts of a layer in ATen's CPU form (new CPU tensors, exact)."""
    blocks = _checked_aten_cpu_blocks()
    codes = _aten_cpu_codes(weight_packed, *blocks)[:out_features]  # [N, Kp]
    pairs = scales_and_zeros.transpose(0, 1)[:out_features]  # [N, G, 2]
    return {
        "qweight": pack_int4_codes(codes),
        "scales": pairs[..., 0].contiguous(),
        "zeros": pairs[..., 1].contiguous(),
    }


def _aten_cpu_codes(packed: Tensor, block: int, split: bool) -> Tensor:
    """ATen's CPU layout uint8 [Np, Kp/2] -> codes uint8 [Np, Kp]. Each block of `block` rows is
    stored k-major: for each column k, the block's rows as nibble pairs."""
    np_, half = packed.shape
    kp = half * 2
    flat = packed.reshape(-1)
    codes = torch.empty(np_, kp, dtype=torch.uint8)
    full = np_ // block * block if split else 0
    if full:
        tiles = flat[: full * half].view(full // block, kp, block // 2)  # [B, Kp, block/2]
        # Low nibbles hold the block's first half of rows, high nibbles the second.
        rows = torch.cat([tiles & 0x0F, tiles >> 4], dim=2)  # [B, Kp, block]
        codes[:full] = rows.transpose(1, 2).reshape(full, kp)
    for start in range(full, np_, block):
        rows_here = min(block, np_ - start)
        tile = flat[start * half : (start + rows_here) * half].view(kp, rows_here // 2)  # [Kp, n/2]
        pairs = torch.stack([tile & 0x0F, tile >> 4], dim=2)  # [Kp, n/2, 2]: rows 2i, 2i+1
        codes[start : start + rows_here] = pairs.reshape(kp, rows_here).t()
    return codes


@functools.cache
def _aten_cpu_blocks(capability: str) -> tuple[int, bool] | None:
    """The layout ATen packs with at this capability, if reading it back gives exactly the codes
    it was given (checked on every tail size of a block); None otherwise."""
    blocks = _ATEN_CPU_BLOCKS.get(capability)
    if blocks is None:
        return None
    generator = torch.Generator().manual_seed(0)
    for rows in range(ROW_MULTIPLE, 2 * 64 + 1, ROW_MULTIPLE):
        codes = torch.randint(0, 16, (rows, 64), dtype=torch.int32, generator=generator)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        if not torch.equal(_aten_cpu_codes(packed, *blocks).to(torch.int32), codes):
            return None
    return blocks


def _checked_aten_cpu_blocks() -> tuple[int, bool]:
    capability = torch.backends.cpu.get_cpu_capability()
    blocks = _aten_cpu_blocks(capability)
    if blocks is None:
        raise QuantizationError(
            f"cannot read back PyTorch {torch.__version__}'s CPU int4 layout (capability {capability}) "
            "to move an int4 layer: load the model on the device it runs on"
        )
    return blocks


def _is_cpu_contiguous(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_contiguous()
