"""WordNet 3.0 -> pocket-dictionary chat turns for the bundled demo model.

Reads the Princeton WordNet 3.0 database files as Debian's `wordnet-base` package installs them
(`/usr/share/wordnet/{index,data}.{noun,verb,adj,adv}`; format: wndb(5WN)) and turns them into
single-turn chats: "What is a lighthouse?" -> "A lighthouse is a tower with a light that gives
warning of shoals to passing ships."

Used by `scripts/train_demo.py`; no torch here. WordNet 3.0 license: permissive (use, copy,
modify and distribute for any purpose, with the copyright notice kept); see the model card.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
# Tie-break when a word's parts of speech have equal SemCor counts: nouns are what people ask most.
POS_ORDER = ("n", "v", "a", "r")

# A dictionary headword: lowercase letters, at most one inner hyphen ("short-lived").
HEADWORD = re.compile(r"^[a-z]+(?:-[a-z]+)?$")
WORD_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)?")
# A word is "common" if SemCor tagged one of its senses, or other glosses mention it this often.
MIN_GLOSS_MENTIONS = 5
MAX_DEFINITION_WORDS = 30
MAX_EXAMPLE_WORDS = 25
# Core words: the most frequent in SemCor (cntlist.rev), plus PROTECTED_WORDS. A small model cannot
# learn 20,000 definitions in the time budget; it sees each core word CORE_REPEATS times per epoch
# (with fresh phrasings) and each other word with probability TAIL_RATE, so the words people ask
# about most come out right while the rest still teach the form of an answer.
CORE_SIZE = 3000
CORE_REPEATS = 4
TAIL_RATE = 0.5
# Held-out words: a fixed hash split, independent of the training seed, so the held-out set
# shipped with the tests never changes when the model is retrained with another seed.
HELDOUT_BUCKETS = 50
# Words used in the README, the model card and the tests: always trained on, never held out.
PROTECTED_WORDS = frozenset(
    {"lighthouse", "ephemeral", "volcano", "run", "happy", "piano", "bicycle", "dog", "quickly", "river"}
)


@dataclass
class Synset:
    offset: int
    pos: str  # n, v, a (satellites "s" folded into "a"), r
    lemmas: list[str]  # as written in WordNet, "_" -> " ", adjective markers such as "(a)" removed
    definition: str
    examples: list[str]
    # lexical antonym pointers: source word number (1-based) -> [(target offset, pos, target word number)]
    antonyms: dict[int, list[tuple[int, str, int]]] = field(default_factory=dict)


@dataclass
class Entry:
    """One headword in one part of speech, with its senses in WordNet's frequency order."""

    word: str
    pos: str
    synsets: list[Synset]
    tagged_senses: int


