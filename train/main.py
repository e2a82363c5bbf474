"""The training job: config -> mesh -> model and optimizer -> loop -> checkpoints.

Restarting the same command resumes from the run directory's latest
checkpoint: parameters, optimizer state, step, RNG and the data iterator's
position, so the losses after a restart are the ones an uninterrupted run logs.

Compromises, named: the host checks each step's finite-loss flag one step
late (after dispatching the next step), so the device never waits for Python;
a checkpoint waits for that check, so no non-finite step is ever saved. The
router losses are averaged over micro-batches (see `train.loss`).
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mixtral_jax import checkpoint, sharding
from mixtral_jax.configtools import UserError
from mixtral_jax.documents import check_output_folder
from mixtral_jax.tokenizer import load_tokenizer
from mixtral_jax.train.checkpointing import Checkpointer, restore_opt_state
from mixtral_jax.train.config import RunConfig
from mixtral_jax.train.data import make_loader
from mixtral_jax.train.metrics import MetricsLogger
from mixtral_jax.train.step import (StateLayout, TrainState, abstract_train_state, init_state, make_optimizer,
                                    make_train_step, stack_layers)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the job stopped early, its checkpoint is saved


def _host(x) -> np.ndarray:
    """A replicated array's value on this host (works when other processes hold shards too)."""
    return np.asarray(x.addressable_data(0))


def _check_run_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
    """`run_dir` as a Path, checked before any work: UserError if it is a file, or lies in
    another run's checkpoints/ folder (a step folder: the new run would nest inside it)."""
    run_dir = check_output_folder(run_dir, "run_dir")
    for folder in [run_dir.resolve(), *run_dir.resolve().parents]:
        if folder.name == checkpoint.CHECKPOINTS and (folder.parent / checkpoint.CONFIG_FILE).is_file():
            raise UserError(f"run_dir {run_dir} is in the {checkpoint.CHECKPOINTS}/ of the run {folder.parent} "
                            f"(a new run would nest there); to resume that run pass run_dir={folder.parent}, "
                            f"else pick another run_dir")
    return run_dir


# the settings that fix which batches a run reads: a saved data position means nothing under others
DATA_STREAM_KEYS = {"data": ("source", "format", "text_field", "tokenizer", "packing", "packing_mask",
                             "shuffle", "seed"),
                    "train": ("batch_size", "seq_len", "seed")}


def _check_resumable(run_dir: pathlib.Path, run: RunConfig) -> None:
    """UserError unless the run saved in `run_dir` can go on under `run`: the same model, and
    the same data stream (settings the saved config.yaml lacks are not compared)."""
    saved = checkpoint.read_run_config(run_dir)
    model = run.model_config.to_dict()
    if saved.get("model") != model:
        changed = sorted(k for k, v in model.items() if (saved.get("model") or {}).get(k) != v)
        raise UserError(f"{run_dir} holds a run of a different model (model.{', model.'.join(changed)} "
                        f"differ); resume it unchanged or pick another run_dir")
    wanted = run.to_dict()
    changed = [f"{section}.{key}" for section, keys in DATA_STREAM_KEYS.items() for key in keys
               if key in (saved.get(section) or {}) and saved[section][key] != wanted[section][key]]
    if changed:
        raise UserError(f"{run_dir} holds a run over another data stream ({', '.join(changed)} differ), "
                        f"so its saved data position does not apply; resume it unchanged, or start a new "
                        f"run_dir with init_from={run_dir} (train.reset_optimizer=false keeps the optimizer)")


def _initial_state(run: RunConfig, mesh, optimizer, checkpointer: Checkpointer, resume_step):
    """(graphdef, state, state shardings, data iterator state or None): resumed from the run
    directory, started from `init_from`, or freshly initialised, always sharded on `mesh`."""
    config, train = run.model_config, run.train
    graphdef, abstract_state, shardings = abstract_train_state(config, mesh, optimizer, train.seed)
    if resume_step is not None:
        state, data_state = checkpointer.restore(resume_step, abstract_state)
        return graphdef, state, shardings, data_state
    make_state = jax.jit(lambda params: init_state(params, optimizer, train.seed), out_shardings=shardings)
    if run.init_from is not None:
        model = checkpoint.restore_params(run.init_from, sharding.abstract_model(config, mesh))
    else:
        model = sharding.init_model(config, mesh, seed=train.seed)
    state = make_state(checkpoint.param_tree(model))
    if run.init_from is not None and not train.reset_optimizer:
        state = state._replace(opt_state=restore_opt_state(run.init_from, state.opt_state))
    return graphdef, state, shardings, None


