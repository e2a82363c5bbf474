"""The MoE block: the grouped CPU path against the all-experts reference, routing and the aux losses."""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import _grouped, moe
from mixtral_jax._grouped import grouped_ffn
from mixtral_jax.benchmarks import compile as compile_bench
from mixtral_jax.benchmarks import moe as moe_bench
from mixtral_jax.benchmarks import timing

# Tiny programs need no optimised machine code: this halves their compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
N, D, F, E = 45, 16, 24, 8  # M = 90 sorted rows: no multiple of the 8-, 64- or 256-row blocks


def assert_close(actual, expected, rel, what=""):
    """Largest difference within `rel` of the largest magnitude (elementwise rtol fails near zero)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, what
    scale = np.max(np.abs(expected))
    assert scale > 0, what
    error = np.max(np.abs(actual - expected)) / scale
    assert error <= rel, f"{what}: relative error {error:.2e}"


def _inputs(seed=0, dtype=jnp.float32):
    """(expert_idx [N, 2], (x, routing weights, w_gate, w_up, w_down)) of a random top-2 layer."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    weights, expert_idx = moe.route(jnp.asarray(normal(N, E)), 2)
    args = (normal(N, D), weights, normal(E, D, F) * D ** -0.5, normal(E, D, F) * D ** -0.5,
            normal(E, F, D) * F ** -0.5)
    return expert_idx, tuple(jnp.asarray(a, dtype) for a in args)


ROUTINGS = {  # name -> expert_idx [N, 2] from the random top-2 choice; a repeated expert counts twice
    "random": lambda idx: idx,
    "empty-groups": lambda idx: jnp.where(idx % 3 == 1, 6, idx % 3 * 3),  # experts 0, 3, 6 only
    "all-to-first": lambda idx: jnp.zeros_like(idx),
    "all-to-last": lambda idx: jnp.full_like(idx, E - 1),  # the last tail spills into the padding
    "all-to-two": lambda idx: jnp.tile(jnp.array([[5, 2]], jnp.int32), (N, 1)),
}
BLOCKS = {  # name -> (block_rows, tail_rows, capacity) of the grouped kernel
    "small": (8, 3, 3),  # 3 slots: the rest of every group has a head and a tail; tails spill
    "uneven": (12, 5, None),  # halvings 12, 6, then 5-row blocks: R / r not a power of two
    "default": (256, 16, None),  # heads and halvings over M left out (every group is shorter)
}


@functools.cache
def _value_and_grads(impl, blocks=None):
    """jit(value_and_grad) of a loss reaching x, the routing weights and every expert weight."""
    experts_fn = moe.experts_fn_for(impl) if blocks is None else moe.sorted_experts(
        functools.partial(grouped_ffn, block_rows=blocks[0], tail_rows=blocks[1], capacity=blocks[2]))

    def loss(x, weights, w_gate, w_up, w_down, expert_idx):
        y, _ = experts_fn(x, expert_idx, weights, w_gate, w_up, w_down)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    return jit(jax.value_and_grad(loss, argnums=range(5)))


def _assert_equals_reference(impl, expert_idx, args, blocks=None):
    """impl's MoE output and gradients (x, routing weights, the three expert weights) equal the reference's."""
    value, grads = _value_and_grads(impl, blocks)(*args, expert_idx)
    ref_value, ref_grads = _value_and_grads("reference")(*args, expert_idx)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for name, grad, ref in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, ref_grads):
        assert_close(grad, ref, 1e-5, name)


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_grouped_equals_reference_values_and_gradients(routing, blocks):
    expert_idx, args = _inputs()
    _assert_equals_reference("grouped", ROUTINGS[routing](expert_idx), args, BLOCKS[blocks])


@pytest.mark.parametrize("capacity", [6, 15, 48, 93])  # 93 > M: every row in a slot, no overflow
def test_grouped_equals_reference_for_any_split_between_slots_and_overflow(capacity):
    expert_idx, args = _inputs(4)
    _assert_equals_reference("grouped", expert_idx, args, (8, 3, capacity))


