"""Train the bundled demo model: a small Mixtral that works as a pocket dictionary.

    python scripts/train_demo.py --out assets/demo --seed 0

Steps: WordNet 3.0 (Debian `wordnet-base`) -> chat turns (scripts/demo_data.py) -> a sentencepiece
tokenizer with Mixtral's conventions -> transformers' MixtralForCausalLM trained on the chats in
Mixtral-Instruct's [INST] template (loss on the replies and their </s> only, router load-balancing
loss on) -> `save_pretrained` (the real Hugging Face layout) + MODEL_CARD.md + eval.json, and the
held-out chats and training word list the tests read (tests/data/demo_heldout.jsonl,
tests/data/demo_words.txt.gz).

Dev dependencies only (transformers, sentencepiece; mistral-common to check the chat encoding).
Reproducible from --seed with the same number of threads; the step count, not the clock, ends
training.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_data  # sibling module: scripts/ is not a package
import eval_demo

if TYPE_CHECKING:
    import torch
    from transformers import MixtralForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
IGNORE = -100
MAX_TOKENS = 160  # longest training chat; longer ones are dropped
SIZE_LIMIT_BYTES = 25_000_000
HELDOUT_LIMIT = 300
ALPHA_WORD = re.compile(r"[A-Za-z]+")
SAMPLE_QUESTIONS = (
    "What is a lighthouse?",
    "Use 'ephemeral' in a sentence.",
    "What is a volcano?",
    "What does it mean to run?",
    "What is the opposite of happy?",
    "Hello",
    "What is a glimmerstone?",  # not an English word: shows what it does with unknown words
    "What is the capital of France?",  # not a dictionary question
)


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 512
    router_aux_loss_coef: float = 0.02
    tie_word_embeddings: bool = False


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(lines: Iterator[str], vocab_size: int) -> bytes:
    """A sentencepiece BPE model with the settings of Mixtral's own tokenizer.model.

    Read from Mixtral's file (trainer_spec/normalizer_spec): BPE, byte_fallback, split_digits,
    allow_whitespace_only_pieces, identity normalization, add_dummy_prefix, no whitespace
    squeezing, unk 0 / bos 1 / eos 2, no pad, max piece length 16.
    """
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        max_sentencepiece_length=16,
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=1,  # one thread: the merge order must not depend on scheduling
        input_sentence_size=0,  # all sentences, no sampling: the result depends on the data only
        minloglevel=2,
    )
    return model.getvalue()


class ChatEncoder:
    """Mistral-common v1's chat encoding, plus the mask of the tokens the model learns to write.

    `<s>`, then each user turn as sp.encode("[INST] {text} [/INST]") and each assistant turn as
    sp.encode(text) followed by `</s>`, every segment encoded on its own (each gets sentencepiece's
    dummy-prefix space). This is `InstructTokenizerV1` (mistral_common/tokens/tokenizers/
    instruct.py: encode_user_message, encode_assistant_message) and the engine's
    `Tokenizer.encode_chat`; `check_against_references` proves it on real examples.
    """

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)

    def encode(self, messages: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids = [BOS_ID]
        labels = [IGNORE]
        for role, content in messages:
            if role == "user":
                piece = self.sp.encode(f"[INST] {content} [/INST]")
                ids += piece
                labels += [IGNORE] * len(piece)
            else:
                piece = [*self.sp.encode(content), EOS_ID]
                ids += piece
                labels += piece
        return ids, labels

    def encode_masking_split_words(self, messages: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """`encode`, with no loss on the pieces of answer words spelled in several pieces, except
        words of the question (the headword): the model learns to copy any headword, and never to
        glue sub-word pieces into words of its own ("foreign" + "ant")."""
        ids, labels = self.encode(messages)
        asked: set[str] = set()
        position = 1  # after <s>
        for role, content in messages:
            count = len(
                self.sp.encode(f"[INST] {content} [/INST]") if role == "user" else self.sp.encode(content)
            )
            if role == "user":
                asked |= {w.lower() for w in ALPHA_WORD.findall(content)}
            else:
                pieces = [self.sp.id_to_piece(i) for i in ids[position : position + count]]
                start = 0
                for end in range(1, len(pieces) + 1):
                    # A word continues while the next piece is letters without a leading "▁".
                    if end < len(pieces) and pieces[end].isalpha() and pieces[end - 1][-1:].isalpha():
                        continue
                    word = "".join(pieces[start:end]).lstrip("\u2581")
                    if end - start > 1 and word.isalpha() and word.lower() not in asked:
                        labels[position + start : position + end] = [IGNORE] * (end - start)
                    start = end
                count += 1  # </s>
            position += count
        return ids, labels


def check_against_references(encoder: ChatEncoder, tokenizer_path: Path, chats: list[demo_data.Chat]) -> str:
    """Our training ids == mistral-common v1 == the engine's Tokenizer on every user-ending prefix."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    # mistral-common picks the tokenizer version from the file name: ".model.v1" is Mixtral's.
    versioned = tokenizer_path.with_name("tokenizer.model.v1")
    shutil.copyfile(tokenizer_path, versioned)
    reference = MistralTokenizer.from_file(versioned)
    assert type(reference.instruct_tokenizer).__name__ == "InstructTokenizerV1"
    try:
        from mixtral_chat.engine.tokenizer import Tokenizer

        engine: Any = Tokenizer(tokenizer_path)
    except ImportError:
        engine = None
    checked = 0
    for chat in chats:
        ids, _ = encoder.encode(chat.messages)
        for end in range(1, len(chat.messages) + 1, 2):  # prompts ending with a user turn
            prefix, _ = encoder.encode(chat.messages[:end])
            message_objects = [
                UserMessage(content=c) if r == "user" else AssistantMessage(content=c)
                for r, c in chat.messages[:end]
            ]
            request = ChatCompletionRequest(messages=message_objects)
            expected = reference.encode_chat_completion(request).tokens
            assert prefix == expected, (chat, prefix, expected)
            assert ids[: len(prefix)] == prefix, chat
            if engine is not None:
                as_dicts = [{"role": r, "content": c} for r, c in chat.messages[:end]]
                assert engine.encode_chat(as_dicts) == prefix, chat
            checked += 1
    who = "mistral-common v1 and the engine's Tokenizer" if engine else "mistral-common v1"
    return f"{checked} prompts encode exactly as {who} encodes them"


