"""The models mixtral-chat knows without being told: Mixtral-8x7B-Instruct-v0.1 (recommended),
Mixtral-8x7B-v0.1 and the bundled demo, with their sizes computed from Mixtral's shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_chat.engine import paths
from mixtral_chat.engine.config import ModelArgs

DEMO_NAME = "demo"
RECOMMENDED_NAME = "mixtral-8x7b-instruct"
DEFAULT_GROUP_SIZE = 64

# Mixtral-8x7B's shape (config.json of both v0.1 repos); sizes below are computed from it.
MIXTRAL_8X7B_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
}


def quantized_size_estimate(args: ModelArgs, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of a 4-bit model directory: attention and expert weights at 4 bits plus one 16-bit
    scale and one 16-bit zero (int4) or one fp32 absmax (nf4) per group; the rest stays 16-bit.
    An upper-side estimate for disk checks (the quantizer's metadata is small)."""
    d, h = args.hidden_size, args.head_dim
    attention = d * h * args.num_attention_heads * 2 + d * h * args.num_key_value_heads * 2
    experts = args.num_local_experts * 3 * d * args.intermediate_size
    quantized = args.num_hidden_layers * (attention + experts)
    bits_per_weight = 4 + 32 / group_size
    return int(quantized * bits_per_weight / 8 + (args.n_params - quantized) * 2)


def bf16_size(args: ModelArgs) -> int:
    return args.n_params * 2


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    description: str
    repo_id: str | None  # None: bundled with the package
    revision: str
    download_bytes: int  # what a pull fetches (approximate for the demo: its size on disk)
    quantized_bytes: int  # estimated 4-bit size (0 for the demo)
    parameters: int
    active_parameters: int
    license: str
    gated: bool
    recommended: bool = False
    bundled: bool = False


def _mixtral_catalog_entry(
    name: str, title: str, description: str, repo_id: str, recommended: bool
) -> CatalogEntry:
    args = ModelArgs.from_dict(MIXTRAL_8X7B_CONFIG, source=f"catalog:{name}")
    # 19 bf16 safetensors shards (their headers add ~0.1 MB) + tokenizer files (~2.3 MB).
    download = bf16_size(args) + 2_400_000
    return CatalogEntry(
        name=name,
        title=title,
        description=description,
        repo_id=repo_id,
        revision="main",  # no commit pinned: the repos are stable and a pin would need checking
        download_bytes=download,
        quantized_bytes=quantized_size_estimate(args),
        parameters=args.n_params,
        active_parameters=args.n_active_params,
        license="Apache-2.0",
        # Both repos ask users to accept sharing contact details before downloading: a token is needed.
        gated=True,
        recommended=recommended,
    )


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        _mixtral_catalog_entry(
            "mixtral-8x7b-instruct",
            "Mixtral-8x7B-Instruct-v0.1",
            "Mistral AI's instruction-tuned sparse mixture of experts: the model this app is for",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            recommended=True,
        ),
        _mixtral_catalog_entry(
            "mixtral-8x7b",
            "Mixtral-8x7B-v0.1",
            "The base (pretrained, not chat-tuned) Mixtral-8x7B: continues text rather than answering",
            "mistralai/Mixtral-8x7B-v0.1",
            recommended=False,
        ),
        CatalogEntry(
            name=DEMO_NAME,
            title="Demo (bundled)",
            description="A small Mixtral-architecture model shipped with the app so it works offline",
            repo_id=None,
            revision="",
            download_bytes=0,
            quantized_bytes=0,
            parameters=0,
            active_parameters=0,
            license="see MODEL_CARD.md in the demo folder",
            gated=False,
            bundled=True,
        ),
    )
}


def demo_dir() -> Path:
    return paths.assets_dir() / "demo"
