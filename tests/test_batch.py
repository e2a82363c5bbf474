"""Batch jobs: error records, duplicate ids, per-row settings, process shards, SIGKILL + resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

import mixtral_jax as mj
from mixtral_jax.checkpoint import save_params
from mixtral_jax.configtools import UserError
from mixtral_jax.infer import runtime
from mixtral_jax.infer.batch import finished_lines, part_path, run_job
from mixtral_jax.infer.generate import Generator, Request
from mixtral_jax.tokenizer import load_tokenizer

SETTINGS = runtime.InferenceConfig(max_new_tokens=6, tokenizer="bytes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = mj.preset("tiny", vocab_size=259, tokenizer="bytes", moe_impl="reference",
                       max_position_embeddings=128, initializer_range=0.2)
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    save_params(run_dir, mj.init(config, seed=0))
    return run_dir


@pytest.fixture(scope="module")
def generator(checkpoint):
    model = runtime.load_model(str(checkpoint))
    return Generator(model, load_tokenizer(model.config, "bytes"))


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


MIXED = [
    b'\xef\xbb\xbf{"id": "a", "prompt": "hello"}',  # a byte-order mark before the first row
    b"{not json",
    {"prompt": "no id"},
    {"id": "b", "prompt": 5},
    {"id": "c", "prompt": "x" * 200},  # longer than the 128-token context
    b'{"id": "d", "prompt": "\xff\xfe"}',
    {"id": "a", "prompt": "again"},
    {"id": "e", "prompt": "hey", "temperature": 0.8, "top_k": 5, "max_new_tokens": 3},
    {"id": "f", "prompt": "abc", "temperature": "hot"},
    {"id": 7, "messages": [{"role": "user", "content": "hi"}]},  # the byte tokenizer has no chat format
    {"id": "g", "prompt": "stop early", "stop": ["\n", "q"]},
    b'{"id": "h", "prompt": "a\\ud800"}',  # an unpaired surrogate escape: no UTF-8, no tokens
    b"[" * 100_000,  # deeper than Python's json parser recurses
    b'{"id": "i", "prompt": ',  # cut short: the error names the column after its last character
    {"id": "j", "prompt": "hey", "tempreature": 2},  # a misspelt setting would be ignored silently
    {"id": "k", "prompt": "hey", "source": "notes", "max_new_tokens": 2},  # other keys: metadata, ignored
]


def run_twice(tmp_path, generator, rows, batch_size):
    """The records and counts of a job over `rows`, after checking that running the same job
    again completes nothing more."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, rows)
    counts = run_job(generator, source, out, SETTINGS, batch_size=batch_size, progress=False)
    records = read_records(out)
    assert run_job(generator, source, out, SETTINGS, batch_size=batch_size, progress=False)["completed"] == 0
    return records, counts


def test_bad_rows_become_error_records_and_the_job_goes_on(tmp_path, generator):
    records, counts = run_twice(tmp_path, generator, MIXED, batch_size=4)
    records = {r["line"]: r for r in records}
    assert sorted(records) == list(range(1, len(MIXED) + 1))
    errors = {line: r["error"] for line, r in records.items() if "error" in r}
    assert set(errors) == {2, 3, 4, 5, 6, 7, 9, 10, 12, 13, 14, 15}
    for line, word in {2: "JSON", 3: "id", 4: "prompt", 5: "context", 6: "UTF-8", 7: "duplicate",
                       9: "temperature", 10: "chat", 12: "not valid Unicode", 13: "nested too deeply",
                       14: "Expecting value at column 23", 15: "did you mean 'temperature'"}.items():
        assert word in errors[line], errors[line]
    assert records[6]["id"] == "d" and records[2]["id"] is None
    assert records[1]["finish_reason"] in ("eos", "length") and records[1]["completion_tokens"] <= 6
    assert records[1]["prompt_tokens"] == 6  # bos + 5 bytes
    assert records[8]["completion_tokens"] <= 3
    stopped = Request(generator.tokenizer.encode("stop early"), 6, stop=("\n", "q"))  # row 11, run alone
    (alone,) = generator.run([stopped])
    assert (records[11]["text"], records[11]["finish_reason"]) == (alone.text, alone.finish_reason)
    assert records[16]["completion_tokens"] <= 2
    assert (counts["completed"], counts["errors"]) == (4, 12)