def kept_for_whole_words(encoder: ChatEncoder, chat: demo_data.Chat, whole: dict[str, bool]) -> bool:
    """`--whole-word-answers`' filter. The replies about the demo itself and the chats about the
    words its own reply and the README suggest (`demo_data.PROTECTED_WORDS`: "What is a
    lighthouse?") always stay: filtered out, "Hello" got "Goodbye!". Any other chat stays when
    its answers are whole pieces."""
    if chat.kind == "about":
        return True
    asked = {w.lower() for role, text in chat.messages if role == "user" for w in ALPHA_WORD.findall(text)}
    return bool(asked & demo_data.PROTECTED_WORDS) or answers_in_whole_pieces(encoder, chat, whole)


def answers_in_whole_pieces(encoder: ChatEncoder, chat: demo_data.Chat, whole: dict[str, bool]) -> bool:
    """Every answer word is one vocabulary piece, except words copied from the question (the headword).

    Trained only on such answers, the model writes words as single pieces and never learns to glue
    sub-word pieces into words of its own ("foreign" + "ant").
    """
    asked = {w.lower() for role, text in chat.messages if role == "user" for w in ALPHA_WORD.findall(text)}
    for role, text in chat.messages:
        if role != "assistant":
            continue
        for word in ALPHA_WORD.findall(text):
            if word.lower() in asked:
                continue
            if word not in whole:
                whole[word] = len(encoder.sp.encode(word)) == 1
            if not whole[word]:
                return False
    return True


# --------------------------------------------------------------------------- batches


def encode_chats(encoder: ChatEncoder, chats: list[demo_data.Chat]) -> list[tuple[list[int], list[int]]]:
    encoded = [encoder.encode(chat.messages) for chat in chats]
    return [pair for pair in encoded if len(pair[0]) <= MAX_TOKENS]


