"""The bundled demo model (assets/demo): its files, its held-out loss, and its greedy answers.

The held-out chats (tests/data/demo_heldout.jsonl) are about words the model never saw in
training; `scripts/train_demo.py` wrote them together with assets/demo/eval.json, which records the
held-out loss it measured with transformers. A loading, tokenizer or model regression in the
engine moves the loss here.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtral_chat.engine.options import GenerationConfig, LoadOptions
from mixtral_chat.engine.runtime import Engine
from mixtral_chat.engine.tokenizer import Tokenizer
from mixtral_chat.engine.weights import load_model

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "assets" / "demo"
HELDOUT_FILE = REPO_ROOT / "tests" / "data" / "demo_heldout.jsonl"
WORDS_FILE = REPO_ROOT / "tests" / "data" / "demo_words.txt.gz"
WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")
MAX_TOKENS = 64
QUESTIONS = (
    "What is a lighthouse?",
    "Use 'ephemeral' in a sentence.",
    "What is a volcano?",
    "What does it mean to run?",
    "What is the opposite of happy?",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The model is tiny: one thread is as fast, and far cheaper on shared cores (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def heldout() -> list[list[dict[str, str]]]:
    chats = [json.loads(line)["messages"] for line in HELDOUT_FILE.read_text().splitlines()]
    # Single-turn chats: the reply is everything after the prompt, so the loss has one definition.
    assert chats and all([m["role"] for m in chat] == ["user", "assistant"] for chat in chats)
    return chats


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return json.loads((DEMO_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(DEMO_DIR, LoadOptions(device="cpu", dtype="float32"))


def encode_heldout(tokenizer: Tokenizer, chat: list[dict[str, str]]) -> tuple[list[int], int]:
    """Ids of prompt + reply + </s>, and where the reply starts."""
    prompt = tokenizer.encode_chat(chat[:1])
    return [*prompt, *tokenizer.encode(chat[1]["content"]), tokenizer.eos_id], len(prompt)


def reply_nll(logits: torch.Tensor, ids: list[int], start: int) -> tuple[float, int]:
    """Summed NLL (nats) of ids[start:] given the logits [S, V] of the whole sequence."""
    logprobs = torch.log_softmax(logits[start - 1 : -1].double(), dim=-1)  # [R, V]
    targets = torch.tensor(ids[start:])  # [R]
    return -float(logprobs.gather(-1, targets[:, None]).sum()), len(targets)


def test_files_are_a_small_mixtral_in_the_hugging_face_layout() -> None:
    from safetensors import safe_open

    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    with safe_open(DEMO_DIR / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    # Tied embeddings (issue 17 item 13: a vocabulary that holds the answer words whole, paid for by
    # one matrix): transformers saves no lm_head then, and the engine reuses embed_tokens.
    assert config["tie_word_embeddings"] is ("lm_head.weight" not in keys)
    last_layer = config["num_hidden_layers"] - 1
    for key in (
        "model.embed_tokens.weight",
        f"model.layers.{last_layer}.block_sparse_moe.gate.weight",
        f"model.layers.{last_layer}.block_sparse_moe.experts.7.w1.weight",
        f"model.layers.{last_layer}.block_sparse_moe.experts.7.w2.weight",
        f"model.layers.{last_layer}.block_sparse_moe.experts.7.w3.weight",
        f"model.layers.{last_layer}.self_attn.k_proj.weight",
    ):
        assert key in keys
    total = sum(f.stat().st_size for f in DEMO_DIR.iterdir() if f.is_file())
    assert total <= 25_000_000, total


def test_tokenizer_follows_mixtral_conventions_and_mistral_common(
    heldout: list[list[dict[str, str]]], tmp_path: Path
) -> None:
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = Tokenizer(DEMO_DIR / "tokenizer.model")
    pieces = [tokenizer.id_to_piece(i) for i in range(4)]
    assert pieces == ["<unk>", "<s>", "</s>", "<0x00>"]  # unk 0, bos 1, eos 2, then byte fallback
    assert tokenizer.decode(tokenizer.encode("naïve 42 €")) == "naïve 42 €"  # bytes for unseen text
    # mistral-common picks the v1 (Mixtral) template from the file name.
    versioned = tmp_path / "tokenizer.model.v1"
    versioned.write_bytes((DEMO_DIR / "tokenizer.model").read_bytes())
    reference = MistralTokenizer.from_file(versioned)
    for chat in heldout[:50]:
        request = ChatCompletionRequest(messages=[UserMessage(content=chat[0]["content"])])
        assert tokenizer.encode_chat(chat[:1]) == reference.encode_chat_completion(request).tokens


def test_heldout_loss_matches_transformers_and_the_model_card(
    heldout: list[list[dict[str, str]]], recorded: dict[str, Any]
) -> None:
    from transformers import MixtralForCausalLM

    tokenizer = Tokenizer(DEMO_DIR / "tokenizer.model")
    encoded = [encode_heldout(tokenizer, chat) for chat in heldout]
    width = max(len(ids) for ids, _ in encoded)
    # One right-padded batch: causal attention never lets a position see the padding after it.
    batch = torch.full((len(encoded), width), tokenizer.eos_id)  # [B, S]
    for row, (ids, _) in enumerate(encoded):
        batch[row, : len(ids)] = torch.tensor(ids)
    ours = load_model(DEMO_DIR, device="cpu", dtype=torch.float32)
    ours.setup_cache(width, batch=len(encoded))
    theirs = MixtralForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()
    with torch.inference_mode():
        our_logits = ours(batch, torch.arange(width))  # [B, S, V]
        their_logits = theirs(input_ids=batch).logits
    our_nll = their_nll = 0.0
    tokens = 0
    for row, (ids, start) in enumerate(encoded):
        nll, count = reply_nll(our_logits[row, : len(ids)], ids, start)
        our_nll += nll
        their_nll += reply_nll(their_logits[row, : len(ids)], ids, start)[0]
        tokens += count
    our_loss, their_loss = our_nll / tokens, their_nll / tokens
    assert tokens == recorded["heldout_tokens"]
    assert abs(our_loss - their_loss) < 1e-4, (our_loss, their_loss)
    assert our_loss <= recorded["heldout_loss"] * 1.02, (our_loss, recorded["heldout_loss"])
    # A trained model, not noise: well below the uniform guess over the vocabulary. (Per token, so
    # the bound depends on the tokenizer: the 8192 pieces of today's demo carry more text each
    # than the 2048 before; per held-out chat the two demos score within 2%, docs/BENCHMARKS.md.)
    assert our_loss < 0.6 * math.log(tokenizer.vocab_size)


# Every other kind of question the demo is trained on, about words people try first: with the
# sample questions, the answers' words come from the training chats' vocabulary (a tiny model can
# still miscopy a word into a non-word, so a share: measured 7 of 564, 1.2%, on AVX-512 Zen 4;
# the bound leaves room for a few greedy tokens that flip on another CPU's float kernels).
PROBE_WORDS = (
    *("ephemeral", "happy", "river", "dog", "piano", "bicycle", "quickly", "run", "volcano", "lighthouse"),
    *("house", "water", "strong", "light", "open", "speak", "music", "friend", "cold", "tree"),
)
PROBES = tuple(
    form.format(w=word)
    for word in PROBE_WORDS
    for form in (
        "Use '{w}' in a sentence.",
        "Use {w} in a sentence.",
        "What is the opposite of {w}?",
        "What is another word for {w}?",
    )
)


def test_greedy_answers_stop_and_are_made_of_training_words(engine: Engine) -> None:
    vocabulary = set(gzip.decompress(WORDS_FILE.read_bytes()).decode().split())
    unknown: list[tuple[str, str]] = []
    total = 0
    for question in QUESTIONS + PROBES:
        stream = engine.chat([{"role": "user", "content": question}], GenerationConfig(max_tokens=MAX_TOKENS))
        answer = "".join(stream)
        assert stream.stats is not None
        assert stream.stats.finish_reason == "stop", (question, answer)
        assert stream.stats.completion_tokens < MAX_TOKENS
        words = WORD.findall(answer.lower())
        assert len(words) >= 2, (question, answer)
        total += len(words)
        unknown += [(question, w) for w in words if w not in vocabulary]
    print(f"{len(unknown)} of {total} answer words outside the training vocabulary: {unknown}")
    assert len(unknown) <= 0.02 * total, (len(unknown), total, unknown)


def test_engine_greedy_equals_transformers_greedy(engine: Engine) -> None:
    from transformers import MixtralForCausalLM

    theirs = MixtralForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()
    for question in QUESTIONS[:3]:
        messages = [{"role": "user", "content": question}]
        prompt = engine.tokenizer.encode_chat(messages)
        answer = "".join(engine.chat(messages, GenerationConfig(max_tokens=MAX_TOKENS)))
        with torch.inference_mode():
            output = theirs.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=engine.tokenizer.eos_id,
                pad_token_id=engine.tokenizer.eos_id,
            )
        expected = engine.tokenizer.decode(output[0, len(prompt) :].tolist())
        assert answer == expected, question


def load_eval_demo() -> Any:
    """scripts/eval_demo.py, the one place the real-word share is defined (scripts/ is no package)."""
    import importlib
    import sys

    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)  # eval_demo imports its sibling demo_data
    return importlib.import_module("eval_demo")


def test_greedy_answers_about_unseen_words_are_real_words(engine: Engine, recorded: dict[str, Any]) -> None:
    """Issue 17 item 13's measure: the share of real words in the demo's greedy answers about held-out
    words (tests/data/demo_define_heldout.jsonl, never a training headword), through the engine,
    scored against the shipped WordNet lexicon (no WordNet needed), stays at what eval.json records
    (scripts/eval_demo.py --record), and at the item's goal of 98% or more.
    """
    eval_demo = load_eval_demo()
    lexicon = eval_demo.Lexicon.from_file(eval_demo.LEXICON_FILE)
    assert lexicon.is_real("lighthouses") and lexicon.is_real("stopped") and lexicon.is_real("the")
    assert not lexicon.is_real("foreignant")
    prompts = eval_demo.read_jsonl(eval_demo.PROMPTS_FILE)
    answers = eval_demo.greedy_answers(engine, [p["prompt"] for p in prompts])
    share, words, unreal = eval_demo.real_word_share(lexicon, answers)
    assert words >= 5 * len(prompts), words  # answers, not empty replies
    # A greedy token may flip on another CPU's kernels: one point of slack, no more.
    assert share >= recorded["words"]["real_word_share"] - 0.01, (share, unreal)
    assert share >= 0.98, (share, unreal)
