"""Mixtral's sentencepiece tokenizer, its Instruct chat template, and a streaming detokenizer.

The chat encoding reproduces mistral-common's `MistralTokenizer.v1()` (the reference for
Mixtral-8x7B-Instruct) exactly, rule for rule:

* all non-empty system messages are joined with a blank line into one system prompt, which is put
  in front of the *first* user turn, followed by a blank line;
* system messages also end a run of messages: consecutive messages of the same role (user/user,
  assistant/assistant) are merged into one turn with a blank line between their non-empty
  contents, but user, system, user makes two user turns;
* a conversation whose first turn is not the user's gets an empty user turn in front;
* a user turn is the text `[INST] {content} [/INST]` and an assistant turn is its content followed
  by `</s>`, each encoded *separately* by sentencepiece (so each gets its own dummy-prefix "▁"),
  after one `<s>` for the whole conversation. `[INST]` is plain text in this vocabulary, and so
  is `</s>` written inside a message: only the ids added here are control tokens.

Only sentencepiece is imported here (no torch), so the CLI can import this module cheaply.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mixtral_chat.engine.errors import TokenizerError

_ROLES = ("system", "user", "assistant")
# mistral-common's join string for system prompts and merged messages (`_DEFAULT_JOIN_STR`).
_BLANK_LINE = "\n\n"
_REPLACEMENT_CHAR = "\ufffd"


def well_formed(text: str) -> str:
    """`text` as valid Unicode: undecodable bytes (which Python keeps in a command line as lone
    surrogates) and lone surrogates become U+FFFD. Neither sentencepiece nor SQLite takes them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # the bytes a command line or a pipe held, each bad one replaced once
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (JSON's "\ud800")
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


class Tokenizer:
    """A sentencepiece `tokenizer.model` plus the Mixtral-Instruct chat template."""

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece

        path = Path(model_path)
        if not path.exists():
            raise TokenizerError(f"tokenizer file not found: {path}")
        if path.is_dir():
            raise TokenizerError(f"tokenizer path is a directory, expected a tokenizer.model file: {path}")
        try:
            serialized = path.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from exc

        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(serialized)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(
                f"tokenizer file {path} is not a valid sentencepiece model (corrupt or truncated?)"
            ) from exc
        if processor.bos_id() < 0 or processor.eos_id() < 0:
            raise TokenizerError(f"tokenizer file {path} defines no <s>/</s> tokens; it cannot encode chats")

        self._sp = processor
        self.path = path
        self._vocab_size = processor.vocab_size()
        self._bos_id = processor.bos_id()
        self._eos_id = processor.eos_id()

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode plain text; control-token spellings such as `</s>` inside it stay plain text."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode a string, got {type(text).__name__}")
        ids: list[int] = self._sp.encode(text)
        if bos:
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; control tokens (<s>, </s>) decode to nothing."""
        id_list = [int(token_id) for token_id in ids]
        try:
            text: str = self._sp.decode(id_list)
        except IndexError:
            bad = next(t for t in id_list if not 0 <= t < self._vocab_size)
            raise TokenizerError(self._out_of_range_message(bad)) from None
        return text

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id, e.g. '▁Hello' or '<0x0A>' (for debugging and tests)."""
        self._check_id(token_id)
        piece: str = self._sp.id_to_piece(token_id)
        return piece

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of an OpenAI-style conversation, ready for the model to write the next reply.

        Equal to mistral-common's `MistralTokenizer.v1().encode_chat_completion(...).tokens` for
        every conversation both accept. A malformed conversation raises `TokenizerError`.
        """
        system_prompt, turns = _chat_turns(messages)
        ids = [self._bos_id]
        for index, (role, content) in enumerate(turns):
            if role == "user":
                # v1 puts the system prompt into the *first* user turn, even if it is empty.
                if index == 0 and system_prompt is not None:
                    content = system_prompt + _BLANK_LINE + content
                ids.extend(self._sp.encode(f"[INST] {content} [/INST]"))
            else:
                ids.extend(self._sp.encode(content))
                ids.append(self._eos_id)
        return ids

    def count_chat_tokens(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Prompt length in tokens of a conversation (what `encode_chat` returns)."""
        return len(self.encode_chat(messages))

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self._vocab_size:
            raise TokenizerError(self._out_of_range_message(token_id))

    def _out_of_range_message(self, token_id: int) -> str:
        last = self._vocab_size - 1
        return f"token id {token_id} is out of range for this tokenizer (valid ids are 0..{last})"


