"""4-bit quantization of Mixtral's linear layers: schemes, quantized model directories, loading.

Importing this package is cheap; the names below load their module (and torch) on first use.

Schemes (`get_scheme(name, group_size, double_quant)` -> a handler, see `quant.schemes`):
    none   float, for reference and tests
    int4   group-wise asymmetric int4 (group 32/64/128/256, default 64): on CPU a native AVX2
           kernel on the stored form (`quant.native`, compiled on first use), else PyTorch's
           packed int4 kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int4pack_mm` on CUDA)
    nf4    bitsandbytes NF4 (block size 64 by default, optional double quantization)
Quantized: attention q/k/v/o projections and expert w1/w2/w3 (`is_quantizable(hf_key)`);
embeddings, lm_head, norms and router gates stay as stored. `default_scheme(device)` is the
scheme measured fastest on that device (int4 on CPU; nf4 on CUDA until measured there).

Directories:
    quantize_model_dir(src, dst, scheme, group_size, *, double_quant=False, progress=None,
                       cancel=None) -> Path
        streams a float safetensors checkpoint into a quantized directory (safetensors shards,
        model.safetensors.index.json, quant_config.json, copies of config/tokenizer files);
        resumable, written to `.<dst>.partial` and renamed. `progress` gets `QuantProgress`
        snapshots; setting `cancel` raises `QuantizationCancelled` (finished shards are kept).
    load_quantized_model_weights(model, model_dir, device, dtype) -> QuantConfig
        fills a model built on the meta device from a quantized directory.
    quantize_model_in_memory(model, scheme, group_size=None, double_quant=False) -> int
        swaps a loaded float model's quantizable linears (for `ask --quant`).
    QuantConfig.read(model_dir)
        the checked contents of quant_config.json.

bitsandbytes 4-bit checkpoints (config.json with a transformers `quantization_config`, e.g. the
prequantized Mixtral repos on the hub), loaded without re-quantizing:
    is_bnb_4bit_checkpoint(model_dir) -> bool; read_bnb_4bit_config(model_dir) -> Bnb4bitConfig
    load_bnb_4bit_weights(model, model_dir, device, dtype) -> Bnb4bitConfig
        4-bit attention/expert linears become Nf4Linear (nf4 or fp4), the rest float in `dtype`.

Experts for offloading: each expert is one contiguous uint8 blob
(`model.layers.N.block_sparse_moe.experts.E.packed`, layout in quant_config.json, see
`quant.blob`). `ExpertBlobReader(model_dir)` gives `.location(layer, expert)` (file, offset,
nbytes), `.read(layer, expert, out=None)` and `.linears(layer, expert, device, dtype)`;
`expert_linears_from_blob(blob, layout, scheme, device, dtype)` builds w1/w2/w3 from any copy
of a blob (CPU, pinned or CUDA).

Runtime layers (`Int4Linear`, `Nf4Linear`, or nn.Linear for `none`) compute
forward(x [..., in]) -> [..., out] like a bias-free nn.Linear for float32 and bfloat16 inputs.
"""

from __future__ import annotations

from mixtral_chat.engine.lazy import lazy_exports

_EXPORTS = {
    "is_quantizable": "common",
    "get_scheme": "schemes",
    "default_scheme": "schemes",
    "QuantScheme": "schemes",
    "NoneScheme": "schemes",
    "Int4Scheme": "schemes",
    "Nf4Scheme": "schemes",
    "SCHEME_NAMES": "schemes",
    "DEFAULT_GROUP_SIZE": "schemes",
    "quantize_int4": "int4",
    "dequantize_int4": "int4",
    "Int4Linear": "int4",
    "quantize_nf4": "nf4",
    "dequantize_nf4": "nf4",
    "Nf4Linear": "nf4",
    "ExpertBlobLayout": "blob",
    "expert_linears_from_blob": "blob",
    "QuantConfig": "config",
    "QUANT_CONFIG_FILE": "config",
    "quantize_model_dir": "convert",
    "QuantProgress": "convert",
    "QuantizationCancelled": "convert",
    "load_quantized_model_weights": "load",
    "quantize_model_in_memory": "load",
    "quantize_state_dict": "assemble",
    "ExpertBlobReader": "load",
    "is_bnb_4bit_checkpoint": "bnb_checkpoint",
    "read_bnb_4bit_config": "bnb_checkpoint",
    "load_bnb_4bit_weights": "bnb_checkpoint",
    "Bnb4bitConfig": "bnb_checkpoint",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(globals(), _EXPORTS)
