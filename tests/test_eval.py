"""Eval: perplexity is exp(mean NLL) of the model's own logits, windows included."""

import importlib
import json

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.cli import main
from mixtral_jax.checkpoint import save_params
from mixtral_jax.infer import evaluate as evaluate_module
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


def test_eval_windows_default_to_the_models_context(tmp_path, capsys):
    config = mj.preset("tiny", vocab_size=259, tokenizer="bytes", moe_impl="reference", max_position_embeddings=32)
    save_params(tmp_path / "run", mj.init(config, seed=0))
    (tmp_path / "doc.txt").write_text("a document of a hundred bytes or so, long enough for several windows " * 2)
    args = ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "doc.txt"), "compile_cache="]

    def perplexity(*settings):
        assert main(args + list(settings)) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])["perplexity"]

    unset, at_context = perplexity(), perplexity("seq_len=32")
    assert unset == at_context != perplexity("seq_len=16")  # windows of the context, not of 2048
    assert main(args + ["seq_len=64"]) == 2


def one_line_error(capsys, command: str) -> str:
    """The stderr of a failed command, checked to be one `error:` line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mixtral-jax {command}: error:"), err
    return err


@pytest.fixture
def run_dir(tmp_path):
    config = mj.preset("tiny", vocab_size=259, tokenizer="bytes", moe_impl="reference")
    save_params(tmp_path / "run", mj.init(config, seed=0))
    return tmp_path / "run"


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "a\xffb"}\n', "bad.jsonl:2: not valid UTF-8 (byte 0xff)"),
    ("bad.txt", b"ok\nstill ok\na\xc3(b", "bad.txt:3: not valid UTF-8 (byte 0xc3)"),
    ("empty.txt", b"", "empty.txt holds no documents"),
    ("blank.txt", b" \n\n", "blank.txt holds no documents"),
    ("empty-text.jsonl", b'{"text": ""}\n', "empty-text.jsonl holds no documents"),
    ("empty.jsonl", b"", "empty.jsonl holds no documents"),
    ("tokens.npy", None, "tokens.npy: eval reads text or JSONL documents"),
    ("array.jsonl", b'{"text": "ok"}\n["text"]\n', "array.jsonl:2: a line must be a JSON object, got list"),
    ("deep.jsonl", b"[" * 100_000 + b"\n", "deep.jsonl:1: not valid JSON (nested too deeply)"),
    ("folder", "dir", "data file {path} is a directory"),
])
def test_eval_bad_data_is_one_line(tmp_path, capsys, run_dir, name, content, message):
    path = tmp_path / name
    if content is None:
        np.save(path, np.arange(1, 40, dtype=np.int32))
    elif content == "dir":
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(path), "compile_cache="]) == 2
    assert message.format(path=path) in one_line_error(capsys, "eval")


def test_eval_output_is_checked_before_scoring(tmp_path, capsys, run_dir, monkeypatch):
    (tmp_path / "doc.txt").write_text("one document of plain text")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "scores").mkdir()
    args = ["eval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "doc.txt"), "compile_cache="]
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "score", lambda *a, **k: pytest.fail("scored before --output was checked"))
        for output, message in [(tmp_path / "scores", "is a folder"),
                                (tmp_path / "a-file" / "s.jsonl", "a-file is a file, not a folder")]:
            assert main(args + ["--output", str(output)]) == 2
            assert message in one_line_error(capsys, "eval")
    output = tmp_path / "new" / "folder" / "scores.jsonl"  # missing folders are created, as batch does
    assert main(args + ["--output", str(output)]) == 0
    assert json.loads(output.read_text())["tokens"] == 27


def test_an_oserror_escaping_a_command_is_one_line(tmp_path, capsys, run_dir, monkeypatch):
    (tmp_path / "prompts.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    (tmp_path / "out").mkdir()
    assert main(["batch", "--checkpoint", str(run_dir), "--input", str(tmp_path / "prompts.jsonl"),
                 "--output", str(tmp_path / "out"), "--no-progress", "max_new_tokens=2",
                 "compile_cache="]) == 2
    assert f"{tmp_path / 'out'}: Is a directory" in one_line_error(capsys, "batch")

    def fail(args):
        raise PermissionError(13, "Permission denied", "/some/path")

    monkeypatch.setattr(importlib.import_module("mixtral_jax.commands.eval"), "run", fail)
    assert main(["eval", "--checkpoint", "x", "--data", "y"]) == 2
    assert one_line_error(capsys, "eval") == "mixtral-jax eval: error: /some/path: Permission denied\n"
