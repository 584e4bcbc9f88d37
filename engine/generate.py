"""Token generation: small pure functions and one generator that yields token ids."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mixtral_chat.engine.checkpoint import module_to_hf_name
from mixtral_chat.engine.errors import MixtralChatError, WeightsError
from mixtral_chat.engine.model import Mixtral
from mixtral_chat.engine.options import GenerationConfig

# Long prompts are prefilled in chunks so attention scores stay [chunk, context], not [S, S].
PREFILL_CHUNK = 512


def sample(logits: Tensor, params: GenerationConfig, generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits [V] (float32); `params` has checked its bounds."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def prefill(model: Mixtral, tokens: Sequence[int], start_pos: int) -> Tensor:
    """Run tokens at positions start_pos.. through the model; return the last logits [V]."""
    device = model.device
    logits = None
    for offset in range(0, len(tokens), PREFILL_CHUNK):
        chunk = tokens[offset : offset + PREFILL_CHUNK]
        ids = host_to_device([chunk], device)  # [1, S]
        end = start_pos + offset + len(chunk)
        pos = torch.arange(start_pos + offset, end, device=device)  # [S]
        logits = model(ids, pos, last_only=True, end=end)
    assert logits is not None, "prefill needs at least one token"
    return logits[0, -1]


@torch.inference_mode()
def decode_one(model: Mixtral, token: int, pos: int) -> Tensor:
    """One token at position pos -> next-token logits [V]."""
    ids, positions = host_to_device([[token], [pos]], model.device)  # [2, 1]: one copy for both
    return model(ids[None], positions, end=pos + 1)[0, -1]


def host_to_device(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Integer rows as a long tensor on `device`: on a GPU from pinned memory, asynchronously
    (a pageable copy would wait for the device), on a CPU as is."""
    host = torch.tensor(rows, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class TokenStreamState:
    """What the generator has fed into the KV cache, for reuse by the next call."""

    cached_ids: list[int]
    finish_reason: str = "stop"
    reused: int = 0  # prompt tokens whose keys/values were already in the cache (not prefilled)


def generate_tokens(
    model: Mixtral,
    prompt: Sequence[int],
    *,
    eos_id: int,
    params: GenerationConfig,
    stop_event: threading.Event | None = None,
    cached_prefix: Sequence[int] = (),
    state: TokenStreamState | None = None,
) -> Iterator[int]:
    """Yield generated token ids (EOS excluded) until EOS, `params.max_tokens`, or stop_event.

    `cached_prefix` is what the KV cache already holds from an earlier call: the longest common
    prefix with `prompt` is reused and only the rest is prefilled. `state` (if given) receives the
    tokens now in the cache and the finish reason: "stop", "length" or "cancelled".
    """
    state = state if state is not None else TokenStreamState([])
    reuse = common_prefix_len(cached_prefix, prompt)
    if reuse == len(prompt):
        reuse -= 1  # at least one token must run to produce logits
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(params.seed)
    room = model.max_seq_len - len(prompt)
    budget = min(params.max_tokens, room)
    state.cached_ids = list(prompt[:reuse])
    state.reused = reuse
    state.finish_reason = "length"
    if stop_event is not None and stop_event.is_set():
        state.finish_reason = "cancelled"
        return
    logits = prefill(model, prompt[reuse:], reuse)
    state.cached_ids = list(prompt)
    for produced in range(budget):
        check_logits(model, logits)
        token = sample(logits, params, generator)
        if token == eos_id:
            state.finish_reason = "stop"
            return
        yield token
        if stop_event is not None and stop_event.is_set():
            state.finish_reason = "cancelled"
            return
        if produced + 1 == budget:
            return  # no need to run the model for a token nobody will sample
        logits = decode_one(model, token, len(state.cached_ids))
        state.cached_ids.append(token)


def check_logits(model: Mixtral, logits: Tensor) -> None:
    """NaN logits (argmax would pick garbage, sampling would fail): name the damaged weight.

    Per token one sum over [V] (NaN propagates into it): 3.5 us on one CPU core for a 32000
    vocabulary (isnan().any() alone: 37 us); the demo decodes within noise of no check. The
    weights are scanned only when a NaN is there.
    """
    if not bool(torch.isnan(logits.sum())) or not bool(torch.isnan(logits).any()):
        return

    # state_dict: the weights and persistent buffers (quantized parts), not the KV cache, which
    # a NaN forward has filled with NaN too.
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta and bool(torch.isnan(tensor).any()):
            raise WeightsError(
                f"the model produced NaN logits: tensor '{module_to_hf_name(name)}' has NaN values"
            )
    raise MixtralChatError(
        "the model produced NaN logits, though no weight is NaN (a numeric overflow? try --dtype float32)"
    )


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