def _chat_turns(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate a conversation and normalize it the way mistral-common v1 does.

    Returns the merged system prompt (None when there is none) and the list of (role, text) turns,
    which starts with a user turn and ends with a user turn.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    if len(messages) == 0:
        raise TokenizerError("the conversation is empty: it needs at least one user message")

    roles: list[str] = []
    contents: list[str] = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"message {number} must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in _ROLES:
            raise TokenizerError(
                f"message {number} has unknown role {role!r} (expected system, user or assistant)"
            )
        if "content" not in message:
            raise TokenizerError(f"message {number} ({role}) has no 'content'")
        content = message["content"]
        if not isinstance(content, str):
            raise TokenizerError(
                f"message {number} ({role}) content must be a string, got {type(content).__name__}"
            )
        if role == "assistant" and not content:
            # mistral-common rejects these too: an empty reply would encode as a bare </s>.
            raise TokenizerError(f"message {number} (assistant) has empty content")
        if role == "system" and roles and roles[-1] == "assistant":
            # The only order mistral-common rejects among these roles (v1 has nowhere to put it).
            raise TokenizerError(f"message {number}: a system message cannot follow an assistant message")
        roles.append(role)
        contents.append(content)

    non_system_roles = [role for role in roles if role != "system"]
    if "user" not in non_system_roles:
        raise TokenizerError("the conversation has no user message")
    if non_system_roles[-1] != "user":
        raise TokenizerError(
            "the conversation must end with a user message (the last message is the assistant's)"
        )

    pairs = list(zip(roles, contents, strict=True))
    system_parts = [content for role, content in pairs if role == "system" and content]
    system_prompt = _BLANK_LINE.join(system_parts) if system_parts else None

    turns: list[tuple[str, str]] = []
    # groupby over the original order: a system message ends a run, so user, system, user stays two turns.
    for role, run in itertools.groupby(pairs, key=lambda pair: pair[0]):
        if role == "system":
            continue
        turns.append((role, _BLANK_LINE.join(content for _, content in run if content)))
    if turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    return system_prompt, turns


class StreamingDetokenizer:
    """Turns generated ids into text pieces, one `add` per id, for streaming to a screen.

    Invariant: the concatenation of everything `add` and `flush` return equals
    `tokenizer.decode(all ids)`. Sentencepiece drops the "▁" (space) that starts the first visible
    piece, so a reply's first word comes out without a leading space, exactly like `decode`.
    Byte-fallback pieces (<0xE4> ...) are held back until their UTF-8 character is complete.

    Cost per id is O(1): only a short window is decoded, from an *anchor* (the last id whose text
    was emitted) to the newest id. Decoding it gives the anchor's text followed by the new text,
    because sentencepiece's decode is local except for two things:
      * the leading-space strip applies to the first visible piece only; the anchor is never a
        control id, and any other id ends the strip, so every later piece of the window decodes
        as in the full sequence;
      * byte-fallback runs are decoded as a unit; text is emitted (and the anchor moved) only once
        the window does not end in U+FFFD, i.e. never while a character still waits for bytes.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._sp = tokenizer._sp
        self._window: list[int] = []  # ids from the anchor on
        self._emitted_len = 0  # how many ids of the window have had their text emitted
        self._emitted_text = ""  # decode(window[:emitted_len]), as decoded from the anchor
        self._finished = False

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (often one word piece, sometimes "")."""
        if self._finished:
            raise RuntimeError("StreamingDetokenizer.add() called after flush(); use a new one per reply")
        token_id = int(token_id)
        self._tokenizer._check_id(token_id)
        if self._sp.is_control(token_id) and self._emitted_len == len(self._window):
            # <s> and </s> decode to nothing and, with no byte run pending, change nothing else.
            return ""
        self._window.append(token_id)
        text = self._sp.decode(self._window)
        if text.endswith(_REPLACEMENT_CHAR):
            return ""  # maybe a character still waiting for bytes: hold until it is decided
        return self._emit(text)

    def flush(self) -> str:
        """End of the reply: return whatever is still held (incomplete bytes decode to U+FFFD)."""
        self._finished = True
        if self._emitted_len == len(self._window):
            return ""
        return self._emit(self._sp.decode(self._window))

    def _emit(self, text: str) -> str:
        new_text = text[len(self._emitted_text) :]
        # The last id becomes the anchor: everything up to it is final. Outside flush() it is never
        # a control id (those are only kept while bytes are held, and then the text ends in
        # U+FFFD), so it ends the leading-space strip: a piece (even a lone "▁" consumes the strip)
        # or the byte that completed a character. Alone, such a byte decodes as itself (ASCII) or
        # as one U+FFFD (a continuation byte), so the bytes after it group as in the full sequence.
        last = len(self._window) - 1
        if last > 0 and not self._sp.is_control(self._window[last]):
            del self._window[:last]
            self._emitted_text = self._sp.decode(self._window)
        else:
            self._emitted_text = text
        self._emitted_len = len(self._window)
        return new_text