@dataclass(frozen=True)
class Chat:
    """A conversation for training: alternating user/assistant messages, ending with the assistant."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    kind: str  # definition, example, synonym, antonym, about, multi

    def as_json(self) -> dict:
        return {"kind": self.kind, "messages": [{"role": r, "content": c} for r, c in self.messages]}


def _clean_lemma(raw: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", raw).replace("_", " ")


def _clean_definition(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip().rstrip(";:, ").strip()
    # Drop a leading usage label such as "(biology)" or "(of persons)": it reads badly after "is".
    text = re.sub(r"^\([^)]*\)\s*", "", text)
    if len(text.split()) > MAX_DEFINITION_WORDS and ";" in text:
        text = text.split(";")[0].strip()
    return text.rstrip(".;:, ")


def parse_data_file(path: Path, pos: str) -> dict[int, Synset]:
    synsets: dict[int, Synset] = {}
    with path.open(encoding="latin-1") as lines:
        for line in lines:
            if line.startswith("  "):  # the license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset = int(fields[0])
            word_count = int(fields[3], 16)
            lemmas = [_clean_lemma(fields[4 + 2 * i]) for i in range(word_count)]
            cursor = 4 + 2 * word_count
            pointer_count = int(fields[cursor])
            antonyms: dict[int, list[tuple[int, str, int]]] = {}
            for i in range(pointer_count):
                symbol, target, target_pos, source_target = fields[cursor + 1 + 4 * i : cursor + 5 + 4 * i]
                if symbol == "!":
                    source, target_word = int(source_target[:2], 16), int(source_target[2:], 16)
                    target_pos = "a" if target_pos == "s" else target_pos
                    antonyms.setdefault(source, []).append((int(target), target_pos, target_word))
            examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss)]
            definition = _clean_definition(gloss.split('"')[0])
            synsets[offset] = Synset(offset, pos, lemmas, definition, examples, antonyms)
    return synsets


SynsetTable = dict[tuple[str, int], Synset]  # (pos, byte offset) -> synset


def load_wordnet(wordnet_dir: Path = DEFAULT_WORDNET_DIR) -> tuple[list[Entry], SynsetTable]:
    """All common single-word headwords of WordNet with their senses; also the synset table."""
    if not (wordnet_dir / "data.noun").exists():
        raise SystemExit(
            f"WordNet not found in {wordnet_dir}: install it with `apt-get install wordnet-base` "
            "or pass --wordnet-dir"
        )
    table: dict[tuple[str, int], Synset] = {}
    for pos, name in POS_FILES.items():
        for offset, synset in parse_data_file(wordnet_dir / f"data.{name}", pos).items():
            table[(pos, offset)] = synset

    mentions: Counter[str] = Counter()
    for synset in table.values():
        mentions.update(WORD_TOKEN.findall(synset.definition.lower()))
        for example in synset.examples:
            mentions.update(WORD_TOKEN.findall(example.lower()))

    entries: list[Entry] = []
    for pos, name in POS_FILES.items():
        with (wordnet_dir / f"index.{name}").open(encoding="latin-1") as lines:
            for line in lines:
                if line.startswith("  "):
                    continue
                fields = line.split()
                word = fields[0]
                if not HEADWORD.match(word):
                    continue
                synset_count, pointer_count = int(fields[2]), int(fields[3])
                tagged = int(fields[5 + pointer_count])
                offsets = [int(o) for o in fields[6 + pointer_count : 6 + pointer_count + synset_count]]
                # The index is lowercased: keep only senses that spell the word in lowercase, so
                # "he" is not answered with helium's "He" nor "crete" with the island.
                synsets = [
                    table[(pos, o)]
                    for o in offsets
                    if table[(pos, o)].definition and word in table[(pos, o)].lemmas
                ]
                if synsets:
                    entries.append(Entry(word, pos, synsets, tagged))

    # Plural-only nouns ("nerves", "glasses") read badly as "A nerves is ...": drop those whose
    # singular is an entry of its own.
    nouns = {e.word for e in entries if e.pos == "n"}
    entries = [
        e
        for e in entries
        if not (e.pos == "n" and e.word.endswith("s") and (e.word[:-1] in nouns or e.word[:-2] in nouns))
    ]
    tagged_total: Counter[str] = Counter()
    for entry in entries:
        tagged_total[entry.word] += entry.tagged_senses
    common = {
        e.word
        for e in entries
        if tagged_total[e.word] > 0 or mentions[e.word] >= MIN_GLOSS_MENTIONS or e.word in PROTECTED_WORDS
    }
    return [e for e in entries if e.word in common], table


def is_heldout(word: str) -> bool:
    if word in PROTECTED_WORDS:
        return False
    digest = hashlib.sha256(word.encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELDOUT_BUCKETS == 0


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _word_in(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}(?:s|es|d|ed|ing|ly|er|est)?\b", text, re.IGNORECASE) is not None


# Question phrasings. `{w}` is the word, `{a}` its article. Generic ones go to a word's primary
# part of speech only, so "Define run." always has one answer.
GENERIC_QUESTIONS = (
    "Define {w}.",
    "What does {w} mean?",
    "What is the meaning of {w}?",
    "What does the word {w} mean?",
    "What is the definition of {w}?",
    "Explain the word {w}.",
)
POS_QUESTIONS = {
    "n": ("What is {a} {w}?", "What is {a} {w}?", "What's {a} {w}?", "Tell me what {a} {w} is."),
    "v": ("What does it mean to {w}?", "What does the verb {w} mean?"),
    "a": ("What does it mean to be {w}?", "What does the adjective {w} mean?"),
    "r": ("What does the adverb {w} mean?",),
}
EXAMPLE_QUESTIONS = (
    "Use {w} in a sentence.",
    "Use '{w}' in a sentence.",
    "Use the word {w} in a sentence.",
    "Give me an example sentence with {w}.",
    "How do you use {w} in a sentence?",
    "Can you use {w} in a sentence?",
)
SYNONYM_QUESTIONS = (
    "What is another word for {w}?",
    "Give me a synonym for {w}.",
    "What is a synonym of {w}?",
)
ANTONYM_QUESTIONS = (
    "What is the opposite of {w}?",
    "What is an antonym of {w}?",
    "Give me an antonym for {w}.",
)
# About the demo itself, so the first thing a new user types gets a useful answer.
ABOUT_REPLY = (
    "I am the small demo model that comes with mixtral-chat: a tiny Mixtral trained on the WordNet "
    "dictionary. Ask me what a word means, for example: What is a lighthouse?"
)
ABOUT_CHATS = (
    (
        ("Hello", "Hello!", "Hi", "Hi!", "Hi there", "Hey", "Good morning", "Good evening"),
        "Hello! " + ABOUT_REPLY,
    ),
    (
        (
            "Who are you?",
            "What are you?",
            "What can you do?",
            "Help",
            "What is this?",
            "Are you Mixtral?",
            "What model are you?",
        ),
        ABOUT_REPLY + " For real answers, download the full Mixtral model.",
    ),
    (("Thank you", "Thanks!", "Thanks", "Thank you very much."), "You are welcome."),
    (("Goodbye", "Bye", "Bye!"), "Goodbye!"),
)


def definition_answer(
    word: str, pos: str, definition: str, lowercase_headword: bool = False, echo_headword: bool = True
) -> str:
    """lowercase_headword: "The adjective abashed means ..." instead of "Abashed means ...", so a
    model copies the pieces the user typed instead of respelling the word capitalised.

    echo_headword=False: "It is a tower ...", "It means to ...": the answer does not repeat the
    word. A model this small miscopies a word it never saw ("Define technician." -> "A techniac
    is ..."); not echoing it leaves only the gloss to write."""
    if not echo_headword:
        return {"n": f"It is {definition}.", "v": f"It means to {definition}."}.get(
            pos, f"It means {definition}."
        )
    if pos == "n":
        return f"{_article(word).capitalize()} {word} is {definition}."
    if pos == "v":
        return f"To {word} is to {definition}."
    if lowercase_headword:
        return f"The {POS_NAMES[pos]} {word} means {definition}."
    return f"{word.capitalize()} means {definition}."


class ChatMaker:
    """Turns entries into chats; every choice comes from the rng it is given."""

    def __init__(
        self,
        entries: list[Entry],
        table: dict[tuple[str, int], Synset],
        lowercase_headword: bool = False,
        echo_headword: bool = True,
    ) -> None:
        self.lowercase_headword = lowercase_headword
        self.echo_headword = echo_headword
        by_word: dict[str, list[Entry]] = {}
        for entry in entries:
            by_word.setdefault(entry.word, []).append(entry)
        self.words = sorted(by_word)
        self.primary: dict[str, Entry] = {}
        self.secondary: dict[str, list[Entry]] = {}
        self.examples: dict[str, list[str]] = {}
        self.synonyms: dict[str, list[str]] = {}
        self.antonyms: dict[str, list[str]] = {}
        for word, word_entries in by_word.items():
            ranked = sorted(word_entries, key=lambda e: (-e.tagged_senses, POS_ORDER.index(e.pos)))
            self.primary[word] = ranked[0]
            # A second part of speech only when it is in real use (SemCor-tagged).
            self.secondary[word] = [e for e in ranked[1:] if e.tagged_senses > 0]
            examples = [
                x
                for e in ranked
                for s in e.synsets
                for x in s.examples
                if _word_in(word, x) and len(x.split()) <= MAX_EXAMPLE_WORDS
            ]
            self.examples[word] = list(dict.fromkeys(examples))[:3]
            first = ranked[0].synsets[0]
            self.synonyms[word] = [
                lemma for lemma in first.lemmas if lemma != word and HEADWORD.match(lemma)
            ][:2]
            self.antonyms[word] = self._antonyms(word, ranked[0], table)

    @staticmethod
    def _antonyms(word: str, entry: Entry, table: dict[tuple[str, int], Synset]) -> list[str]:
        found: list[str] = []
        for synset in entry.synsets[:2]:
            if word not in synset.lemmas:
                continue
            number = synset.lemmas.index(word) + 1
            for target_offset, target_pos, target_word in synset.antonyms.get(number, []):
                target = table.get((target_pos, target_offset))
                if target and 0 < target_word <= len(target.lemmas):
                    lemma = target.lemmas[target_word - 1]
                    if HEADWORD.match(lemma) and lemma not in found:
                        found.append(lemma)
        return found[:1]

    def definition(self, word: str, entry: Entry) -> str:
        """The answer to "Define word." for this part of speech (its first sense)."""
        return definition_answer(
            word, entry.pos, entry.synsets[0].definition, self.lowercase_headword, self.echo_headword
        )

    def vocabulary(self, words: list[str]) -> list[str]:
        """Every word the training chats about `words` can contain (questions and answers)."""
        texts: list[str] = [
            t
            for group in (GENERIC_QUESTIONS, EXAMPLE_QUESTIONS, SYNONYM_QUESTIONS, ANTONYM_QUESTIONS)
            for t in group
        ]
        texts += [t for group in POS_QUESTIONS.values() for t in group]
        texts += [q for questions, reply in ABOUT_CHATS for q in (*questions, reply)]
        texts += ["to is means another word for the opposite of a an"]
        for word in words:
            texts.append(word)
            for entry in (self.primary[word], *self.secondary[word]):
                texts.append(entry.synsets[0].definition)
            texts += self.examples[word] + self.synonyms[word] + self.antonyms[word]
        return sorted({w for text in texts for w in WORD_TOKEN.findall(text.lower())})

    def word_chats(self, word: str, rng: random.Random, every_kind: bool = False) -> Iterator[Chat]:
        """One epoch's chats about one word (every_kind: each available kind, for the held-out set)."""
        primary = self.primary[word]

        def ask(templates: tuple[str, ...]) -> str:
            question = rng.choice(templates).format(w=word, a=_article(word))
            # Users type sloppily: a few questions lose their capital or final punctuation.
            if rng.random() < 0.08:
                question = question[0].lower() + question[1:]
            if rng.random() < 0.08:
                question = question.rstrip("?.")
            return question

        templates = GENERIC_QUESTIONS + POS_QUESTIONS[primary.pos]
        answer = self.definition(word, primary)
        yield Chat((("user", ask(templates)), ("assistant", answer)), "definition")
        for entry in self.secondary[word]:
            answer = self.definition(word, entry)
            yield Chat((("user", ask(POS_QUESTIONS[entry.pos])), ("assistant", answer)), "definition")
        if self.examples[word] and (every_kind or rng.random() < 0.7):
            answer = _sentence(rng.choice(self.examples[word]))
            yield Chat((("user", ask(EXAMPLE_QUESTIONS)), ("assistant", answer)), "example")
        if self.synonyms[word] and (every_kind or rng.random() < 0.4):
            named = word if self.echo_headword else "it"
            answer = f"Another word for {named} is {' or '.join(self.synonyms[word])}."
            yield Chat((("user", ask(SYNONYM_QUESTIONS)), ("assistant", answer)), "synonym")
        if self.antonyms[word] and (every_kind or rng.random() < 0.8):
            named = word if self.echo_headword else "it"
            answer = f"The opposite of {named} is {self.antonyms[word][0]}."
            yield Chat((("user", ask(ANTONYM_QUESTIONS)), ("assistant", answer)), "antonym")

    def epoch(
        self,
        words: list[str],
        rng: random.Random,
        about_count: int = 150,
        core: frozenset[str] = frozenset(),
    ) -> list[Chat]:
        """One pass over `words`, shuffled, with a few about-the-demo chats and two-turn chats.

        With `core`, core words come CORE_REPEATS times and the others with probability TAIL_RATE.
        """
        chats: list[Chat] = []
        for word in words:
            if not core:
                repeats = 1
            elif word in core:
                repeats = CORE_REPEATS
            else:
                repeats = 1 if rng.random() < TAIL_RATE else 0
            for _ in range(repeats):
                chats.extend(self.word_chats(word, rng))
        for _ in range(about_count):
            questions, reply = rng.choice(ABOUT_CHATS)
            chats.append(Chat((("user", rng.choice(questions)), ("assistant", reply)), "about"))
        rng.shuffle(chats)
        # Chat apps send the history: ~8% become two-turn chats so a second question is answered too.
        merged: list[Chat] = []
        index = 0
        while index < len(chats):
            if index + 1 < len(chats) and rng.random() < 0.08:
                merged.append(Chat(chats[index].messages + chats[index + 1].messages, "multi"))
                index += 2
            else:
                merged.append(chats[index])
                index += 1
        return merged


def semcor_counts(wordnet_dir: Path = DEFAULT_WORDNET_DIR) -> Counter[str]:
    """How often each lemma was tagged in SemCor (cntlist.rev: `sense_key sense_number count`)."""
    counts: Counter[str] = Counter()
    with (wordnet_dir / "cntlist.rev").open(encoding="latin-1") as lines:
        for line in lines:
            sense_key, _, count = line.split()
            counts[sense_key.split("%")[0]] += int(count)
    return counts


def core_words(train_words: list[str], counts: Counter[str]) -> frozenset[str]:
    ranked = sorted(train_words, key=lambda w: (-counts[w], w))[:CORE_SIZE]
    return frozenset(ranked) | (PROTECTED_WORDS & set(train_words))


def split_words(maker: ChatMaker) -> tuple[list[str], list[str]]:
    train = [w for w in maker.words if not is_heldout(w)]
    heldout = [w for w in maker.words if is_heldout(w)]
    return train, heldout


def heldout_chats(maker: ChatMaker, words: list[str], limit: int) -> list[Chat]:
    """The fixed held-out set: every kind of question about held-out words, seeded, capped."""
    rng = random.Random(20240601)
    chats = [chat for word in words for chat in maker.word_chats(word, rng, every_kind=True)]
    rng.shuffle(chats)
    return chats[:limit]
