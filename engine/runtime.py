"""The engine as the CLI and the TUI use it: load a model directory, chat, stream text."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import ContextTooLongError, MixtralChatError, OutOfMemoryError
from mixtral_chat.engine.tokenizer import StreamingDetokenizer, Tokenizer

if TYPE_CHECKING:
    import torch

    from mixtral_chat.engine.model import Mixtral
    from mixtral_chat.engine.offload import ExpertOffloader

DEFAULT_CONTEXT = 4096
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MixtralChatError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MixtralChatError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MixtralChatError(f"top-k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise MixtralChatError(f"max tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tok_s: float
    finish_reason: FinishReason
    dropped_turns: int = 0


@dataclass(frozen=True)
class OffloadOptions:
    """Expert offloading: k experts per layer on the compute device, the rest in a store."""

    experts_per_layer: int | None = None  # overrides the planner; = experts means all resident
    memory_budget_gb: float | None = None  # for the planner; default: free device memory - margin
    # Off by default: one-layer-ahead speculation measured 11-16% slower decode at a Mixtral-like
    # copy/compute ratio even with wrong guesses stopped mid-copy (docs/BENCHMARKS.md).
    prefetch: bool = False
    # None: host RAM, or the disk when offloading on a CPU because RAM is short (`only_if_needed`).
    store: Literal["ram", "disk"] | None = None
    policy: str = "lru"
    simulate_link_gbps: float | None = None  # CPU benchmarks: copies take bytes / bandwidth
    # Offload only when the model does not fit the budget (what the CLI and the TUI do unless
    # told otherwise): a model that fits stays all resident, one that does not still runs.
    only_if_needed: bool = False


@dataclass(frozen=True)
class EngineInfo:
    name: str
    path: Path
    device: str
    dtype: str
    scheme: str
    context_length: int
    n_params: int
    n_active_params: int
    offload_plan: str | None = None


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MixtralChatError("--device cuda was asked for, but no CUDA GPU is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MixtralChatError(f"unknown device {device!r} (auto, cpu or cuda)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        # bfloat16 halves memory and is fast on GPUs; most CPUs compute float32 faster.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise MixtralChatError(f"unknown dtype {dtype!r} (auto, float32 or bfloat16)")
    return table[dtype]


class ChatStream:
    """Iterate to get text pieces as they are generated; `stats` is set once iteration ends."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.stats: GenerationStats | None = None
        self.notices: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return self._pieces


