"""The engine as the CLI and the TUI use it: load a model directory, chat, stream text."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mixtral_chat.engine import checkpoint as ckpt
from mixtral_chat.engine import load_progress
from mixtral_chat.engine.capability import GpuSupport, gpu_support
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import ContextTooLongError, MixtralChatError, OutOfMemoryError
from mixtral_chat.engine.host_ram import available_ram_bytes
from mixtral_chat.engine.load_progress import LoadProgress
from mixtral_chat.engine.options import UNQUANTIZED, GenerationConfig, LoadOptions
from mixtral_chat.engine.tokenizer import StreamingDetokenizer, Tokenizer

if TYPE_CHECKING:
    import torch

    from mixtral_chat.engine.checkpoint import CheckpointKind
    from mixtral_chat.engine.model import Mixtral
    from mixtral_chat.engine.offload import ExpertOffloader, StoredExperts
    from mixtral_chat.engine.offload.streamed import StreamedExperts

# The default context is the model's own, shortened (halved) while its KV cache would take more
# than this share of the device's memory budget, but never below MIN_DEFAULT_CONTEXT.
KV_SHARE_OF_BUDGET = 1 / 8
MIN_DEFAULT_CONTEXT = 2048
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tok_s: float
    finish_reason: FinishReason
    dropped_turns: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the KV cache held from the previous answer


@dataclass(frozen=True)
class OffloadDecision:
    """Offloading as decided for one load: the planner's inputs, and why it started when the
    options did not ask for it (the model did not fit)."""

    experts_per_layer: int | None
    budget_gb: float | None
    store: Literal["ram", "disk"]
    reason: str | None = None
    on_miss: str = "auto"


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
    vocab_weights: str = "float"  # "int8" where they were quantized at load (LoadOptions.vocab_weights)


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MixtralChatError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        # bfloat16 halves memory and is fast on GPUs (float16 before Ampere, which lacks bfloat16);
        # most CPUs compute float32 faster.
        if device.type != "cuda":
            return torch.float32
        return getattr(torch, cuda_support(device).dtype)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise MixtralChatError(f"unknown dtype {dtype!r} (auto, float32 or bfloat16)")
    return table[dtype]


def cuda_support(device: torch.device) -> GpuSupport:
    import torch

    return gpu_support(*torch.cuda.get_device_capability(device))


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
        options: LoadOptions | None = None,
        *,
        name: str | None = None,
        progress: Callable[[LoadProgress], None] | None = None,
    ) -> Engine:
        """Resolve device and dtype, decide on offloading, load the weights (experts streamed from
        a quantized directory's files where they can be), offload, check the tokenizer.
        `progress` hears how many weight bytes are read, about every 0.1 s and at the end."""
        with load_progress.counting(load_progress.weight_bytes(Path(model_dir)), progress):
            return cls._load(Path(model_dir), options, name)

    @classmethod
    def _load(cls, model_dir: Path, options: LoadOptions | None, name: str | None) -> Engine:
        import torch

        from mixtral_chat.quant.int8 import quantize_vocab_weights, vocab_weights_form

        # A copy: the app's settings hold the options it passes, and its settings screen may
        # edit them while this load runs in a thread.
        options = dataclasses.replace(options) if options else LoadOptions()
        options.check()
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        tokenizer = Tokenizer(model_dir / "tokenizer.model")
        args = ModelArgs.from_hf_config(model_dir)
        ctx = context_for(args, options.context_length, dtype, device)
        found = ckpt.detect(model_dir)
        if device.type == "cuda":  # int4 needs Ampere: nf4 where it cannot run
            support = cuda_support(device)
            options.quant = support.scheme_for(options.quant)
            if found.kind == ckpt.QUANTIZED and not options.quant:
                support.check_stored_scheme(found.scheme, str(model_dir))
        scheme = describe_scheme(model_dir, found, options.quant)
        vocab_weights = vocab_weights_form(options.vocab_weights, device.type, scheme != UNQUANTIZED, args)
        offload = decide_offload(model_dir, device, dtype, options, ctx, vocab_weights)
        try:
            stored = open_stored_experts(model_dir, found, device, dtype, offload, options.quant)
            check_offload_can_stream(model_dir, found, device, offload, stored)
            int8_vocab = vocab_weights == "int8"
            model, streamed = load_weights(
                model_dir, found, device, dtype, options.quant, offload, stored, int8_vocab
            )
            if int8_vocab:
                quantize_vocab_weights(model, dtype)
            offloader = (
                offload_experts(model, model_dir, ctx, device, offload, options, stored, streamed)
                if offload
                else None
            )
            model.setup_cache(ctx)
            if device.type == "cuda" and options.cuda_graphs:
                from mixtral_chat.engine.decode_graphs import DecodeGraphs

                model.decode_graphs = DecodeGraphs(model, capture=True)
            if device.type == "cpu":
                # The native kernel (compiled once per machine and CPU, ~2-5 s; never raises)
                # is made ready while loading: else a float32 model's first decode step asks for
                # it (its decode attention), and the first reply's speed counts the compile.
                from mixtral_chat.quant.native import int4_kernel

                int4_kernel()
        except torch.OutOfMemoryError as exc:
            raise OutOfMemoryError(f"out of {device.type} memory loading {model_dir}: {exc}") from None
        check_vocab(model_dir, tokenizer, model.args)
        info = EngineInfo(
            name=name or model_dir.name,
            path=model_dir,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            scheme=scheme,
            context_length=ctx,
            n_params=model.args.n_params,
            n_active_params=model.args.n_active_params,
            offload_plan=describe_offload(offload, offloader),
            vocab_weights=vocab_weights,
        )
        return cls(model, tokenizer, info, offloader)

    def fit_prompt(self, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
        """Encode messages, dropping the oldest turns (never the system prompt) to fit.

        Returns the prompt ids and how many messages were dropped. Turns are dropped only while
        the prompt leaves less than `reply_room` for the answer (max_tokens, at most a quarter of
        the context: a 1024-token budget must not empty a 512-token demo's memory); the answer
        then stops at the context's end. The last user turn alone only has to leave room for one.
        """
        ctx = self.info.context_length
        reply_room = max(1, min(max_tokens, ctx // 4))
        system = [m for m in messages[:1] if m.get("role") == "system"]
        turns = messages[len(system) :]
        dropped = 0
        while True:
            ids = self.tokenizer.encode_chat(system + turns)
            if len(ids) + reply_room <= ctx:
                return ids, dropped
            # Drop from the front, a user message with the assistant reply after it together.
            cut = 1
            while cut < len(turns) and turns[cut].get("role") != "user":
                cut += 1
            if cut >= len(turns):
                if len(ids) < ctx:
                    return ids, dropped
                raise ContextTooLongError(self._too_long(len(ids)))
            turns = turns[cut:]
            dropped += cut

    def _too_long(self, prompt_tokens: int) -> str:
        ctx, own = self.info.context_length, self.model.args.max_position_embeddings
        over = prompt_tokens - ctx + 1  # one token of room for the answer
        what = f"the prompt is {prompt_tokens} tokens, {over} over the context of {ctx} tokens"
        if ctx < own:
            return f"{what}; raise --context (this model takes up to {own}) or shorten the prompt"
        return f"{what} ({self.info.name}'s maximum); shorten the prompt or use a model with a longer context"

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
        from mixtral_chat.engine.generate import TokenStreamState, generate_tokens  # (torch)

        detok = StreamingDetokenizer(self.tokenizer)
        state = TokenStreamState([])
        start = time.perf_counter()
        first_at: float | None = None
        completion = 0
        with self._lock:
            tokens = generate_tokens(
                self.model,
                prompt,
                eos_id=self.tokenizer.eos_id,
                params=config,
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
                    cached_tokens=state.reused,
                )

    def cache_stats(self) -> dict | None:
        """Expert-cache counters when experts are offloaded; None when all are resident."""
        return self.offloader.stats() if self.offloader else None

    def decode_graphs_state(self) -> str | None:
        """Whether decode replays CUDA graphs (engine/decode_graphs.py); None where it never does."""
        graphs = self.model.decode_graphs
        return graphs.state() if graphs is not None else None

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


# -- the steps of Engine.load ---------------------------------------------------------------------


def context_for(args: ModelArgs, context_length: int | None, dtype: torch.dtype, device: torch.device) -> int:
    """The context asked for, at most the model's own; by default the model's own, as long as its
    KV cache fits KV_SHARE_OF_BUDGET of the device's memory (Mixtral: 32768 on a big card)."""
    if context_length:
        return min(context_length, args.max_position_embeddings)
    return default_context(args, dtype.itemsize, default_memory_budget_gb(device) * 1e9)


def default_context(args: ModelArgs, dtype_bytes: int, budget_bytes: float) -> int:
    ctx = args.max_position_embeddings
    floor = min(MIN_DEFAULT_CONTEXT, ctx)
    while ctx // 2 >= floor and args.kv_cache_bytes(ctx, dtype_bytes) > budget_bytes * KV_SHARE_OF_BUDGET:
        ctx //= 2
    return ctx


def decide_offload(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    options: LoadOptions,
    ctx: int,
    vocab_weights: str,
) -> OffloadDecision | None:
    """None: all experts resident. Asked for, offloading is as the options say; else it starts
    only when the model does not fit the budget, with the planner's k and the store for the device.
    `vocab_weights`: the lm_head and embeddings' form (`vocab_weights_form`), counted in the need."""
    if options.offload:
        store = "disk" if options.offload_store == "disk" else "ram"
        return OffloadDecision(
            options.experts_per_layer, options.gpu_budget_gb, store, on_miss=options.on_miss
        )
    from mixtral_chat.engine.weights import loaded_weight_bytes  # (torch)

    args = ModelArgs.from_hf_config(model_dir)
    need = loaded_weight_bytes(model_dir, dtype) + args.kv_cache_bytes(ctx, dtype.itemsize)
    if vocab_weights == "int8":
        from mixtral_chat.quant.int8 import vocab_int8_saving

        need -= vocab_int8_saving(args, dtype.itemsize)
    budget_gb = options.gpu_budget_gb
    if budget_gb is None:
        budget_gb = default_memory_budget_gb(device)
    if need <= budget_gb * 1e9:
        return None
    reason = f"the model needs {need / 1e9:.2f} GB, the {device.type} budget is {budget_gb:.2f} GB"
    # Next to a GPU the store is RAM when it fits what is available (the experts are most of the
    # weights), else the files; on a CPU, RAM is what is short.
    from mixtral_chat.engine.offload.store import choose_store  # (torch)

    store = "disk" if device.type == "cpu" else choose_store(need, available_ram_bytes())
    return OffloadDecision(None, budget_gb, store, reason, on_miss=options.on_miss)


def open_stored_experts(
    model_dir: Path,
    found: CheckpointKind,
    device: torch.device,
    dtype: torch.dtype,
    offload: OffloadDecision | None,
    quant: str | None,
) -> StoredExperts | None:
    """A directory made by `mixtral-chat quantize`, offloaded: the store reads the experts from its
    files, so they are never loaded whole (None where that cannot be done)."""
    if not offload or found.kind != ckpt.QUANTIZED or quant:
        return None
    from mixtral_chat.engine.offload import StoredExperts

    return StoredExperts.open(model_dir, device, dtype)


def check_offload_can_stream(
    model_dir: Path,
    found: CheckpointKind,
    device: torch.device,
    offload: OffloadDecision | None,
    stored: StoredExperts | None,
) -> None:
    """Offloading a model that is not streamed from its files loads it whole first: on a CPU
    whose RAM it does not fit (automatic offloading), that is the failure to avoid."""
    if not (offload and offload.reason) or device.type != "cpu" or stored is not None:
        return
    prequantized = found.kind == ckpt.QUANTIZED or found.quantization_config
    how = (
        "its experts cannot be read from the files in place on this machine"
        if prequantized
        else "quantize it (mixtral-chat quantize) so that its experts are read from disk"
    )
    raise OutOfMemoryError(f"{model_dir}: {offload.reason}; {how}")


def load_weights(
    model_dir: Path,
    found: CheckpointKind,
    device: torch.device,
    dtype: torch.dtype,
    quant: str | None,
    offload: OffloadDecision | None,
    stored: StoredExperts | None,
    vocab_as_stored: bool = False,
) -> tuple[Mixtral, StreamedExperts | None]:
    """The model; offloaded from a float checkpoint, its experts go into the store as they load
    (the model keeps meta shells), so they are never held twice. `vocab_as_stored`: see
    `load_model` (the vocabulary weights become int8 next)."""
    import os

    from mixtral_chat.engine.weights import load_model  # (torch)

    streamed = None
    if offload and stored is None and found.kind not in (ckpt.QUANTIZED, ckpt.BNB_4BIT):
        from mixtral_chat.engine.offload.streamed import StreamedExperts
        from mixtral_chat.engine.paths import data_dir

        args = ModelArgs.from_hf_config(model_dir)
        path = data_dir() / "offload" / f"experts-{os.getpid()}-{time.monotonic_ns()}.pack"
        streamed = StreamedExperts(
            args.num_hidden_layers, args.num_local_experts, offload.store, device.type == "cuda", path
        )
    # With offloading, weights load into host memory and only the resident part moves.
    model = load_model(
        model_dir,
        "cpu" if offload else device,
        dtype,
        quant=quant,
        skip_experts=stored is not None,
        expert_sink=streamed.put if streamed else None,
        vocab_as_stored=vocab_as_stored,
    )
    return model, streamed


def offload_experts(
    model: Mixtral,
    model_dir: Path,
    ctx: int,
    device: torch.device,
    offload: OffloadDecision,
    options: LoadOptions,
    stored: StoredExperts | None,
    streamed: StreamedExperts | None = None,
) -> ExpertOffloader:
    """Move all but the experts to the device, plan each layer's slots and misses (from the host's
    bandwidths, measured once and cached), start the cache. A store on disk is timed on the
    model's shards: the store reads them, or (a loaded model's pack file, in the data directory)
    they are the nearest thing to it on disk."""
    from mixtral_chat.engine.offload import (
        ExpertOffloader,
        move_non_experts,
        needs_staging,
        plan_offload,
    )
    from mixtral_chat.engine.offload.bandwidth import measured, with_disk, with_overrides

    on_disk = offload.store == "disk"
    bandwidths = measured(device)
    if on_disk and options.disk_gbps is None:  # the shards a store on disk reads
        bandwidths = with_disk(bandwidths, sorted(model_dir.glob("*.safetensors")))
    bandwidths = with_overrides(
        bandwidths,
        h2d_gbps=options.h2d_gbps,
        cpu_gbps=options.cpu_gbps,
        disk_gbps=options.disk_gbps if on_disk else None,
    )
    # Experts streamed from the files next to a GPU compute on the CPU only where their CPU form
    # reads the same blobs; loaded experts were built on the CPU, so their form is the CPU's.
    cpu_template = stored.cpu_template() if stored is not None and device.type != "cpu" else None
    cpu_compute = stored is None or device.type == "cpu" or cpu_template is not None
    on_miss = offload.on_miss if cpu_compute or offload.on_miss != "auto" else "copy"
    move_non_experts(model, device)
    budget = offload.budget_gb
    if budget is None and offload.experts_per_layer is None:
        budget = default_memory_budget_gb(device)
    plan = plan_offload(
        model,
        ctx,
        budget_bytes=int(budget * 1e9) if budget is not None else None,
        experts_per_layer=offload.experts_per_layer,
        store=offload.store,
        expert_bytes=stored.layout.nbytes
        if stored
        else (streamed.complete()[0].layout.nbytes if streamed else None),
        on_miss=on_miss,
        bandwidths=bandwidths,
        staging=needs_staging(model, stored, streamed),
        available_ram_bytes=available_ram_bytes() if on_disk else None,
    )
    return ExpertOffloader(
        model,
        plan,
        policy=options.cache_policy,
        prefetch=options.prefetch,
        simulate_link_gbps=options.simulate_link_gbps,
        stored=stored,
        cpu_template=cpu_template,
        streamed=streamed,
    )


def check_vocab(model_dir: Path, tokenizer: Tokenizer, args: ModelArgs) -> None:
    if tokenizer.vocab_size > args.vocab_size:
        raise MixtralChatError(
            f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens, the model only {args.vocab_size}"
        )


def describe_scheme(model_dir: Path, found: CheckpointKind, quant: str | None) -> str:
    if found.kind == ckpt.QUANTIZED:  # made by `mixtral-chat quantize`
        return str(found.scheme or "unknown")
    if found.kind == ckpt.BNB_4BIT:
        return str(found.label)  # "nf4 (bitsandbytes)", as `models list` says it
    return quant or UNQUANTIZED


def describe_offload(offload: OffloadDecision | None, offloader: ExpertOffloader | None) -> str | None:
    if offload is None or offloader is None:
        return None
    return (f"auto ({offload.reason}): " if offload.reason else "") + offloader.plan.describe()
