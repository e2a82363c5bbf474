"""The SentencePiece tokenizer: round trips, the chat format against mistral-common,
streaming decode, training a tiny model with Mixtral's layout, and the CLI."""

import io
import random
import re
import sys

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from sentencepiece import sentencepiece_model_pb2

from mixtral_jax import cli, tokenizer
from mixtral_jax.config import preset
from mixtral_jax.configtools import UserError
from mixtral_jax.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "  two leading spaces, a tab\there and a newline\nthen 12345 digits",
    "Grüße aus Köln, ça va? ¿Qué tal? Привет, мир.",
    "日本語のテキストと한국어 문장, العربية و हिन्दी",
    "emoji 😀🦜🧬 and rare 𝔘ꙮ characters",
    "",
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is a mixture of experts?"}],
    "system": [{"role": "system", "content": "Answer in one sentence."},
               {"role": "user", "content": "Why is the sky blue?"}],
    "multi_turn_multilingual": [
        {"role": "system", "content": "Tu es un assistant utile. 🤖"},
        {"role": "user", "content": "Bonjour ! Comment ça va ?"},
        {"role": "assistant", "content": "Très bien, merci. 日本語も話せます。"},
        {"role": "user", "content": "Und auf Deutsch? 🦜"},
        {"role": "assistant", "content": "Ja, natürlich!  "},
        {"role": "user", "content": "  Спасибо\n\nи пока  "},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3, in Korean?"},
        {"role": "assistant", "content": "여섯 (6)"},
    ],
    "system_ends_with_assistant": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "11 "},
    ],
    "empty_system": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
}

MESSAGE_CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


@pytest.fixture(scope="module")
def v1():
    return Tokenizer()


@pytest.fixture(scope="module")
def v3():
    return Tokenizer("mistral-v3")


def reference_chat(tok, messages):
    """mistral-common's tokens; a conversation that ends with an answer is a finetuning example."""
    mode = ValidationMode.finetuning if messages[-1]["role"] == "assistant" else ValidationMode.test
    reference = MistralTokenizer.from_file(str(tok.path), mode=mode)
    request = ChatCompletionRequest(messages=[MESSAGE_CLASSES[m["role"]](content=m["content"])
                                              for m in messages])
    return reference.encode_chat_completion(request).tokens


def test_special_ids_of_the_mixtral_models(v1, v3):
    assert (v1.bos_id, v1.eos_id, v1.pad_id, v1.vocab_size) == (1, 2, 0, 32000)
    assert (v3.bos_id, v3.eos_id, v3.pad_id, v3.vocab_size) == (1, 2, 0, 32768)
    assert Tokenizer("mistral-v1").path == v1.path


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_bos_eos(v1, text):
    ids = v1.encode(text)
    assert ids[0] == 1 and 2 not in ids
    assert v1.decode(ids) == text
    assert v1.encode(text, bos=False) == ids[1:]
    assert v1.encode(text, bos=False, eos=True) == ids[1:] + [2]


def test_known_ids_and_split_digits(v1):
    assert v1.encode("Hello world") == [1, 22557, 1526]
    pieces = [v1.processor.IdToPiece(i) for i in v1.encode("2024", bos=False)]
    assert pieces == ["▁", "2", "0", "2", "4"]


def test_batch_equals_single(v1):
    assert v1.encode_batch(TEXTS, bos=False, eos=True) == [v1.encode(t, bos=False, eos=True) for t in TEXTS]
    assert v1.encode_batch(TEXTS) == [v1.encode(t) for t in TEXTS]


def test_decode_skips_special_ids_and_rejects_unknown_ones(v1, v3):
    text = "a short answer"
    assert v1.decode([v1.pad_id, v1.bos_id, *v1.encode(text, bos=False), v1.eos_id]) == text
    assert v3.decode([3, *v3.encode(text, bos=False), 4, 2]) == text  # [INST] [/INST] </s>
    with pytest.raises(UserError, match="32000"):
        v1.decode([1, 32000])
    with pytest.raises(UserError, match="one sequence of ids, got a batch"):
        v1.decode(np.array([v1.encode(text)]))  # e.g. the argmax of [B, T] logits


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("model", ["v1", "v3"])
def test_chat_matches_mistral_common(name, model, request):
    tok = request.getfixturevalue(model)
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(messages) == reference_chat(tok, messages)


