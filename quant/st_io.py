"""safetensors files written tensor by tensor, without holding a whole shard.

The header is computed up front from the tensors' dtypes and shapes, then each tensor is appended
as soon as it is ready. The files are standard safetensors (tests read them with `safe_open`);
reading is engine/safetensors_io.py's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from mixtral_chat.engine.safetensors_io import DTYPE_TO_SAFETENSORS


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
        try:
            self._handle.write(len(raw).to_bytes(8, "little"))
            self._handle.write(raw)
        except BaseException:
            self.abort()  # e.g. a full disk: no file with a header and no data is left behind
            raise

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
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the unfinished file (also when closing fails: flushing the last
        buffered bytes to a full disk raises ENOSPC again)."""
        try:
            self._handle.close()
        except OSError:
            pass
        finally:
            self.file.unlink(missing_ok=True)
