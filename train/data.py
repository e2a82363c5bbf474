"""The training data pipeline: documents -> token stream -> packed rows ->
shuffled, process-sharded batches, as a checkpointable Grain iterator.

Sources (`data.source`: "builtin", or one or more paths or globs):
  text     one document per file (any name not ending in .jsonl, .json or .npy).
  jsonl    one document per line: a JSON object whose `data.text_field` is the text.
  tokens   a `.npy` 1-D integer array laid out as the packer lays documents out,
           `BOS ids... EOS` one after another (a BOS marks a document start);
           `np.save(path, tokenize_documents(texts, tokenizer))` writes one. It is
           memory-mapped: a process reads only the rows it trains on.
  builtin  CPython's own English documentation (`pydoc_data.topics`), one
           document per topic; present on every machine, no download.

Packing: every document becomes `BOS ids... EOS`; the documents are laid end to
end and cut into rows of seq_len + 1 tokens (a document continues in the next
row where the row is full; the stream's last row is padded). With
`packing: false` every document starts a new row instead (rows padded). In a
row, `segment_ids` number the documents from 1 (0 = padding) and `positions`
restart at 0 at every document start, and at the row start for a continued
document (RoPE sees only position differences, so that changes nothing). With
`packing_mask: false` attention may cross documents: a row is one segment
(padding 0) with positions 0..T-1, as in plain concatenated pretraining.

Order: rows are shuffled with Grain's index shuffle, reseeded every epoch
(seed + epoch), and repeat forever. Global batch s holds rows [s*B, (s+1)*B) of
that stream; process p takes the p-th contiguous block of B / process_count
rows, so what is trained on does not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
from typing import Literal

import grain
import numpy as np

from mixtral_jax.configtools import UserError
from mixtral_jax.documents import file_format, holds_text, read_texts

BUILTIN = "builtin"
_BUILTIN_STREAMS: dict[tuple[str, str], np.ndarray] = {}  # tokenizer key -> builtin token stream


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data:` section of a run config."""

    source: str | list[str] = BUILTIN  # "builtin", or paths / globs
    format: Literal["auto", "text", "jsonl", "tokens"] = "auto"  # auto: by file suffix
    text_field: str = "text"  # the JSONL key holding a document's text
    tokenizer: str | None = None  # None: the model's; see `mixtral_jax.tokenizer.load_tokenizer`
    packing: bool = True  # documents end to end (False: each document starts a row)
    packing_mask: bool = True  # attention stays inside a document (False: a row is one segment)
    shuffle: bool = True
    seed: int | None = None  # None: the seed make_loader is given (the run's train.seed)
    prefetch: int = 4  # batches prepared ahead by a background thread (0: none)

    def __post_init__(self):
        if not self.sources or not all(self.sources):
            raise ValueError(f"data.source must name the builtin corpus or files, got {self.source!r}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed must be in [0, 2**32), got {self.seed}")
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {self.prefetch}")

    @property
    def sources(self) -> list[str]:
        """`source` as a list of paths / globs (or ["builtin"])."""
        return [self.source] if isinstance(self.source, str) else list(self.source)