OUT_OF_RANGE = [  # bad settings among good rows of the same batch
    {"id": "ok1", "prompt": "hello", "temperature": 0.8, "top_k": 5},
    {"id": "neg", "prompt": "hello", "seed": -1, "temperature": 0.8, "top_k": 5},
    {"id": "big", "prompt": "hi", "seed": 99999999999},
    {"id": "ok2", "prompt": "hey", "seed": 4294967295, "temperature": 0.8, "top_k": 5},
    {"id": "k", "prompt": "hey", "top_k": 99999999999, "temperature": 1},  # k >= vocabulary: keep all
    b'{"id": "t", "prompt": "hey", "temperature": NaN}',
    b'{"id": "p", "prompt": "hey", "temperature": 1, "top_p": NaN}',
    {"id": "s", "prompt": "hey", "stop": ["x", ""]},
]


def test_out_of_range_settings_become_error_records(tmp_path, generator):
    records, counts = run_twice(tmp_path, generator, OUT_OF_RANGE, batch_size=8)
    records = {r["id"]: r for r in records}
    assert sorted(r["line"] for r in records.values()) == list(range(1, len(OUT_OF_RANGE) + 1))
    for row_id, word in {"neg": "2**32", "big": "2**32", "t": "temperature", "p": "top_p", "s": "stop"}.items():
        assert word in records[row_id]["error"], records[row_id]
    for row_id in ("ok1", "ok2", "k"):
        assert records[row_id]["finish_reason"] in ("eos", "length"), records[row_id]
    assert (counts["completed"], counts["errors"]) == (3, 5)


def test_rows_that_finish_early_make_room_and_change_no_result(tmp_path, generator):
    lengths = [9, 1, 4, 12, 2, 7]
    rows = [{"id": i, "prompt": "ab" * (i % 3 + 1) + "c" * i, "max_new_tokens": n} for i, n in enumerate(lengths)]
    rows[3]["stop"] = ["b"]
    records, _ = run_twice(tmp_path, generator, rows, batch_size=2)
    assert [r["id"] for r in records] != sorted(r["id"] for r in records)  # in the order rows finished
    requests = [Request(generator.tokenizer.encode(r["prompt"]), r["max_new_tokens"],
                        stop=tuple(r.get("stop", ()))) for r in rows]
    alone = [c for i in range(0, len(requests), 2) for c in generator.run(requests[i:i + 2])]  # batch by batch
    for record in records:
        expected = alone[record["id"]]
        assert (record["text"], record["finish_reason"], record["completion_tokens"]) == (
            expected.text, expected.finish_reason, len(expected.tokens))


def test_process_shards_cover_every_line_once(tmp_path, generator):
    source = tmp_path / "in.jsonl"
    rows = [{"id": i, "prompt": "p" * (i % 7 + 1), "temperature": 0.8, "top_k": 5} for i in range(8)]
    write_lines(source, rows)  # sampled like row "e" above: the same compiled programs
    for index in range(2):
        run_job(generator, source, tmp_path / "out.jsonl", SETTINGS, batch_size=4, process_index=index,
                process_count=2, progress=False)
    parts = [read_records(part_path(tmp_path / "out.jsonl", i, 2)) for i in range(2)]
    assert sorted(r["id"] for r in parts[0] + parts[1]) == list(range(8))
    assert {r["line"] % 2 for r in parts[1]} == {0}


def test_retry_errors_reruns_only_the_failed_lines(tmp_path, generator):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "x" * 200}, {"id": "c", "prompt": "hi"}]
    write_lines(source, rows)
    run = lambda **kw: run_job(generator, source, out, SETTINGS, batch_size=2, progress=False, **kw)
    assert (run()["completed"], "context" in read_records(out)[0]["error"]) == (2, True)
    first = out.read_bytes()
    rows[1]["prompt"] = "short now"  # the failed line fixed in place
    write_lines(source, rows)
    assert run()["completed"] == 0 and out.read_bytes() == first  # a plain rerun skips it
    counts = run(retry_errors=True)
    assert (counts["completed"], counts["errors"], counts["skipped"]) == (1, 0, 2)
    records = {r["line"]: r for r in read_records(out)}
    assert sorted(records) == [1, 2, 3] and "error" not in records[2] and records[2]["id"] == "b"
    assert out.read_bytes().startswith(b"".join(line + b"\n" for line in first.splitlines()[1:]))  # kept as written
    assert not list(tmp_path.glob("*.rewrite"))