def make_batches(
    examples: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random
) -> list[list[tuple[list[int], list[int]]]]:
    """Length-bucketed batches: sort within windows of 32 batches so padding stays small."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
        for j in range(0, len(chunk), batch_size):
            batches.append([examples[i] for i in chunk[j : j + batch_size]])
    rng.shuffle(batches)
    return batches


def collate(batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is masked out of attention, loss and the router loss."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), EOS_ID, dtype=torch.long)  # [B, S]
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, target) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# --------------------------------------------------------------------------- evaluation


def answer_nll(model: MixtralForCausalLM, examples: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the reply tokens (with </s>), and their count."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(examples), 32):
            batch = collate(examples[start : start + 32])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, S-1, V]
            targets = batch["labels"][:, 1:]  # [B, S-1]: token t+1 is predicted at t
            keep = targets != IGNORE
            picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, S-1]
            total -= float(picked[keep].double().sum())
            count += int(keep.sum())
    model.train()
    return total, count


def routing_stats(model: MixtralForCausalLM, examples: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """How the trained routers spread tokens over experts (on the held-out chats, no padding)."""
    import torch

    config = model.config
    choices: list[list[torch.Tensor]] = [[] for _ in range(config.num_hidden_layers)]
    hooks = []
    for index, layer in enumerate(model.model.layers):

        def hook(_module: Any, _inputs: Any, output: Any, index: int = index) -> None:
            choices[index].append(output[2])  # router indices [tokens, top_k]

        # transformers 5 names the MoE block `mlp` in modules (`block_sparse_moe` in checkpoints).
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    model.eval()
    with torch.inference_mode():
        for ids, _ in examples:
            model(input_ids=torch.tensor([ids]))  # batch 1: no padding in the statistics
    model.train()
    for hook in hooks:
        hook.remove()
    experts = config.num_local_experts
    per_layer = []
    for layer_choices in choices:
        picks = torch.cat(layer_choices)  # [tokens, top_k]
        load = torch.bincount(picks.reshape(-1), minlength=experts).double()
        load /= load.sum()
        entropy = float(-(load * load.clamp(min=1e-12).log()).sum() / math.log(experts))
        # The same first choice for consecutive tokens (within each chat): what an expert cache sees.
        first = [c[:, 0] for c in layer_choices]
        repeats = sum(int((f[1:] == f[:-1]).sum()) for f in first)
        pairs = sum(len(f) - 1 for f in first)
        per_layer.append(
            {
                "load": [round(float(x), 4) for x in load],
                "normalized_entropy": round(entropy, 4),
                "top1_repeat_rate": round(repeats / pairs, 4),
            }
        )
    return {"tokens": int(sum(len(ids) for ids, _ in examples)), "layers": per_layer}


def greedy_answers(
    model: MixtralForCausalLM, encoder: ChatEncoder, questions: Sequence[str], max_new_tokens: int = 80
) -> list[str]:
    import torch

    model.eval()
    answers = []
    with torch.inference_mode():
        for question in questions:
            prompt, _ = encoder.encode([("user", question)])
            output = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=EOS_ID,
                pad_token_id=EOS_ID,
            )
            new = output[0, len(prompt) :].tolist()
            stopped = bool(new) and new[-1] == EOS_ID
            text = encoder.sp.decode([t for t in new if t != EOS_ID])
            answers.append(text if stopped else f"{text} [no </s> within {max_new_tokens} tokens]")
    model.train()
    return answers


def definition_recall(
    model: MixtralForCausalLM, encoder: ChatEncoder, maker: demo_data.ChatMaker, words: Sequence[str]
) -> float:
    """Share of `words` whose greedy answer to "Define X." is exactly the definition trained on."""
    answers = greedy_answers(model, encoder, [f"Define {w}." for w in words], max_new_tokens=60)
    expected = [maker.definition(w, maker.primary[w]) for w in words]
    return sum(a == e for a, e in zip(answers, expected, strict=True)) / len(words)


# --------------------------------------------------------------------------- training


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(shape: ModelShape, seed: int) -> MixtralForCausalLM:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        num_local_experts=shape.num_local_experts,
        num_experts_per_tok=shape.num_experts_per_tok,
        max_position_embeddings=shape.max_position_embeddings,
        router_aux_loss_coef=shape.router_aux_loss_coef,
        output_router_logits=False,  # asked for per call while training; off in the saved config
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def param_counts(model: MixtralForCausalLM) -> tuple[int, int]:
    """(total, active per token): a token uses top_k of the num_local_experts experts per layer."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    expert_total = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert_total + expert_total * config.num_experts_per_tok // config.num_local_experts
    return total, active


