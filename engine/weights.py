"""Reading Hugging Face safetensors checkpoints tensor by tensor into a `Mixtral`.

The model is built on the `meta` device (no memory), each tensor is read from its memory-mapped
shard, converted and moved, then assigned: peak memory stays near the final model's size plus one
tensor. Pickle checkpoints (.bin/.pt) are never loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    hf_to_module_name,
    module_to_hf_name,
    read_weight_map,
)
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import QuantizationError, WeightsError
from mixtral_chat.engine.model import Mixtral, fuse_loaded_group
from mixtral_chat.engine.safetensors_io import SAFETENSORS_DTYPES, check_finite, read_header, read_tensor
from mixtral_chat.quant.bnb_checkpoint import load_bnb_4bit_weights, read_bnb_4bit_config
from mixtral_chat.quant.load import load_quantized_model_weights, quantize_model_in_memory

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class Checkpoint:
    """Where each tensor of a safetensors checkpoint lives: key -> shard file."""

    directory: Path
    shards: dict[str, Path]
    # Each shard's header is read once, then checked (check_checkpoint) and used (tensors).
    _headers: dict[Path, tuple[dict[str, dict], int]] = field(default_factory=dict, compare=False)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.shards.values()))

    def header(self, file: Path) -> tuple[dict[str, dict], int]:
        """The shard's header (key -> {dtype, shape, data_offsets}) and where its data starts."""
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]

    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        directory = Path(directory)
        if not directory.is_dir():
            raise WeightsError(f"{directory}: model directory not found")
        weight_map = read_weight_map(directory)
        if weight_map is not None:
            shards = {k: directory / v for k, v in weight_map.items()}
            for shard in sorted(set(shards.values())):
                if not shard.exists():
                    raise WeightsError(f"{shard}: shard listed in {INDEX_FILE} is missing")
            return cls(directory, shards)
        single = directory / SINGLE_FILE
        if single.exists():
            header = read_header(single)
            return cls(directory, dict.fromkeys(header[0], single), {single: header})
        pickles = [p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise WeightsError(
                f"{directory}: only pickle weights ({pickles[0]}) found; mixtral-chat loads safetensors only"
            )
        raise WeightsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def tensors(self, keys: list[str] | None = None) -> Iterator[tuple[str, Tensor]]:
        """Yield (key, tensor) shard by shard, each read on its own into fresh memory.

        Reading with pread rather than through safetensors' mmap keeps the file's pages out of
        this process's RSS: peak memory is what the caller keeps plus one tensor.
        """
        wanted = set(self.shards) if keys is None else set(keys)
        for file in self.files:
            file_keys = sorted(k for k, f in self.shards.items() if f == file and k in wanted)
            if not file_keys:
                continue
            header, data_start = self.header(file)
            with open(file, "rb") as handle:
                for key in file_keys:
                    info = header.get(key)
                    if info is None:
                        raise WeightsError(f"{file}: tensor '{key}' listed in the index is missing")
                    yield key, read_tensor(handle, file, key, info, data_start)


def _dtype_name(dtype: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(dtype, dtype)


def check_checkpoint(checkpoint: Checkpoint, model: Mixtral) -> None:
    """Every expected tensor present with the right shape and a float dtype; nothing unexpected."""
    expected = {
        module_to_hf_name(name): tuple(param.shape)
        for name, param in model.state_dict().items()
        if not (model.args.tie_word_embeddings and name == "lm_head.weight")
    }
    headers = {file: checkpoint.header(file)[0] for file in checkpoint.files}
    missing = sorted(set(expected) - set(checkpoint.shards))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{checkpoint.directory}: missing tensor '{missing[0]}'{more}")
    unexpected = sorted(set(checkpoint.shards) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        file = checkpoint.shards[unexpected[0]]
        raise WeightsError(f"{file}: unexpected tensor '{unexpected[0]}'{more} (does config.json match?)")
    for key, shape in expected.items():
        file = checkpoint.shards[key]
        info = headers[file].get(key)
        if info is None:
            raise WeightsError(f"{file}: tensor '{key}' listed in the index is missing")
        if tuple(info["shape"]) != shape:
            raise WeightsError(
                f"{file}: tensor '{key}' has shape {tuple(info['shape'])}, config.json implies {shape}"
            )
        if info["dtype"] not in _FLOAT_DTYPES:
            raise WeightsError(
                f"{file}: tensor '{key}' has dtype {_dtype_name(info['dtype'])}, expected a float type"
            )


def build_on_meta(args: ModelArgs) -> Mixtral:
    with torch.device("meta"):
        return Mixtral(args)


def loaded_weight_bytes(model_dir: str | Path, dtype: torch.dtype) -> int:
    """What the weights take once loaded in `dtype`: float tensors converted to it, quantized
    parts (integer tensors) as stored. Read from the headers only."""
    checkpoint = Checkpoint.open(model_dir)
    total = 0
    for file in checkpoint.files:
        header, _ = checkpoint.header(file)
        for info in header.values():
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            itemsize = dtype.itemsize if stored.is_floating_point else stored.itemsize
            total += math.prod(info["shape"]) * itemsize
    return total


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    group_size: int | None = None,
    skip_experts: bool = False,
) -> Mixtral:
    """Load a model directory (HF safetensors, or a quantized directory with quant_config.json,
    or a bitsandbytes 4-bit checkpoint: config.json with a quantization_config).

    `quant` quantizes a float checkpoint in memory after loading (small models and tests).
    `skip_experts` (quantized directories only) leaves the experts as meta shells, unread: an
    offloading expert store reads them from the files (`engine.offload.StoredExperts`).
    """
    model_dir = Path(model_dir)
    args = ModelArgs.from_hf_config(model_dir)
    model = build_on_meta(args)
    device = torch.device(device)
    kind = ckpt.detect(model_dir).kind
    if kind == ckpt.QUANTIZED:
        load_quantized_model_weights(model, model_dir, device, dtype, skip_experts=skip_experts)
    elif skip_experts:
        raise ValueError("skip_experts needs a quantized model directory")
    elif kind == ckpt.BNB_4BIT:
        # A checkpoint transformers saved quantized: bitsandbytes 4-bit is loaded as it is.
        described = read_bnb_4bit_config(model_dir).describe()  # other kinds: a clear error
        if quant and quant != "none":
            raise QuantizationError(f"{model_dir}: already 4-bit ({described}); load it without --quant")
        load_bnb_4bit_weights(model, model_dir, device, dtype)
    else:
        checkpoint = Checkpoint.open(model_dir)
        check_checkpoint(checkpoint, model)
        state = {}
        for key, tensor in checkpoint.tensors():
            loaded = tensor.to(device=device, dtype=dtype)
            # A NaN/inf weight is named here, not met later as NaN logits. One sum per tensor: from
            # the page cache, a 105 MB bf16 load took 42 ms instead of 32, 211 MB float32 116 ms
            # instead of 100 (one core); on a GPU the sum runs there, after the copy.
            check_finite(loaded, checkpoint.shards[key], key)
            name = hf_to_module_name(key)
            state[name] = loaded
            # q|k|v and w1|w3 concatenated as soon as a group is read, the originals dropped:
            # peak memory stays the model plus one group (fusing after loading doubled them).
            fuse_loaded_group(state, name)
        if args.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if quant and quant != "none":
            quantize_model_in_memory(model, quant, group_size)
    model.fuse_weights()  # q|k|v and w1|w3 as one GEMM each (float weights; model.py)
    model.requires_grad_(False)
    return model.eval()