def _peak_flops(run: RunConfig) -> float | None:
    """FLOP/s of all devices together: train.peak_flops, else measured on CPU (a matmul at the
    model's compute dtype and precision, as `bench train` does), else None."""
    if run.train.peak_flops is not None:
        return run.train.peak_flops or None
    if jax.default_backend() != "cpu":
        return None
    from mixtral_jax.benchmarks.timing import matmul_flops_per_second

    config = run.model_config
    return matmul_flops_per_second(size=2048, dtype=config.dtype, repeats=3, precision=config.matmul_precision)


@contextlib.contextmanager
def _stop_requests():
    """A list that gets a signal number when SIGTERM or SIGINT arrives (the loop checkpoints
    and exits); single-process only: multi-process jobs use JAX's preemption sync point."""
    received: list[int] = []
    if jax.process_count() > 1:
        yield received
        return
    previous = {sig: signal.signal(sig, lambda number, frame: received.append(number))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _should_stop(received: list[int], step: int) -> bool:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off
            return False
    return bool(received)


def train(run: RunConfig) -> dict:
    """Runs (or resumes) the training job `run` describes; returns a short summary."""
    run_dir = _check_run_dir(run.run_dir)
    sharding.initialize_distributed(run.distributed)
    config, train_cfg = run.model_config, run.train
    mesh = sharding.make_mesh(run.mesh)
    sharding.check_divisible(mesh, config, batch_size=train_cfg.micro_batch_size)
    tokenizer = load_tokenizer(config, run.data.tokenizer)
    loader = make_loader(run.data, tokenizer=tokenizer, seq_len=train_cfg.seq_len,
                         global_batch_size=train_cfg.batch_size, process_index=jax.process_index(),
                         process_count=jax.process_count(), seed=train_cfg.seed)
    main = sharding.is_main_process()

    checkpointer = Checkpointer(run_dir, run.checkpoint)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        _check_resumable(run_dir, run)
        if resume_step >= train_cfg.steps:
            checkpointer.close()
            print(f"{run_dir} already finished at step {resume_step} (train.steps={train_cfg.steps}); "
                  f"raise train.steps to go on, or pick another run_dir")
            return {"run_dir": str(run_dir), "step": resume_step}
    optimizer = make_optimizer(train_cfg)
    graphdef, state, shardings, data_state = _initial_state(run, mesh, optimizer, checkpointer, resume_step)
    if main:  # after the start is read: a bad init_from leaves no config.yaml that looks like a run
        checkpoint.write_run_config(run_dir, run.to_dict())
    if data_state is not None:
        loader.set_state(data_state)
    replicated = NamedSharding(mesh, PartitionSpec())
    layout = StateLayout(train_cfg, config.num_hidden_layers, shardings)
    state = layout.for_steps(state)
    train_step = make_train_step(graphdef, optimizer, train_cfg, experts_fn=sharding.experts_fn(mesh, config),
                                 shardings=layout.shardings, batch_sharding=sharding.batch_sharding(mesh),
                                 metrics_sharding=replicated)
    start = int(_host(state.step))
    loop = _Loop(run, checkpointer, start, layout, peak_flops=_peak_flops(run),
                 logger=MetricsLogger(run_dir, train_cfg.steps, enabled=main, resume_step=resume_step))
    stopped_at = None
    try:
        with sharding.use_mesh(mesh), _stop_requests() as stop:
            for step in range(start + 1, train_cfg.steps + 1):
                if _should_stop(stop, step - 1):
                    stopped_at = step - 1
                    break
                batch = sharding.shard_batch(next(loader), mesh)
                state, metrics = train_step(state, batch)
                loop.dispatched(step, metrics)
                if step % run.checkpoint.every == 0 or step == train_cfg.steps:
                    loop.finish_pending()
                    loop.save(step, state, loader.get_state())
            loop.finish_pending()
            if stopped_at is not None:
                loop.save(stopped_at, state, loader.get_state())
    finally:
        checkpointer.close()
        loop.logger.close()
    if stopped_at is not None:
        print(f"stopped by a signal: step {stopped_at} is saved in {run_dir}; run the same command "
              f"to resume", file=sys.stderr)
        return {"run_dir": str(run_dir), "step": stopped_at, "loss": loop.last_loss,
                "exit_code": PREEMPTED_EXIT_CODE}
    summary = {"run_dir": str(run_dir), "step": train_cfg.steps, "loss": loop.last_loss}
    if main:
        from mixtral_jax.train.plots import plot_run

        summary["plot"] = str(plot_run(run_dir))
        if train_cfg.sample_tokens and jax.process_count() == 1:
            summary["sample"] = _sample(nnx.merge(graphdef, stack_layers(state.params)), tokenizer, train_cfg, mesh)
    return summary


def _sample(model, tokenizer, train_cfg, mesh) -> str:
    """A short continuation of train.sample_prompt by the trained model."""
    from mixtral_jax.infer.generate import generate

    (completion,) = generate(model, [train_cfg.sample_prompt], tokenizer, mesh=mesh,
                             max_new_tokens=train_cfg.sample_tokens, temperature=0.7)
    return train_cfg.sample_prompt + completion.text


class _Loop:
    """The host side of the loop: finite checks, metrics, checkpoints."""

    def __init__(self, run: RunConfig, checkpointer: Checkpointer, start: int, layout: StateLayout, *,
                 peak_flops, logger: MetricsLogger):
        self.run, self.checkpointer, self.peak_flops, self.logger = run, checkpointer, peak_flops, logger
        self.layout = layout  # how the loop's state is kept; checkpoints hold it stacked
        t = run.train
        self.tokens_per_step = t.batch_size * t.seq_len
        self.flops_per_token = run.model_config.flops_per_token(t.seq_len)
        self.pending = None  # (step, metrics) dispatched, not yet checked
        self.window = None  # (step, time) since which throughput is measured; None until compiled
        self.last_saved = start  # the newest checkpoint's step (at first the start: nothing new to save)
        self.last_loss = None

    def dispatched(self, step: int, metrics: dict) -> None:
        """Records the step just dispatched and checks the one before it (now finished or nearly)."""
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._check(*previous)
        if self.window is None:  # the first step compiles: time from its end
            self.finish_pending()
            self.window = (step, time.perf_counter())

    def finish_pending(self) -> None:
        """Waits for the last dispatched step and checks it."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._check(*pending)

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Checkpoints `step` unless it is already saved (call after finish_pending)."""
        if step != self.last_saved:
            self.checkpointer.save(step, self.layout.for_saving(state), data_state)
            self.last_saved = step

    def _check(self, step: int, metrics: dict) -> None:
        t = self.run.train
        finite = bool(_host(metrics["finite"]))
        log_now = step % t.log_every == 0 or step == t.steps or not finite
        if log_now:
            self._log(step, metrics)
        if finite:
            return
        if t.skip_nonfinite:
            print(f"step {step}: loss or gradient is not finite; batch skipped (train.skip_nonfinite)",
                  file=sys.stderr)
            return
        last = self.last_saved
        kept = f"the last good checkpoint is step {last}" if last else "no checkpoint was saved"
        raise UserError(f"step {step}: the loss ({float(_host(metrics['loss']))}) or its gradient (norm "
                        f"{float(_host(metrics['grad_norm']))}) is not finite: stopped without saving this "
                        f"step; {kept} in {self.run.run_dir}. Lower train.lr, or set train.skip_nonfinite=true")

    def _log(self, step: int, metrics: dict) -> None:
        values = {name: _host(value) for name, value in metrics.items() if name != "finite"}
        self.last_loss = float(values["loss"])
        if self.window is not None and step > self.window[0]:
            window_step, window_time = self.window
            now = time.perf_counter()
            values["tokens_per_sec"] = (step - window_step) * self.tokens_per_step / (now - window_time)
            if self.peak_flops:
                values["mfu"] = values["tokens_per_sec"] * self.flops_per_token / self.peak_flops
            self.window = (step, now)
        self.logger.log(step, values)
