"""Putting quantized weights into a model: from a quantized directory, a state dict, or in memory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mixtral_chat.engine.checkpoint import shard_files
from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.safetensors_io import read_header, read_tensor
from mixtral_chat.quant.assemble import RuntimeAssembler
from mixtral_chat.quant.blob import ExpertBlobLayout, expert_linears_from_blob
from mixtral_chat.quant.common import (
    expert_blob_key,
    is_quantizable,
    parse_expert_blob_key,
    set_submodule,
)
from mixtral_chat.quant.config import QuantConfig
from mixtral_chat.quant.schemes import NoneScheme, QuantScheme, get_scheme


def load_quantized_model_weights(
    model: nn.Module,
    model_dir: str | Path,
    device: torch.device | str,
    dtype: torch.dtype,
    skip_experts: bool = False,
    keep_stored_dtype: frozenset[str] = frozenset(),
) -> QuantConfig:
    """Load a quantized directory into `model` (built on the meta device): reads
    quant_config.json, then every tensor shard by shard, one at a time; swaps the quantized
    linears for runtime modules and assigns all other tensors in `dtype` on `device`.
    `skip_experts` leaves the experts unread (meta shells) for an expert store that reads them;
    `keep_stored_dtype` names float tensors kept in the file's dtype (`RuntimeAssembler`)."""
    model_dir = Path(model_dir)
    config = QuantConfig.read(model_dir)
    scheme = config.handler()
    assembler = RuntimeAssembler(
        model,
        scheme,
        torch.device(device),
        dtype,
        config.expert_layout,
        where=str(model_dir),
        skip_experts=skip_experts,
        keep_stored_dtype=keep_stored_dtype,
    )
    for file in shard_files(model_dir):
        header, data_start = read_header(file)
        with open(file, "rb") as handle:
            for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if assembler.wants(key):
                    assembler.add(key, read_tensor(handle, file, key, info, data_start))
    assembler.finish()
    return config


@torch.no_grad()
def quantize_model_in_memory(
    model: nn.Module, scheme: str | QuantScheme, group_size: int | None = None, double_quant: bool = False
) -> int:
    """Swap the model's quantizable nn.Linear layers for quantized ones, on their own device and
    in their own dtype (for `ask --quant`, small models and tests). Returns how many were swapped.

    Gives the same modules as quantizing to a directory and loading it with the same dtype."""
    handler = scheme if isinstance(scheme, QuantScheme) else get_scheme(scheme, group_size, double_quant)
    if isinstance(handler, NoneScheme):
        return 0
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_quantizable(f"{name}.weight")
    ]
    for name, module in targets:
        if module.bias is not None:
            raise QuantizationError(f"'{name}' has a bias; quantized layers are bias-free")
        weight = module.weight
        parts = handler.quantize_weight(weight.detach())
        new = handler.build_linear(
            parts, module.out_features, module.in_features, weight.device, weight.dtype
        )
        set_submodule(model, name, new)
    return len(targets)


class ExpertBlobReader:
    """Read single experts out of a quantized directory (for the offloading expert store).

    `location(layer, expert)` gives (file, byte offset, nbytes) of the blob's contiguous bytes,
    `read(layer, expert, out=None)` reads it (into `out`, e.g. a pinned uint8 buffer, if given),
    `linears(layer, expert, device, dtype)` builds its runtime w1/w2/w3.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.config = QuantConfig.read(self.model_dir)
        self.scheme = self.config.handler()
        if self.config.expert_layout is None:
            raise QuantizationError(f"{self.model_dir}: this model has no experts")
        self.layout: ExpertBlobLayout = self.config.expert_layout
        self._where: dict[tuple[int, int], tuple[Path, dict, int]] = {}
        for file in shard_files(self.model_dir):
            header, data_start = read_header(file)
            for key, info in header.items():
                ids = parse_expert_blob_key(key)
                if ids is not None:
                    self._where[ids] = (file, info, data_start)

    def experts(self) -> list[tuple[int, int]]:
        return sorted(self._where)

    def location(self, layer: int, expert: int) -> tuple[Path, int, int]:
        file, info, data_start = self._entry(layer, expert)
        begin, end = info["data_offsets"]
        return file, data_start + begin, end - begin

    def read(self, layer: int, expert: int, out: Tensor | None = None) -> Tensor:
        file, info, data_start = self._entry(layer, expert)
        with open(file, "rb") as handle:
            return read_tensor(handle, file, expert_blob_key(layer, expert), info, data_start, out)

    def linears(
        self, layer: int, expert: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, nn.Module]:
        return expert_linears_from_blob(self.read(layer, expert), self.layout, self.scheme, device, dtype)

    def _entry(self, layer: int, expert: int) -> tuple[Path, dict, int]:
        entry = self._where.get((layer, expert))
        if entry is None:
            raise QuantizationError(f"{self.model_dir}: no blob for expert {expert} of layer {layer}")
        return entry
