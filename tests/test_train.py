"""The training job: config errors before compiling, the optimizer, the jitted step
(learning, bfloat16 compute, exact gradient accumulation, the layer loop) and non-finite losses."""

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_helpers import QUICK, use_compile_cache

import mixtral_jax as mj
from mixtral_jax import checkpoint, cli
from mixtral_jax.configtools import UserError
from mixtral_jax.train.config import TrainConfig, load_run_config
from mixtral_jax.train.main import PREEMPTED_EXIT_CODE, train
from mixtral_jax.train.metrics import read_metrics
from mixtral_jax.train.optim import clip_by_global_norm, decay_mask, learning_rate, make_optimizer
from mixtral_jax.train.step import (UNROLL_MAX_LAYERS, StateLayout, init_state, make_train_step, split_layers,
                                    unrolls_layers)


@pytest.fixture(scope="module", autouse=True)
def compile_cache():
    use_compile_cache()


def tiny_run(tmp_path, *overrides):
    return load_run_config("tiny", [f"run_dir={tmp_path / 'run'}", *QUICK, *overrides])


def random_batch(vocab: int, rows: int, length: int, seed: int = 0, padded_rows: int = 0) -> dict:
    """Two documents per row; the last `padded_rows` rows end in padding (not trained on)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (rows, length + 1), dtype=np.int32)
    half = length // 2
    segment_ids = np.where(np.arange(length) < half, 1, 2).astype(np.int32)[None].repeat(rows, 0)
    positions = np.where(np.arange(length) < half, np.arange(length), np.arange(length) - half)
    loss_mask = np.ones((rows, length), np.float32)
    if padded_rows:
        segment_ids[-padded_rows:, -5:] = 0
        loss_mask[-padded_rows:, -5:] = 0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask,
            "segment_ids": segment_ids, "positions": positions.astype(np.int32)[None].repeat(rows, 0)}


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "unknown key train.stepz"),
    (["train.steps=three"], "train.steps must be int"),
    (["train.batch_size=6", "train.grad_accum=4"], "multiple of train.grad_accum"),
    (["model.hidden_size=62"], "not divisible by num_attention_heads"),
    (["train.seq_len=4096"], "exceeds model.max_position_embeddings"),
    (["mesh.expert=3"], "not a multiple"),
    (["mesh.tensor=8"], "num_attention_heads=4 is not divisible by mesh.tensor=8"),
    (["train.batch_size=4"], "batch size 4 is not divisible"),
    (["data.source=/no/such/file.txt"], "not found"),
    (["train.layer_loop=sideways"], "train.layer_loop must be one of"),
    (["train.lr=inf"], "train.lr must be a finite number"),  # else the first step's loss is NaN
    (["train.lr=-1"], "error: train.lr must be >= 0"),  # named once, not "train: train.lr"
    (["train.peak_flops=-1"], "train.peak_flops must be >= 0"),  # else a negative MFU
    (["train.seed=4294967296"], "train.seed must be in [0, 2**32)"),  # else an overflow in jax
])
def test_bad_config_is_one_clear_line_before_compiling(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    status = cli.main(["train", "--config", "tiny", f"run_dir={run_dir}", *overrides])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1 and error.startswith("mixtral-jax train: error:") and message in error
    assert not (run_dir / checkpoint.CHECKPOINTS).exists()


def test_schedules_warm_up_then_decay_to_the_floor():
    base = dict(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    cosine = learning_rate(TrainConfig(**base, schedule="cosine"))
    linear = learning_rate(TrainConfig(**base, schedule="linear"))
    constant = learning_rate(TrainConfig(**base, schedule="constant"))
    for schedule in (cosine, linear, constant):
        assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
        assert float(schedule(10)) == pytest.approx(1.0)
    assert float(cosine(110)) == pytest.approx(0.1) and float(linear(110)) == pytest.approx(0.1)
    assert float(cosine(60)) == pytest.approx(0.55) and float(linear(60)) == pytest.approx(0.55)
    assert float(constant(110)) == 1.0


def test_weight_decay_leaves_norm_scales_alone():
    abstract = checkpoint.param_tree(nnx.eval_shape(lambda: mj.init(mj.preset("tiny"), seed=0)))
    params = jax.tree.map(lambda a: jnp.full(a.shape, 2.0, a.dtype), abstract)
    mask = decay_mask(params)
    assert not mask["norm"]["weight"] and not mask["layers"]["attn_norm"]["weight"]
    assert not mask["layers"]["moe_norm"]["weight"]
    assert mask["embed"] and mask["lm_head"] and mask["layers"]["moe"]["router"]
    assert mask["layers"]["attn"]["q"] and mask["layers"]["moe"]["w_gate"]

    optimizer = make_optimizer(TrainConfig(lr=0.1, warmup=0, schedule="constant", weight_decay=0.5, clip=0))

    @jax.jit
    def step_with_zero_gradients(params):
        updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    layers = mj.preset("tiny").num_hidden_layers  # the same choices for per-layer buffers
    split_mask = decay_mask(split_layers(params, layers))
    assert split_mask == {**mask, "layers": jax.tree.map(lambda decayed: (decayed,) * layers, mask["layers"])}

    new = step_with_zero_gradients(params)
    np.testing.assert_array_equal(new["layers"]["attn_norm"]["weight"], 2.0)
    np.testing.assert_array_equal(new["norm"]["weight"], 2.0)
    np.testing.assert_allclose(new["embed"], 2.0 * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(new["layers"]["moe"]["router"], 2.0 * (1 - 0.1 * 0.5), rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 5.0])  # the gradients' global norm is 3
def test_clipping_scales_to_the_max_norm_like_optax(max_norm):
    grads = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([[2.0]])}}
    ours, _ = jax.jit(clip_by_global_norm(max_norm).update)(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    assert float(optax.tree.norm(ours)) == pytest.approx(min(max_norm, 3.0), rel=1e-6)
    for mine, ref in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(mine, ref, rtol=1e-6)
    if max_norm > 3.0:
        jax.tree.map(np.testing.assert_array_equal, ours, grads)  # under the limit: untouched


def test_clipping_uses_the_norm_the_caller_passes():
    grads = {"a": jnp.array([3.0, 4.0])}  # norm 5
    clip = clip_by_global_norm(1.0)
    given, _ = clip.update(grads, optax.EmptyState(), global_norm=jnp.float32(10.0))
    np.testing.assert_allclose(given["a"], [0.3, 0.4], rtol=1e-6)  # scaled by 1 / 10, not 1 / 5
    computed, _ = clip.update(grads, optax.EmptyState())
    np.testing.assert_allclose(computed["a"], [0.6, 0.8], rtol=1e-6)


def test_loss_falls_on_a_repeated_batch_with_bfloat16_compute():
    config = mj.preset("tiny", dtype="bfloat16")
    graphdef, params = nnx.split(mj.init(config, seed=0))
    train_cfg = TrainConfig(steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup=0)
    optimizer = make_optimizer(train_cfg)
    state = init_state(nnx.to_pure_dict(params), optimizer, seed=0)
    step = make_train_step(graphdef, optimizer, train_cfg)
    batch = random_batch(config.vocab_size, 4, 32)
    losses = []
    for _ in range(train_cfg.steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1.0, losses
    # float32 master weights and optimizer state under bfloat16 compute
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert int(state.step) == train_cfg.steps and float(metrics["finite"]) == 1.0
    np.testing.assert_allclose(np.sum(metrics["expert_load"], axis=-1), 1.0, rtol=1e-6)


# an "optimizer" that keeps the gradient as its state and changes nothing
KEEP_GRADS = optax.GradientTransformation(
    lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def test_gradient_accumulation_equals_the_big_batch():
    # Router losses are per micro-batch by design (see train.loss): switched off here, so
    # the objective is the masked token mean that accumulation must reproduce exactly.
    config = mj.preset("tiny", router_aux_loss_coef=0.0, moe_impl="reference")
    graphdef, params = nnx.split(mj.init(config, seed=1))
    params = nnx.to_pure_dict(params)
    batch = random_batch(config.vocab_size, 8, 16, seed=1, padded_rows=3)
    results = []
    for grad_accum in (1, 4):
        train_cfg = TrainConfig(batch_size=8, seq_len=16, grad_accum=grad_accum)
        state = init_state(jax.tree.map(jnp.copy, params), KEEP_GRADS, 0)  # the step donates its input
        state, metrics = make_train_step(graphdef, KEEP_GRADS, train_cfg)(state, batch)
        results.append((state.opt_state, metrics))
    (big, big_metrics), (accumulated, accumulated_metrics) = results
    for name in ("loss", "z_loss", "expert_load", "grad_norm"):
        np.testing.assert_allclose(accumulated_metrics[name], big_metrics[name], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(big)):  # float32 sums in another order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto unrolls on CPU only")
def test_layer_loop_auto_unrolls_shallow_models_on_cpu():
    assert unrolls_layers("auto", UNROLL_MAX_LAYERS) and not unrolls_layers("auto", UNROLL_MAX_LAYERS + 1)
    assert unrolls_layers("unroll", 32) and not unrolls_layers("scan", 2)


def test_unrolled_layers_give_the_scans_gradients_without_its_loop():
    config = mj.preset("tiny", moe_impl="reference")  # no loops of its own in the expert path
    graphdef, params = nnx.split(mj.init(config, seed=2))
    params = nnx.to_pure_dict(params)
    batch = random_batch(config.vocab_size, 4, 16, seed=2)
    results, loops = {}, {}
    for layer_loop in ("scan", "unroll"):
        train_cfg = TrainConfig(batch_size=4, seq_len=16, layer_loop=layer_loop)
        step = make_train_step(graphdef, KEEP_GRADS, train_cfg)
        state = init_state(jax.tree.map(jnp.copy, params), KEEP_GRADS, 0)  # the step donates its input
        loops[layer_loop] = step.lower(state, batch).compile().as_text().count(" while(")
        results[layer_loop] = step(state, batch)
    assert loops["scan"] > loops["unroll"] == 0
    (scan_state, scan_metrics), (unrolled_state, unrolled_metrics) = results["scan"], results["unroll"]
    for name in ("loss", "aux_loss", "expert_load", "grad_norm"):
        np.testing.assert_allclose(unrolled_metrics[name], scan_metrics[name], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(unrolled_state.opt_state), jax.tree.leaves(scan_state.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_per_layer_buffers_train_as_the_stacked_state_does_and_save_stacked():
    """Unrolled, the loop keeps each layer's parameters and moments in buffers of their own:
    the steps give the stacked state's results bit for bit (the gradient norm to the last bit
    or one ulp), and saving stacks them back."""
    config = mj.preset("tiny")
    graphdef, params = nnx.split(mj.init(config, seed=3))
    train_cfg = TrainConfig(batch_size=4, seq_len=16, layer_loop="unroll", lr=1e-2, warmup=0)
    optimizer = make_optimizer(train_cfg)
    layout = StateLayout(train_cfg, config.num_hidden_layers)
    assert not StateLayout(TrainConfig(layer_loop="scan"), config.num_hidden_layers).split
    stacked = init_state(nnx.to_pure_dict(params), optimizer, 0)
    split = layout.for_steps(stacked)
    for moment in (split.params, split.opt_state[1][0].mu, split.opt_state[1][0].nu):
        w_gate = moment["layers"]["moe"]["w_gate"]
        assert isinstance(w_gate, tuple) and len(w_gate) == config.num_hidden_layers
        assert w_gate[0].shape == stacked.params["layers"]["moe"]["w_gate"].shape[1:]
    assert split.params["embed"].shape == stacked.params["embed"].shape
    jax.tree.map(np.testing.assert_array_equal, layout.for_saving(split), stacked)

    step = make_train_step(graphdef, optimizer, train_cfg)
    for seed in range(3):  # each step donates its input state
        batch = random_batch(config.vocab_size, 4, 16, seed=seed)
        stacked, stacked_metrics = step(stacked, batch)
        split, split_metrics = step(split, batch)
        # the gradients' norm sums the per-layer leaves in another order (one ulp apart at most)
        np.testing.assert_allclose(split_metrics.pop("grad_norm"), stacked_metrics.pop("grad_norm"), rtol=2e-7)
        jax.tree.map(np.testing.assert_array_equal, split_metrics, stacked_metrics)
    saved = layout.for_saving(split)
    assert jax.tree.structure(saved) == jax.tree.structure(stacked)
    jax.tree.map(np.testing.assert_array_equal, saved, stacked)


NONFINITE = ["train.lr=1.0e30", "train.warmup=0", "train.schedule=constant", "train.steps=4",
             "checkpoint.every=1", "checkpoint.keep=5", "train.log_every=1"]  # step 2 overflows


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tiny_run(tmp_path, *NONFINITE)
    with pytest.raises(UserError, match=r"step 2: .* is not finite.*last good checkpoint is step 1"):
        train(run)
    _, step_dir = checkpoint.resolve(run.run_dir)
    assert step_dir.name == "1"
    logged = read_metrics(f"{run.run_dir}/metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2] and logged[1]["grad_norm"] is None  # NaN


def test_skip_nonfinite_discards_the_bad_updates(tmp_path, capsys):
    run = tiny_run(tmp_path, *NONFINITE, "train.skip_nonfinite=true")
    assert train(run)["step"] == 4
    assert "step 3: loss or gradient is not finite; batch skipped" in capsys.readouterr().err
    after_step = {s: checkpoint.param_tree(checkpoint.load_checkpoint(f"{run.run_dir}/checkpoints/{s}"))
                  for s in (1, 4)}
    jax.tree.map(np.testing.assert_array_equal, after_step[4], after_step[1])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after_step[4]))


def test_ctrl_c_saves_the_step_it_reached_and_stops(tmp_path):
    run = tiny_run(tmp_path, "train.steps=500", "checkpoint.every=1000", "train.log_every=1")
    metrics, returned = tmp_path / "run" / "metrics.jsonl", threading.Event()

    def press_ctrl_c():  # once a step is logged: the loop's handler is in place by then
        while not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.01)
        if not returned.is_set():  # never into pytest itself
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    summary = train(run)
    returned.set()
    assert summary["exit_code"] == PREEMPTED_EXIT_CODE and 1 <= summary["step"] < 500
    assert checkpoint.resolve(run.run_dir)[1].name == str(summary["step"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again


@pytest.mark.parametrize("change, message", [
    ("data.shuffle=false", "another data stream (data.shuffle differ)"),
    ("train.seq_len=32", "another data stream (train.seq_len differ)"),
    ("model.num_hidden_layers=3", "a different model (model.num_hidden_layers differ)"),
])
def test_resuming_over_another_model_or_data_stream_is_refused(tmp_path, capsys, change, message):
    run_dir = tmp_path / "run"  # a run with a step saved, of the tiny config
    (run_dir / checkpoint.CHECKPOINTS / "3" / checkpoint.PARAMS).mkdir(parents=True)
    checkpoint.write_run_config(run_dir, load_run_config("tiny", [f"run_dir={run_dir}"]).to_dict())
    assert cli.main(["train", "--config", "tiny", f"run_dir={run_dir}", "train.steps=5", change]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert sorted(p.name for p in (run_dir / checkpoint.CHECKPOINTS).iterdir()) == ["3"]


def test_a_damaged_run_config_is_one_clear_error(tmp_path):
    for text, word in [("model: [1", "not valid YAML"), ("[1, 2]", "not a mapping")]:
        (tmp_path / checkpoint.CONFIG_FILE).write_text(text)
        with pytest.raises(UserError, match=word):
            checkpoint.read_run_config(tmp_path)


@pytest.mark.parametrize("run_dir, message", [
    ("a-file", "is a file, not a folder"),
    ("a-file/run", "a-file is a file, not a folder"),
    ("old/checkpoints/3", "in the checkpoints/ of the run {old}"),  # a step folder of another run
    ("old/checkpoints", "pass run_dir={old}"),
])
def test_a_run_dir_of_the_wrong_kind_is_one_clear_line(tmp_path, capsys, run_dir, message):
    old = tmp_path / "old"  # another run, with a step saved
    (old / checkpoint.CHECKPOINTS / "3" / checkpoint.PARAMS).mkdir(parents=True)
    (old / checkpoint.CONFIG_FILE).write_text("model: {}\n")
    (tmp_path / "a-file").write_text("")
    assert cli.main(["train", "--config", "tiny", f"run_dir={tmp_path / run_dir}", "train.steps=1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mixtral-jax train: error:")
    assert message.format(old=old) in error
    assert sorted(p.name for p in (old / checkpoint.CHECKPOINTS / "3").iterdir()) == [checkpoint.PARAMS]
    assert sorted(p.name for p in (old / checkpoint.CHECKPOINTS).iterdir()) == ["3"]
