"""The expert-parallel MoE (shard_map + all_to_all) against the single-device model, tight
capacity, and a two-process training run against a one-process one. Eight simulated CPU
devices (tests/conftest.py)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import moe, sharding
from mixtral_jax.sharding import MeshConfig
from mixtral_jax.model import token_nll

CONFIG = mixtral_jax.preset("tiny")  # 8 experts, top-2, 4 heads, 2 kv heads
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # numbers are compared here, not speed
MESHES = [dict(data=1, expert=8), dict(data=2, expert=4), dict(data=1, fsdp=2, expert=2, tensor=2),
          dict(data=8)]


def loss_and_grads(graphdef, params, tokens, experts_fn):
    """(cross-entropy + aux loss, per-layer dropped fractions), gradients w.r.t. params."""
    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        out = model.forward(tokens[:, :-1], experts_fn=experts_fn)
        loss = jnp.mean(token_nll(out.logits, tokens[:, 1:])) + model.aux_loss(out.aux)
        return loss, out.aux.dropped_fraction

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


@pytest.fixture(scope="module")
def single_device():
    """The oracle: the tiny model on one device with every expert on every token."""
    model = mixtral_jax.init(CONFIG.replace(moe_impl="reference"), seed=0)
    graphdef, params = nnx.split(model)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, CONFIG.vocab_size))
    step = jax.jit(lambda p, t: loss_and_grads(graphdef, p, t, None), compiler_options=FAST_COMPILE)
    return graphdef, params, tokens, step(params, tokens)


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_mesh_matches_single_device(single_device, axes):
    """Loss and every gradient equal the single-device model's (float32, 1e-5) when nothing is
    dropped; the mesh runs the default expert path (the grouped kernel) inside shard_map."""
    _, params, tokens, ((ref_loss, _), ref_grads) = single_device
    config = CONFIG  # moe_impl auto: the grouped CPU kernel on each device's local experts
    mesh = sharding.make_mesh(MeshConfig(**axes))
    sharding.check_divisible(mesh, config, batch_size=tokens.shape[0])
    graphdef = nnx.split(sharding.abstract_model(config, mesh))[0]
    placed = jax.device_put(params, sharding.param_shardings(params, mesh))
    experts_fn = sharding.experts_fn(mesh, config)
    assert (experts_fn is None) == (mesh.shape["expert"] == 1)
    with sharding.use_mesh(mesh):
        batch = sharding.shard_batch({"tokens": tokens}, mesh)["tokens"]
        step = jax.jit(lambda p, t: loss_and_grads(graphdef, p, t, experts_fn), compiler_options=FAST_COMPILE)
        (loss, dropped), grads = step(placed, batch)
    assert np.all(np.asarray(dropped) == 0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, grad), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        scale = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def capacity_oracle(expert_idx, devices: int, cap: int, num_experts: int):
    """Which (token, slot) pairs the capacity keeps: per device, first choices before second
    choices, each expert taking its first `cap` pairs in token order. -> kept [N, k] bool."""
    n, k = expert_idx.shape
    kept = np.zeros((n, k), bool)
    for rows in np.split(np.arange(n), devices):
        used = np.zeros(num_experts, int)
        for slot in range(k):
            for token in rows:
                e = expert_idx[token, slot]
                kept[token, slot] = used[e] < cap
                used[e] += 1
    return kept


def moe_inputs(seed: int, n: int, logit_bias):
    """x [n, D], expert weights and a routing biased by `logit_bias` [E] (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    d, e, f = CONFIG.hidden_size, CONFIG.num_local_experts, CONFIG.intermediate_size
    x = rng.normal(size=(n, d)).astype(np.float32)
    w_gate, w_up = (0.1 * rng.normal(size=(e, d, f)).astype(np.float32) for _ in range(2))
    w_down = 0.1 * rng.normal(size=(e, f, d)).astype(np.float32)
    logits = np.asarray(logit_bias, np.float32) + rng.gumbel(size=(n, e)).astype(np.float32)
    top = np.argsort(-logits, axis=1)[:, :2].astype(np.int32)  # [n, 2]: Mixtral's top-2
    chosen = np.take_along_axis(logits, top, 1)
    weights = np.exp(chosen - chosen.max(1, keepdims=True))
    return x, top, (weights / weights.sum(1, keepdims=True)).astype(np.float32), w_gate, w_up, w_down


REFERENCE = jax.jit(moe.reference_experts, compiler_options=FAST_COMPILE)


def test_tight_capacity_drops_and_reports_the_fraction():
    """capacity_factor 0.5 with 8 tokens per device: C = ceil(0.5 * 8 * 2 / 8) = 1 row per expert
    and device. Skewed routing loses pairs; the result is the reference MoE without them."""
    config = CONFIG.replace(capacity_factor=0.5)
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
    n, e = 64, CONFIG.num_local_experts
    assert sharding.capacity(n // 8, 2, e, config.capacity_factor) == 1
    x, expert_idx, weights, *w = moe_inputs(2, n, [4, 3, 2, 1, 0, 0, 0, 0])  # experts 0-3 popular
    with sharding.use_mesh(mesh):
        run = jax.jit(sharding.experts_fn(mesh, config), compiler_options=FAST_COMPILE)
        y, dropped = run(x, expert_idx, weights, *w)
        # every token picks experts 0 and 1: each device keeps 1 of its 8 pairs for each
        _, all_same = run(x, np.tile(np.array([[0, 1]], np.int32), (n, 1)), weights, *w)
    assert float(all_same) == 14 / 16
    kept = capacity_oracle(expert_idx, devices=8, cap=1, num_experts=e)
    assert 0 < float(dropped) == pytest.approx(1 - kept.mean())
    expected, _ = REFERENCE(x, expert_idx, weights * kept, *w)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_never_drop_with_tokens_not_divisible_by_the_mesh():
    """capacity_factor 0 keeps every pair, also for a token count the batch axes do not divide
    (e.g. a few decode tokens): padding rows take no capacity and are not counted."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    x, expert_idx, weights, *w = moe_inputs(3, 5, [9, 9, 0, 0, 0, 0, 0, 0])
    with sharding.use_mesh(mesh):
        run = jax.jit(sharding.experts_fn(mesh, CONFIG), compiler_options=FAST_COMPILE)
        y, dropped = run(x, expert_idx, weights, *w)
    expected, _ = REFERENCE(x, expert_idx, weights, *w)
    assert float(dropped) == 0
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_training(run_dir, devices: int, *overrides) -> subprocess.Popen:
    """`mixtral-jax train` of the tiny model with expert=8 in a fresh process with `devices` CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}
    command = [sys.executable, "-m", "mixtral_jax.cli", "train", "--config", "tiny", f"run_dir={run_dir}",
               "train.steps=3", "train.log_every=1", "train.seq_len=32", "train.peak_flops=0",
               "mesh.data=1", "mesh.expert=8", "checkpoint.every=100", *overrides]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one(tmp_path):
    """Two OS processes x 4 CPU devices (gloo on loopback) train 3 steps with expert=8 and log
    the losses that one process with 8 devices logs; only process 0 writes metrics."""
    port = free_port()
    jobs = [start_training(tmp_path / "two", 4, f"distributed.coordinator=127.0.0.1:{port}",
                           "distributed.num_processes=2", f"distributed.process_id={i}") for i in range(2)]
    jobs.append(start_training(tmp_path / "one", 8))
    try:
        outputs = [job.communicate(timeout=600)[0] for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-3000:]
    two, one = (checkpoint_metrics(tmp_path / name) for name in ("two", "one"))
    assert [r["step"] for r in two] == [1, 2, 3]  # one writer: no duplicated lines
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["aux_loss"] for r in two], [r["aux_loss"] for r in one], rtol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()  # every process took part in saving


def checkpoint_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
