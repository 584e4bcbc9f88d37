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

The expert offloader moves runtime experts as blobs of the same kind: `ExpertBlobLayout.of_module`
lays out a loaded expert module's own tensors (part `linear` = the owning submodule, `name` = the
tensor's attribute), `viewing` reads the layout of a module whose tensors already are views into
one blob (the stored one), `bind` points a module's tensors at views into a blob, and `repack`
refills a module whose runtime form differs from the blob (int4 on CUDA) from a blob's parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.quant.common import EXPERT_LINEARS, PartSpec, dtype_from_name, dtype_name

ALIGNMENT = 64


@dataclass(frozen=True)
class BlobPart(PartSpec):
    """A scheme's part (`PartSpec`: name, dtype, shape) where it lies in the blob."""

    linear: str  # "w1" | "w2" | "w3"; for a module layout, the owning submodule ("" itself)
    offset: int  # bytes from the blob's start


@dataclass(frozen=True)
class ExpertBlobLayout:
    # "w1" -> (out_features, in_features); for a module layout, the children that say theirs
    linears: dict[str, tuple[int, int]]
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
                parts.append(BlobPart(spec.name, spec.dtype, spec.shape, linear=linear, offset=offset))
                offset += -(-spec.nbytes // ALIGNMENT) * ALIGNMENT
        return cls(linears, tuple(parts), offset)

    @classmethod
    def of_module(cls, expert: nn.Module) -> ExpertBlobLayout:
        """A fresh layout of an expert module's tensors, each starting `ALIGNMENT`-aligned."""
        parts: list[BlobPart] = []
        offset = 0
        for name, tensor in module_tensors(expert):
            part = _part_of(name, tensor, offset)
            parts.append(part)
            offset += -(-part.nbytes // ALIGNMENT) * ALIGNMENT
        return cls(_module_linears(expert), tuple(parts), offset)

    @classmethod
    def viewing(cls, expert: nn.Module, blob: Tensor) -> ExpertBlobLayout | None:
        """The layout of an expert whose tensors all are views into `blob`; None if any is not."""
        parts = []
        for name, tensor in module_tensors(expert):
            offset = tensor.data_ptr() - blob.data_ptr()
            nbytes = tensor.numel() * tensor.element_size()
            inside = tensor.device == blob.device and offset >= 0 and offset + nbytes <= blob.numel()
            if not (inside and tensor.is_contiguous()):
                return None
            parts.append(_part_of(name, tensor, offset))
        return cls(_module_linears(expert), tuple(parts), blob.numel())

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
                    str(p["name"]),
                    dtype_from_name(str(p["dtype"])),
                    tuple(int(d) for d in p["shape"]),
                    linear=str(p["linear"]),
                    offset=int(p["offset"]),
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

    def pack(self, parts_by_linear: dict[str, dict[str, Tensor]], out: Tensor | None = None) -> Tensor:
        """{"w1": {"qweight": t, ...}, ...} -> one uint8 [nbytes] tensor: `out` (padding left as it
        is), or a new CPU one (padding zeroed)."""
        blob = torch.zeros(self.nbytes, dtype=torch.uint8) if out is None else out
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

    def pack_module(self, expert: nn.Module, out: Tensor | None = None) -> Tensor:
        """`pack` of an expert module laid out by `of_module` (or `viewing`)."""
        parts_by_linear: dict[str, dict[str, Tensor]] = {}
        for name, tensor in module_tensors(expert):
            linear, _, attr = name.rpartition(".")
            parts_by_linear.setdefault(linear, {})[attr] = tensor
        return self.pack(parts_by_linear, out)

    def bind(self, module: nn.Module, blob: Tensor) -> None:
        """Point the module's tensors at views into `blob`: the module computes whatever it holds."""
        for linear, views in self.unpack(blob).items():
            owner = module.get_submodule(linear)  # "" is the module itself
            for attr, view in views.items():
                if attr in owner._parameters:
                    owner._parameters[attr] = nn.Parameter(view, requires_grad=False)
                else:
                    owner._buffers[attr] = view

    def repack(self, module: nn.Module, blob: Tensor) -> None:
        """Refill a module held in its device's own runtime form from a blob on that device (an
        offload slot whose form is not views of the blob: int4 on CUDA): each linear's
        `repack_from` of its parts' views. The module's tensors stay the same objects."""
        for linear, views in self.unpack(blob).items():
            module.get_submodule(linear).repack_from(views)

    def unpack(self, blob: Tensor) -> dict[str, dict[str, Tensor]]:
        """Views (no copies) of each part, on the blob's device: {"w1": {"qweight": view, ...}}."""
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != self.nbytes:
            raise QuantizationError(
                f"expert blob is {blob.dtype} {tuple(blob.shape)}, the layout expects uint8 ({self.nbytes},)"
            )
        out: dict[str, dict[str, Tensor]] = {name: {} for name in self.linears}
        for p in self.parts:
            raw = blob[p.offset : p.offset + p.nbytes]
            out.setdefault(p.linear, {})[p.name] = raw.view(p.dtype).view(p.shape)
        return out


def module_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """A module's parameters, then its buffers, by dotted name: the order a module layout uses."""
    return [*module.named_parameters(), *module.named_buffers()]


def _part_of(name: str, tensor: Tensor, offset: int) -> BlobPart:
    linear, _, attr = name.rpartition(".")  # "w1.weight" -> ("w1", "weight")
    return BlobPart(attr, tensor.dtype, tuple(tensor.shape), linear=linear, offset=offset)


def _module_linears(expert: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (child.out_features, child.in_features)
        for name, child in expert.named_children()
        if isinstance(getattr(child, "out_features", None), int)
        and isinstance(getattr(child, "in_features", None), int)
    }


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
