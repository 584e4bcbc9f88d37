"""Names and small helpers shared by the quantization schemes, the converter and the loader.

Which tensors are quantized: the attention projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`)
and the expert feed-forward weights (`w1`, `w2`, `w3`). Embeddings, `lm_head`, norms and the
router `gate` stay in 16/32-bit, as in the Mixtral paper and gpt-fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixtral_chat.engine.errors import QuantizationError

# Keys are accepted with or without the checkpoint's `model.` prefix.
_ATTENTION_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$")
_EXPERT_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_EXPERT_BLOB_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.packed$")

EXPERT_LINEARS = ("w1", "w2", "w3")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The stored tensors of one quantized linear, by part name (`qweight`, `scales`...: `PartSpec.name`).
Parts = dict[str, Tensor]
# Where a runtime layer is built: a torch.device or its name ("cpu", "cuda:0").
DeviceLike = torch.device | str


def is_quantizable(hf_key: str) -> bool:
    """True for the weights a 4-bit scheme quantizes: attention projections and expert w1/w2/w3."""
    return bool(_ATTENTION_KEY.match(hf_key) or _EXPERT_KEY.match(hf_key))


def parse_expert_key(hf_key: str) -> tuple[int, int, str] | None:
    """`model.layers.3.block_sparse_moe.experts.5.w1.weight` -> (3, 5, "w1"); None otherwise."""
    match = _EXPERT_KEY.match(hf_key)
    return (int(match[1]), int(match[2]), match[3]) if match else None


def parse_expert_blob_key(key: str) -> tuple[int, int] | None:
    """`model.layers.3.block_sparse_moe.experts.5.packed` -> (3, 5); None otherwise."""
    match = _EXPERT_BLOB_KEY.match(key)
    return (int(match[1]), int(match[2])) if match else None


def is_attention_weight(hf_key: str) -> bool:
    return bool(_ATTENTION_KEY.match(hf_key))


def expert_blob_key(layer: int, expert: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.packed"


def expert_weight_key(layer: int, expert: int, linear: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{linear}.weight"


def expert_module_name(layer: int, expert: int) -> str:
    return f"layers.{layer}.block_sparse_moe.experts.{expert}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise QuantizationError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class PartSpec:
    """One stored tensor of a quantized linear: its suffix (`qweight`, `scales`...), dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (which must exist) by `module`."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


def find_linear(model: nn.Module, module_name: str) -> nn.Module:
    """The module at `module_name`, which must have in_features/out_features (an nn.Linear or ours)."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise QuantizationError(
            f"the model has no module '{module_name}' (does config.json match?)"
        ) from None
    if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
        raise QuantizationError(f"'{module_name}' is a {type(module).__name__}, not a linear layer")
    return module


NESTED_BLOCKSIZE = 256  # bnb's block size for double quantization of absmax


def nf4_part_specs(out_features: int, in_features: int, blocksize: int, double_quant: bool) -> list[PartSpec]:
    n = out_features * in_features
    blocks = -(-n // blocksize)
    specs = [
        PartSpec("qweight", torch.uint8, ((n + 1) // 2,)),
        PartSpec("absmax", torch.uint8 if double_quant else torch.float32, (blocks,)),
        PartSpec("quant_map", torch.float32, (16,)),
    ]
    if double_quant:
        specs += [
            PartSpec("nested_absmax", torch.float32, (-(-blocks // NESTED_BLOCKSIZE),)),
            PartSpec("nested_quant_map", torch.float32, (256,)),
            PartSpec("absmax_offset", torch.float32, (1,)),
        ]
    return specs
