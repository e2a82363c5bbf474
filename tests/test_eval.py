"""Eval: perplexity is exp(mean NLL) of the model's own logits, windows included."""

import json

import jax
import numpy as np

import mixtral_jax as mj
from mixtral_jax.cli import main
from mixtral_jax.checkpoint import save_params
from mixtral_jax.infer.evaluate import evaluate, windows
from mixtral_jax.tokenizer import ByteTokenizer

TEXTS = ["hi", "a short document", "a document long enough to need several windows of sixteen tokens"]


def direct_nll(model, pieces):
    """NLL of each token list from one call of model(tokens) (right padding: causal, so harmless)."""
    tokens = np.zeros((len(pieces), max(map(len, pieces))), np.int32)
    for row, piece in enumerate(pieces):
        tokens[row, :len(piece)] = piece
    log_probs = np.asarray(jax.nn.log_softmax(model(tokens), axis=-1))
    return [-sum(log_probs[row, i, t] for i, t in enumerate(piece[1:])) for row, piece in enumerate(pieces)]


def test_perplexity_equals_exp_mean_nll(tmp_path):
    model = mj.init(mj.preset("tiny", vocab_size=259, moe_impl="reference", initializer_range=0.2), seed=0)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    summary, records = evaluate(model, ByteTokenizer(), data, seq_len=16, batch_size=2)

    docs = ByteTokenizer().encode_batch(TEXTS, bos=True, eos=True)
    pieces = [(doc, w) for doc, tokens in enumerate(docs) for w in windows(tokens, 16)]
    window_nll = direct_nll(model, [w for _, w in pieces])
    nll = [sum(n for (doc, _), n in zip(pieces, window_nll) if doc == d) for d in range(len(docs))]
    assert len(windows(docs[2], 16)) == 5 and [r["tokens"] for r in records] == [len(d) - 1 for d in docs]
    np.testing.assert_allclose([-r["log_likelihood"] for r in records], nll, rtol=1e-5)
    total = sum(len(d) - 1 for d in docs)
    np.testing.assert_allclose(summary["perplexity"], np.exp(sum(nll) / total), rtol=1e-5)


def test_eval_command_writes_records(tmp_path, capsys):
    config = mj.preset("tiny", vocab_size=259, tokenizer="bytes", moe_impl="reference")
    save_params(tmp_path / "run", mj.init(config, seed=0))
    (tmp_path / "doc.txt").write_text("one document of plain text")
    code = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "doc.txt"),
                 "--output", str(tmp_path / "scores.jsonl"), "seq_len=64", "compile_cache="])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    (record,) = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert summary["tokens"] == record["tokens"] == 27  # 26 bytes + EOS
    np.testing.assert_allclose(summary["perplexity"], record["perplexity"])
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "nope.txt")]) == 2
