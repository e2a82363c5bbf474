"""Perplexity and per-document log-likelihoods over a text or JSONL file.

Documents are read as training reads them (`mixtral_jax.train.data`): a text
file is one document, a JSONL file one per line (its `text` field). Each is
scored framed as training sees it, `BOS ids... EOS`: every token after BOS is
predicted once. A document longer than `seq_len` is cut into windows of
`seq_len` predictions, each starting afresh (the window's first token is the
previous window's last), so the numbers match a model trained at `seq_len`.
A pre-tokenized `.npy` file (training's `tokens` source) holds no documents to
read this way and is refused, as are invalid UTF-8 and a file with no text.
"""

from __future__ import annotations

import contextlib
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.configtools import UserError
from mixtral_jax.documents import file_format, holds_text, read_texts
from mixtral_jax.infer.generate import MIN_PROMPT_BUCKET, batch_rows, bucket
from mixtral_jax.model import token_nll


def read_documents(path: str | pathlib.Path, text_field: str = "text") -> list[str]:
    """The documents of a text file (one) or a JSONL file (one per non-blank line); UserError
    for a missing file, a pre-tokenized .npy file (training data, not documents), or no text."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"data file {path} is a directory; name a file")
    if not path.is_file():
        raise UserError(f"data file {path} not found")
    fmt = file_format(path)
    if fmt == "tokens":
        raise UserError(f"{path}: eval reads text or JSONL documents; a .npy file holds token ids "
                        f"(training data), not documents")
    texts = read_texts(path, fmt, text_field)
    if not holds_text(texts):
        raise UserError(f"{path} holds no documents")
    return texts


def windows(tokens: list[int], seq_len: int) -> list[list[int]]:
    """Cuts a framed document into windows of at most seq_len + 1 tokens sharing their edge token."""
    return [tokens[start:start + seq_len + 1] for start in range(0, max(len(tokens) - 1, 1), seq_len)]


@functools.partial(jax.jit, static_argnames=("graphdef", "experts_fn"))
def _window_nll(graphdef, params, tokens, lengths, experts_fn=None):
    """Summed negative log-likelihood of each right-padded window: tokens [B, T+1], lengths [B] -> [B]."""
    model = nnx.merge(graphdef, params)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    steps = jnp.arange(inputs.shape[1])[None, :]
    predicted = steps < (lengths[:, None] - 1)  # [B, T]: real target positions
    positions = jnp.where(predicted, steps, -1)
    logits = model.forward(inputs, positions, experts_fn=experts_fn).logits  # [B, T, V]
    return jnp.sum(jnp.where(predicted, token_nll(logits, targets), 0.0), axis=-1)


def score(model, documents: list[list[int]], *, seq_len: int, batch_size: int, mesh=None,
          progress: bool = False) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) of each framed document (token ids incl. BOS and EOS)."""
    from tqdm import tqdm

    context = model.config.max_position_embeddings
    if seq_len > context:
        raise UserError(f"seq_len {seq_len} exceeds the model's context {context}")
    graphdef, params = nnx.split(model)
    experts_fn, multiple, scope = None, 1, contextlib.nullcontext()
    if mesh is not None:
        from mixtral_jax import sharding

        experts_fn, multiple, scope = (sharding.experts_fn(mesh, model.config),
                                       sharding.batch_devices(mesh), sharding.use_mesh(mesh))
    pieces = [(doc, w) for doc, tokens in enumerate(documents) for w in windows(tokens, seq_len)]
    pieces.sort(key=lambda piece: len(piece[1]))  # similar lengths share a batch
    totals = [[0.0, 0] for _ in documents]
    with scope:
        for first in tqdm(range(0, len(pieces), batch_size), unit="batch", disable=not progress):
            batch = pieces[first:first + batch_size]
            rows = batch_rows(len(batch), multiple)
            width = min(bucket(max(len(w) for _, w in batch) - 1, MIN_PROMPT_BUCKET), seq_len) + 1
            tokens = np.zeros((rows, width), np.int32)
            lengths = np.zeros((rows,), np.int32)
            for row, (_, w) in enumerate(batch):
                tokens[row, :len(w)], lengths[row] = w, len(w)
            nll = jax.device_get(_window_nll(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                             experts_fn=experts_fn))
            for row, (doc, w) in enumerate(batch):
                totals[doc][0] += float(nll[row])
                totals[doc][1] += len(w) - 1
    return [(nll, count) for nll, count in totals]


def evaluate(model, tokenizer, path, *, seq_len: int, batch_size: int, text_field: str = "text",
             mesh=None, progress: bool = False) -> tuple[dict, list[dict]]:
    """(summary with the perplexity, one record per document) for the documents in `path`."""
    texts = read_documents(path, text_field)
    documents = tokenizer.encode_batch(texts, bos=True, eos=True)
    results = score(model, documents, seq_len=seq_len, batch_size=batch_size, mesh=mesh, progress=progress)
    records = [{"doc": i, "tokens": count, "log_likelihood": -nll,
                "perplexity": math.exp(nll / count)} for i, (nll, count) in enumerate(results)]
    total_nll, total = sum(nll for nll, _ in results), sum(count for _, count in results)
    summary = {"documents": len(records), "tokens": total, "nll_per_token": total_nll / total,
               "perplexity": math.exp(total_nll / total)}
    return summary, records