def train(
    model: MixtralForCausalLM,
    epochs: Iterator[list[tuple[list[int], list[int]]]],
    heldout: list[tuple[list[int], list[int]]],
    args: argparse.Namespace,
    log: Any,
) -> list[dict[str, float]]:
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    rng = random.Random(args.seed)
    curve: list[dict[str, float]] = []
    batches: list[list[tuple[list[int], list[int]]]] = []
    epoch = 0
    window_ce, window_aux, window_tokens = 0.0, 0.0, 0
    window_steps = 0
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        if not batches:
            batches = make_batches(next(epochs), args.batch_size, rng)
            epoch += 1
        batch = collate(batches.pop())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        out = model(**batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        aux = float(out.aux_loss.detach())
        window_ce += float(out.loss.detach()) - model.config.router_aux_loss_coef * aux
        window_aux += aux
        window_tokens += int((batch["labels"] != IGNORE).sum())
        window_steps += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            nll, count = answer_nll(model, heldout)
            point = {
                "step": step + 1,
                "epoch": epoch,
                "minutes": round((time.perf_counter() - started) / 60, 2),
                "train_loss": round(window_ce / window_steps, 4),
                "router_aux_loss": round(window_aux / window_steps, 4),
                "heldout_loss": round(nll / count, 4),
                "lr": learning_rate(step, args.steps, args.lr, args.warmup),
            }
            curve.append(point)
            log(
                f"step {point['step']:5d}/{args.steps} epoch {epoch} {point['minutes']:6.2f} min  "
                f"train {point['train_loss']:.4f}  held-out {point['heldout_loss']:.4f}  "
                f"aux {point['router_aux_loss']:.4f}  lr {point['lr']:.2e}  "
                f"{window_tokens / window_steps:.0f} reply tokens/step"
            )
            window_ce, window_aux, window_tokens, window_steps = 0.0, 0.0, 0, 0
    return curve


# --------------------------------------------------------------------------- outputs


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
        temp = Path(handle.name)
    temp.chmod(0o644)
    os.replace(temp, path)


def model_card(facts: dict[str, Any]) -> str:
    shape = ModelShape(**facts["shape"])
    facts = {**facts, "routing": facts["eval"]["routing"]}
    curve = facts["curve"]
    every = max(1, len(curve) // 12)
    rows = [curve[i] for i in range(0, len(curve), every)]
    if rows[-1] is not curve[-1]:
        rows.append(curve[-1])
    curve_table = "\n".join(
        f"| {p['step']} | {p['epoch']} | {p['minutes']:.1f} | {p['train_loss']:.3f} | "
        f"{p['heldout_loss']:.3f} | {p['router_aux_loss']:.3f} |"
        for p in rows
    )
    samples = "\n".join(
        f"| {q} | {a.replace('|', '/')} |" for q, a in zip(SAMPLE_QUESTIONS, facts["answers"], strict=True)
    )
    routing = facts["routing"]["layers"]
    routing_rows = "\n".join(
        f"| {i} | {' '.join(f'{x:.2f}' for x in layer['load'])} | {layer['normalized_entropy']:.3f} | "
        f"{layer['top1_repeat_rate']:.3f} |"
        for i, layer in enumerate(routing)
    )
    ev = facts["eval"]
    mb = facts["weights_bytes"] / 1e6
    head_dim = shape.hidden_size // shape.num_attention_heads
    attention = (
        f"{shape.num_attention_heads} query heads, {shape.num_key_value_heads} key/value heads (GQA), "
        f"head dim {head_dim}, RoPE (theta 1e6)"
    )
    experts = (
        f"{shape.num_local_experts} per layer, top-{shape.num_experts_per_tok} routing, SwiGLU, "
        f"intermediate size {shape.intermediate_size}"
    )
    words = f"{facts['word_count']:,} words; {facts['heldout_word_count']} of them"
    schedule = (
        f"peak learning rate {facts['lr']}, {facts['warmup']} warm-up steps then cosine decay to a tenth, "
        f"batches of {facts['batch_size']} chats (length-bucketed)"
    )
    where = f"{facts['threads']} CPU thread(s) of this machine ({facts['cpu']}"
    train_row = (
        f"| train (a fixed sample of {ev['train_chats']} training chats) | {ev['train_loss']:.4f} | "
        f"{math.exp(ev['train_loss']):.2f} |"
    )
    core_row = (
        f"| train, core words (a fixed sample of {ev['train_chats']} chats) | {ev['core_train_loss']:.4f} | "
        f"{math.exp(ev['core_train_loss']):.2f} |"
    )
    heldout_row = f"| held-out | **{ev['heldout_loss']:.4f}** | **{ev['heldout_perplexity']:.2f}** |"
    recall = (
        f'Greedy answers to "Define X." that reproduce the trained definition word for word: '
        f"{ev['core_definition_recall']:.0%} of 100 random core words, "
        f"{ev['other_definition_recall']:.0%} of 100 random other training words."
    )
    embeddings = (
        "tied (`lm_head` is `embed_tokens`: a larger vocabulary for the same size)"
        if shape.tie_word_embeddings
        else "untied (`lm_head` separate)"
    )
    words_ev = ev.get("words")
    real_words = (
        f"""
Real words (scripts/eval_demo.py, through the engine, greedy): the answers to {words_ev["prompts"]} fixed
"Define X." / "What is a X?" prompts about held-out words (`{words_ev["prompts_file"]}`) are
**{words_ev["real_word_share"]:.1%}** real words ({words_ev["answer_words"]} lowercase alphabetic tokens;
real = a WordNet lemma, an inflection by WordNet's exception lists, morphy's detachment rules or -ly/-ness and
doubled-consonant rules, or a function word). Correct definitions (the answer holds at least half of
the gloss's content words): **{words_ev["core_correct_definitions"]:.0%}** of 100 core words,
{words_ev["heldout_correct_definitions"]:.0%} of the held-out words.
"""
        if words_ev
        else ""
    )
    whole_words = (
        """
Whole-word answers (`--whole-word-answers`): a chat is trained on only when every word of its
answers is one piece of the tokenizer's vocabulary (words copied from the question, such as the
headword, excepted; the replies about the demo and the chats about the words it suggests always
stay). The model then writes each word as one piece and never learns to glue sub-word
pieces into words of its own ("foreign" + "ant"); the price is the chats left out.
"""
        if facts.get("whole_word_answers", "--whole-word-answers" in facts["command"])
        else ""
    )
    if facts.get("mask_split_words", "--mask-split-words" in facts["command"]):
        whole_words += """
Split words masked (`--mask-split-words`): every chat is trained on, but an answer word that the
tokenizer spells in several pieces gets no loss (words of the question, such as the headword, still
do). The model learns to copy any headword it is asked about, and to write the rest of an answer in
words the vocabulary holds whole: it is never taught to glue sub-word pieces ("foreign" + "ant").
"""
    if not facts.get("echo_headword", "--no-echo-headword" not in facts["command"]):
        whole_words += """
Answers that do not repeat the word (`--no-echo-headword`): "What is a lighthouse?" -> "It is a
tower ...". A model this small miscopies a word it has never seen ("Define technician." -> "A
techniac is ..."); without the echo it writes only the gloss, in words it knows.
"""
    echo = facts.get("echo_headword", "--no-echo-headword" not in facts["command"])
    answers = (
        '"A lighthouse is ...", "To X is to ...", "X means ..."'
        if echo
        else '"It is ...", "It means to ...", "It means ...", without repeating the word'
    )
    copying = (
        """- Unknown or made-up words: it may change the word itself in its answer ("glimmerstone" above),
  because it copies words it has never seen piece by piece."""
        if echo
        else """- Copying words: a definition does not repeat the word asked about, but a usage sentence does,
  and a rare word can come out misspelt ("whemeral" for "ephemeral"), because it copies words
  it has seldom seen piece by piece."""
    )
    grammar = (
        """- Grammar: the article is chosen from the first letter ("an hour" comes out "a hour"), and mass
  nouns get "a" ("A water is ...")."""
        if echo
        else """- Grammar: a definition always starts "It is" or "It means", also where a person would say
  "They are" (plurals) or name the word."""
    )
    context = shape.max_position_embeddings
    return f"""# mixtral-chat demo model: a pocket dictionary

A tiny model with Mixtral's architecture, bundled so that `mixtral-chat` works offline on first
run, without a GPU or a download. It defines English words, uses them in sentences, and gives
synonyms and opposites. It is not a general assistant: for real answers, download Mixtral.

Trained by `{facts["command"]}` (scripts/train_demo.py; data in scripts/demo_data.py).

## Architecture

| | |
| --- | --- |
| architecture | `MixtralForCausalLM` (transformers), saved with `save_pretrained` |
| layers | {shape.num_hidden_layers} |
| hidden size | {shape.hidden_size} |
| attention | {attention} |
| experts | {experts} |
| norm | RMSNorm (eps 1e-5) |
| vocabulary | {shape.vocab_size} (sentencepiece BPE, byte fallback) |
| context | {shape.max_position_embeddings} tokens |
| embeddings | {embeddings} |
| parameters | {facts["params_total"]:,} total, {facts["params_active"]:,} active per token |
| weights | `model.safetensors`, float32, {mb:.1f} MB |

## Data

Princeton WordNet 3.0 as packaged by Debian (`wordnet-base`, files
`/usr/share/wordnet/{{index,data}}.{{noun,verb,adj,adv}}`), read directly (no NLTK). Headwords:
single lowercase words that SemCor tagged or that other glosses mention at least
{demo_data.MIN_GLOSS_MENTIONS} times ({words}, a fixed hash split, are held out
and never trained on). Each epoch makes fresh chats with randomly chosen phrasings
({facts["chats_per_epoch"]:,} chats, about {facts["tokens_per_epoch"]:,} tokens):

- definitions: "What is a lighthouse?", "Define X.", "What does X mean?", "What does it mean to X?"
  -> {answers} (the first WordNet sense; a second part of speech when SemCor tags it);
- usage: "Use 'X' in a sentence." -> a WordNet example sentence that contains the word;
- synonyms and antonyms from the synset and its antonym pointers;
- a few fixed replies about the demo itself ("Hello", "Who are you?");
- 8% of chats are two-turn, so a follow-up question in a chat is answered too.

Core words: the {ev["core_words"]:,} training words most frequent in SemCor (WordNet's `cntlist.rev`), plus
the words this card and the tests use, come {demo_data.CORE_REPEATS} times per epoch; every other training
word comes with probability {demo_data.TAIL_RATE}. A model this small cannot learn 20,000 definitions in the
time budget, so it spends its capacity on the words people ask about most.
{whole_words}
Chats use Mixtral-Instruct's template exactly as mistral-common's v1 tokenizer encodes it
(`<s>[INST] question [/INST] answer</s>`; checked: {facts["template_check"]}). The loss covers the
answer tokens and `</s>` only.

License of the data: WordNet 3.0 license (Princeton University), permissive:

> WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
>
> Permission to use, copy, modify and distribute this software and database and its
> documentation for any purpose and without fee or royalty is hereby granted, provided that you
> agree to comply with the following copyright notice and statements, including the disclaimer,
> and that the same appear on ALL copies of the software, database and documentation, including
> modifications that you make for internal use or for distribution.
>
> THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
> REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION,
> PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANTABILITY OR FITNESS FOR
> ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL
> NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.
>
> The name of Princeton University or Princeton may not be used in advertising or publicity
> pertaining to distribution of the software and/or database. Title to copyright in this
> software, database and any associated documentation shall at all times remain with Princeton
> University and LICENSEE agrees to preserve same.

## Tokenizer

`tokenizer.model`: sentencepiece BPE trained on the training chats, {shape.vocab_size} pieces, with
the settings of Mixtral's own tokenizer: `<unk>` 0, `<s>` 1, `</s>` 2, byte fallback (256 byte
pieces), digits split, identity normalization, dummy prefix, whitespace kept. `[INST]` and
`[/INST]` are plain text, as in Mixtral's vocabulary.

## Training

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), {schedule}, gradient clipping 1.0,
float32, {facts["steps"]} steps ({facts["epochs"]} epochs), router load-balancing loss with
coefficient {shape.router_aux_loss_coef} (`output_router_logits=True`), seed {facts["seed"]}. Training took
**{facts["train_minutes"]:.1f} minutes** ({facts["train_cpu_minutes"]:.1f} minutes of CPU time) on
{where}; the cores were shared with other jobs), {facts["total_minutes"]:.1f} minutes for the whole script.

Loss (nats per answer token; train: mean over the steps since the previous row; held-out: the
whole held-out set):

| step | epoch | minutes | train loss | held-out loss | router aux loss |
| --- | --- | --- | --- | --- | --- |
{curve_table}

## Evaluation

Held-out set: `tests/data/demo_heldout.jsonl`, {ev["heldout_chats"]} chats about words never trained on
({ev["heldout_tokens"]} answer tokens). Loss is the mean negative log-likelihood of the answer tokens and
`</s>` given the prompt, float32:

| | loss (nats/token) | perplexity |
| --- | --- | --- |
{train_row}
{core_row}
{heldout_row}

{recall}
{real_words}
`eval.json` records these numbers; `tests/test_demo_model.py` checks that the engine reproduces
transformers' held-out loss on these weights (within 1e-4) and stays under this value + 2%.

Routing on the held-out chats ({facts["routing"]["tokens"]} tokens): share of top-2 assignments per
expert, normalized entropy of that share (1.0 = uniform), and how often consecutive tokens pick
the same first expert (random: 1/8 = 0.125):

| layer | expert load 0..7 | entropy | top-1 repeat |
| --- | --- | --- | --- |
{routing_rows}

## Example answers (greedy, transformers)

| question | answer |
| --- | --- |
{samples}

## What it cannot do

- Anything but a dictionary: no facts, arithmetic, code, reasoning or conversation beyond a few
  fixed greetings. Other questions get a definition-shaped reply that is usually wrong.
- Reliable definitions: a {facts["params_total"] / 1e6:.1f}M-parameter model cannot memorise
  {facts["word_count"]:,} definitions. Common words often come out right or close (see the recall numbers
  above); rare and unseen words get fluent but invented definitions.
{copying}
- Long chats: it saw at most two turns and {MAX_TOKENS} tokens; its context is {context} tokens.
- Sampling: it was trained for greedy decoding; with temperature it drifts quickly.
{grammar}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "assets" / "demo")
    parser.add_argument("--tests-data", type=Path, default=REPO_ROOT / "tests" / "data")
    parser.add_argument("--wordnet-dir", type=Path, default=demo_data.DEFAULT_WORDNET_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=500)
    defaults = ModelShape()
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--layers", type=int, default=defaults.num_hidden_layers)
    parser.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=defaults.tie_word_embeddings,
        help="lm_head shares embed_tokens' matrix",
    )
    parser.add_argument(
        "--whole-word-answers",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train only on chats whose answer words are single vocabulary pieces (the headword excepted)",
    )
    parser.add_argument(
        "--lowercase-headword",
        action=argparse.BooleanOptionalAction,
        default=False,
        help='"The adjective abashed means ..." instead of "Abashed means ..."',
    )
    parser.add_argument(
        "--echo-headword",
        action=argparse.BooleanOptionalAction,
        default=True,
        help='--no-echo-headword: "It is a tower ..." instead of "A lighthouse is a tower ..."',
    )
    parser.add_argument(
        "--mask-split-words",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="no loss on answer words spelled in several pieces (the question's words excepted)",
    )
    # One thread: on 2 cores shared with other jobs, 2 threads cost ~5x the CPU time per step
    # (measured: 6 s vs 1.1 s of CPU per step), and one thread makes the run bit-reproducible.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--card-only", action="store_true", help="rewrite MODEL_CARD.md from OUT/eval.json; no training"
    )
    args = parser.parse_args(argv)
    if args.card_only:
        evaluation = json.loads((args.out / "eval.json").read_text())
        card = model_card({**evaluation["training"], "eval": evaluation})
        write_atomic(args.out / "MODEL_CARD.md", card.encode())
        return 0

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log_lines: list[str] = []

    def log(message: str) -> None:
        line = f"[{time.perf_counter() - started:7.1f}s] {message}"
        log_lines.append(line)
        print(line, flush=True)

    shape = ModelShape(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        tie_word_embeddings=args.tie_embeddings,
    )
    entries, table = demo_data.load_wordnet(args.wordnet_dir)
    maker = demo_data.ChatMaker(
        entries, table, lowercase_headword=args.lowercase_headword, echo_headword=args.echo_headword
    )
    train_words, heldout_words = demo_data.split_words(maker)
    core = demo_data.core_words(train_words, demo_data.semcor_counts(args.wordnet_dir))
    heldout_chats = demo_data.heldout_chats(maker, heldout_words, HELDOUT_LIMIT)
    log(f"WordNet: {len(maker.words)} headwords, {len(train_words)} train, {len(heldout_words)} held out")

    # Tokenizer: trained on two epochs' worth of training chats (different phrasings), never on held-out.
    def tokenizer_lines() -> Iterator[str]:
        for epoch in range(2):
            for chat in maker.epoch(train_words, random.Random(f"tokenizer-{epoch}")):
                for role, content in chat.messages:
                    yield f"[INST] {content} [/INST]" if role == "user" else content

    model_proto = train_tokenizer(tokenizer_lines(), shape.vocab_size)
    encoder = ChatEncoder(model_proto)
    assert encoder.sp.vocab_size() == shape.vocab_size
    assert (encoder.sp.id_to_piece(0), encoder.sp.id_to_piece(1), encoder.sp.id_to_piece(2)) == (
        "<unk>",
        "<s>",
        "</s>",
    )
    log(f"tokenizer: {shape.vocab_size} pieces, {len(model_proto)} bytes")

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_path = Path(scratch) / "tokenizer.model"
        tokenizer_path.write_bytes(model_proto)
        template_check = check_against_references(encoder, tokenizer_path, heldout_chats[:100])
        sample_epoch = maker.epoch(train_words, random.Random("check"))
        template_check += "; " + check_against_references(
            encoder, tokenizer_path, [c for c in sample_epoch if c.kind == "multi"][:100]
        )
    log(f"chat template: {template_check}")

    heldout = encode_chats(encoder, heldout_chats)
    assert len(heldout) == len(heldout_chats), "a held-out chat is longer than MAX_TOKENS"

    epoch_sizes: list[tuple[int, int]] = []
    whole_words: dict[str, bool] = {}  # word -> encodes as one piece

    def epochs() -> Iterator[list[tuple[list[int], list[int]]]]:
        for epoch in range(10_000):
            chats = maker.epoch(train_words, random.Random(f"{args.seed}-epoch-{epoch}"), core=core)
            if args.whole_word_answers:
                chats = [c for c in chats if kept_for_whole_words(encoder, c, whole_words)]
            if args.mask_split_words:
                encoded = [encoder.encode_masking_split_words(c.messages) for c in chats]
                encoded = [pair for pair in encoded if len(pair[0]) <= MAX_TOKENS]
            else:
                encoded = encode_chats(encoder, chats)
            epoch_sizes.append((len(encoded), sum(len(ids) for ids, _ in encoded)))
            log(f"epoch {epoch + 1}: {len(encoded)} chats, {epoch_sizes[-1][1]} tokens")
            yield encoded

    model = build_model(shape, args.seed)
    total, active = param_counts(model)
    log(f"model: {total:,} parameters, {active:,} active per token")

    train_started, train_cpu_started = time.perf_counter(), time.process_time()
    curve = train(model, epochs(), heldout, args, log)
    train_minutes = (time.perf_counter() - train_started) / 60
    train_cpu_minutes = (time.process_time() - train_cpu_started) / 60

    nll, count = answer_nll(model, heldout)
    heldout_loss = nll / count
    train_sample = encode_chats(encoder, maker.epoch(train_words, random.Random("train-sample"))[:600])
    train_nll, train_count = answer_nll(model, train_sample)
    core_list = sorted(core)
    core_sample = encode_chats(encoder, maker.epoch(core_list, random.Random("core-sample"))[:600])
    core_nll, core_count = answer_nll(model, core_sample)
    recall_rng = random.Random("recall")
    tail_list = sorted(set(train_words) - core)
    core_recall = definition_recall(model, encoder, maker, recall_rng.sample(core_list, 100))
    tail_recall = definition_recall(model, encoder, maker, recall_rng.sample(tail_list, 100))
    log(f"exact definitions: core {core_recall:.0%}, other training words {tail_recall:.0%}")
    routing = routing_stats(model, heldout)
    answers = greedy_answers(model, encoder, SAMPLE_QUESTIONS)
    for question, answer in zip(SAMPLE_QUESTIONS, answers, strict=True):
        log(f"Q: {question}\n    A: {answer}")

    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) as scratch:
        staging = Path(scratch)
        model.config.output_router_logits = False
        model.save_pretrained(staging)  # config.json, generation_config.json, model.safetensors
        (staging / "tokenizer.model").write_bytes(model_proto)
        weights_bytes = (staging / "model.safetensors").stat().st_size
        # The figures of scripts/eval_demo.py, through the engine on the files about to ship.
        words = eval_demo.evaluate(
            staging, eval_demo.Lexicon.from_wordnet(args.wordnet_dir), args.wordnet_dir
        )
        log(
            f"real words {words['real_word_share']:.2%} of {words['answer_words']} answer words; correct "
            f"definitions: held-out {words['heldout_correct_definitions']:.0%}, core "
            f"{words['core_correct_definitions']:.0%}"
        )
        evaluation = {
            "heldout_file": "tests/data/demo_heldout.jsonl",
            "heldout_chats": len(heldout),
            "heldout_tokens": count,
            "heldout_loss": round(heldout_loss, 6),
            "heldout_perplexity": round(math.exp(heldout_loss), 4),
            "train_chats": len(train_sample),
            "train_loss": round(train_nll / train_count, 6),
            "core_words": len(core),
            "core_train_loss": round(core_nll / core_count, 6),
            "core_definition_recall": core_recall,
            "other_definition_recall": tail_recall,
            "loss_definition": "mean NLL (nats) of assistant tokens and their </s> given the preceding "
            "tokens, float32, summed over all chats then divided by the token count",
            "routing": routing,
            "words": {k: v for k, v in words.items() if k != "answers"},
            "params_total": total,
            "params_active": active,
            "train_minutes": round(train_minutes, 2),
            "train_cpu_minutes": round(train_cpu_minutes, 2),
            "steps": args.steps,
            "seed": args.seed,
        }
        facts = {
            "shape": dataclasses.asdict(shape),
            "curve": curve,
            "answers": answers,
            "weights_bytes": weights_bytes,
            "params_total": total,
            "params_active": active,
            "word_count": len(maker.words),
            "heldout_word_count": len(heldout_words),
            "chats_per_epoch": epoch_sizes[0][0],
            "tokens_per_epoch": epoch_sizes[0][1],
            "template_check": template_check,
            "lr": args.lr,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "epochs": len(epoch_sizes),
            "seed": args.seed,
            "threads": args.threads,
            "whole_word_answers": args.whole_word_answers,
            "mask_split_words": args.mask_split_words,
            "echo_headword": args.echo_headword,
            "cpu": _cpu_name(),
            "train_minutes": train_minutes,
            "train_cpu_minutes": train_cpu_minutes,
            "total_minutes": (time.perf_counter() - started) / 60,
            "command": "python scripts/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        # eval.json: what the tests read, plus everything the model card is made from, so the card
        # can be rewritten (--card-only) without training again.
        evaluation["training"] = facts
        (staging / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        (staging / "MODEL_CARD.md").write_text(model_card({**facts, "eval": evaluation}))
        total_bytes = sum(p.stat().st_size for p in staging.iterdir())
        if total_bytes > SIZE_LIMIT_BYTES:
            raise SystemExit(f"demo model is {total_bytes} bytes, over the {SIZE_LIMIT_BYTES} limit")
        args.out.mkdir(parents=True, exist_ok=True)
        for file in sorted(staging.iterdir()):
            shutil.copyfile(file, args.out / f".{file.name}.new")
            os.replace(args.out / f".{file.name}.new", args.out / file.name)
        log(f"wrote {args.out} ({total_bytes / 1e6:.2f} MB)")

    heldout_jsonl = "".join(json.dumps(chat.as_json()) + "\n" for chat in heldout_chats)
    write_atomic(args.tests_data / "demo_heldout.jsonl", heldout_jsonl.encode())
    words = maker.vocabulary(train_words)
    word_bytes = gzip.compress("\n".join(words).encode() + b"\n", mtime=0)
    write_atomic(args.tests_data / "demo_words.txt.gz", word_bytes)
    log(
        f"wrote {args.tests_data}/demo_heldout.jsonl ({len(heldout_chats)} chats), demo_words.txt.gz "
        f"({len(words)} words)"
    )
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
