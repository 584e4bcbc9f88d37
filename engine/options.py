"""What a generation and a model load are asked for, as one type each: the settings file stores
them as they are, the CLI builds them from its flags, and the engine takes them.

Torch-free (base layer): the CLI imports it at start-up to check its flags against the same bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from mixtral_chat.engine.errors import MixtralChatError

# The one set of sampling bounds (settings file, CLI flags, engine). Above 5 the distribution is
# close to uniform over the vocabulary: noise, and the settings file always refused it.
TEMPERATURE_MIN = 0.0
TEMPERATURE_MAX = 5.0
TOP_P_ABOVE = 0.0  # top_p is in (TOP_P_ABOVE, TOP_P_MAX]
TOP_P_MAX = 1.0
TOP_K_MIN = 0  # 0: no top-k cut
MAX_TOKENS_MIN = 1
# What torch.Generator.manual_seed accepts.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class GenerationConfigError(MixtralChatError):
    """A sampling value outside its bounds; the message names the field and the value."""


# The one set of load bounds (settings file and screen, CLI flags, Engine.load).
CONTEXT_MIN = 16  # tokens: below it not even a short prompt and its answer fit
# 0: no slots, every expert computed on the CPU (on_miss "cpu"); the most is the model's own
# count, checked against its config.
EXPERTS_PER_LAYER_MIN = 0
GPU_BUDGET_MIN = 0.0  # GB, inclusive
# Each string option's values ("cuda:N" too, for device).
LOAD_CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "quant": ("none", "int4", "nf4"),
    "offload_store": ("ram", "disk"),
    "cache_policy": ("lru", "lfu"),
    "on_miss": ("auto", "copy", "cpu", "split"),
    "vocab_weights": ("auto", "float", "int8"),
}
BANDWIDTHS = ("simulate_link_gbps", "h2d_gbps", "cpu_gbps", "disk_gbps")  # GB/s, each > 0


class LoadOptionsError(MixtralChatError, ValueError):
    """A load option outside its bounds; the message names the settings file's key and the value."""


# The scheme name of float weights (`--quant none`, and `engine.info.scheme` for them).
UNQUANTIZED = "none"


@dataclass(frozen=True)
class GenerationConfig:
    """How one answer is sampled. The defaults are the engine's (greedy, as `ask` runs); the
    settings give new chats their own (app/settings.py NEW_CHAT_GENERATION)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    max_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        # `not (low <= x <= high)` also refuses NaN (every comparison fails) and inf (above the cap).
        if not (TEMPERATURE_MIN <= self.temperature <= TEMPERATURE_MAX):
            bounds = f"between {TEMPERATURE_MIN:g} and {TEMPERATURE_MAX:g}"
            raise GenerationConfigError(f"temperature must be {bounds}, got {self.temperature}")
        if not (TOP_P_ABOVE < self.top_p <= TOP_P_MAX):
            raise GenerationConfigError(
                f"top_p must be in ({TOP_P_ABOVE:g}, {TOP_P_MAX:g}], got {self.top_p}"
            )
        if self.top_k < TOP_K_MIN:
            raise GenerationConfigError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.max_tokens < MAX_TOKENS_MIN:
            raise GenerationConfigError(
                f"max_tokens must be at least {MAX_TOKENS_MIN}, got {self.max_tokens}"
            )
        if self.seed is not None and not (SEED_MIN <= self.seed <= SEED_MAX):
            raise GenerationConfigError(f"seed must be between {SEED_MIN} and {SEED_MAX}, got {self.seed}")


@dataclass
class LoadOptions:
    """How a model is loaded (Engine.load). The field names are the settings file's keys under
    [engine]; not frozen, because the settings screen edits the one the app holds.

    Offloading keeps k experts per layer on the compute device and the rest in a store. With
    `offload` off, it still starts when the model does not fit `gpu_budget_gb`: then the planner
    picks k, and the store is host RAM next to a GPU, the disk on a CPU (RAM is what is short).
    """

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quant: str | None = None  # None: as stored on disk; "none" | "int4" | "nf4"
    offload: bool = False  # offload experts even when the model fits
    experts_per_layer: int | None = None  # with offload: experts on the device; None: the planner's
    # Memory budget for the planner and the does-it-fit check; None: free device memory - margin.
    gpu_budget_gb: float | None = None
    # Off by default: one-layer-ahead speculation measured 11-16% slower decode at a Mixtral-like
    # copy/compute ratio even with wrong guesses stopped mid-copy (docs/BENCHMARKS.md).
    prefetch: bool = False
    offload_store: str = "ram"  # with offload: "ram" | "disk"
    context_length: int | None = None  # None: the model's own, shortened to fit memory
    cache_policy: str = "lru"  # "lru" | "lfu"
    simulate_link_gbps: float | None = None  # CPU benchmarks: copies take bytes / bandwidth
    # With offload, what a missed expert does: "copy" into a slot, "cpu" (computed on the CPU from
    # the host store), or "auto": the planner's cost model picks from the bandwidths below (copy on
    # a CPU-only host). The bandwidths: None = measured once per host (engine/offload/bandwidth.py).
    on_miss: str = "auto"
    h2d_gbps: float | None = None
    cpu_gbps: float | None = None
    disk_gbps: float | None = None  # a store on disk: its files read past the page cache
    # The lm_head and embeddings of a 4-bit model on the CPU: "int8" (one float32 scale per 32
    # columns, on the native kernel: a quarter of the bytes the lm_head reads per token and of
    # the RAM both take; quality in docs/BENCHMARKS.md), "float" (as stored), or "auto": int8
    # where that kernel runs, else float. Float models keep them float under "auto" (the reference).
    vocab_weights: str = "auto"  # auto | float | int8
    # On CUDA, a decode layer's attention half and its chosen experts are replayed from CUDA graphs
    # (engine/decode_graphs.py): eager decode there is bound by kernel launches. Off: all eager.
    cuda_graphs: bool = True

    def check(self) -> None:
        """Raise LoadOptionsError for the first value outside its bounds (the CLI's flags are
        checked against the same bounds as they parse, app/commands/engine_flags.py)."""
        if self.context_length is not None and self.context_length < CONTEXT_MIN:
            raise LoadOptionsError(
                f"context_length must be at least {CONTEXT_MIN}, got {self.context_length}"
            )
        if self.experts_per_layer is not None and self.experts_per_layer < EXPERTS_PER_LAYER_MIN:
            raise LoadOptionsError(
                f"experts_per_layer must be at least {EXPERTS_PER_LAYER_MIN}, got {self.experts_per_layer}"
            )
        budget = self.gpu_budget_gb
        if budget is not None and not (GPU_BUDGET_MIN <= budget < math.inf):  # NaN fails both
            raise LoadOptionsError(f"gpu_budget_gb must be a finite number of GB >= 0, got {budget}")
        for name in BANDWIDTHS:
            value = getattr(self, name)
            if value is not None and not (0 < value < math.inf):
                raise LoadOptionsError(f"{name} must be a finite number of GB/s > 0, got {value}")
        for item in fields(self):
            allowed = LOAD_CHOICES.get(item.name)
            value = getattr(self, item.name)
            if allowed is None or value is None or value in allowed:
                continue
            if item.name == "device" and value.startswith("cuda:") and value[5:].isdigit():
                continue
            raise LoadOptionsError(f"{item.name} must be one of {', '.join(allowed)}, got {value!r}")
