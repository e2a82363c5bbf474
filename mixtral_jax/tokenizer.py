"""The SentencePiece tokenizer: Mixtral's vocabularies, the instruct chat format,
streaming detokenization, and training a new model with Mixtral's layout.

The real tokenizers ship inside the PyPI package `mistral-common` (a runtime
dependency only as the source of these files): "mistral-v1" is Mixtral 8x7B's
32000-piece model, "mistral-v3" is Mixtral 8x22B's 32768-piece model, whose
[INST] and [/INST] are control tokens. Any other `.model` file works too.

Chat format (the same tokens as mistral-common's `encode_chat_completion`):
    v1:  <s>▁[INST]▁user▁[/INST]▁answer</s>▁[INST]▁next▁[/INST]
    v3:  <s>[INST]▁user[/INST]▁answer</s>[INST]▁next[/INST]
A system prompt is joined to a user message with a blank line: the first user
message in v1, the last one in v3. `[INST]` is text in v1 and a control token
in models that have one.
"""

from __future__ import annotations

import importlib.resources
import io
import os
import pathlib
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from mixtral_jax.configtools import UserError
from mixtral_jax.documents import decode_utf8

TOKENIZERS = {  # name -> file in mistral_common/data
    "mistral-v1": "tokenizer.model.v1",  # Mixtral 8x7B (and -Instruct)
    "mistral-v3": "mistral_instruct_tokenizer_240323.model.v3",  # Mixtral 8x22B (and -Instruct)
}
ROLES = ("system", "user", "assistant")
BEGIN_INST, END_INST = "[INST]", "[/INST]"
_UTF8_MAX_BYTES = 4  # byte-fallback pieces a streamed character can need

# Mixtral's SentencePiece trainer settings (read from tokenizer.model.v1's trainer_spec and
# normalizer_spec): BPE, byte fallback, digits split, no normalization, a dummy prefix space.
MIXTRAL_TRAINER_SPEC = dict(
    model_type="bpe", character_coverage=0.99995, byte_fallback=True, split_digits=True,
    split_by_unicode_script=True, split_by_number=True, split_by_whitespace=True,
    treat_whitespace_as_suffix=False, allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16, max_sentence_length=4192, shuffle_input_sentence=True,
    vocabulary_output_piece_score=True, hard_vocab_limit=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>",
    eos_piece="</s>", unk_surface=" \u2047 ",
    normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
)


def model_path(model: str | os.PathLike | None) -> pathlib.Path:
    """The `.model` file for a name from TOKENIZERS, a path, or a directory holding tokenizer.model."""
    name = "mistral-v1" if model is None else os.fspath(model)
    if name in TOKENIZERS:
        return pathlib.Path(str(importlib.resources.files("mistral_common") / "data" / TOKENIZERS[name]))
    path = pathlib.Path(name).expanduser()
    if path.is_dir() and (path / "tokenizer.model").is_file():
        return path / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"tokenizer {name!r} is neither a file nor a known name ({', '.join(TOKENIZERS)})")
    return path


