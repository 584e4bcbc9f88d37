"""int8 per 32 columns for the vocabulary's matrices of a 4-bit model on the CPU (llama.cpp's Q8_0).

The lm_head is the largest matrix a decode step reads after the experts: Mixtral's is 32000 x
4096, 524 MB in float32, where a token's two experts per layer are 29 MB each in int4. At a
few layers (and at small widths) it is most of the step. In int8 with one float32 scale per 32
columns it is 1.125 bytes per weight (147 MB), computed by the native kernel
(`Int4Kernel.q8_linear`: x rounded to int8 per 32 columns, integer dot products); quality is
measured in docs/BENCHMARKS.md ("A quantized lm_head"). The embeddings take the same form
(`Int8Embedding`: a token's row is gathered from the codes and scaled), which saves their RAM
(377 MB of Mixtral's 524), not time: a token reads one row.

Built at load time from the float weights (`quantize_vocab_weights`), never stored: quantized
model directories keep them as they always did. Only where the native kernel runs (CPU, AVX2);
elsewhere they stay float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixtral_chat.engine import heap
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import MixtralChatError, QuantizationError
from mixtral_chat.quant.native import Int4Kernel, int4_kernel, kernel_output, native_unavailable_reason

GROUP = 32  # columns per scale (Q8_GROUP in quant/csrc/q8_gemv.c)


@torch.no_grad()
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """W [N, K] (K a multiple of 32, any float dtype) -> (codes int8 [N, K], scales float32
    [N, K / 32]) with W[n, k] ~= codes[n, k] * scales[n, k // 32], the scale being the absmax of
    the 32 columns over 127. Row chunks keep the float32 copy small."""
    n, k = weight.shape
    if k % GROUP != 0:
        raise QuantizationError(f"int8 needs in_features a multiple of {GROUP}, got {k}")
    codes = torch.empty(n, k, dtype=torch.int8)
    heap.prefer_huge_pages(codes.data_ptr(), n * k)  # the lm_head streams it every token
    scales = torch.empty(n, k // GROUP, dtype=torch.float32)
    rows = max(1, (1 << 22) // k)  # ~16 MB of float32 per chunk
    for start in range(0, n, rows):
        block = weight[start : start + rows].to(torch.float32).reshape(-1, k // GROUP, GROUP)  # [n, G, 32]
        scale = block.abs().amax(dim=-1) / 127.0  # [n, G]
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        rounded = torch.round(block * inverse[..., None]).clamp(-127, 127)  # [n, G, 32]
        codes[start : start + rows] = rounded.to(torch.int8).reshape(-1, k)
        scales[start : start + rows] = scale
    return codes, scales


class Int8Linear(nn.Module):
    """A bias-free linear layer on int8 weights (one float32 scale per 32 columns), on the
    native kernel: forward(x [..., in]) -> [..., out] in x's dtype, computed in float32."""

    def __init__(self, codes: Tensor, scales: Tensor, kernel: Int4Kernel) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self._kernel = kernel
        self.register_buffer("qweight", codes)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Linear | None:
        """The layer for float W [N, K] on the CPU, or None where it cannot run here (no
        native kernel, in_features not a multiple of 32): keep the float layer then."""
        kernel = int4_kernel()
        if kernel is None or weight.shape[1] % GROUP != 0 or weight.device.type != "cpu" or weight.is_meta:
            return None
        codes, scales = quantize_int8(weight)
        return cls(codes, scales, kernel)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()  # [M, K]
        y = x2.new_empty((x2.shape[0], self.out_features))  # [M, N]
        buffers = self._buffers
        self._kernel.q8_linear(buffers["qweight"], buffers["scales"], x2, y)
        return kernel_output(y, x, self.out_features)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int8Linear:
        _stay_on_the_cpu(self.qweight, fn)
        return self  # a dtype change leaves the int8 codes and float32 scales as they are

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP}"


