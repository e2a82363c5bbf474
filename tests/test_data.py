"""The data pipeline: packing, determinism, process sharding, checkpointed state, errors."""

import json

import numpy as np
import pytest

from mixtral_jax import preset
from mixtral_jax.configtools import UserError, build
from mixtral_jax.tokenizer import ByteTokenizer, load_tokenizer
from mixtral_jax.train.data import DataConfig, builtin_corpus, make_loader, pack_row, tokenize_documents

BYTES = ByteTokenizer()
DOCS = [f"document {i}: " + "lorem ipsum " * (i % 5) for i in range(40)]


def loader(source, seq_len=16, batch=4, **kwargs):
    options = {k: kwargs.pop(k) for k in ("process_index", "process_count", "seed") if k in kwargs}
    data = build(DataConfig, {"source": source, **kwargs}, "data")
    return make_loader(data, tokenizer=BYTES, seq_len=seq_len, global_batch_size=batch, **options)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(batches, others):
    assert len(batches) == len(others)
    for a, b in zip(batches, others):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return str(path)


def test_pack_row_marks_documents():
    # the tail of a document continued from the previous row, then a whole one, then padding
    row = pack_row(np.array([7, 8, 2, 1, 5, 6, 2]), row_len=9, bos_id=1, pad_id=0)
    np.testing.assert_array_equal(row["inputs"], [7, 8, 2, 1, 5, 6, 2, 0])
    np.testing.assert_array_equal(row["targets"], [8, 2, 1, 5, 6, 2, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 2, 3, 0])
    # no loss on predicting the next document's BOS, nor on padding
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 0])
    whole = pack_row(np.array([7, 8, 2, 1, 5, 6, 2]), row_len=9, bos_id=1, pad_id=0, per_document=False)
    np.testing.assert_array_equal(whole["segment_ids"], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(whole["positions"], [0, 1, 2, 3, 4, 5, 6, 0])
    np.testing.assert_array_equal(whole["loss_mask"], row["loss_mask"])
    assert {k: v.dtype for k, v in row.items()} == {
        "inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
        "segment_ids": np.int32, "positions": np.int32}


def test_documents_are_framed_and_packed_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cde")
    batch = next(loader(str(tmp_path / "*.txt"), seq_len=4, batch=2, shuffle=False))
    a, b, c, d, e = (x + 3 for x in b"abcde")
    # stream: BOS a b EOS BOS c d e EOS, cut into rows of 5, the last one padded
    np.testing.assert_array_equal(batch["inputs"], [[1, a, b, 2], [c, d, e, 2]])
    np.testing.assert_array_equal(batch["targets"], [[a, b, 2, 1], [d, e, 2, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 0], [1, 1, 1, 0]])


def test_without_packing_every_document_starts_a_row(corpus):
    batch = next(loader(corpus, seq_len=64, batch=8, shuffle=False, packing=False))
    np.testing.assert_array_equal(batch["inputs"][:, 0], BYTES.bos_id)
    for row, text in zip(batch["inputs"], DOCS):
        assert BYTES.decode(row) == text


def test_rows_cover_every_token_once_per_epoch(corpus):
    data = loader(corpus, seq_len=16, batch=1, shuffle=True)
    stream = tokenize_documents(DOCS, BYTES)
    rows = [b["inputs"][0] for b in take(data, data.rows_per_epoch)]
    assert data.tokens_per_epoch == len(stream)
    assert sorted(map(bytes, rows)) == sorted(bytes(r["inputs"]) for r in
                                              (pack_row(stream[i:i + 17], 17, 1, 0) for i in range(0, len(stream), 17)))


def test_shuffle_is_deterministic_and_reshuffles_every_epoch(corpus):
    first, again = loader(corpus, seed=3), loader(corpus, seed=3)
    n = first.rows_per_epoch // 4  # batches per epoch
    epoch1, epoch2 = take(first, n), take(first, n)
    assert_same(epoch1 + epoch2, take(again, 2 * n))
    order1 = [bytes(r) for b in epoch1 for r in b["inputs"]]
    order2 = [bytes(r) for b in epoch2 for r in b["inputs"]]
    assert order1 != order2 and sorted(order1) == sorted(order2)
    other_seed = [bytes(r) for b in take(loader(corpus, seed=4), n) for r in b["inputs"]]
    assert other_seed != order1


def test_processes_read_disjoint_blocks_of_the_global_batch(corpus):
    single = take(loader(corpus, batch=4, seed=1), 5)
    shards = [take(loader(corpus, batch=4, seed=1, process_index=p, process_count=2), 5) for p in (0, 1)]
    for step, batch in enumerate(single):
        for key in batch:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)
    assert shards[0][0]["inputs"].shape == (2, 16)