class Tokenizer:
    """A SentencePiece model with Mixtral's conventions (bos 1, eos 2, no pad of its own).

    `model` is None (= "mistral-v1"), a name from TOKENIZERS, or a path to a `.model` file.
    """

    def __init__(self, model: str | os.PathLike | None = None):
        self.name = "mistral-v1" if model is None else os.fspath(model)
        self.path = model_path(model)
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(self.path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{self.path}: not a SentencePiece model ({err})") from None
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"{self.path}: the model defines no bos or eos piece")
        self._inst = self._control_id(BEGIN_INST), self._control_id(END_INST)
        skipped = [i for i in range(self.vocab_size) if self.processor.IsControl(i)]
        self._silent = frozenset(skipped + [self.pad_id])  # ids that decode to no text

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    @classmethod
    def for_config(cls, config) -> Tokenizer:
        """The tokenizer a MixtralConfig names, checked to fit the model's embedding table."""
        tokenizer = cls(config.tokenizer)
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"tokenizer {config.tokenizer!r} has {tokenizer.vocab_size} pieces but "
                            f"model.vocab_size is {config.vocab_size}: ids would not fit the embedding")
        return tokenizer

    def _control_id(self, piece: str) -> int | None:
        token = self.processor.PieceToId(piece)  # unknown pieces map to <unk>, not a control token
        return token if self.processor.IsControl(token) else None

    @property
    def bos_id(self) -> int:
        """Beginning of sequence, `<s>` (1 in Mixtral)."""
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        """End of sequence and of each assistant turn, `</s>` (2 in Mixtral)."""
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's own pad, else `<unk>` (0): byte fallback means encoding never yields it."""
        pad = self.processor.pad_id()
        return pad if pad >= 0 else self.processor.unk_id()

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id is in [0, vocab_size)."""
        return self.processor.GetPieceSize()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos / eos."""
        return self.processor.Encode(unicode_text(text), add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """`encode` of each text, run by SentencePiece's batch encoder on all cores."""
        _check_batch(texts)
        return self.processor.Encode([unicode_text(text) for text in texts], add_bos=bos, add_eos=eos)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; control tokens (bos, eos, [INST] ...) and padding produce no text."""
        return self.processor.Decode(self._checked(ids))

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = list(ids)
        if any(isinstance(i, (list, tuple)) or getattr(i, "ndim", 0) for i in ids):
            raise UserError("decode takes one sequence of ids, got a batch (decode each row on its own)")
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside the tokenizer's vocabulary [0, {self.vocab_size})")
        return [i for i in ids if i not in self._silent]

    def stream(self) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation in Mixtral's instruct format (see the module docstring).

        `messages`: an optional leading {"role": "system"}, then user and assistant turns
        alternating, starting with a user turn. Ending with a user turn gives a prompt for
        the next answer; ending with an assistant turn gives a training example (closed by eos).
        """
        system, turns = _check_conversation(messages)
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        system_turn = users[-1] if self._inst[0] is not None else users[0]
        ids = [self.bos_id]
        for i, (role, content) in enumerate(turns):
            if role == "assistant":
                ids += self._assistant_turn(content)
                continue
            if system and i == system_turn:
                content = f"{system}\n\n{content}"
            ids += self._user_turn(content)
        return ids

    def _user_turn(self, content: str) -> list[int]:
        begin, end = self._inst
        if begin is None:  # v1: [INST] is plain text
            return self.encode(f"{BEGIN_INST} {content} {END_INST}", bos=False)
        return [begin, *self.encode(content, bos=False), end]

    def _assistant_turn(self, content: str) -> list[int]:
        if self._inst[0] is not None:  # v3 drops trailing spaces of answers
            content = content.rstrip(" ")
        return self.encode(content, bos=False, eos=True)


def unicode_text(text: str, what: str = "text") -> str:
    """`text`, or UserError naming `what` if it holds a lone surrogate, which has no UTF-8 and
    so no tokens (JSON's unpaired "\\ud800" escapes, or bytes that are not UTF-8 in a
    command-line argument); UserError too for what is no string."""
    if not isinstance(text, str):
        raise UserError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(f"{what} is not valid Unicode at character {err.start} (a lone surrogate, "
                        f"{text[err.start]!r}: an unpaired escape, or bytes that are not UTF-8)") from None
    return text


def _check_batch(texts) -> None:
    """UserError for one string given where a list of them belongs (it would encode each character)."""
    if isinstance(texts, str):
        raise UserError("encode_batch takes a list of strings (encode takes one)")


def _a(role: str) -> str:
    return "an assistant" if role == "assistant" else f"a {role}"


def _check_conversation(messages) -> tuple[str, list[tuple[str, str]]]:
    """(system prompt or "", [(role, content), ...] user/assistant turns) of a valid conversation."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence) or not messages:
        raise UserError("a conversation must be a non-empty list of {'role', 'content'} messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"messages[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise UserError(f"messages[{i}] content must be a string, got {type(content).__name__}")
        unicode_text(content, f"messages[{i}] content")
        if role == "system" and i > 0:
            raise UserError(f"messages[{i}] is a system message; only the first message may be one")
        if role == "assistant" and not content:
            raise UserError(f"messages[{i}] is an assistant message with empty content")
        turns.append((role, content))
    system = turns.pop(0)[1] if turns[0][0] == "system" else ""
    offset = len(messages) - len(turns)
    for i, (role, _) in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if role != expected:
            raise UserError(f"messages[{i + offset}] is {_a(role)} message where {_a(expected)} message "
                            "belongs: turns must alternate user/assistant, starting with user")
    if not turns:
        raise UserError("the conversation has no user message")
    return system, turns


class StreamDecoder:
    """Turns generated ids into text one id at a time, for printing as tokens arrive.

    `push(id)` returns only the newly completed text: a character split over several
    byte-fallback pieces waits until its last byte, and SentencePiece's leading space
    of a word is kept (the sum of all pushes and `flush()` equals `decode(all ids)`).
    Each push decodes only the last few ids, so the cost does not grow with length.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # the non-silent ids pushed so far
        self._prefix = 0  # ids[_prefix:_read] were already printed; they give the context
        self._read = 0

    def push(self, token_id: int) -> str:
        """The text completed by `token_id` (often "", e.g. for eos or a partial character)."""
        self.ids += self.tokenizer._checked([token_id])
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished byte sequence) at the end of the stream."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self.ids):  # nothing new: keep the context window where it is
            return ""
        decode = self.tokenizer.processor.Decode
        seen = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        pending = len(self.ids) - self._read
        if not final and text.endswith("\ufffd") and pending < _UTF8_MAX_BYTES:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(seen):]


