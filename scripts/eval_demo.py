"""Does the bundled demo answer in real words? Greedy answers through the engine, scored on WordNet.

    python scripts/eval_demo.py --model assets/demo [--json OUT.json] [--write-data]

Three figures, all through mixtral_chat's own Engine (greedy, as `mixtral-chat ask` runs it):

- real-word share: the answers to 100 fixed "Define X." / "What is a X?" prompts about held-out
  words (tests/data/demo_define_heldout.jsonl; never a training headword) split into lowercase
  alphabetic tokens (`[a-z]+` on the lowercased answer: "one's" -> one, s; "x-ray" -> x, ray), and
  the share of those tokens that are real words. Real: a single-word lemma of WordNet 3.0's index
  files (hyphenated lemmas give their parts), an inflected form from WordNet's exception lists
  (*.exc), a form that WordNet's morphy detachment rules or the suffix rules below reduce to such a
  lemma, or one of FUNCTION_WORDS (WordNet holds only nouns, verbs, adjectives and adverbs, so "the",
  "of", "which" are not in it), or a name of the demo's fixed replies (REPLY_NAMES).
- correct definitions: an answer is correct when it holds at least half of the gloss's content
  words (both sides lowercased, reduced to their lemma by the same rules, FUNCTION_WORDS and the
  headword left out); measured on 100 seeded core (most-trained) words and on the held-out prompts.
- held-out loss, as eval.json defines it: mean NLL of the assistant tokens and their </s> over the
  300 held-out chats (tests/data/demo_heldout.jsonl), float32.

--write-data (re)writes the prompt file and tests/data/demo_lexicon.txt.gz (the real-word list, so
tests score answers without WordNet installed). Needs WordNet (Debian `wordnet-base`) for the
prompts and the lexicon; with the shipped files it needs neither.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_data  # sibling module: scripts/ is not a package

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DATA = REPO_ROOT / "tests" / "data"
PROMPTS_FILE = TESTS_DATA / "demo_define_heldout.jsonl"
LEXICON_FILE = TESTS_DATA / "demo_lexicon.txt.gz"
HELDOUT_CHATS_FILE = TESTS_DATA / "demo_heldout.jsonl"
PROMPT_COUNT = 100
PROMPT_SEED = 20261206
MAX_ANSWER_TOKENS = 80
ANSWER_WORD = re.compile(r"[a-z]+")
# A definition is correct when the answer holds at least this share of the gloss's content words.
CORRECT_OVERLAP = 0.5

# Closed-class English words (articles, pronouns, prepositions, conjunctions, auxiliaries, a few
# quantifiers): WordNet has only open-class words, and these are real words of any answer.
_FUNCTION_WORDS_TEXT = """
    a an the this that these those some any each every either neither no none all both half
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
    it its itself we us our ours ourselves they them their theirs themselves one ones oneself
    who whom whose which what whatever whichever whoever where when why how whether
    and or nor but yet so because although though while whereas if unless until than as
    of in on at by for with without within into onto upon from to toward towards through throughout
    about above below over under between among amongst against along across around behind beyond
    beside besides near during before after since via per except despite like unlike off out up down
    am is are was were be been being do does did done doing have has had having
    can could may might must shall should will would ought not
    such other another more most less least many much few several own same
    there here then thus hence also too very only just even ever never often
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_TEXT.split())
# The names in the demo's fixed replies about itself ("a tiny Mixtral trained on the WordNet dictionary").
REPLY_NAMES = frozenset({"mixtral", "wordnet"})
# WordNet's morphy detachment rules (morph.c, all parts of speech), then the usual English suffix
# rules morphy leaves to its exception lists: -ly adverbs, a doubled final consonant.
MORPHY_RULES = (
    ("s", ""),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
    ("es", "e"),
    ("es", ""),
    ("ed", "e"),
    ("ed", ""),
    ("ing", "e"),
    ("ing", ""),
    ("er", ""),
    ("est", ""),
    ("er", "e"),
    ("est", "e"),
)
SUFFIX_RULES = (("ly", ""), ("ily", "y"), ("ically", "ic"), ("ally", "al"), ("ness", ""), ("iness", "y"))
DOUBLED_SUFFIXES = ("ed", "ing", "er", "est")  # stopped -> stop, bigger -> big