def test_grouped_capacity_is_a_positive_multiple_of_the_tail():
    _, (x, _, w_gate, w_up, w_down) = _inputs()
    sizes = jnp.full((E,), 2 * N // E, jnp.int32)
    for capacity in (0, 4):
        with pytest.raises(ValueError, match="capacity must be a positive multiple of tail_rows"):
            grouped_ffn(x, sizes, w_gate, w_up, w_down, capacity=capacity, tail_rows=3)
    assert _grouped.default_capacity(128, 16) >= 128  # the even split fits in the slots


@pytest.mark.parametrize("routing", ["random", "empty-groups", "all-to-last"])
def test_ragged_equals_reference_values_and_gradients(routing):
    """The path `auto` takes on GPU and TPU (`jax.lax.ragged_dot`), checked on CPU."""
    expert_idx, args = _inputs(3)
    _assert_equals_reference("ragged", ROUTINGS[routing](expert_idx), args)


def test_grouped_kernel_runs_each_expert_on_exactly_its_rows():
    _, (x, _, w_gate, w_up, w_down) = _inputs(1)
    group_sizes = jnp.array([7, 0, 0, 20, 1, 0, 13, 0], jnp.int32)  # 41 of the 45 rows
    kernel = functools.partial(grouped_ffn, group_sizes=group_sizes, w_gate=w_gate, w_up=w_up,
                               w_down=w_down, block_rows=8, tail_rows=3, capacity=6)  # 7, 20, 13: overflow
    y, dx = jit(lambda x: (kernel(x), jax.grad(lambda x: jnp.sum(kernel(x)))(x)))(x)
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    bounds = np.cumsum([0, *group_sizes.tolist()])
    for e in range(E):
        rows = x[bounds[e]:bounds[e + 1]]
        gate = rows @ w_gate[e]
        expected = (gate / (1 + np.exp(-gate)) * (rows @ w_up[e])) @ w_down[e]
        np.testing.assert_allclose(y[bounds[e]:bounds[e + 1]], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[41:], 0)  # rows past the last group: no output, no gradient
    np.testing.assert_array_equal(dx[41:], 0)


def test_grouped_in_bfloat16():
    expert_idx, args = _inputs(2, jnp.bfloat16)
    value, grads = _value_and_grads("grouped", BLOCKS["small"])(*args, expert_idx)
    ref_value, ref_grads = _value_and_grads("reference")(*(a.astype(jnp.float32) for a in args),
                                                         expert_idx)  # same inputs, float32 math
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(value, ref_value, rtol=2e-2)
    for name, grad, ref in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, ref_grads):
        assert_close(grad, ref, 2e-2, name)  # bfloat16 keeps 8 significant bits


def _random_state(abstract_state, seed):
    """Random weights for an abstract model state: N(0, 0.2), norms 1 + N(0, 0.2).

    (NumPy: compiling jax.random for each parameter shape costs seconds.)"""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        offset = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(offset + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_state)


