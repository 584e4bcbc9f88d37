"""Quantized state dicts: made from float ones (`quantize_state_dict`) and assigned into a model
(`RuntimeAssembler`), for any scheme (`quant.schemes`), which uses both for its whole-model methods.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mixtral_chat.engine.checkpoint import hf_to_module_name
from mixtral_chat.engine.errors import QuantizationError, WeightsError
from mixtral_chat.quant.blob import ExpertBlobLayout, expert_linears_from_blob
from mixtral_chat.quant.common import (
    EXPERT_LINEARS,
    expert_blob_key,
    expert_module_name,
    find_linear,
    is_attention_weight,
    is_quantizable,
    parse_expert_blob_key,
    parse_expert_key,
    set_submodule,
)

if TYPE_CHECKING:
    from mixtral_chat.quant.schemes import QuantScheme

# A stored part of a quantized attention projection: `model.layers.0.self_attn.q_proj.scales`.
_ATTENTION_PART = re.compile(
    r"^((?:model\.)?layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj))\.(\w+)$"
)


class RuntimeAssembler:
    """Receives a quantized state dict tensor by tensor (HF keys) and builds the runtime model.

    Experts (`.packed` blobs) become three runtime linears, attention parts are collected until
    complete and then become one runtime linear, every other tensor is assigned as a parameter
    or buffer in `dtype` (floats) on `device`. `finish()` checks that nothing is missing.
    With `skip_experts`, expert blobs are not wanted (`wants`) and the experts stay meta shells:
    the offloading expert store reads them from the files itself.
    """

    def __init__(
        self,
        model: nn.Module,
        scheme: QuantScheme,
        device: torch.device,
        dtype: torch.dtype,
        layout: ExpertBlobLayout | None = None,
        where: str = "quantized weights",
        skip_experts: bool = False,
        keep_stored_dtype: frozenset[str] = frozenset(),
    ) -> None:
        """`keep_stored_dtype`: float tensors assigned in the dtype the file has, not `dtype`."""
        self.model = model
        self.skip_experts = skip_experts
        self.keep_stored_dtype = keep_stored_dtype
        self.scheme = scheme
        self.device = device
        self.dtype = dtype
        self.layout = layout
        self.where = where
        self._pending: dict[str, dict[str, Tensor]] = {}

    def wants(self, key: str) -> bool:
        return not (self.skip_experts and parse_expert_blob_key(key) is not None)

    def add(self, key: str, tensor: Tensor) -> None:
        if not self.wants(key):
            return
        blob_id = parse_expert_blob_key(key)
        if blob_id is not None:
            self._add_expert(blob_id[0], blob_id[1], tensor)
            return
        if self.scheme.keeps_float:
            self._assign(key, tensor)
            return
        if is_quantizable(key):
            kind = "expert" if parse_expert_key(key) else "attention"
            raise QuantizationError(
                f"{self.where}: {kind} weight '{key}' is stored in float, but the model is "
                f"{self.scheme.describe()} (mixed or corrupt quantized directory)"
            )
        match = _ATTENTION_PART.match(key)
        if match:
            prefix, part = match[1], match[2]
            parts = self._pending.setdefault(prefix, {})
            parts[part] = tensor
            linear = find_linear(self.model, hf_to_module_name(prefix))
            specs = self.scheme.part_specs(linear.out_features, linear.in_features)
            if {s.name for s in specs} <= set(parts):
                self._build_attention(prefix, self._pending.pop(prefix))
            return
        self._assign(key, tensor)

    def _layout_for(self, layer: int, expert: int) -> ExpertBlobLayout:
        w1 = find_linear(self.model, f"{expert_module_name(layer, expert)}.w1")
        expected = ExpertBlobLayout.build(self.scheme, w1.in_features, w1.out_features)
        if self.layout is None:
            self.layout = expected
        elif self.layout != expected:
            raise QuantizationError(
                f"{self.where}: the expert layout in quant_config.json is for hidden size "
                f"{self.layout.hidden_size} / intermediate size {self.layout.intermediate_size}, "
                f"the model has {expected.hidden_size} / {expected.intermediate_size}"
            )
        return self.layout

    def _add_expert(self, layer: int, expert: int, blob: Tensor) -> None:
        layout = self._layout_for(layer, expert)
        if blob.dtype != torch.uint8 or tuple(blob.shape) != (layout.nbytes,):
            raise QuantizationError(
                f"{self.where}: expert blob '{expert_blob_key(layer, expert)}' is {blob.dtype} "
                f"{tuple(blob.shape)}, expected uint8 ({layout.nbytes},) for {self.scheme.describe()}"
            )
        modules = expert_linears_from_blob(blob, layout, self.scheme, self.device, self.dtype)
        for linear, module in modules.items():
            set_submodule(self.model, f"{expert_module_name(layer, expert)}.{linear}", module)

    def _build_attention(self, prefix: str, parts: dict[str, Tensor]) -> None:
        name = hf_to_module_name(prefix)
        linear = find_linear(self.model, name)
        self.scheme.check_parts(parts, linear.out_features, linear.in_features, f"{self.where}: '{prefix}'")
        module = self.scheme.build_linear(
            parts, linear.out_features, linear.in_features, self.device, self.dtype
        )
        set_submodule(self.model, name, module)

    def _assign(self, key: str, tensor: Tensor) -> None:
        name = hf_to_module_name(key)
        module_name, _, leaf = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_name) if module_name else self.model
        except AttributeError:
            module = None
        if module is None or (leaf not in module._parameters and leaf not in module._buffers):
            raise WeightsError(f"{self.where}: unexpected tensor '{key}' (does config.json match?)")
        current = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
        if current is not None and tuple(current.shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{self.where}: tensor '{key}' has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(current.shape)} (does config.json match?)"
            )
        wanted = self.dtype if tensor.is_floating_point() and key not in self.keep_stored_dtype else None
        value = tensor.to(device=self.device, dtype=wanted or tensor.dtype)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value

    def finish(self) -> None:
        for prefix, parts in self._pending.items():
            linear = find_linear(self.model, hf_to_module_name(prefix))
            # Raises the "missing '<part>' tensor" error for the first absent part.
            self.scheme.check_parts(
                parts, linear.out_features, linear.in_features, f"{self.where}: '{prefix}'"
            )
        self._pending.clear()
        args = getattr(self.model, "args", None)
        lm_head = getattr(self.model, "lm_head", None)
        embed = getattr(self.model, "embed_tokens", None)
        if (
            getattr(args, "tie_word_embeddings", False)
            and lm_head is not None
            and embed is not None
            and lm_head.weight.is_meta
        ):
            lm_head.weight = embed.weight
        missing = [
            name
            for name, t in self.model.state_dict(keep_vars=True).items()
            if t.is_meta and not (self.skip_experts and parse_expert_key(f"model.{name}"))
        ]
        if missing:
            first = missing[0]
            key = "lm_head.weight" if first.startswith("lm_head.") else f"model.{first}"
            if is_quantizable(key):
                prefix = key.removesuffix(".weight")
                expert = parse_expert_key(key)
                what = (
                    f"expert blob '{expert_blob_key(expert[0], expert[1])}'"
                    if expert
                    else f"the quantized tensors of '{prefix}'"
                )
                raise QuantizationError(f"{self.where}: missing {what} (incomplete quantized model)")
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise WeightsError(f"{self.where}: missing tensor '{key}'{more}")


def quantize_state_dict(scheme: QuantScheme, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF-keyed float state dict -> the quantized state dict a quantized directory stores."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[int, int], dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        expert = parse_expert_key(key)
        if expert is not None:
            experts.setdefault(expert[:2], {})[expert[2]] = tensor
        elif is_attention_weight(key) and not scheme.keeps_float:
            prefix = key.removesuffix(".weight")
            for part, value in scheme.quantize_weight(tensor).items():
                out[f"{prefix}.{part}"] = value
        else:
            out[key] = tensor
    for (layer, expert), weights in sorted(experts.items()):
        missing = [w for w in EXPERT_LINEARS if w not in weights]
        if missing:
            raise WeightsError(f"expert {expert} of layer {layer} has no {missing[0]} weight")
        w1 = weights["w1"]
        layout = ExpertBlobLayout.build(scheme, w1.shape[1], w1.shape[0])
        parts = {w: scheme.quantize_weight(weights[w]) for w in EXPERT_LINEARS}
        out[expert_blob_key(layer, expert)] = layout.pack(parts)
    return out