def test_chat_layout_v1(v1):
    ids = v1.encode_chat(CONVERSATIONS["system_ends_with_assistant"])
    text = "".join(v1.processor.IdToPiece(i) for i in ids).replace("▁", " ").replace("<0x0A>", "\n")
    assert text == "<s> [INST] Be terse.\n\nName a prime. [/INST] 7</s> [INST] Another? [/INST] 11 </s>"


BAD_CONVERSATIONS = [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
    ([{"role": "user", "content": ["x"]}], "must be a string"),
    ([{"role": "assistant", "content": "hi"}], "is an assistant message where a user message belongs"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "messages\\[1\\] is a user message where an assistant message belongs"),
    ([{"role": "user", "content": "a\ud800"}], "messages\\[0\\] content is not valid Unicode at character 1"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "empty content"),
    ([{"role": "system", "content": "only a system prompt"}], "no user message"),
]


@pytest.mark.parametrize("messages, message", BAD_CONVERSATIONS)
def test_malformed_conversations(v1, messages, message):
    with pytest.raises(UserError, match=message):
        v1.encode_chat(messages)


@pytest.mark.parametrize("name", ["mistral-v1", "bytes"])
def test_text_with_a_lone_surrogate_is_one_clear_error(name):
    # from JSON's "\ud800", or from a command-line argument's bytes that are not UTF-8
    tok = tokenizer.load_tokenizer(preset("tiny", vocab_size=32000), name)
    for encode in (tok.encode, lambda text: tok.encode_batch([text])):
        with pytest.raises(UserError, match="not valid Unicode at character 2"):
            encode("ab\udcff")


def streamed(tok, ids):
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    return pieces, "".join(pieces) + stream.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(v1, text):
    ids = [v1.bos_id, *v1.encode(text, bos=False), v1.eos_id, *v1.encode(" again " + text, bos=False)]
    pieces, joined = streamed(v1, ids)
    assert joined == v1.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # a multi-byte character is never split


def test_stream_holds_a_character_until_its_last_byte(v1):
    ids = v1.encode("x🦜", bos=False)  # ▁x then four byte-fallback pieces
    pieces, _ = streamed(v1, ids)
    assert pieces == ["x", "", "", "", "🦜"]
    assert streamed(v1, v1.encode("a b", bos=False))[0] == ["a", " b"]


def test_missing_or_invalid_model_file(tmp_path):
    with pytest.raises(UserError, match="neither a file nor a known name"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer(bad)


def test_for_config():
    assert Tokenizer.for_config(preset("mixtral-8x22b")).vocab_size == 32768
    with pytest.raises(UserError, match="vocab_size is 256"):
        Tokenizer.for_config(preset("tiny"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = ["expert", "router", "token", "layer", "mixture", "sparse", "gate", "scale", "model"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 999)}"
             for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_tiny_tokenizer_with_mixtral_layout(corpus, tmp_path, v1):
    out = tmp_path / "tiny" / "tok.model"
    tok = tokenizer.train([corpus], vocab_size=320, out=out)
    assert out.is_file() and tok.vocab_size == 320
    assert [tok.processor.IdToPiece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.processor.pad_id()) == (1, 2, 0, -1)
    assert tok.processor.IdToPiece(258) == "<0xFF>"
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(out.read_bytes())
    reference = sentencepiece_model_pb2.ModelProto()
    reference.ParseFromString(v1.path.read_bytes())
    for field in ("model_type", "byte_fallback", "split_digits", "character_coverage",
                  "allow_whitespace_only_pieces", "max_sentencepiece_length"):
        assert getattr(proto.trainer_spec, field) == getattr(reference.trainer_spec, field), field
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces",
                  "precompiled_charsmap"):
        assert getattr(proto.normalizer_spec, field) == getattr(reference.normalizer_spec, field), field
    assert len(tok.encode("mixture expert router", bos=False)) < len("mixture expert router") / 2
    text = "router 12345  unseen: Köln 🦜"  # unseen characters fall back to bytes
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_chat([{"role": "user", "content": "gate"}])[0] == 1


@pytest.mark.parametrize("make", [Tokenizer, tokenizer.ByteTokenizer])
def test_encode_refuses_what_is_no_text(make):
    tok = make()
    for bad, message in [(None, "text must be a string, got NoneType"), (b"hi", "text must be a string, got bytes")]:
        with pytest.raises(UserError, match=message):
            tok.encode(bad)
    with pytest.raises(UserError, match="encode_batch takes a list of strings"):  # not one per character
        tok.encode_batch("Hello")
    assert tok.encode_batch(["Hello"]) == [tok.encode("Hello")]


def test_train_rejects_bad_input(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="no text"):
        tokenizer.train([empty], 300, tmp_path / "x.model")
    with pytest.raises(UserError, match="not found"):
        tokenizer.train([tmp_path / "missing.txt"], 300, tmp_path / "x.model")
    with pytest.raises(UserError, match="too small"):
        tokenizer.train([corpus], 100, tmp_path / "x.model")
    with pytest.raises(UserError, match="max_sentences must be positive, got 0"):
        tokenizer.train([corpus], 300, tmp_path / "x.model", max_sentences=0)
    with pytest.raises(UserError, match="Vocabulary size too high"):
        tokenizer.train([corpus], 5000, tmp_path / "x.model")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"text\nmore \xff\xfe\n")
    with pytest.raises(UserError, match=r"binary.txt:2: not valid UTF-8 \(byte 0xff\)"):
        tokenizer.train([corpus, binary], 300, tmp_path / "x.model")
    assert not (tmp_path / "x.model").exists()


