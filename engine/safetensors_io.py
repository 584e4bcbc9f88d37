"""safetensors files read tensor by tensor, without holding a whole shard or mapping it.

Reading uses the JSON header and plain reads at the recorded offsets (into fresh or caller-given
memory), so a shard's pages never pile up in this process's RSS, and a truncated or corrupt file
fails with its name and the tensor's. Shared by the checkpoint loader and quant/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from mixtral_chat.engine import heap
from mixtral_chat.engine.errors import WeightsError
from mixtral_chat.engine.load_progress import note_read

# safetensors dtype names <-> torch dtypes (those a checkpoint may hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

Header = dict[str, dict]


def read_header(file: Path) -> tuple[Header, int]:
    """(key -> {dtype, shape, data_offsets}, absolute offset where the data starts).

    Checks every entry and that it lies inside the file, so truncation fails here, by name.
    """
    try:
        with open(file, "rb") as f:
            size_bytes = f.read(8)
            file_len = file.stat().st_size
            if len(size_bytes) < 8:
                raise WeightsError(f"{file}: truncated safetensors file (no header)")
            header_len = int.from_bytes(size_bytes, "little")
            if header_len > file_len - 8:
                raise WeightsError(f"{file}: corrupt safetensors header (length {header_len})")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise WeightsError(f"{file}: unreadable ({exc.strerror or exc})") from None
    except ValueError:
        raise WeightsError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: corrupt safetensors header")
    header.pop("__metadata__", None)
    data_len = file_len - 8 - header_len
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            shape = info["shape"]
            valid = (
                dtype is not None
                and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end
                and end - begin == math.prod(shape) * dtype.itemsize
            )
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise WeightsError(f"{file}: corrupt safetensors header (entry '{key}')")
        if end > data_len:
            raise WeightsError(f"{file}: truncated safetensors file (tensor '{key}' is cut off)")
    return header, 8 + header_len


def tensor_dtype(info: dict) -> torch.dtype:
    return SAFETENSORS_DTYPES[info["dtype"]]


def tensor_nbytes(info: dict) -> int:
    begin, end = info["data_offsets"]
    return end - begin


def read_tensor(
    handle: BinaryIO, file: Path, key: str, info: dict, data_start: int, out: Tensor | None = None
) -> Tensor:
    """One tensor read into fresh memory (or into `out`, a contiguous CPU uint8 tensor)."""
    dtype = tensor_dtype(info)
    begin, end = info["data_offsets"]
    nbytes = end - begin
    if out is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        heap.prefer_huge_pages(buffer.data_ptr(), nbytes)  # before the read touches it
    else:
        if (
            out.dtype != torch.uint8
            or out.numel() != nbytes
            or not out.is_contiguous()
            or out.device.type != "cpu"
        ):
            raise ValueError(f"out must be a contiguous CPU uint8 tensor of {nbytes} bytes")
        buffer = out.view(-1)
    if nbytes:
        try:
            handle.seek(data_start + begin)
            read = handle.readinto(memoryview(buffer.numpy()))
        except OSError as exc:
            raise WeightsError(f"{file}: tensor '{key}' is unreadable ({exc.strerror or exc})") from None
        if read != nbytes:
            raise WeightsError(f"{file}: truncated safetensors file (tensor '{key}' is cut off)")
        note_read(nbytes)
    return buffer.view(dtype).reshape(info["shape"])


def check_finite(tensor: Tensor, file: Path, key: str) -> None:
    """WeightsError naming the file and tensor when a float tensor holds NaN or infinite values.

    The common case costs one sum (NaN and inf propagate into it; ~10 GB/s for bfloat16 on one
    CPU core, 16 GB/s float32); only a sum that is not finite pays for the elementwise scan.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.is_meta:
        return
    if bool(torch.isfinite(tensor.sum())):
        return
    if bool(torch.isnan(tensor).any()):
        raise WeightsError(f"{file}: tensor '{key}' has NaN values")
    if bool(torch.isinf(tensor).any()):
        raise WeightsError(f"{file}: tensor '{key}' has infinite values")
    # Finite values whose sum overflowed: unusual weights, but not damaged ones.