def test_torn_last_line_is_cut_and_redone(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1, "line": 1, "text": "x"}\n\n{"id": 2, "line": 2, "te')  # a blank line too
    assert finished_lines(out) == {1}
    assert out.read_bytes().endswith(b'"x"}\n\n')


@pytest.mark.parametrize("content", [
    b'{"id": "a", "prompt": "The"}\n{"id": "b", "prompt": "Hi"}',  # the input given as --output
    b'{"id": "b", "prompt": "Hi"}',  # one line, no newline
    b'{"id": 1, "line": 1, "text": "x"}\nnotes without a newline',  # a record, then not one
])
def test_a_file_that_is_not_this_jobs_output_is_refused_untouched(tmp_path, content):
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with pytest.raises(UserError, match="not a record of this job"):
        finished_lines(out)
    assert out.read_bytes() == content


@pytest.mark.slow
def test_sigkilled_job_resumes_without_gaps_or_duplicates(tmp_path, checkpoint):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # prompt lengths over several buckets: each new bucket compiles, so the kill lands mid-job
    write_lines(source, [{"id": f"r{i}", "prompt": "z" * (3 * i + 1)} for i in range(40)])
    command = [sys.executable, "-m", "mixtral_jax.cli", "batch", "--checkpoint", str(checkpoint),
               "--input", str(source), "--output", str(out), "--no-progress", "batch_size=4",
               "max_new_tokens=4", "tokenizer=bytes", f"compile_cache={tmp_path / 'xla'}"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # the job's start (imports, checkpoint, first compile) on a busy machine
    while time.time() < deadline and job.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    written = out.read_bytes().count(b"\n")
    assert 4 <= written < 40, f"kill missed the job ({written} rows written)"

    finish = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert json.loads(finish.stdout.splitlines()[-1])["skipped"] == written
    records = read_records(out)
    assert sorted(r["line"] for r in records) == list(range(1, 41))
    assert all(r["finish_reason"] in ("eos", "length") for r in records)


def test_bench_commands_name_the_machine(capsys):
    """Every `mixtral-jax bench` JSON says what it ran on: figures move with the CPU generation."""
    from mixtral_jax.cli import main

    assert main(["bench", "batch", "--preset", "tiny", "--rows", "3", "--batch-size", "2", "--prompt-len", "4",
                 "--max-new-tokens", "2", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["continuous"]["tokens_per_s"] > 0
    machine = report["machine"]
    assert machine["backend"] == jax.default_backend() and machine["device_count"] == jax.device_count()
    assert machine["jax"] == jax.__version__ and machine["cores"] >= 1


def test_cpu_description_reads_cpuinfo():
    from mixtral_jax.cpuinfo import cpu_description

    cpu = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
           "model name\t: AMD EPYC 9B45\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    assert cpu_description(cpu.format(n=0, flags="avx512f avx512bw") + cpu.format(n=1, flags="avx512f")) == {
        "cpu": "AMD EPYC 9B45", "cpu_family": 26, "cpu_model": 2, "avx512": True}
    assert cpu_description(cpu.format(n=0, flags="avx512_bf16"))["avx512"] is False
    assert cpu_description("") == {}


def test_bench_batch_times_both_ways_over_the_same_tokens():
    import argparse

    from mixtral_jax.infer import batch_bench

    args = argparse.Namespace(preset="tiny", rows=6, batch_size=2, prompt_len=4, max_new_tokens=9, repeats=1)
    report = batch_bench.run(args)
    lengths = report["new_tokens"]
    assert 1 <= lengths["min"] <= lengths["median"] <= lengths["max"] <= 9 and lengths["total"] >= 6
    for way in ("batch_by_batch", "continuous"):  # seconds rounded to 0.1 ms
        seconds = report[way]["seconds"]
        assert report[way]["tokens_per_s"] == pytest.approx(lengths["total"] / seconds, rel=6e-5 / seconds + 1e-3)
    ratio = report["batch_by_batch"]["seconds"] / report["continuous"]["seconds"]
    assert report["speedup"] == pytest.approx(ratio, rel=0.05, abs=0.01)
