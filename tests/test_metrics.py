"""Metrics files (JSONL, TensorBoard), resume truncation, the end-of-run plot, the train bench."""

import json
import math

import numpy as np
import pytest

from mixtral_jax.allocator import reusing_freed_memory
from mixtral_jax.configtools import UserError
from mixtral_jax.train.metrics import MetricsLogger, read_metrics
from mixtral_jax.train.plots import plot_run


def step_metrics(step, layers=2, experts=4):
    load = np.full((layers, experts), 1 / experts) + 0.05 * np.sin(np.arange(layers * experts) + step).reshape(layers, experts)
    return {"loss": np.float32(5.0 / step), "aux_loss": 0.02 + 0.001 * step, "lr": 1e-3,
            "tokens_per_sec": 1234.5, "expert_load": load}


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3) as logger:
        logger.log(1, step_metrics(1))
        logger.log(2, {**step_metrics(2), "grad_norm": float("nan")})
        # every line is on disk as soon as it is logged (a killed run keeps it)
        assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(5.0) and records[1]["grad_norm"] is None
    assert np.allclose(records[0]["expert_load"], step_metrics(1)["expert_load"])
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 500  # scalars, 8 expert-load curves


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", total_steps=3, enabled=False)
    logger.log(1, step_metrics(1))
    logger.close()
    assert not (tmp_path / "run").exists()


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10) as logger:
        for step in range(1, 6):
            logger.log(step, step_metrics(step))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn by a kill mid-write
    with MetricsLogger(tmp_path, total_steps=10, resume_step=3) as logger:
        logger.log(4, step_metrics(4))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    with MetricsLogger(tmp_path, total_steps=10) as logger:  # a new run starts afresh
        logger.log(1, step_metrics(1))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_plot_run_writes_a_png(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            record = {k: np.asarray(v).tolist() for k, v in step_metrics(step, layers=3, experts=8).items()}
            f.write(json.dumps({"step": step, **record}) + "\n")
    path = plot_run(tmp_path)
    assert path == tmp_path / "training.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 1000 and height > 400


def test_plot_run_without_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing to plot"):
        plot_run(tmp_path)


def tiny_bench_config():
    from mixtral_jax.train.config import load_run_config

    return load_run_config("bench-tiny", ["train.steps=2", "train.batch_size=2", "train.seq_len=16",
                                          "model.vocab_size=512", "model.hidden_size=64",
                                          "model.intermediate_size=64",
                                          "model.moe_impl=reference"])  # the cheapest step to compile


def test_train_bench_reports_its_keys():
    from mixtral_jax.train import bench

    result = bench.measure(tiny_bench_config(), torch_steps=0, matmul_size=256)
    assert set(bench.RESULT_KEYS) <= set(result)
    assert result["malloc_tuned"] is reusing_freed_memory()  # pytest's process: as earlier tests left it
    assert result["tokens_per_sec"] > 0 and 0 < result["mfu"] and result["peak_rss_mb"] > 0
    assert math.isfinite(result["final_loss"])
    assert result["torch_tokens_per_sec"] is None and result["speedup_vs_torch"] is None
    assert result["torch_malloc_tuned_tokens_per_sec"] is None


@pytest.mark.slow
def test_train_bench_times_transformers_in_processes_of_its_own():
    from mixtral_jax.train import bench

    run = tiny_bench_config()
    result = bench.measure(run, torch_steps=3, blocks=2, warmup=1, matmul_size=256)
    tokens = run.train.batch_size * run.train.seq_len
    for prefix in bench.TORCH_RUNS:
        seconds = result[f"{prefix}_step_time_median_s"]
        assert seconds > 0 and result[f"{prefix}_tokens_per_sec"] == pytest.approx(tokens / seconds)
        assert result[f"speedup_vs_{prefix}"] > 0 and result[f"{prefix}_mfu"] > 0
    assert result["meets_goals"]["speedup_vs_torch"] == (result["speedup_vs_torch"] >= 1.2)


def test_a_failing_transformers_process_is_an_error_not_a_hang():
    from mixtral_jax.train import bench

    run = tiny_bench_config()
    out_of_vocab = bench.random_batches(run.model_config.vocab_size * 4, 2, 16, seed=1)  # ids past the embedding
    process = bench.TorchProcess(run, out_of_vocab, warmup=1, tune_malloc=False)
    try:
        with pytest.raises(RuntimeError, match="transformers' process failed: IndexError"):
            process.wait_ready()
    finally:
        process.close()