def train(inputs: Sequence[str | os.PathLike], vocab_size: int, out: str | os.PathLike,
          max_sentences: int = 10_000_000) -> Tokenizer:
    """Trains a BPE SentencePiece model with Mixtral's settings and special ids on text files.

    Each line of each input file is a sentence; at most `max_sentences` random lines are used.
    Writes the model to `out` (a `.model` file) and returns it loaded.
    """
    paths = [pathlib.Path(p) for p in inputs]
    if not paths:
        raise UserError("no input files given")
    for path in paths:
        if not path.is_file():
            raise UserError(f"input file {path} not found")
    if not any([_holds_text(path) for path in paths]):  # a list: every file is checked
        raise UserError(f"the input files hold no text: {', '.join(map(str, paths))}")
    if max_sentences < 1:
        raise UserError(f"max_sentences must be positive, got {max_sentences}")
    minimum = 3 + 256 + 1  # unk, bos, eos, 256 byte pieces, at least one character
    if vocab_size < minimum:
        raise UserError(f"vocab size {vocab_size} is too small: Mixtral's layout needs at least "
                        f"{minimum} (3 special and 256 byte-fallback pieces)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            input=[str(p) for p in paths], vocab_size=vocab_size, model_writer=model,
            input_sentence_size=max_sentences, num_threads=os.cpu_count() or 1,
            minloglevel=2, **MIXTRAL_TRAINER_SPEC)  # minloglevel: errors only, no progress log
    except RuntimeError as err:  # "INTERNAL: file.cc(744) [check] message": keep the message
        raise UserError(f"SentencePiece training failed: {str(err).rsplit('] ', 1)[-1]}") from None
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return Tokenizer(out)


def _holds_text(path: pathlib.Path, chunk_bytes: int = 1 << 20) -> bool:
    """Whether the file holds more than whitespace; UserError naming the line of the first byte
    that is not UTF-8 (SentencePiece would train on such bytes without a word)."""
    found, line, tail = False, 1, b""
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            data = tail + chunk
            cut = _before_last_character(data)  # which the chunk may have cut off: it waits for the next
            whole, tail = data[:cut], data[cut:]
            decode_utf8(whole, path, line)
            found, line = found or bool(whole.strip()), line + whole.count(b"\n")
    decode_utf8(tail, path, line)
    return found or bool(tail.strip())


def _before_last_character(data: bytes) -> int:
    """Where the last UTF-8 character of `data` starts when it is a multi-byte one, else len(data)."""
    cut = len(data)
    while cut > max(len(data) - 3, 0) and data[cut - 1] & 0xC0 == 0x80:  # continuation bytes 10xxxxxx
        cut -= 1
    if cut and data[cut - 1] >= 0xC0:  # the byte that starts them, 11xxxxxx
        return cut - 1
    return len(data)


class ByteTokenizer:
    """Byte-level tokens for tiny test models: byte b is id b + 3; pad 0, bos 1, eos 2."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259
    path = "bytes"

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """UTF-8 bytes of `text` shifted by 3, optionally framed by bos / eos."""
        ids = [b + 3 for b in unicode_text(text).encode("utf-8")]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts, bos: bool = True, eos: bool = False) -> list[list[int]]:
        """`encode` of each text."""
        _check_batch(texts)
        return [self.encode(text, bos, eos) for text in texts]

    def decode(self, ids) -> str:
        """The text of `ids`; special ids produce no text, broken UTF-8 becomes U+FFFD."""
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < self.vocab_size).decode("utf-8", "replace")


def load_tokenizer(model_config, name: str | None = None):
    """The tokenizer `name` names (default: the model config's): "bytes" for `ByteTokenizer`, a
    known name or a .model path; checked against the model's vocabulary."""
    name = name or model_config.tokenizer
    if name != "bytes":
        return Tokenizer.for_config(model_config.replace(tokenizer=name))
    if ByteTokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"tokenizer 'bytes' needs model.vocab_size >= {ByteTokenizer.vocab_size}, "
                        f"got {model_config.vocab_size}")
    return ByteTokenizer()