@dataclass(frozen=True)
class Lexicon:
    """The real-word list: WordNet lemmas, exception-list forms, FUNCTION_WORDS; plus suffix rules."""

    words: frozenset[str]

    @classmethod
    def from_wordnet(cls, wordnet_dir: Path = demo_data.DEFAULT_WORDNET_DIR) -> Lexicon:
        words: set[str] = set(FUNCTION_WORDS | REPLY_NAMES)
        for name in demo_data.POS_FILES.values():
            with (wordnet_dir / f"index.{name}").open(encoding="latin-1") as lines:
                for line in lines:
                    if line.startswith("  "):  # the license header
                        continue
                    lemma = line.split(" ", 1)[0]
                    if "_" not in lemma:
                        words.update(part for part in lemma.split("-") if part.isalpha())
            with (wordnet_dir / f"{name}.exc").open(encoding="latin-1") as lines:
                for line in lines:
                    form = line.split()[0]
                    if form.isalpha():
                        words.add(form)
        return cls(frozenset(words))

    @classmethod
    def from_file(cls, path: Path = LEXICON_FILE) -> Lexicon:
        return cls(frozenset(gzip.decompress(path.read_bytes()).decode().split()))

    def to_bytes(self) -> bytes:
        return gzip.compress("\n".join(sorted(self.words)).encode() + b"\n", mtime=0)

    def lemma(self, word: str) -> str | None:
        """The word itself if listed, else the first listed base form the rules give, else None."""
        if word in self.words:
            return word
        for suffix, ending in (*MORPHY_RULES, *SUFFIX_RULES):
            if word.endswith(suffix) and len(word) > len(suffix):
                base = word[: -len(suffix)] + ending
                if base in self.words:
                    return base
        for suffix in DOUBLED_SUFFIXES:
            stem = word[: -len(suffix)]
            if word.endswith(suffix) and len(stem) >= 3 and stem[-1] == stem[-2] and stem[:-1] in self.words:
                return stem[:-1]
        return None

    def is_real(self, word: str) -> bool:
        return self.lemma(word) is not None


def answer_words(text: str) -> list[str]:
    return ANSWER_WORD.findall(text.lower())


def real_word_share(lexicon: Lexicon, answers: Iterable[str]) -> tuple[float, int, list[str]]:
    """(share of real words, word count, the words that are not real) over all the answers."""
    words = [w for answer in answers for w in answer_words(answer)]
    unreal = [w for w in words if not lexicon.is_real(w)]
    return (1 - len(unreal) / len(words)) if words else 0.0, len(words), unreal


def content_lemmas(lexicon: Lexicon, text: str, headword: str) -> set[str]:
    lemmas = {lexicon.lemma(w) or w for w in answer_words(text) if w not in FUNCTION_WORDS}
    return lemmas - {headword, lexicon.lemma(headword)} - FUNCTION_WORDS


def definition_overlap(lexicon: Lexicon, answer: str, gloss: str, headword: str) -> float:
    """Share of the gloss's content lemmas that the answer holds."""
    expected = content_lemmas(lexicon, gloss, headword)
    return len(expected & content_lemmas(lexicon, answer, headword)) / len(expected) if expected else 0.0


# --------------------------------------------------------------------------- prompts


def define_prompt(word: str, pos: str, index: int) -> str:
    """Every other noun is asked "What is a X?", the rest "Define X." (both trained phrasings)."""
    if pos == "n" and index % 2:
        return f"What is {'an' if word[0] in 'aeiou' else 'a'} {word}?"
    return f"Define {word}."