def builtin_corpus() -> list[str]:
    """The default corpus: every topic of CPython's bundled English documentation."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def tokenize_documents(texts, tokenizer) -> np.ndarray:
    """Documents as one int32 token stream, each framed `BOS ids... EOS` (batch-encoded)."""
    ids = tokenizer.encode_batch(list(texts), bos=True, eos=True)
    return np.concatenate([np.asarray(doc, np.int32) for doc in ids]) if ids else np.zeros(0, np.int32)


# ---- reading sources ---------------------------------------------------------------------
def _paths(sources: list[str]) -> list[pathlib.Path]:
    paths = []
    for source in sources:
        if any(c in source for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
            files = [path for path in map(pathlib.Path, matches) if path.is_file()]
            if not files:
                raise UserError(f"data.source glob {source!r} matches no files")
            paths += files
            continue
        path = pathlib.Path(source).expanduser()
        if path.is_dir():
            raise UserError(f"data.source {source!r} is a directory; name its files with a glob, "
                            f"e.g. {source.rstrip('/')}/*.txt")
        if not path.is_file():
            raise UserError(f"data file {source} not found")
        paths.append(path)
    return paths


def _read_tokens(path: pathlib.Path, vocab_size: int) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise UserError(f"{path}: not a .npy array ({err})") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"{path}: expected a 1-D integer array of token ids, "
                        f"got shape {tokens.shape} of {tokens.dtype}")
    if tokens.size and not 0 <= tokens.min() <= tokens.max() < vocab_size:
        raise UserError(f"{path}: token ids must be in [0, {vocab_size}) (the tokenizer's vocabulary)")
    return tokens


def token_streams(data: DataConfig, tokenizer) -> list[np.ndarray]:
    """The token streams the sources make: text and JSONL documents tokenized into one
    stream, each .npy file a stream of its own. UserError for a missing or empty source."""
    if data.sources == [BUILTIN]:
        key = (type(tokenizer).__name__, str(getattr(tokenizer, "path", "")))
        if key not in _BUILTIN_STREAMS:
            _BUILTIN_STREAMS[key] = tokenize_documents(builtin_corpus(), tokenizer)
        return [_BUILTIN_STREAMS[key]]
    texts, streams = [], []
    for path in _paths(data.sources):
        fmt = data.format if data.format != "auto" else file_format(path)
        if fmt == "tokens":
            stream = _read_tokens(path, tokenizer.vocab_size)
            streams.append(stream)
            empty = stream.size == 0
        else:
            documents = read_texts(path, fmt, data.text_field)
            texts += documents
            empty = not holds_text(documents)
        if empty:
            raise UserError(f"data file {path} is empty")
    if texts:
        streams.insert(0, tokenize_documents(texts, tokenizer))
    return streams


# ---- packing -----------------------------------------------------------------------------
def row_table(streams: list[np.ndarray], row_len: int, packing: bool, bos_id: int) -> np.ndarray:
    """[R, 3] int64 rows as (stream, start, length): cut every row_len tokens (packing),
    or every row_len tokens of each document, a document starting at each BOS."""
    tables = []
    for index, stream in enumerate(streams):
        if packing:
            starts = np.arange(0, len(stream), row_len, dtype=np.int64)
            ends = np.minimum(starts + row_len, len(stream))
        else:
            doc_starts = np.flatnonzero(np.asarray(stream) == bos_id)
            if not len(doc_starts) or doc_starts[0] != 0:
                doc_starts = np.concatenate([[0], doc_starts])
            doc_ends = np.append(doc_starts[1:], len(stream))
            rows_per_doc = -(-(doc_ends - doc_starts) // row_len)  # [documents]
            first_row = np.cumsum(rows_per_doc) - rows_per_doc
            doc = np.repeat(np.arange(len(doc_starts)), rows_per_doc)  # [rows]: the row's document
            starts = doc_starts[doc] + (np.arange(len(doc)) - first_row[doc]) * row_len
            ends = np.minimum(starts + row_len, doc_ends[doc])
        tables.append(np.stack([np.full_like(starts, index), starts, ends - starts], axis=1))
    return np.concatenate(tables).astype(np.int64)


def pack_row(tokens: np.ndarray, row_len: int, bos_id: int, pad_id: int,
             per_document: bool = True) -> dict[str, np.ndarray]:
    """One training row from up to row_len = T + 1 tokens: inputs, targets (shifted by one),
    loss_mask (0 for padding and for a BOS target: the next document's start is
    unpredictable), segment_ids (documents from 1, 0 = padding), positions (from 0 in
    each document). per_document False: the whole row is segment 1, positions 0..T-1."""
    row = np.full(row_len, pad_id, np.int32)
    row[:len(tokens)] = tokens
    index = np.arange(row_len)
    valid = index < len(tokens)
    starts = valid & (row == bos_id) if per_document else np.zeros(row_len, bool)
    starts[0] = valid[0]  # a document continued from the previous row is a segment too
    segment_ids = np.where(valid, np.cumsum(starts), 0)
    last_start = np.maximum.accumulate(np.where(starts, index, 0))
    positions = np.where(valid, index - last_start, 0)
    return {
        "inputs": row[:-1],
        "targets": row[1:],
        "loss_mask": (valid[1:] & (row[1:] != bos_id)).astype(np.float32),
        "segment_ids": segment_ids[:-1].astype(np.int32),
        "positions": positions[:-1].astype(np.int32),
    }


class _PackedRows:
    """Random access to the packed rows (a Grain data source)."""

    def __init__(self, streams, table, row_len: int, bos_id: int, pad_id: int, per_document: bool):
        self.streams, self.table = streams, table
        self.row_len, self.bos_id, self.pad_id, self.per_document = row_len, bos_id, pad_id, per_document

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        stream, start, length = self.table[index]
        tokens = self.streams[stream][start:start + length]
        return pack_row(tokens, self.row_len, self.bos_id, self.pad_id, self.per_document)


class Loader:
    """An endless iterator over this process's batches (dicts of [b, T] numpy arrays).

    `get_state()` -> {"next_index": int} and `set_state(state)` checkpoint and
    restore the exact position (a fresh loader built from the same config and
    set to a saved state yields the same batches as the original did).
    """

    def __init__(self, dataset: grain.IterDataset, rows: _PackedRows):
        self._iterator = iter(dataset)
        self.rows_per_epoch = len(rows)
        self.tokens_per_epoch = int(rows.table[:, 2].sum())

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        """The iterator position, JSON-serialisable."""
        return dict(self._iterator.get_state())

    def set_state(self, state: dict) -> None:
        """Moves to a position `get_state` returned."""
        self._iterator.set_state(dict(state))


def make_loader(data: DataConfig, *, tokenizer, seq_len: int, global_batch_size: int,
                process_index: int = 0, process_count: int = 1, seed: int = 0) -> Loader:
    """The loader of this process's share (global_batch_size // process_count rows per batch)."""
    if seq_len < 1 or global_batch_size < 1:
        raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {global_batch_size}")
    if global_batch_size % process_count:
        raise UserError(f"train.batch_size ({global_batch_size}) must be a multiple of the number "
                        f"of processes ({process_count})")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    streams = token_streams(data, tokenizer)
    row_len = seq_len + 1
    rows = _PackedRows(streams, row_table(streams, row_len, data.packing, tokenizer.bos_id), row_len,
                       tokenizer.bos_id, getattr(tokenizer, "pad_id", 0), data.packing_mask)
    dataset = grain.MapDataset.source(rows)
    if data.shuffle:
        dataset = dataset.shuffle(seed=(seed if data.seed is None else data.seed) % 2**32)
    local_batch = global_batch_size // process_count
    dataset = (dataset.repeat(None)  # epoch e reshuffles with seed + e
               .batch(local_batch, drop_remainder=True)
               .slice(slice(process_index, None, process_count)))
    options = grain.ReadOptions(num_threads=1 if data.prefetch else 0, prefetch_buffer_size=data.prefetch)
    return Loader(dataset.to_iter_dataset(options), rows)
