"""Checkpoints that transformers saved with a bitsandbytes 4-bit `quantization_config`, loaded as
they are (no re-quantization): the ~24 GB prequantized Mixtral repos instead of the 93 GB original.

config.json holds `"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
"bnb_4bit_quant_type": "nf4"|"fp4", "bnb_4bit_use_double_quant": ..., ...}`. Each 4-bit linear
`P.weight` is stored as bnb's packed codes (uint8 [(N*K+1)//2, 1]) next to the items of
`QuantState.as_dict(packed=True)`: `P.weight.absmax`, `P.weight.quant_map`, with double
quantization `P.weight.nested_absmax` and `P.weight.nested_quant_map`, and
`P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): the JSON of the other fields. bnb's own
`QuantState.from_dict` reads them; its fields map one to one onto `Nf4Linear`'s parts.

Which tensors are 4-bit is read from the files, linear by linear: transformers 5 keeps Mixtral's
experts fused and saves them in float (only attention is 4-bit), transformers 4.x quantized each
expert's w1/w2/w3 and the router `gate` too. Attention and expert linears become `Nf4Linear`s;
a 4-bit router gate or lm_head (which mixtral-chat keeps in float) is dequantized once at load.
Everything else is float and assigned in the model's dtype. Tensors are read one at a time.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from mixtral_chat.engine.checkpoint import (
    bnb_4bit_settings,
    hf_to_module_name,
    module_to_hf_name,
    shard_files,
)
from mixtral_chat.engine.errors import QuantizationError, WeightsError
from mixtral_chat.engine.safetensors_io import read_header, read_tensor, tensor_nbytes
from mixtral_chat.quant.assemble import RuntimeAssembler
from mixtral_chat.quant.bnb import bnb_functional
from mixtral_chat.quant.common import NESTED_BLOCKSIZE, find_linear, is_quantizable, set_submodule
from mixtral_chat.quant.nf4 import QUANT_TYPES, Nf4Linear, check_nf4_parts, dequantize_nf4
from mixtral_chat.quant.schemes import NoneScheme

# `P.weight.<item>`: an item of bnb's packed QuantState dict.
_STATE_ITEM = re.compile(
    r"^(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$"
)
_PACKED_STATE = "quant_state.bitsandbytes__"
# Block sizes bnb's 4-bit kernels take.
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class Bnb4bitConfig:
    """The checked `quantization_config` of a bitsandbytes 4-bit checkpoint."""

    quant_type: str  # nf4 | fp4 (each tensor's own quant state has the final say)
    double_quant: bool

    def describe(self) -> str:
        return f"{self.quant_type} (bitsandbytes)"  # the label of checkpoint.detect, too


def read_bnb_4bit_config(model_dir: str | Path) -> Bnb4bitConfig:
    """The 4-bit settings; QuantizationError for any other quantized (or a float) checkpoint."""
    return Bnb4bitConfig(*bnb_4bit_settings(model_dir))


def is_bnb_4bit_checkpoint(model_dir: str | Path) -> bool:
    """True when config.json describes a bitsandbytes 4-bit checkpoint (never raises)."""
    try:
        read_bnb_4bit_config(model_dir)
    except QuantizationError:
        return False
    return True


@dataclass
class _Linear4bit:
    """Where the stored tensors of one 4-bit weight are: item name ("" = the codes) -> key."""

    base: str  # HF key of the weight, `model.layers.0.self_attn.q_proj.weight`
    file: Path
    keys: dict[str, str]


def _plan(
    model: nn.Module, model_dir: Path, entries: dict[str, tuple[Path, dict, int]]
) -> tuple[dict[str, _Linear4bit], dict[str, str]]:
    """From the headers only: the 4-bit weights (base key -> where) and which key belongs to
    which (item key -> base key), after checking that the files hold exactly what the model needs."""
    args = getattr(model, "args", None)
    tied = getattr(args, "tie_word_embeddings", False)
    expected = {
        module_to_hf_name(name): tuple(t.shape)
        for name, t in model.state_dict(keep_vars=True).items()
        if not (tied and name == "lm_head.weight")
    }
    linears: dict[str, _Linear4bit] = {}
    owner: dict[str, str] = {}
    for key in entries:
        match = _STATE_ITEM.match(key)
        if match:
            base, item = match[1], match[2]
            if base not in entries:
                raise QuantizationError(
                    f"{entries[key][0]}: missing tensor '{base}' (its bitsandbytes quantization state "
                    f"'{key}' is there)"
                )
            linear = linears.setdefault(base, _Linear4bit(base, entries[base][0], {"": base}))
            if item.startswith(_PACKED_STATE) and any(k.startswith(_PACKED_STATE) for k in linear.keys):
                raise QuantizationError(f"{linear.file}: '{base}' has two bitsandbytes quantization states")
            linear.keys[item] = key
            owner[key] = owner[base] = base
    for key, (file, info, _) in entries.items():
        if key in owner:
            continue
        if key not in expected:
            raise WeightsError(f"{file}: unexpected tensor '{key}' (does config.json match?)")
        if info["dtype"] not in _FLOAT_DTYPES:
            raise QuantizationError(
                f"{file}: tensor '{key}' is {info['dtype']} without a bitsandbytes quantization state "
                f"(missing '{key}.{_PACKED_STATE}nf4')"
            )
        if tuple(info["shape"]) != expected[key]:
            raise WeightsError(
                f"{file}: tensor '{key}' has shape {tuple(info['shape'])}, config.json implies "
                f"{expected[key]}"
            )
    for base, linear in linears.items():
        if base not in expected:
            raise WeightsError(f"{linear.file}: unexpected tensor '{base}' (does config.json match?)")
        module = model.get_submodule(hf_to_module_name(base).removesuffix(".weight"))
        if not isinstance(module, nn.Linear):
            raise QuantizationError(f"{linear.file}: '{base}' is stored 4-bit, but it is not a linear weight")
        state = next((k for k in linear.keys if k.startswith(_PACKED_STATE)), f"{_PACKED_STATE}nf4")
        for item in ("absmax", "quant_map", state):
            if item not in linear.keys:
                raise QuantizationError(
                    f"{linear.file}: missing tensor '{base}.{item}' (incomplete bitsandbytes 4-bit weight)"
                )
        nested = [item for item in ("nested_absmax", "nested_quant_map") if item in linear.keys]
        if len(nested) == 1:
            other = "nested_quant_map" if nested[0] == "nested_absmax" else "nested_absmax"
            raise QuantizationError(
                f"{linear.file}: missing tensor '{base}.{other}' (incomplete bitsandbytes 4-bit weight)"
            )
        n = math.prod(expected[base])
        nbytes = tensor_nbytes(entries[base][1])
        if nbytes != (n + 1) // 2:
            raise WeightsError(
                f"{linear.file}: 4-bit tensor '{base}' holds {nbytes} bytes, a {list(expected[base])} weight "
                f"takes {(n + 1) // 2} (does config.json match?)"
            )
    missing = sorted(set(expected) - set(entries))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{model_dir}: missing tensor '{missing[0]}'{more}")
    return linears, owner


def _quant_state(linear: _Linear4bit, tensors: dict[str, Tensor]):
    """bnb's QuantState of one weight, from its stored items; errors name the file and tensor."""
    bnbf = bnb_functional()
    state_item = next(k for k in linear.keys if k.startswith(_PACKED_STATE))
    packed = tensors[state_item]
    where = f"{linear.file}: tensor '{linear.keys[state_item]}'"
    try:
        fields = json.loads(bytes(packed.reshape(-1).to(torch.uint8).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise QuantizationError(f"{where} is not a bitsandbytes quantization state (not JSON)") from None
    if not isinstance(fields, dict):
        raise QuantizationError(f"{where} is not a bitsandbytes quantization state (not a JSON object)")
    required = ["quant_type", "blocksize", "dtype", "shape"]
    if "nested_absmax" in linear.keys:
        required += ["nested_blocksize", "nested_dtype", "nested_offset"]
    absent = [name for name in required if name not in fields]
    if absent:
        raise QuantizationError(f"{where}: corrupt bitsandbytes quantization state (no '{absent[0]}')")
    items = {item: tensors[item] for item in linear.keys if item}
    try:
        state = bnbf.QuantState.from_dict(items, device=torch.device("cpu"))
    except (AssertionError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise QuantizationError(f"{where}: corrupt bitsandbytes quantization state ({exc!r})") from None
    if state.quant_type not in QUANT_TYPES or state_item != f"{_PACKED_STATE}{state.quant_type}":
        raise QuantizationError(f"{where}: unsupported 4-bit quant type {state.quant_type!r} (nf4 or fp4)")
    if type(state.blocksize) is not int or state.blocksize not in BNB_BLOCKSIZES:
        raise QuantizationError(f"{where}: unsupported block size {state.blocksize!r}")
    if state.nested and state.state2.blocksize != NESTED_BLOCKSIZE:
        raise QuantizationError(
            f"{where}: nested block size {state.state2.blocksize!r} is not supported (bitsandbytes "
            f"uses {NESTED_BLOCKSIZE})"
        )
    return state


def _nf4_parts(codes: Tensor, state) -> dict[str, Tensor]:
    """bnb's QuantState fields as `Nf4Linear` parts (floats as float32, codes flat uint8)."""

    def as_float32(t: Tensor) -> Tensor:
        return t.float() if t.is_floating_point() else t

    parts = {
        # quant_storage other than uint8 is the same bytes seen as another dtype.
        "qweight": codes.contiguous().reshape(-1).view(torch.uint8),
        "absmax": as_float32(state.absmax).reshape(-1),
        "quant_map": as_float32(state.code),
    }
    if state.nested:
        parts.update(
            nested_absmax=as_float32(state.state2.absmax).reshape(-1),
            nested_quant_map=as_float32(state.state2.code),
            absmax_offset=state.offset.reshape(1).float(),
        )
    return parts


def load_bnb_4bit_weights(
    model: nn.Module, model_dir: str | Path, device: torch.device | str, dtype: torch.dtype
) -> Bnb4bitConfig:
    """Fill `model` (built on the meta device) from a bitsandbytes 4-bit checkpoint, tensor by
    tensor: 4-bit attention/expert linears become `Nf4Linear`s computing in `dtype` on `device`,
    the rest is assigned in `dtype`. Everything is checked against the headers before any read."""
    model_dir = Path(model_dir)
    config = read_bnb_4bit_config(model_dir)
    device = torch.device(device)
    entries: dict[str, tuple[Path, dict, int]] = {}
    for file in shard_files(model_dir):
        header, data_start = read_header(file)
        for key, info in header.items():
            entries[key] = (file, info, data_start)
    linears, owner = _plan(model, model_dir, entries)
    assembler = RuntimeAssembler(model, NoneScheme(), device, dtype, where=str(model_dir))
    # In file order, except that a 4-bit weight's items are read together (safetensors puts
    # uint8 codes and float32 absmax far apart): at most one weight's items are held at a time.
    order = sorted(entries, key=lambda key: (entries[key][0], entries[key][1]["data_offsets"][0]))
    done: set[str] = set()
    with ExitStack() as stack:
        handles: dict[Path, BinaryIO] = {}

        def read(key: str) -> Tensor:
            file, info, data_start = entries[key]
            if file not in handles:
                handles[file] = stack.enter_context(open(file, "rb"))
            return read_tensor(handles[file], file, key, info, data_start)

        for key in order:
            base = owner.get(key)
            if base is None:
                assembler.add(key, read(key))
            elif base not in done:
                done.add(base)
                linear = linears[base]
                tensors = {item: read(item_key) for item, item_key in linear.keys.items()}
                _build(model, assembler, linear, tensors, device, dtype)
    assembler.finish()
    return config


def _build(
    model: nn.Module,
    assembler: Any,
    linear: _Linear4bit,
    tensors: dict[str, Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    state = _quant_state(linear, tensors)
    name = hf_to_module_name(linear.base).removesuffix(".weight")
    module = find_linear(model, name)
    shape = (module.out_features, module.in_features)
    where = f"{linear.file}: '{linear.base}'"
    if state.shape is None or tuple(state.shape) != shape:
        raise QuantizationError(
            f"{where}: its quantization state says shape {state.shape and list(state.shape)}, config.json "
            f"implies {list(shape)}"
        )
    parts = _nf4_parts(tensors[""], state)
    check_nf4_parts(parts, *shape, state.blocksize, state.nested, where)
    if is_quantizable(linear.base):
        runtime = Nf4Linear.from_parts(
            parts, *shape, state.blocksize, state.nested, device, dtype, state.quant_type
        )
        set_submodule(model, name, runtime)
    else:  # a router gate or lm_head: float in mixtral-chat
        weight = dequantize_nf4(parts, *shape, state.blocksize, torch.float32, state.quant_type)
        assembler.add(linear.base, weight)
