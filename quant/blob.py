"""One contiguous uint8 blob per expert, so that one expert moves with a single copy.

An expert's w1, w2, w3 (all their parts: codes, scales, zeros / absmax...) are concatenated into
one 1-D uint8 tensor stored as `model.layers.N.block_sparse_moe.experts.E.packed`. Every part
starts at a multiple of `ALIGNMENT` bytes, so typed views (`blob[a:b].view(dtype)`) work on the
blob wherever it lives (CPU, pinned, CUDA) as long as the blob itself starts 64-byte aligned
(fresh tensors do; if you carve blobs out of one big buffer, keep each slot 64-byte aligned).

All experts of a model share one layout (same shapes), recorded in quant_config.json under
`expert_layout`:

    {"nbytes": 1234, "alignment": 64,
     "linears": {"w1": [out, in], "w2": [out, in], "w3": [out, in]},
     "parts": [{"linear": "w1", "name": "qweight", "dtype": "uint8", "shape": [..],
                "offset": 0, "nbytes": ..}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant.common import EXPERT_LINEARS, dtype_from_name, dtype_name

ALIGNMENT = 64


@dataclass(frozen=True)
class BlobPart:
    linear: str  # "w1" | "w2" | "w3"
    name: str  # the scheme's part name ("qweight", "scales", ...)
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the blob's start

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertBlobLayout:
    linears: dict[str, tuple[int, int]]  # "w1" -> (out_features, in_features)
    parts: tuple[BlobPart, ...]
    nbytes: int

    @classmethod
    def build(cls, scheme: Any, hidden_size: int, intermediate_size: int) -> ExpertBlobLayout:
        """The layout of `scheme` (a QuantScheme) for an expert of the given sizes."""
        linears = {
            "w1": (intermediate_size, hidden_size),  # gate projection
            "w2": (hidden_size, intermediate_size),  # down projection
            "w3": (intermediate_size, hidden_size),  # up projection
        }
        parts: list[BlobPart] = []
        offset = 0
        for linear in EXPERT_LINEARS:
            out_features, in_features = linears[linear]
            for spec in scheme.part_specs(out_features, in_features):
                parts.append(BlobPart(linear, spec.name, spec.dtype, spec.shape, offset))
                offset += -(-spec.nbytes // ALIGNMENT) * ALIGNMENT
        return cls(linears, tuple(parts), offset)

    @property
    def hidden_size(self) -> int:
        return self.linears["w1"][1]

    @property
    def intermediate_size(self) -> int:
        return self.linears["w1"][0]

    def to_json(self) -> dict[str, Any]:
        return {
            "nbytes": self.nbytes,
            "alignment": ALIGNMENT,
            "linears": {name: list(shape) for name, shape in self.linears.items()},
            "parts": [
                {
                    "linear": p.linear,
                    "name": p.name,
                    "dtype": dtype_name(p.dtype),
                    "shape": list(p.shape),
                    "offset": p.offset,
                    "nbytes": p.nbytes,
                }
                for p in self.parts
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> ExpertBlobLayout:
        try:
            linears = {str(k): (int(v[0]), int(v[1])) for k, v in data["linears"].items()}
            parts = tuple(
                BlobPart(
                    str(p["linear"]),
                    str(p["name"]),
                    dtype_from_name(str(p["dtype"])),
                    tuple(int(d) for d in p["shape"]),
                    int(p["offset"]),
                )
                for p in data["parts"]
            )
            layout = cls(linears, parts, int(data["nbytes"]))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise QuantizationError(f"quant_config.json: invalid expert_layout ({exc})") from None
        if set(linears) != set(EXPERT_LINEARS):
            raise QuantizationError("quant_config.json: expert_layout must describe w1, w2 and w3")
        for p in parts:
            if p.offset % ALIGNMENT or p.offset + p.nbytes > layout.nbytes:
                raise QuantizationError(
                    f"quant_config.json: expert_layout part {p.linear}.{p.name} is out of place"
                )
        return layout

    def pack(self, parts_by_linear: dict[str, dict[str, Tensor]]) -> Tensor:
        """{"w1": {"qweight": t, ...}, ...} -> one uint8 [nbytes] CPU tensor (padding zeroed)."""
        blob = torch.zeros(self.nbytes, dtype=torch.uint8)
        for p in self.parts:
            tensor = parts_by_linear.get(p.linear, {}).get(p.name)
            if tensor is None:
                raise QuantizationError(f"expert {p.linear}: missing part '{p.name}'")
            if tensor.dtype != p.dtype or tuple(tensor.shape) != p.shape:
                raise QuantizationError(
                    f"expert {p.linear}.{p.name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                    f"layout says {p.dtype} {p.shape}"
                )
            raw = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
            blob[p.offset : p.offset + p.nbytes] = raw
        return blob

    def unpack(self, blob: Tensor) -> dict[str, dict[str, Tensor]]:
        """Views (no copies) of each part, on the blob's device: {"w1": {"qweight": view, ...}}."""
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != self.nbytes:
            raise QuantizationError(
                f"expert blob is {blob.dtype} {tuple(blob.shape)}, the layout expects uint8 ({self.nbytes},)"
            )
        out: dict[str, dict[str, Tensor]] = {name: {} for name in self.linears}
        for p in self.parts:
            raw = blob[p.offset : p.offset + p.nbytes]
            out[p.linear][p.name] = raw.view(p.dtype).view(p.shape)
        return out


def expert_linears_from_blob(
    blob: Tensor,
    layout: ExpertBlobLayout,
    scheme: Any,
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, nn.Module]:
    """Runtime w1, w2, w3 modules of one expert from its blob.

    The blob is copied to `device` once (a no-op when it is already there); nf4 and `none`
    layers then hold views of that one tensor, and so do int4 layers on the native CPU kernel;
    int4 on CUDA (or on CPU without the native kernel) converts to PyTorch's packed layout
    (new tensors; on CPU this costs ~0.2-0.5 s per 14336x4096 matrix).
    """
    device = torch.device(device)
    views = layout.unpack(blob.to(device, non_blocking=True))
    modules: dict[str, nn.Module] = {}
    for linear, (out_features, in_features) in layout.linears.items():
        modules[linear] = scheme.build_linear(views[linear], out_features, in_features, device, dtype)
    return modules