class Engine:
    def __init__(
        self, model: Mixtral, tokenizer: Tokenizer, info: EngineInfo, offloader: ExpertOffloader | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.offloader = offloader
        self._cached_ids: list[int] = []  # tokens whose keys/values the KV cache holds
        self._lock = threading.Lock()  # one generation at a time

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quant: str | None = None,
        context_length: int | None = None,
        name: str | None = None,
        offload: OffloadOptions | None = None,
    ) -> Engine:
        import torch

        from mixtral_chat.engine.weights import load_model  # (torch)

        model_dir = Path(model_dir)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        tokenizer = Tokenizer(model_dir / "tokenizer.model")
        offloader = None
        stored = None
        shortfall = None  # why offloading was turned on, when it was automatic
        if offload is not None and offload.only_if_needed:
            offload, shortfall = _offload_if_needed(
                model_dir, torch_device, torch_dtype, context_length, offload
            )
        found = ckpt.detect(model_dir)
        own_quantized = found.kind == ckpt.QUANTIZED  # made by `mixtral-chat quantize`
        try:
            if offload and own_quantized and not quant:
                from mixtral_chat.engine.offload import StoredExperts

                # The experts are read from the quantized files by the store, never loaded whole.
                stored = StoredExperts.open(model_dir, torch_device, torch_dtype)
            if shortfall and torch_device.type == "cpu" and stored is None:
                # Offloading a model that is not streamed from its files loads it whole first.
                prequantized = own_quantized or found.quantization_config
                how = (
                    "its experts cannot be read from the files in place on this machine"
                    if prequantized
                    else "quantize it (mixtral-chat quantize) so that its experts are read from disk"
                )
                raise OutOfMemoryError(f"{model_dir}: {shortfall}; {how}")
            # With offloading, weights load into host memory and only the resident part moves.
            model = load_model(
                model_dir,
                "cpu" if offload else torch_device,
                torch_dtype,
                quant=quant,
                skip_experts=stored is not None,
            )
            limit = model.args.max_position_embeddings
            ctx = min(context_length or DEFAULT_CONTEXT, limit)
            if offload:
                from mixtral_chat.engine.offload import ExpertOffloader, move_non_experts, plan_offload

                move_non_experts(model, torch_device)
                budget = offload.memory_budget_gb
                if budget is None and offload.experts_per_layer is None:
                    budget = default_memory_budget_gb(torch_device)
                plan = plan_offload(
                    model,
                    ctx,
                    budget_bytes=int(budget * 1e9) if budget is not None else None,
                    experts_per_layer=offload.experts_per_layer,
                    store=offload.store or "ram",
                    expert_bytes=stored.layout.nbytes if stored else None,
                )
                offloader = ExpertOffloader(
                    model,
                    plan,
                    policy=offload.policy,
                    prefetch=offload.prefetch,
                    simulate_link_gbps=offload.simulate_link_gbps,
                    stored=stored,
                )
            model.setup_cache(ctx)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemoryError(f"out of {torch_device.type} memory loading {model_dir}: {exc}") from None
        if tokenizer.vocab_size > model.args.vocab_size:
            raise MixtralChatError(
                f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens, the model only "
                f"{model.args.vocab_size}"
            )
        scheme = quant or "none"
        if own_quantized:
            scheme = str(found.scheme or "unknown")
        elif found.kind == ckpt.BNB_4BIT:
            from mixtral_chat.quant.bnb_checkpoint import read_bnb_4bit_config  # (torch)

            scheme = read_bnb_4bit_config(model_dir).describe()  # "nf4 (bitsandbytes checkpoint)"
        info = EngineInfo(
            name=name or model_dir.name,
            path=model_dir,
            device=str(torch_device),
            dtype=str(torch_dtype).removeprefix("torch."),
            scheme=scheme,
            context_length=ctx,
            n_params=model.args.n_params,
            n_active_params=model.args.n_active_params,
            offload_plan=(f"auto ({shortfall}): " if shortfall else "") + offloader.plan.describe()
            if offloader
            else None,
        )
        return cls(model, tokenizer, info, offloader)

    def fit_prompt(self, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
        """Encode messages, dropping the oldest turns (never the system prompt) to fit.

        Returns the prompt ids and how many messages were dropped. Turns are dropped until the
        prompt leaves room for max_tokens; the last user turn alone only has to leave room for one.
        """
        ctx = self.info.context_length
        system = [m for m in messages[:1] if m.get("role") == "system"]
        turns = messages[len(system) :]
        dropped = 0
        while True:
            ids = self.tokenizer.encode_chat(system + turns)
            if len(ids) + max_tokens <= ctx:
                return ids, dropped
            # Drop from the front, a user message with the assistant reply after it together.
            cut = 1
            while cut < len(turns) and turns[cut].get("role") != "user":
                cut += 1
            if cut >= len(turns):
                if len(ids) < ctx:
                    return ids, dropped
                raise ContextTooLongError(
                    f"the prompt is {len(ids)} tokens, more than the context of {ctx} tokens"
                )
            turns = turns[cut:]
            dropped += cut

    def chat(
        self,
        messages: list[dict],
        config: GenerationConfig | None = None,
        stop_event: threading.Event | None = None,
    ) -> ChatStream:
        """Start answering the conversation; nothing runs until the stream is iterated."""
        config = config or GenerationConfig()
        prompt, dropped = self.fit_prompt(messages, config.max_tokens)
        stream = ChatStream(iter(()))
        if dropped:
            stream.notices.append(f"dropped the {dropped} oldest messages to fit the context")
        stream._pieces = self._stream(prompt, config, stop_event, stream, dropped)
        return stream

    def _stream(
        self,
        prompt: list[int],
        config: GenerationConfig,
        stop_event: threading.Event | None,
        stream: ChatStream,
        dropped: int,
    ) -> Iterator[str]:
        from mixtral_chat.engine.generate import SamplingParams, TokenStreamState, generate_tokens  # (torch)

        params = SamplingParams(config.temperature, config.top_p, config.top_k)
        detok = StreamingDetokenizer(self.tokenizer)
        state = TokenStreamState([])
        start = time.perf_counter()
        first_at: float | None = None
        completion = 0
        with self._lock:
            tokens = generate_tokens(
                self.model,
                prompt,
                max_new_tokens=config.max_tokens,
                eos_id=self.tokenizer.eos_id,
                params=params,
                seed=config.seed,
                stop_event=stop_event,
                cached_prefix=self._cached_ids,
                state=state,
            )
            try:
                for token in tokens:
                    completion += 1
                    if first_at is None:
                        first_at = time.perf_counter()
                    piece = detok.add(token)
                    if piece:
                        yield piece
                tail = detok.flush()
                if tail:
                    yield tail
            except GeneratorExit:  # the consumer stopped reading: a cancellation too
                state.finish_reason = "cancelled"
                raise
            finally:
                # Also when the consumer stops early (GeneratorExit): keep the cache consistent.
                tokens.close()
                self._cached_ids = state.cached_ids
                end = time.perf_counter()
                decode_time = end - first_at if first_at is not None else 0.0
                stream.stats = GenerationStats(
                    prompt_tokens=len(prompt),
                    completion_tokens=completion,
                    ttft_s=(first_at or end) - start,
                    decode_tok_s=(completion - 1) / decode_time
                    if completion > 1 and decode_time > 0
                    else 0.0,
                    finish_reason=state.finish_reason,  # type: ignore[arg-type]
                    dropped_turns=dropped,
                )

    def cache_stats(self) -> dict | None:
        """Expert-cache counters when experts are offloaded; None when all are resident."""
        return self.offloader.stats() if self.offloader else None

    def close(self) -> None:
        if self.offloader:
            self.offloader.close()


def default_memory_budget_gb(device: torch.device) -> float:
    """Free memory on the compute device minus a margin for activations and the allocator."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free / 1e9 - 1.0, 0.0)
    return max(available_ram_bytes() / 1e9 * 0.8, 0.0)


def available_ram_bytes() -> int:
    """RAM a new allocation can get: MemAvailable counts the page cache the kernel can drop,
    unlike free pages (which a machine that has read a few files has little of)."""
    import os

    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _offload_if_needed(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    context_length: int | None,
    options: OffloadOptions,
) -> tuple[OffloadOptions | None, str | None]:
    """The options to load with and why: None when the model fits the budget (all resident),
    else offloading with the planner, the experts in host RAM (GPU) or read from disk (CPU)."""
    import dataclasses

    from mixtral_chat.engine.weights import loaded_weight_bytes  # (torch)

    args = ModelArgs.from_hf_config(model_dir)
    ctx = min(context_length or DEFAULT_CONTEXT, args.max_position_embeddings)
    need = loaded_weight_bytes(model_dir, dtype) + args.kv_cache_bytes(ctx, dtype.itemsize)
    budget_gb = options.memory_budget_gb
    if budget_gb is None:
        budget_gb = default_memory_budget_gb(device)
    if need <= budget_gb * 1e9:
        return None, None
    store = options.store or ("disk" if device.type == "cpu" else "ram")
    options = dataclasses.replace(options, memory_budget_gb=budget_gb, store=store, only_if_needed=False)
    return options, f"the model needs {need / 1e9:.2f} GB, the {device.type} budget is {budget_gb:.2f} GB"
