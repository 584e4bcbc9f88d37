"""Reading Hugging Face safetensors checkpoints tensor by tensor into a `Mixtral`.

The model is built on the `meta` device (no memory), each tensor is read from its memory-mapped
shard, converted and moved, then assigned: peak memory stays near the final model's size plus one
tensor. Pickle checkpoints (.bin/.pt) are never loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine import heap
from mixtral_chat.engine.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    hf_to_module_name,
    module_to_hf_name,
    read_weight_map,
)
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import QuantizationError, WeightsError
from mixtral_chat.engine.model import Expert, Mixtral, fuse_loaded_group
from mixtral_chat.engine.safetensors_io import SAFETENSORS_DTYPES, check_finite, read_header, read_tensor
from mixtral_chat.quant.bnb_checkpoint import load_bnb_4bit_weights, read_bnb_4bit_config
from mixtral_chat.quant.load import load_quantized_model_weights, quantize_model_in_memory
from mixtral_chat.quant.schemes import get_scheme

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")  # the [vocab, hidden] matrices

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_EXPERT_WEIGHT = re.compile(r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")

# Takes each expert as soon as its three weights are read (and quantized): (layer, expert, module).
ExpertSink = Callable[[int, int, nn.Module], None]
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

    def tensors(
        self, keys: list[str] | None = None, out_for: Callable[[str, int], Tensor | None] | None = None
    ) -> Iterator[tuple[str, Tensor]]:
        """Yield (key, tensor) shard by shard, each read on its own into fresh memory (or into
        `out_for(key, nbytes)`'s buffer, when it gives one: a caller that reuses buffers).

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
                    out = out_for(key, info["data_offsets"][1] - info["data_offsets"][0]) if out_for else None
                    yield key, read_tensor(handle, file, key, info, data_start, out)


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
    expert_sink: ExpertSink | None = None,
    vocab_as_stored: bool = False,
) -> Mixtral:
    """Load a model directory (HF safetensors, or a quantized directory with quant_config.json,
    or a bitsandbytes 4-bit checkpoint: config.json with a quantization_config).

    `quant` quantizes a float checkpoint in memory after loading (small models and tests).
    `skip_experts` (quantized directories only) leaves the experts as meta shells, unread: an
    offloading expert store reads them from the files (`engine.offload.StoredExperts`).
    `expert_sink` (float checkpoints): each expert goes to the sink once read (and quantized with
    `quant`), and the model keeps a meta shell of it: experts are never held twice in RAM.
    `vocab_as_stored`: the embeddings and lm_head stay in the file's dtype, for a caller that makes
    them int8 next (`quantize_vocab_weights`): two float32 copies of Mixtral's 32000 x 4096 were
    1 GB of the load's peak, bf16 ones are half that (float32 of bf16 is exact: the same codes).
    """
    keep = frozenset(VOCAB_KEYS) if vocab_as_stored else frozenset()
    with heap.loading():  # peak memory: the model plus one tensor (engine/heap.py)
        return _load_model(model_dir, device, dtype, quant, group_size, skip_experts, expert_sink, keep)


def _load_model(
    model_dir: str | Path,
    device: str | torch.device,
    dtype: torch.dtype,
    quant: str | None,
    group_size: int | None,
    skip_experts: bool,
    expert_sink: ExpertSink | None,
    keep_stored_dtype: frozenset[str],
) -> Mixtral:
    model_dir = Path(model_dir)
    args = ModelArgs.from_hf_config(model_dir)
    model = build_on_meta(args)
    device = torch.device(device)
    kind = ckpt.detect(model_dir).kind
    if kind == ckpt.QUANTIZED:
        load_quantized_model_weights(
            model, model_dir, device, dtype, skip_experts=skip_experts, keep_stored_dtype=keep_stored_dtype
        )
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
        streaming = _ExpertStreaming(model, quant, group_size, expert_sink) if expert_sink else None
        out_for = streaming.read_buffer if streaming else None
        for key, tensor in checkpoint.tensors(out_for=out_for):
            if streaming is not None and streaming.is_expert(key):
                loaded = streaming.converted(key, tensor, dtype)
            else:
                loaded = tensor.to(device=device, dtype=tensor.dtype if key in keep_stored_dtype else dtype)
            # A NaN/inf weight is named here, not met later as NaN logits. One sum per tensor: from
            # the page cache, a 105 MB bf16 load took 42 ms instead of 32, 211 MB float32 116 ms
            # instead of 100 (one core); on a GPU the sum runs there, after the copy.
            check_finite(loaded, checkpoint.shards[key], key)
            name = hf_to_module_name(key)
            if streaming is None or not streaming.take(name, loaded):
                state[name] = loaded
                # q|k|v and w1|w3 concatenated as soon as a group is read, the originals dropped:
                # peak memory stays the model plus one group (fusing after loading doubled them).
                fuse_loaded_group(state, name)
        if args.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        if streaming is not None:
            streaming.finish()
            state.update(streaming.shell_state())
        model.load_state_dict(state, strict=True, assign=True)
        if quant and quant != "none":
            quantize_model_in_memory(model, quant, group_size)
    model.fuse_weights()  # q|k|v and w1|w3 as one GEMM each (float weights; model.py)
    model.requires_grad_(False)
    return model.eval()


