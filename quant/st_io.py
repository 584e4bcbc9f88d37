"""safetensors files read and written tensor by tensor, without holding a whole shard.

Reading uses the JSON header and plain reads at the recorded offsets (into fresh or caller
given memory), so a shard's pages never pile up in this process's RSS. Writing streams: the
header is computed up front from the tensors' dtypes and shapes, then each tensor is appended
as soon as it is ready. The files are standard safetensors (tests read them with `safe_open`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from mixtral_chat.engine.errors import WeightsError
from mixtral_chat.quant.common import DTYPE_TO_SAFETENSORS, SAFETENSORS_DTYPES

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
    return buffer.view(dtype).reshape(info["shape"])


class StreamWriter:
    """Write a safetensors file whose tensors are known in advance (name, dtype, shape) and
    arrive one at a time, in that order."""

    def __init__(
        self,
        file: Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.file = file
        self._expected = list(specs)
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_TO_SAFETENSORS[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.data_bytes = offset
        self.total_bytes = 8 + len(raw) + offset
        self._handle = open(file, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._handle.write(len(raw).to_bytes(8, "little"))
        self._handle.write(raw)

    def write(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self._expected):
            raise RuntimeError(f"{self.file}: unexpected tensor '{name}'")
        exp_name, exp_dtype, exp_shape = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, exp_dtype, tuple(exp_shape)):
            raise RuntimeError(
                f"{self.file}: got '{name}' {tensor.dtype} {tuple(tensor.shape)}, planned "
                f"'{exp_name}' {exp_dtype} {tuple(exp_shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        if data.numel():
            self._handle.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the file (all planned tensors must have been written) and flush it to disk."""
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            self.abort()
            raise RuntimeError(f"{self.file}: tensor '{missing}' was never written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def abort(self) -> None:
        """Close and delete the unfinished file."""
        self._handle.close()
        self.file.unlink(missing_ok=True)