def make_prompts(
    maker: demo_data.ChatMaker, words: Sequence[str], count: int, seed: int
) -> list[dict[str, str]]:
    chosen = sorted(random.Random(seed).sample(sorted(words), count))
    rows = []
    for index, word in enumerate(chosen):
        entry = maker.primary[word]
        rows.append(
            {
                "word": word,
                "pos": entry.pos,
                "prompt": define_prompt(word, entry.pos, index),
                "gloss": entry.synsets[0].definition,
            }
        )
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_data(wordnet_dir: Path, tests_data: Path) -> dict[str, Any]:
    """The held-out prompts and the lexicon, from WordNet; also how unseen the prompt words are."""
    from train_demo import write_atomic

    entries, table = demo_data.load_wordnet(wordnet_dir)
    maker = demo_data.ChatMaker(entries, table)
    train_words, heldout_words = demo_data.split_words(maker)
    prompts = make_prompts(maker, heldout_words, PROMPT_COUNT, PROMPT_SEED)
    write_atomic(tests_data / PROMPTS_FILE.name, "".join(json.dumps(p) + "\n" for p in prompts).encode())
    lexicon = Lexicon.from_wordnet(wordnet_dir)
    write_atomic(tests_data / LEXICON_FILE.name, lexicon.to_bytes())
    training_text = set(maker.vocabulary(train_words))
    unseen = [p["word"] for p in prompts if p["word"] not in training_text]
    return {
        "prompt_words": len(prompts),
        "lexicon_words": len(lexicon.words),
        "never_in_training_text": len(unseen),
    }


def core_prompts(wordnet_dir: Path, count: int, seed: int) -> list[dict[str, str]]:
    """ "Define X." for `count` seeded core words (the most trained ones), with their glosses."""
    entries, table = demo_data.load_wordnet(wordnet_dir)
    maker = demo_data.ChatMaker(entries, table)
    train_words, _ = demo_data.split_words(maker)
    core = sorted(demo_data.core_words(train_words, demo_data.semcor_counts(wordnet_dir)))
    chosen = sorted(random.Random(seed).sample(core, count))
    return [
        {
            "word": w,
            "pos": maker.primary[w].pos,
            "prompt": f"Define {w}.",
            "gloss": maker.primary[w].synsets[0].definition,
        }
        for w in chosen
    ]


# --------------------------------------------------------------------------- measuring


def greedy_answers(engine: Any, prompts: Sequence[str], max_tokens: int = MAX_ANSWER_TOKENS) -> list[str]:
    """The engine's greedy answers (GenerationConfig's defaults: temperature 0), as `ask` gives them."""
    from mixtral_chat.engine.options import GenerationConfig

    config = GenerationConfig(max_tokens=max_tokens)
    return ["".join(engine.chat([{"role": "user", "content": p}], config)) for p in prompts]


def heldout_loss(model_dir: Path, chats_file: Path = HELDOUT_CHATS_FILE) -> tuple[float, int, float]:
    """eval.json's held-out loss through the engine's model: mean NLL of reply tokens + </s>; also
    nats per chat, which compares models with different tokenizers (per token does not)."""
    import torch

    from mixtral_chat.engine.tokenizer import Tokenizer
    from mixtral_chat.engine.weights import load_model

    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    model = load_model(model_dir, device="cpu", dtype=torch.float32)
    total, count = 0.0, 0
    rows = read_jsonl(chats_file)
    for row in rows:
        chat = row["messages"]
        prompt = tokenizer.encode_chat(chat[:1])
        ids = [*prompt, *tokenizer.encode(chat[1]["content"]), tokenizer.eos_id]
        model.setup_cache(len(ids), batch=1)
        with torch.inference_mode():
            logits = model(torch.tensor([ids]), torch.arange(len(ids)))[0]  # [S, V]
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1].double(), dim=-1)  # [R, V]
        targets = torch.tensor(ids[len(prompt) :])  # [R]
        total -= float(logprobs.gather(-1, targets[:, None]).sum())
        count += len(targets)
    return total / count, count, total / len(rows)


