"""Exact resumption: a run killed with SIGKILL, restarted, stopped with SIGTERM (which
checkpoints), and restarted again logs the losses of an uninterrupted run, bit for bit;
and continued training from another run's checkpoint."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import QUICK, use_compile_cache

from mixtral_jax.train.config import load_run_config
from mixtral_jax.train.main import PREEMPTED_EXIT_CODE, train
from mixtral_jax.train.metrics import read_metrics

RUN = [*QUICK, "train.steps=40", "checkpoint.every=5", "train.log_every=1"]
TIMEOUT = 300  # seconds any one phase may take on a busy machine


def launch(run_dir, env):
    command = [sys.executable, "-m", "mixtral_jax.cli", "train", "--config", "tiny", f"run_dir={run_dir}", *RUN]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, what: str):
    """Polls until condition() holds while `process` still runs."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before {what}:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def saved_steps(run_dir) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def logged_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] or [0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, in this process: its run directory."""
    run_dir = tmp_path_factory.mktemp("reference")
    use_compile_cache()
    train(load_run_config("tiny", [f"run_dir={run_dir}", *RUN]))
    return run_dir


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_exactly(tmp_path, reference):
    env = {**os.environ, **use_compile_cache(), "PYTHONUNBUFFERED": "1"}
    expected = {r["step"]: r["loss"] for r in read_metrics(reference / "metrics.jsonl")}
    assert sorted(expected) == list(range(1, 41))

    run_dir = tmp_path / "run"
    first = launch(run_dir, env)  # SIGKILL as soon as the first checkpoint is complete
    wait_for(lambda: saved_steps(run_dir), first, "the first checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = saved_steps(run_dir)[-1]
    assert killed_at < 40

    launched = time.time()
    second = launch(run_dir, env)  # SIGTERM once it has trained past the checkpoint
    metrics = run_dir / "metrics.jsonl"  # the killed run logged past its checkpoint: wait for new lines
    wait_for(lambda: metrics.stat().st_mtime > launched and max(logged_steps(run_dir)) > killed_at,
             second, "a step after the restart")
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=TIMEOUT)
    assert second.returncode == PREEMPTED_EXIT_CODE, stderr
    stopped_at = int(re.search(r"step (\d+) is saved", stderr).group(1))
    assert killed_at < stopped_at < 40 and saved_steps(run_dir)[-1] == stopped_at

    assert train(load_run_config("tiny", [f"run_dir={run_dir}", *RUN]))["step"] == 40  # to the end, here
    assert saved_steps(run_dir) == saved_steps(reference) == [35, 40]  # checkpoint.keep=2 of every 5
    resumed = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
    assert resumed == expected  # every step once, each loss bit for bit


def test_init_from_a_run_starts_from_its_parameters_and_optimizer(tmp_path, reference):
    losses = {}
    for reset in ("false", "true"):
        run = load_run_config("tiny", [f"run_dir={tmp_path / reset}", f"init_from={reference}",
                                       f"train.reset_optimizer={reset}", *RUN, "train.steps=3"])
        assert run.model_config == load_run_config("tiny", RUN).model_config
        train(run)
        losses[reset] = [r["loss"] for r in read_metrics(tmp_path / reset / "metrics.jsonl")]
    first_losses = [r["loss"] for r in read_metrics(reference / "metrics.jsonl")][:3]
    assert max(losses["false"]) < min(first_losses) - 0.5  # the same batches, on trained weights
    assert losses["false"][0] == losses["true"][0]  # the same weights before the first update...
    assert losses["false"][1] != losses["true"][1]  # ...which uses the run's Adam moments, or fresh ones


def test_init_from_a_checkpoint_of_another_shape_is_one_line(tmp_path, reference):
    command = [sys.executable, "-m", "mixtral_jax.cli", "train", "--config", "tiny", f"init_from={reference}",
               "model.num_hidden_layers=3", f"run_dir={tmp_path / 'deeper'}", *QUICK]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    # the whole of stderr, read at exit: a failed read of the checkpoint would add tracebacks
    assert re.fullmatch(r"mixtral-jax train: error: .*: parameters do not match the model config: "
                        r"layers/\S+ is \(2, [\d, ]+\) in the checkpoint, \(3, [\d, ]+\) in the model\n",
                        done.stderr), done.stderr
    assert not (tmp_path / "deeper" / "config.yaml").exists()  # no half-made run left to resume


def test_a_damaged_checkpoint_is_named_with_the_array_it_breaks_on(tmp_path):
    import mixtral_jax as mj
    from mixtral_jax.checkpoint import load_checkpoint, save_params
    from mixtral_jax.configtools import UserError

    step = save_params(tmp_path / "run", mj.init(mj.preset("tiny"), seed=0))
    for data in step.rglob("d/*"):  # every OCDBT data file cut short
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(UserError, match=r"parameters unreadable: damaged, or not of the model config "
                                        r"\(OUT_OF_RANGE: Error (reading|opening) "):
        load_checkpoint(tmp_path / "run")


def test_a_damaged_checkpoint_is_one_line_on_stderr(tmp_path):
    """The reads still in flight when one fails call into Orbax's closed event loop; each
    printed a traceback after the error. In a process of its own: another test's stragglers
    must not land here, nor these in another test."""
    import mixtral_jax as mj
    from mixtral_jax.checkpoint import save_params

    step = save_params(tmp_path / "run", mj.init(mj.preset("tiny"), seed=0))
    for data in step.rglob("d/*"):
        data.write_bytes(data.read_bytes()[:100])
    command = [sys.executable, "-m", "mixtral_jax.cli", "generate", "--checkpoint", str(tmp_path / "run"),
               "--prompt", "hi", "tokenizer=bytes", f"compile_cache={tmp_path / 'xla'}"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "parameters unreadable: damaged" in done.stderr, done.stderr


def test_closed_loop_reports_are_dropped_and_others_kept(tmp_path, monkeypatch):
    """The filter drops a `call_soon_threadsafe` into a closed loop and hands on anything else;
    a read that succeeds leaves the hook as it found it."""
    import asyncio
    import types

    import mixtral_jax as mj
    from mixtral_jax.checkpoint import _closed_loop_filter, load_checkpoint, save_params

    previous = lambda report: None
    monkeypatch.setattr(sys, "unraisablehook", previous)
    save_params(tmp_path / "run", mj.init(mj.preset("tiny"), seed=0))
    load_checkpoint(tmp_path / "run")
    assert sys.unraisablehook is previous

    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError) as closed:
        loop.call_soon_threadsafe(print)
    report = lambda err: types.SimpleNamespace(object=None, exc_value=err, exc_traceback=err.__traceback__)
    handed_on = []
    hook = _closed_loop_filter(handed_on.append)
    hook(report(closed.value))
    assert handed_on == []
    try:
        raise RuntimeError("Event loop is closed")  # the same words from elsewhere: kept
    except RuntimeError as err:
        other = report(err)
    hook(other)
    assert handed_on == [other]