def test_model_with_grouped_experts_equals_reference():
    config = mixtral_jax.preset("tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 24), np.int32))
    abstract = lambda impl: nnx.split(nnx.eval_shape(lambda: mixtral_jax.init(config.replace(moe_impl=impl))))
    state = _random_state(abstract("grouped")[1], 3)
    results = []
    for impl in ("grouped", "reference"):
        graphdef = abstract(impl)[0]

        def loss(state):
            model = nnx.merge(graphdef, state)
            out = model.forward(tokens)
            log_probs = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
            nll = -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))
            return nll + model.aux_loss(out.aux), out.logits

        results.append(jit(jax.value_and_grad(loss, has_aux=True))(state))
    ((value, logits), grads), ((ref_value, ref_logits), ref_grads) = results
    assert_close(logits, ref_logits, 1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for (path, grad), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert_close(grad, ref, 1e-5, jax.tree_util.keystr(path))


# ---- routing and the auxiliary losses ------------------------------------------------------------
def test_route_renormalises_over_the_top_k():
    logits = jnp.asarray(np.random.default_rng(4).standard_normal((32, E), np.float32) * 3)
    weights, expert_idx = moe.route(logits, 2)
    assert expert_idx.dtype == jnp.int32
    np.testing.assert_array_equal(expert_idx, jnp.argsort(-logits, axis=-1)[:, :2])
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    chosen = jnp.take_along_axis(logits, expert_idx, axis=-1)
    np.testing.assert_allclose(weights, jax.nn.softmax(chosen, axis=-1), rtol=1e-6)


@pytest.mark.parametrize("style", ["pooled", "per_layer"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_is_top_k_when_perfectly_balanced(style, top_k):
    tokens = 4 * E
    expert_idx = (jnp.arange(tokens)[:, None] + jnp.arange(top_k)) % E  # every expert equally often
    stats = moe.router_stats(jnp.zeros((tokens, E)), expert_idx, jnp.ones(tokens), 0.0)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a, a]), stats)  # 3 layers
    np.testing.assert_allclose(moe.load_balancing_loss(stacked, style), top_k, rtol=1e-6)


@pytest.mark.parametrize("style", ["pooled", "per_layer"])
def test_load_balancing_loss_grows_when_one_expert_takes_everything(style):
    logits = jnp.zeros((16, E)).at[:, 0].set(4.0)
    _, expert_idx = moe.route(logits, 2)
    stats = jax.tree.map(lambda a: a[None], moe.router_stats(logits, expert_idx, jnp.ones(16), 0.0))
    assert moe.load_balancing_loss(stats, style) > 2 * 2


def test_router_losses_equal_their_formulas_over_the_counted_tokens():
    layers, tokens, top_k = 2, 12, 2
    logits = np.random.default_rng(4).standard_normal((layers, tokens, E)) * 2
    mask = np.ones(tokens)
    mask[[2, 7, 8]] = 0  # padding: in no statistic
    stats = [moe.router_stats(jnp.asarray(l, jnp.float32), moe.route(jnp.asarray(l, jnp.float32), top_k)[1],
                              jnp.asarray(mask), 0.0) for l in logits]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    counted = logits[:, mask == 1]  # [L, 9, E]
    lse = np.log(np.exp(counted).sum(-1))
    probs = np.exp(counted - lse[..., None])
    chosen = np.argsort(-probs, axis=-1)[..., :top_k]  # [L, 9, k]
    # [L, E]: (token, slot) pairs per expert over the tokens, summing to k as in transformers' loss
    per_token = np.stack([np.bincount(c.ravel(), minlength=E) / len(c) for c in chosen])
    switch = E * np.sum(per_token * probs.mean(1), axis=-1)  # [L]: each layer's Switch loss
    z_loss = np.mean(lse ** 2)
    np.testing.assert_allclose(moe.load_balancing_loss(stacked, "per_layer"), switch.mean(), rtol=1e-5)
    np.testing.assert_allclose(moe.router_z_loss(stacked), z_loss, rtol=1e-5)
    model = mixtral_jax.init(mixtral_jax.preset("tiny", router_aux_loss_coef=0.02, router_z_loss_coef=0.001,
                                                aux_loss_style="per_layer"), seed=0)
    np.testing.assert_allclose(model.aux_loss(stacked), 0.02 * switch.mean() + 0.001 * z_loss, rtol=1e-5)


