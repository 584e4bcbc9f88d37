"""Tokenizer tests against the real Mixtral tokenizer and mistral-common v1 as the oracle.

mistral-common ships Mixtral-8x7B-Instruct's `tokenizer.model` as `data/tokenizer.model.v1`; the
tests load it under its checkpoint name `tokenizer.model`, encode a table of conversations with our
`Tokenizer.encode_chat` and compare the ids with `MistralTokenizer.v1().encode_chat_completion`.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mistral_common
import pytest
import sentencepiece
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_chat.engine.errors import MixtralChatError, TokenizerError
from mixtral_chat.engine.tokenizer import StreamingDetokenizer, Tokenizer

REPLACEMENT_CHAR = "\ufffd"
V1_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The checkpoint's file name, so the test also covers a path that is not mistral-common's.
    path = tmp_path_factory.mktemp("mixtral") / "tokenizer.model"
    shutil.copyfile(V1_MODEL, path)
    return path


@pytest.fixture(scope="module")
def tok(model_file: Path) -> Tokenizer:
    return Tokenizer(model_file)


@pytest.fixture(scope="module")
def reference() -> MistralTokenizer:
    return MistralTokenizer.v1()


def reference_ids(reference: MistralTokenizer, messages: list[dict[str, Any]]) -> list[int]:
    return reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def sys_(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def bot(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


CODE = 'def f(x):\n    if x:\n\t\treturn  "a  b"   # two  spaces\n    return None\n'
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "single user": [user("Hello, who are you?")],
    "system + user": [sys_("You are a helpful assistant."), user("Hi")],
    "system + two rounds": [sys_("Be brief."), user("2+2?"), bot("4"), user("And 3+3?")],
    "three rounds": [user("a"), bot("b"), user("c"), bot("d"), user("e"), bot("f"), user("g")],
    "consecutive users": [user("first"), user("second"), user("third")],
    "consecutive users, first empty": [user(""), user("only this")],
    "consecutive users with system": [sys_("S"), user("one"), user("two")],
    "consecutive assistants": [user("q"), bot("part one"), bot("part two"), user("go on")],
    "system between users splits them": [user("a"), sys_("S"), user("b")],
    "two system messages joined": [sys_("Rule one."), sys_("Rule two."), user("hi")],
    "system messages spread out": [sys_("A"), user("x"), bot("y"), user("z"), sys_("B"), user("w")],
    "empty system ignored": [sys_(""), user("hi")],
    "empty user": [user("")],
    "system + empty user": [sys_("S"), user("")],
    "assistant first": [bot("Hello! How can I help?"), user("Tell me a joke")],
    "system then assistant first": [sys_("S"), bot("Hi"), user("Yo")],
    "trailing system after user": [user("hi"), sys_("late system")],
    "leading and trailing spaces": [sys_("  sys  "), user("  hi  "), bot("  answer  "), user(" x ")],
    "double spaces inside": [user("a  b   c    d")],
    "whitespace-only user": [user("   ")],
    "newline-only user": [user("\n")],
    "whitespace-only assistant": [user("a"), bot(" "), user("b")],
    "reply with leading space and newline": [user("q"), bot(" Sure.\n"), user("thanks")],
    "newlines": [sys_("line1\nline2"), user("para one\n\npara two\n"), bot("\nok\n\n"), user("\r\nwin\r\n")],
    "tabs and code": [user(CODE), bot("```python\n" + CODE + "```"), user("explain")],
    "emoji and CJK": [user("你好，世界 😀🎉 مرحبا こんにちは"), bot("👍🏽 好的！"), user("🧑‍💻 ok?")],
    "rare characters (byte fallback)": [user("\u0f3a\U0001f9ec\u2fff\U0010fffd \u00e9\u0301")],
    "INST written literally": [
        user("[INST] nested [/INST] text"),
        bot("I see [INST] and [/INST]."),
        user("[/INST]"),
    ],
    "control tokens written literally": [user("</s><s> <unk> end</s>"), bot("</s>"), user("<s>[INST]")],
    "fullwidth and ligatures": [user("ＡＢＣ ﬁ ① ½ ™")],
    "replacement char in text": [user("bad \ufffd byte")],
    "long message": [user("word " * 300)],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encode_chat_equals_mistral_common_v1(tok: Tokenizer, reference: MistralTokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(messages) == reference_ids(reference, messages)


def test_chat_template_layout(tok: Tokenizer) -> None:
    ids = tok.encode_chat([sys_("S"), user("hi"), bot("yo"), user("ok")])
    pieces = [tok.id_to_piece(i) for i in ids]
    # `<s>[INST] S\n\nhi [/INST] yo</s>[INST] ok [/INST]`, each part with its own dummy "▁".
    assert "".join(pieces) == ("<s>▁[INST]▁S<0x0A><0x0A>hi▁[/INST]▁yo</s>▁[INST]▁ok▁[/INST]")
    assert ids[0] == tok.bos_id == 1
    assert ids.count(tok.eos_id) == 1 and tok.eos_id == 2
    # decode drops only the very first dummy space; the one of "▁[INST]" after "yo" stays.
    assert tok.decode(ids) == "[INST] S\n\nhi [/INST] yo [INST] ok [/INST]"


def test_literal_control_text_is_never_a_control_token(tok: Tokenizer) -> None:
    messages = [user("</s> <s> [INST]"), bot("</s>"), user("</s>")]
    ids = tok.encode_chat(messages)
    assert ids.count(tok.bos_id) == 1  # only the conversation's own <s>
    assert ids.count(tok.eos_id) == 1  # only the </s> after the assistant turn
    assert [tok.id_to_piece(i) for i in tok.encode("</s>")] == ["▁</", "s", ">"]
    assert tok.eos_id not in tok.encode("</s>") and tok.bos_id not in tok.encode("<s>")


def test_count_chat_tokens(tok: Tokenizer) -> None:
    messages = CONVERSATIONS["system + two rounds"]
    assert tok.count_chat_tokens(messages) == len(tok.encode_chat(messages))


def test_encode_decode_basics(tok: Tokenizer) -> None:
    assert tok.vocab_size == 32000
    ids = tok.encode("Hello world")
    assert [tok.id_to_piece(i) for i in ids] == ["▁Hello", "▁world"]
    assert tok.encode("Hello world", bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode(ids) == "Hello world"  # sentencepiece drops the dummy-prefix space
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "Hello world"
    for text in ["  two leading", "tab\tand\nnewline", "😀 你好", CODE, ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == []


def test_decode_accepts_any_int_sequence(tok: Tokenizer) -> None:
    ids = tok.encode("tuple input")
    assert tok.decode(tuple(ids)) == "tuple input"


def test_bad_token_ids_are_clear_errors(tok: Tokenizer) -> None:
    expected = r"^token id 32000 is out of range for this tokenizer \(valid ids are 0\.\.31999\)$"
    with pytest.raises(TokenizerError, match=expected):
        tok.decode([5, 32000])
    with pytest.raises(TokenizerError, match=r"^token id -1 is out of range"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match=r"^token id 40000 is out of range"):
        StreamingDetokenizer(tok).add(40000)
    with pytest.raises(TokenizerError, match=r"^can only encode a string, got bytes$"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# --- invalid conversations ------------------------------------------------------------------------

INVALID: list[tuple[Any, str, bool]] = [
    # (messages, our exact message, whether mistral-common rejects it too)
    ([], "the conversation is empty: it needs at least one user message", True),
    ("hello", "a conversation must be a list of messages, got str", False),
    (["hello"], "message 1 must be an object with 'role' and 'content', got str", False),
    (
        [{"role": "bot", "content": "x"}],
        "message 1 has unknown role 'bot' (expected system, user or assistant)",
        True,
    ),
    (
        [user("x"), {"role": "tool", "content": "{}"}, user("y")],
        "message 2 has unknown role 'tool' (expected system, user or assistant)",
        True,
    ),
    ([{"content": "x"}], "message 1 has unknown role None (expected system, user or assistant)", True),
    ([{"role": "user"}], "message 1 (user) has no 'content'", False),
    ([{"role": "user", "content": None}], "message 1 (user) content must be a string, got NoneType", False),
    (
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "message 1 (user) content must be a string, got list",
        False,
    ),
    (
        [user("hi"), bot("hello")],
        "the conversation must end with a user message (the last message is the assistant's)",
        True,
    ),
    ([bot("hello")], "the conversation has no user message", True),
    ([sys_("only a system prompt")], "the conversation has no user message", False),
    ([user("a"), bot(""), user("b")], "message 2 (assistant) has empty content", True),
    (
        [user("a"), bot("b"), sys_("S"), user("c")],
        "message 3: a system message cannot follow an assistant message",
        True,
    ),
]


@pytest.mark.parametrize(("messages", "message"), [(m, e) for m, e, _ in INVALID])
def test_invalid_conversations_raise_one_line_errors(tok: Tokenizer, messages: Any, message: str) -> None:
    with pytest.raises(TokenizerError) as info:
        tok.encode_chat(messages)
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    assert isinstance(info.value, MixtralChatError)


@pytest.mark.parametrize("messages", [m for m, _, reference_rejects in INVALID if reference_rejects])
def test_mistral_common_rejects_them_too(reference: MistralTokenizer, messages: list[dict[str, Any]]) -> None:
    with pytest.raises(Exception):  # noqa: B017 - pydantic, validator or tokenizer exceptions
        reference_ids(reference, messages)


# --- loading errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError, match=r"^tokenizer file not found: .*nope/tokenizer\.model$"):
        Tokenizer(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    expected = r"^tokenizer path is a directory, expected a tokenizer\.model file: "
    with pytest.raises(TokenizerError, match=expected):
        Tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a sentencepiece model", "truncated", os.urandom(4096)],
    ids=["empty", "text", "truncated", "random"],
)
def test_corrupt_file(tmp_path: Path, content: bytes | str) -> None:
    if content == "truncated":
        content = V1_MODEL.read_bytes()[: V1_MODEL.stat().st_size // 2]
    assert isinstance(content, bytes)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    expected = f"tokenizer file {path} is not a valid sentencepiece model (corrupt or truncated?)"
    with pytest.raises(TokenizerError) as info:
        Tokenizer(path)
    assert str(info.value) == expected


def tokenizer_error_as(uid: int | None, path: Path) -> str:
    """The TokenizerError message for `path`, read by this process or, for root (who can read
    any file), by a forked child that dropped to `uid` first (modules are already imported)."""
    if uid is None:
        with pytest.raises(TokenizerError) as info:
            Tokenizer(path)
        return str(info.value)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only the read and the message
        try:
            os.setgid(uid)
            os.setuid(uid)
            try:
                Tokenizer(path)
                message = "no error"
            except TokenizerError as exc:
                message = str(exc)
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.mark.skipif(os.name != "posix", reason="file modes and fork are POSIX")
def test_unreadable_file() -> None:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mixtral-chat-unreadable-"))
    folder.chmod(0o755)  # others may look inside: only the file's own mode refuses them
    path = folder / "tokenizer.model"
    shutil.copyfile(V1_MODEL, path)
    path.chmod(0)
    try:
        message = tokenizer_error_as(65534 if os.geteuid() == 0 else None, path)  # root: as nobody
        assert message == f"cannot read tokenizer file {path}: Permission denied"
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_read_error(tmp_path: Path) -> None:
    # Reading /proc/self/mem from offset 0 fails with EIO, even for root.
    with pytest.raises(TokenizerError) as info:
        Tokenizer("/proc/self/mem")
    assert str(info.value) == "cannot read tokenizer file /proc/self/mem: Input/output error"


def test_model_without_bos_eos(tmp_path: Path) -> None:
    model = io.BytesIO()
    corpus = ["a tiny corpus for a tiny model", "with a few lines of text"] * 10
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=30,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(TokenizerError) as info:
        Tokenizer(path)
    assert str(info.value) == f"tokenizer file {path} defines no <s>/</s> tokens; it cannot encode chats"


def test_import_does_not_load_torch() -> None:
    code = "import sys, mixtral_chat.engine.tokenizer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- streaming detokenizer ------------------------------------------------------------------------


def stream(tok: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Feed ids one by one, checking the streaming invariants after every step; return the pieces."""
    detok = StreamingDetokenizer(tok)
    pieces: list[str] = []
    emitted = ""
    for count, token_id in enumerate(ids, start=1):
        piece = detok.add(token_id)
        pieces.append(piece)
        emitted += piece
        so_far = tok.decode(ids[:count])
        # Never ahead of the text so far (no half character, no space that decode would drop) ...
        assert so_far.startswith(emitted), (ids[:count], emitted, so_far)
        # ... and never behind it, except for a character that may still be waiting for bytes.
        if not so_far.endswith(REPLACEMENT_CHAR):
            assert emitted == so_far, (ids[:count], emitted, so_far)
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids)
    return pieces