class Int8Embedding(nn.Module):
    """Token ids [...] -> rows [..., dim] in `dtype`, from int8 codes with one float32 scale per
    32 columns (`quantize_int8`'s form)."""

    def __init__(self, codes: Tensor, scales: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.dtype = dtype
        self.register_buffer("qweight", codes)
        self.register_buffer("scales", scales)

    def forward(self, ids: Tensor) -> Tensor:
        # index_select, not self.qweight[ids]: after the lm_head's kernel call, advanced indexing
        # of the int8 codes took ~1 ms at Mixtral's widths for one row (docs/BENCHMARKS.md).
        flat = ids.reshape(-1)  # [T]
        codes = self.qweight.index_select(0, flat).view(flat.shape[0], -1, GROUP)  # [T, G, 32]
        rows = codes.to(torch.float32) * self.scales.index_select(0, flat)[..., None]  # [T, G, 32]
        return rows.view(*ids.shape, self.embedding_dim).to(self.dtype)  # [..., dim]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int8Embedding:
        _stay_on_the_cpu(self.qweight, fn)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # rows come out in the model's dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={GROUP}"


def _stay_on_the_cpu(codes: Tensor, fn: Callable[[Tensor], Tensor]) -> None:
    moved = fn(torch.empty(0, device=codes.device))
    if moved.device != codes.device:
        raise QuantizationError(
            f"int8 vocabulary weights run on the CPU's native kernel; they cannot move to {moved.device}"
        )


def quantize_vocab_weights(model: nn.Module, dtype: torch.dtype | None = None) -> bool:
    """Replace `model.lm_head` and `model.embed_tokens` (float, on the CPU) with their int8 forms,
    one set of codes when they are tied; False where the kernel cannot run (both kept float, in
    `dtype`). `dtype`: the model's compute dtype, the embedding rows' (default: the weights')."""
    head, embed = model.lm_head.weight, model.embed_tokens.weight
    dtype = dtype or embed.dtype
    layer = Int8Linear.from_float(head)
    if layer is None:
        model.lm_head.to(dtype)
        model.embed_tokens.to(dtype)
        return False
    if embed.data_ptr() == head.data_ptr() and embed.shape == head.shape:  # tied: one int8 matrix
        codes, scales = layer.qweight, layer.scales
    else:
        codes, scales = quantize_int8(embed)
    model.lm_head = layer
    model.embed_tokens = Int8Embedding(codes, scales, dtype)
    return True


def vocab_weights_form(wanted: str, device_type: str, quantized: bool, args: ModelArgs) -> str:
    """The form the lm_head and embeddings will take, "int8" or "float" (LoadOptions.vocab_weights:
    "auto" means int8 for a 4-bit model on the CPU where the kernel runs), decided before
    loading so that the memory plan counts it."""
    if wanted not in ("auto", "float", "int8"):
        raise MixtralChatError(f"unknown vocab_weights {wanted!r} (auto, float or int8)")
    if wanted == "float" or (wanted == "auto" and (not quantized or device_type != "cpu")):
        return "float"
    if device_type != "cpu":
        raise MixtralChatError(f"int8 vocabulary weights run on the CPU, not on {device_type}")
    hidden = args.hidden_size
    if int4_kernel() is not None and hidden % GROUP == 0:
        return "int8"
    if wanted == "int8":
        reason = native_unavailable_reason() or f"hidden size {hidden} is not a multiple of {GROUP}"
        raise MixtralChatError(f"int8 vocabulary weights need the native kernel: {reason}")
    return "float"


def int8_matrix_bytes(rows: int, columns: int) -> int:
    """What `quantize_int8` makes of a [rows, columns] matrix: codes and float32 scales."""
    return rows * columns + rows * (columns // GROUP) * 4


def vocab_int8_saving(args: ModelArgs, float_itemsize: int) -> int:
    """Bytes the int8 lm_head and embeddings take less than float ones (one matrix when tied)."""
    weights = args.vocab_size * args.hidden_size
    per_matrix = weights * float_itemsize - int8_matrix_bytes(args.vocab_size, args.hidden_size)
    return per_matrix * (1 if args.tie_word_embeddings else 2)