# ---- the benchmarks' JSON (tiny sizes: keys and sanity only, no speed) --------------------------
def _bench(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_bench_moe_reports_every_documented_key():
    report = _bench(moe_bench, ["--tokens", "64", "--dim", "64", "--ffn", "32", "--experts", "4",
                                "--repeats", "1", "--expert-parallel", "4"])
    assert report["expert_parallel"]["mesh"]["expert"] == 4
    assert report["expert_parallel"]["all_to_all_bytes_per_device"] > 0
    for key in ("fast_seconds", "dense_active_seconds", "ratio_vs_dense_active", "reference_seconds",
                "reference_ratio_vs_dense_active", "ragged_seconds", "ragged_ratio_vs_dense_active"):
        assert report[key] > 0, key
    assert report["ratio_vs_dense_active"] == report["fast_seconds"] / report["dense_active_seconds"]


def test_alternating_seconds_runs_the_calls_in_turn():
    order = []
    calls = {name: functools.partial(order.append, name) for name in ("a", "b")}
    times = timing.alternating_seconds(calls, warmup=1, repeats=3)
    assert order == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]
    assert timing.median_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0  # the per-round ratios 2, 3, 3


def test_compile_seconds_of_a_one_layer_model():
    assert compile_bench.compile_seconds(mixtral_jax.preset("tiny", num_hidden_layers=1), 1, 8) > 0


def test_bench_compile_reports_both_depths(monkeypatch):
    compiled = []
    monkeypatch.setattr(compile_bench, "compile_seconds",  # one real compile is tested above
                        lambda config, batch, seq_len: compiled.append(config.num_hidden_layers) or
                        float(config.num_hidden_layers))
    report = _bench(compile_bench, ["--preset", "tiny", "--layers", "2", "32", "--repeats", "2",
                                    "moe_impl=reference"])
    assert compiled == [2, 2, 32, 2, 32]  # a warm-up, then the depths alternate
    assert report["layers"] == [2, 32] and report["seconds"] == [2.0, 32.0]
    assert report["ratio"] == 16.0 and report["moe_impl"] == "reference"


@pytest.mark.parametrize("argv, message", [
    (["decode", "--batches", "1,abc"], "--batches takes comma-separated integers, got '1,abc'"),
    (["decode", "--batches", "8,0"], "--batches must be positive, got 0"),
    (["decode", "--repeats", "0"], "--repeats must be positive, got 0"),
    (["decode", "--new-tokens", "1"], "--new-tokens must be at least 2, got 1"),
    (["decode", "--presets", "tiny,nope"], "unknown model preset 'nope'"),
    (["compile", "--layers", "0", "32"], "--layers must be positive, got 0"),
    (["moe", "--ffn", "-1"], "--ffn must be positive, got -1"),
])
def test_bench_arguments_are_checked_before_any_measuring(argv, message, monkeypatch, capsys):
    from mixtral_jax.cli import main
    from mixtral_jax.infer import bench as decode_bench

    def measured(*args, **kwargs):
        raise AssertionError("measured before checking the arguments")

    for module, name in ((decode_bench, "read_bandwidth"), (compile_bench, "compile_seconds"),
                         (moe_bench, "moe_case")):
        monkeypatch.setattr(module, name, measured)
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("blocks", [(256, 16), (12, 5)])
def test_grouped_blocks_cover_each_row_once_and_waste_under_r_rows(blocks):
    block_rows, tail_rows = blocks
    group_sizes = jnp.array([0, 1, 15, 16, 17, 255, 300, 90], jnp.int32)
    m = int(group_sizes.sum())

    def expert_body(e, run_blocks, carry):
        def block_body(block, first, end, carry):
            rows_run, cover = carry
            rows = first + jnp.arange(block)
            return rows_run.at[e].add(block), cover.at[rows].add((rows < end).astype(jnp.int32))

        return run_blocks(block_body, carry)

    init = (jnp.zeros(E, jnp.int32), jnp.zeros(m + tail_rows, jnp.int32))
    for_each = lambda sizes: _grouped._for_each_expert(jnp.cumsum(sizes) - sizes, sizes, m, block_rows, tail_rows,
                                                        expert_body, init)
    rows_run, cover = jit(for_each)(group_sizes)
    np.testing.assert_array_equal(cover, np.r_[np.ones(m), np.zeros(tail_rows)])  # in-group rows once each
    waste = np.asarray(rows_run - group_sizes)
    assert waste.min() >= 0 and waste.max() < tail_rows, waste