def evaluate(
    model_dir: Path, lexicon: Lexicon, wordnet_dir: Path | None, heldout: Path = HELDOUT_CHATS_FILE
) -> dict[str, Any]:
    from mixtral_chat.engine.options import LoadOptions
    from mixtral_chat.engine.runtime import Engine

    started = time.process_time()
    engine = Engine.load(model_dir, LoadOptions(device="cpu", dtype="float32"))
    prompts = read_jsonl(PROMPTS_FILE)
    answers = greedy_answers(engine, [p["prompt"] for p in prompts])
    share, word_count, unreal = real_word_share(lexicon, answers)
    overlaps = [
        definition_overlap(lexicon, a, p["gloss"], p["word"]) for a, p in zip(answers, prompts, strict=True)
    ]
    result: dict[str, Any] = {
        "prompts_file": str(PROMPTS_FILE.relative_to(REPO_ROOT)),
        "prompts": len(prompts),
        "answer_words": word_count,
        "real_word_share": round(share, 4),
        "not_real": sorted(set(unreal)),
        "heldout_correct_definitions": sum(o >= CORRECT_OVERLAP for o in overlaps) / len(prompts),
        "heldout_mean_gloss_overlap": round(sum(overlaps) / len(overlaps), 4),
        "answers": [{"prompt": p["prompt"], "answer": a} for p, a in zip(prompts, answers, strict=True)],
    }
    if wordnet_dir is not None:
        core = core_prompts(wordnet_dir, PROMPT_COUNT, PROMPT_SEED)
        core_answers = greedy_answers(engine, [p["prompt"] for p in core])
        core_overlaps = [
            definition_overlap(lexicon, a, p["gloss"], p["word"])
            for a, p in zip(core_answers, core, strict=True)
        ]
        result["core_correct_definitions"] = sum(o >= CORRECT_OVERLAP for o in core_overlaps) / len(core)
        result["core_mean_gloss_overlap"] = round(sum(core_overlaps) / len(core_overlaps), 4)
        result["core_real_word_share"] = round(real_word_share(lexicon, core_answers)[0], 4)
    engine.close()
    loss, tokens, per_chat = heldout_loss(model_dir, heldout)
    result["heldout_file"] = str(heldout)
    result["heldout_loss"] = round(loss, 6)
    result["heldout_tokens"] = tokens
    result["heldout_nats_per_chat"] = round(per_chat, 3)
    result["cpu_seconds"] = round(time.process_time() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "assets" / "demo")
    parser.add_argument("--wordnet-dir", type=Path, default=demo_data.DEFAULT_WORDNET_DIR)
    parser.add_argument("--json", type=Path, help="write the figures and every answer here")
    parser.add_argument("--write-data", action="store_true", help="rewrite the prompt and lexicon files")
    parser.add_argument("--heldout", type=Path, default=HELDOUT_CHATS_FILE, help="the held-out chats")
    parser.add_argument(
        "--record",
        action="store_true",
        help="store the figures in MODEL/eval.json and rewrite its MODEL_CARD.md",
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    has_wordnet = (args.wordnet_dir / "data.noun").exists()
    if args.write_data:
        print(json.dumps(write_data(args.wordnet_dir, TESTS_DATA)))
    lexicon = Lexicon.from_wordnet(args.wordnet_dir) if has_wordnet else Lexicon.from_file()
    result = evaluate(args.model, lexicon, args.wordnet_dir if has_wordnet else None, args.heldout)
    summary = {k: v for k, v in result.items() if k not in ("answers",)}
    print(json.dumps(summary, indent=1))
    for row in result["answers"][:8]:
        print(f"Q: {row['prompt']}\n   A: {row['answer']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.record:
        from train_demo import model_card, write_atomic

        recorded = json.loads((args.model / "eval.json").read_text())
        recorded["words"] = {k: v for k, v in summary.items() if k != "heldout_file"}
        write_atomic(args.model / "eval.json", (json.dumps(recorded, indent=2) + "\n").encode())
        card = model_card({**recorded["training"], "eval": recorded})
        write_atomic(args.model / "MODEL_CARD.md", card.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