class _ExpertStreaming:
    """Experts handed to a sink one by one as their weights arrive (`load_model(expert_sink=)`).

    Every expert's weights are read into, and converted in, the same few buffers: fresh tensors
    per expert fragment glibc's heap (its mmap threshold grows after the first large free, so
    later tensors come from the heap and are never given back), which measured as ~90% of the
    experts' size again in peak RSS."""

    def __init__(self, model: Mixtral, quant: str | None, group_size: int | None, sink: ExpertSink) -> None:
        self.args = model.args
        self.model = model
        self.quant = quant if quant and quant != "none" else None
        self.group_size = group_size
        self.sink = sink
        self.parts: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._read: dict[tuple[str, int], Tensor] = {}  # (w1|w2|w3, nbytes) -> raw bytes
        self._converted: dict[tuple[str, torch.dtype], Tensor] = {}

    def _held(self, linear: str) -> bool:
        """An expert still waiting for its other weights holds this linear's buffer (its weights
        straddle two shards): the next one gets fresh memory."""
        return any(linear in parts for parts in self.parts.values())

    def is_expert(self, key: str) -> bool:
        return _EXPERT_WEIGHT.fullmatch(hf_to_module_name(key)) is not None

    def read_buffer(self, key: str, nbytes: int) -> Tensor | None:
        match = _EXPERT_WEIGHT.fullmatch(hf_to_module_name(key))
        if match is None or self._held(match[3]):
            return None
        if (match[3], nbytes) not in self._read:
            self._read[(match[3], nbytes)] = torch.empty(nbytes, dtype=torch.uint8)
        return self._read[(match[3], nbytes)]

    def converted(self, key: str, tensor: Tensor, dtype: torch.dtype) -> Tensor:
        """The weight in `dtype`, in this linear's reused buffer."""
        linear = _EXPERT_WEIGHT.fullmatch(hf_to_module_name(key))[3]  # type: ignore[index]
        if tensor.dtype == dtype:
            return tensor
        if self._held(linear):
            return tensor.to(dtype)
        target = self._converted.get((linear, dtype))
        if target is None or target.shape != tensor.shape:
            target = self._converted[(linear, dtype)] = torch.empty(tensor.shape, dtype=dtype)
        return target.copy_(tensor)

    def take(self, name: str, tensor: Tensor) -> bool:
        """Keep an expert weight (True); once an expert has all three, build it and hand it on."""
        match = _EXPERT_WEIGHT.fullmatch(name)
        if match is None:
            return False
        layer, expert = int(match[1]), int(match[2])
        parts = self.parts.setdefault((layer, expert), {})
        parts[match[3]] = tensor
        if len(parts) == 3:
            del self.parts[(layer, expert)]
            self._hand_on(layer, expert, parts)
        return True

    def _hand_on(self, layer: int, expert: int, parts: dict[str, Tensor]) -> None:
        with torch.device("meta"):
            module = Expert(self.args.hidden_size, self.args.intermediate_size)
        module.load_state_dict({f"{w}.weight": t for w, t in parts.items()}, strict=True, assign=True)
        module.requires_grad_(False)
        if self.quant:  # as quantize_model_in_memory does it, one expert at a time
            handler = get_scheme(self.quant, self.group_size)
            for name in ("w1", "w2", "w3"):
                linear = getattr(module, name)
                parts = handler.quantize_weight(linear.weight.detach())
                built = handler.build_linear(
                    parts, linear.out_features, linear.in_features, linear.weight.device, linear.weight.dtype
                )
                setattr(module, name, built)
        self.sink(layer, expert, module)
        if self.quant:
            heap.give_back_freed()  # the quantizer's temporaries, else the heap keeps them
        # The model keeps a meta shell of the runtime form (quantized or not), for the cache's slots.
        self.model.layers[layer].block_sparse_moe.experts[expert] = module.to("meta")

    def finish(self) -> None:
        if self.parts:
            (layer, expert), parts = next(iter(self.parts.items()))
            missing = sorted({"w1", "w2", "w3"} - set(parts))
            raise WeightsError(f"expert {expert} of layer {layer} lacks {', '.join(missing)}")

    def shell_state(self) -> dict[str, Tensor]:
        """The experts' meta tensors, so that a strict load_state_dict sees every key."""
        return {
            f"layers.{li}.block_sparse_moe.experts.{e}.{name}": tensor
            for li, layer in enumerate(self.model.layers)
            for e, expert in enumerate(layer.block_sparse_moe.experts)
            for name, tensor in expert.state_dict().items()
        }