STREAM_TEXTS = [
    "Hello world",
    " Leading space",
    "  two leading spaces, trailing two  ",
    "Sure! Here is the answer:\n\n1. first\n2. second\n",
    CODE,
    "你好，世界！这是一个测试。",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "🧬🧬🧬🧬🧬",  # byte-fallback characters back to back
    "x🧬y🧬🧬z",
    "mixed 中文 and English, ελληνικά, русский, हिन्दी, 한국어",
    "\n\nstarts with newlines",
    "tabs\tand\r\nwindows newlines",
    "[INST] literal [/INST] and </s> text",
    "replacement \ufffd char in the text",
    "\u0f3a\U0001f9ec\u2fff\U0010fffd",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_of_encoded_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert "".join(stream(tok, ids)) == tok.decode(ids) == text


def test_stream_first_piece_has_no_dummy_space(tok: Tokenizer) -> None:
    # The reply after [/INST] starts with "▁Sure": decode drops that space, and so does the stream.
    pieces = stream(tok, tok.encode("Sure, here"))
    assert pieces[0] == "Sure"
    assert "".join(pieces) == "Sure, here"
    # A real leading space is encoded as a separate "▁" and is kept, as decode keeps it.
    assert "".join(stream(tok, tok.encode(" Sure"))) == " Sure"


def test_stream_holds_bytes_until_character_is_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🧬")  # not in the vocabulary: byte fallback
    assert [tok.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0xA7>", "<0xAC>"]
    assert stream(tok, ids) == ["", "", "", "", "🧬", ""]


def test_stream_after_chat_prompt_reply(tok: Tokenizer) -> None:
    # A whole reply as the model writes it: text ids then </s>.
    reply = [*tok.encode("Bonjour ! Ça va ? 😊🧬\n```\n  x = 1\n```"), tok.eos_id]
    assert "".join(stream(tok, reply)) == "Bonjour ! Ça va ? 😊🧬\n```\n  x = 1\n```"


def test_stream_with_control_tokens(tok: Tokenizer) -> None:
    e4, bd, a0 = 3 + 0xE4, 3 + 0xBD, 3 + 0xA0  # the bytes of "你"
    assert "".join(stream(tok, [e4, bd, a0])) == "你"
    ids = [tok.bos_id, *tok.encode("a b"), tok.eos_id, *tok.encode("c"), tok.bos_id, tok.eos_id]
    pieces = stream(tok, ids)
    assert "".join(pieces) == "a b c"
    # A control id inside a byte run splits it: both halves decode as invalid bytes.
    assert "".join(stream(tok, [e4, tok.eos_id, bd, a0, *tok.encode("x")])) == REPLACEMENT_CHAR * 3 + " x"
    # Controls first: the leading-space strip still applies to the first visible piece.
    assert "".join(stream(tok, [tok.bos_id, tok.eos_id, *tok.encode("y z")])) == "y z"


def test_stream_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    byte_ids = list(range(3, 259))  # <0x00>..<0xFF>
    # Valid characters as bytes, plus bytes that make tricky invalid UTF-8: stray continuation
    # bytes, truncated leads, a surrogate (ED A0), overlong (C0), beyond U+10FFFF (F4 90, F5), and
    # EF BF BD, which is U+FFFD itself.
    characters = [c.encode() for c in "é你🧬👍🏽\U0010fffd\ufffd"]
    tricky_bytes = [
        0x41,
        0x0A,
        0x20,
        0x80,
        0xBF,
        0xC3,
        0xE4,
        0xBD,
        0xF0,
        0x9F,
        0xED,
        0xA0,
        0xC0,
        0xF5,
        0xF4,
        0x90,
    ]
    lone_space = tok.encode(" ")[0]  # "▁"
    for case in range(300):
        ids: list[int] = []
        for _ in range(rng.randint(1, 40)):
            kind = rng.random()
            if case % 3 == 0:
                ids.append(rng.randrange(tok.vocab_size))  # anything at all
            elif kind < 0.35:
                ids.append(3 + rng.choice(tricky_bytes) if case % 3 == 1 else rng.choice(byte_ids))
            elif kind < 0.5:
                ids.extend(3 + b for b in rng.choice(characters))
            elif kind < 0.6:
                ids.append(rng.choice([0, 1, 2]))  # <unk>, <s>, </s>
            elif kind < 0.7:
                ids.append(lone_space)
            else:
                ids.append(rng.randrange(259, tok.vocab_size))
        stream(tok, ids)


def test_stream_window_stays_small(tok: Tokenizer) -> None:
    # O(1) per id: the detokenizer only decodes the ids since its last anchor, not the history.
    text = ("The quick brown fox jumps over the lazy dog. 你好 😀🧬\n    indented(code)  \n") * 60
    ids = tok.encode(text)
    detok = StreamingDetokenizer(tok)
    longest_window = 0
    out = []
    for token_id in ids:
        out.append(detok.add(token_id))
        longest_window = max(longest_window, len(detok._window))
    out.append(detok.flush())
    assert len(ids) > 1500
    assert "".join(out) == text
    assert longest_window <= 6  # an emoji is 4 byte pieces plus the anchor before it


def test_flush_emits_incomplete_bytes_and_ends_the_stream(tok: Tokenizer) -> None:
    detok = StreamingDetokenizer(tok)
    assert detok.add(3 + 0xE4) == ""
    assert detok.flush() == tok.decode([3 + 0xE4]) == REPLACEMENT_CHAR
    assert detok.flush() == ""
    with pytest.raises(RuntimeError, match="after flush"):
        detok.add(5)