def test_state_round_trip_gives_the_same_next_batches(corpus):
    original = loader(corpus, seed=5, prefetch=2)
    take(original, 7)
    state = json.loads(json.dumps(original.get_state()))
    expected = take(original, 4)
    restored = loader(corpus, seed=5, prefetch=2)
    restored.set_state(state)
    assert_same(take(restored, 4), expected)


def test_pretokenized_npy_matches_the_text_pipeline(tmp_path, corpus):
    path = tmp_path / "tokens.npy"
    np.save(path, tokenize_documents(DOCS, BYTES))
    assert_same(take(loader(str(path), seed=2), 3), take(loader(corpus, seed=2), 3))


def test_builtin_corpus_with_the_real_tokenizer():
    assert len(builtin_corpus()) > 50
    data = DataConfig()
    tokenizer = load_tokenizer(preset("tiny", vocab_size=32000), data.tokenizer)
    batch = next(make_loader(data, tokenizer=tokenizer, seq_len=32, global_batch_size=2))
    assert batch["inputs"].shape == (2, 32) and batch["inputs"].max() < 32000
    assert batch["loss_mask"].sum() > 0


def test_byte_tokenizer_needs_room_in_the_vocab():
    with pytest.raises(UserError, match="vocab_size >= 259"):
        load_tokenizer(preset("tiny"), "bytes")
    assert isinstance(load_tokenizer(preset("tiny", vocab_size=259), "bytes"), ByteTokenizer)
    assert BYTES.decode(BYTES.encode("héllo", eos=True)) == "héllo"


@pytest.mark.parametrize("write, source, message", [
    (None, "missing.txt", "missing.txt not found"),
    ({"empty.txt": "  \n"}, "empty.txt", "empty.txt is empty"),
    (None, "nothing-*.txt", "matches no files"),
    ({"d/x.txt": "x"}, "d", "is a directory"),
    ({"rows.jsonl": '{"text": "a"}\n\n{"body": "b"}\n'}, "rows.jsonl", r"rows.jsonl:3: no string field 'text'"),
    ({"rows.jsonl": '{"text": "a"}\n{oops\n'}, "rows.jsonl", r"rows.jsonl:2: not valid JSON"),
    ({"t.npy": np.zeros((2, 3), np.int32)}, "t.npy", "1-D integer array"),
    ({"t.npy": np.array([1, 300, 2], np.int32)}, "t.npy", r"token ids must be in \[0, 259\)"),
])
def test_bad_sources_are_one_clear_error(tmp_path, monkeypatch, write, source, message):
    monkeypatch.chdir(tmp_path)
    for name, content in (write or {}).items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        np.save(tmp_path / name, content) if name.endswith(".npy") else (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        loader(source)


def test_bad_settings_are_user_errors(corpus):
    with pytest.raises(UserError, match="multiple of the number of processes"):
        loader(corpus, batch=3, process_count=2)
    with pytest.raises(UserError, match="data.format"):
        build(DataConfig, {"format": "csv"}, "data")


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    (tmp_path / "rows.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b\xffc"}\n')
    (tmp_path / "doc.txt").write_bytes(b"first line\nsecond \xfe line\n")
    with pytest.raises(UserError, match=r"rows.jsonl:2: not valid UTF-8 \(byte 0xff\)"):
        loader(str(tmp_path / "rows.jsonl"))
    with pytest.raises(UserError, match=r"doc.txt:2: not valid UTF-8 \(byte 0xfe\)"):
        loader(str(tmp_path / "doc.txt"))


def test_text_newlines_are_read_as_open_reads_them_and_empty_text_is_empty(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\rc\n")
    (tmp_path / "lf.txt").write_bytes(b"a\nb\nc\n")
    assert_same(take(loader(str(tmp_path / "crlf.txt"), shuffle=False), 2),
                take(loader(str(tmp_path / "lf.txt"), shuffle=False), 2))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(UserError, match="blank.jsonl is empty"):
        loader(str(tmp_path / "blank.jsonl"))