def test_train_reads_characters_cut_by_the_read_chunks(tmp_path):
    from mixtral_jax.documents import decode_utf8

    path = tmp_path / "multibyte.txt"
    data = ("Köln 漢字\n🦜 é\n" * 50).encode()
    for chunk_bytes in (1, 2, 3, 5, 4096):  # reads that end inside 2-, 3- and 4-byte characters
        path.write_bytes(data)
        assert tokenizer._holds_text(path, chunk_bytes)
        for at in range(700, 704):  # a stray continuation byte, between and inside characters
            path.write_bytes(data[:at] + b"\x80" + data[at:])
            with pytest.raises(UserError) as whole:  # the file decoded in one piece
                decode_utf8(path.read_bytes(), path)
            with pytest.raises(UserError, match=re.escape(str(whole.value))):
                tokenizer._holds_text(path, chunk_bytes)


def test_cli(tmp_path, corpus, capsys):
    assert cli.main(["tokenizer", "encode", "--text", "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["1", "22557", "1526"]
    assert cli.main(["tokenizer", "decode", "--ids", "1", "22557", "1526", "2"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert cli.main(["tokenizer", "encode", "--text", "hi", "--chat", "--model", "mistral-v3"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["1", "3"]
    out = tmp_path / "cli.model"
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                     "--out", str(out)]) == 0
    assert Tokenizer(out).vocab_size == 300
    capsys.readouterr()
    bad_calls = [
        ["tokenizer", "decode", "--ids", "40000"],
        ["tokenizer", "encode", "--text", "x", "--model", str(tmp_path / "nope.model")],
        ["tokenizer", "encode", "--text", "x", "--system", "s"],
        ["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
         "--out", str(out)],
    ]
    for argv in bad_calls:
        assert cli.main(argv) == 2, argv
        assert "mixtral-jax tokenizer: error:" in capsys.readouterr().err


@pytest.mark.parametrize("stdin, argv_text, message", [
    (b"a\xffb", "-", "<stdin>:1: not valid UTF-8 (byte 0xff)"),
    (b"line one\nline \xc3( two", "-", "<stdin>:2: not valid UTF-8 (byte 0xc3)"),
    (b"", "a\udcffb", "--text:1: not valid UTF-8 (byte 0xff)"),  # undecodable argv bytes
])
def test_invalid_utf8_text_is_one_line(monkeypatch, capsys, stdin, argv_text, message):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert cli.main(["tokenizer", "encode", "--text", argv_text]) == 2
    err = capsys.readouterr().err
    assert err == f"mixtral-jax tokenizer: error: {message}\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Hello world".encode())))
    assert cli.main(["tokenizer", "encode", "--text", "-"]) == 0
    assert capsys.readouterr().out.split() == ["1", "22557", "1526"]


def test_train_out_is_checked_before_training(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(tokenizer, "train", lambda *a, **k: pytest.fail("trained before --out was checked"))
    (tmp_path / "a-file").write_text("")
    for out, message in [(tmp_path, "is a folder; name a file"),
                         (tmp_path / "a-file" / "x.model", "a-file is a file, not a folder")]:
        assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                         "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mixtral-jax tokenizer: error: --out") and message in err
    assert not (tmp_path / "x.model").exists()
