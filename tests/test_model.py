"""The model config and the decoder: validation, full-size shapes without memory, the KV cache."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax import ConfigError, Mixtral, MixtralConfig, init, preset
from mixtral_jax.config import from_section
from mixtral_jax.layers import SKINNY_ROWS, _skinny_rows, dense, dense_reverse, matmul


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(num_attention_heads=8, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(num_experts_per_tok=9), "exceeds num_local_experts"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(vocab_size=-3), "vocab_size must be a positive integer"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(moe_impl="magic"), "moe_impl must be one of"),
    (dict(matmul_precision="fast"), "matmul_precision must be one of"),
    (dict(tokenizer=5), "tokenizer must be a tokenizer name or a .model path, got 5"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be a finite number > 0, got inf"),  # logits all 0
    (dict(sliding_window=True), "sliding_window must be a positive integer or null, got True"),
    (dict(tokenizer=""), "tokenizer must be a tokenizer name"),
    (dict(hidden_size=66, num_attention_heads=4), "not divisible by num_attention_heads"),
    (dict(rope_theta="1e6"), "rope_theta must be a finite number > 0, got '1e6'"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a finite number > 0"),
    (dict(capacity_factor=None), "capacity_factor must be a finite number >= 0, got None"),
    (dict(eos_token_id=256), r"eos_token_id must be an id in \[0, 256\), got 256"),
    (dict(router_aux_loss_coef=float("nan")), "router_aux_loss_coef must be a finite number >= 0"),
])
def test_invalid_configs_fail_with_a_message_naming_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny", **changes)


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown model key.*hidden_sise"):
        preset("tiny", hidden_sise=3)
    with pytest.raises(ConfigError, match="unknown model key.*colour"):
        from_section({"colour": "red"})
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("mixtral-1x1b")


def test_paper_parameter_counts():
    c7 = preset("mixtral-8x7b")
    assert c7.num_params == 46_702_792_704
    assert c7.num_active_params == 12_879_925_248
    c22 = preset("mixtral-8x22b")
    assert c22.num_params == 140_630_071_296  # the paper's 141B, counted by hand from config.json
    assert c22.num_active_params == 39_161_468_928  # 39B
    assert c7.router_aux_loss_coef == 0.02 and c22.router_aux_loss_coef == 0.001


def test_hf_config_round_trip_keeps_every_hf_field():
    config = preset("tiny", sliding_window=7, head_dim=24)
    hf = config.to_hf_config()
    assert hf["model_type"] == "mixtral" and hf["head_dim"] == 24
    assert "moe_impl" not in hf
    assert MixtralConfig.from_hf_config(hf) == config.replace(tokenizer="mistral-v1")
    with pytest.raises(ConfigError, match="not a Mixtral config"):
        MixtralConfig.from_hf_config({**hf, "model_type": "llama"})


def test_flops_per_token_counts_active_experts_only():
    config = preset("mixtral-8x7b")
    dense_weights = config.num_active_params - config.vocab_size * config.hidden_size
    assert config.flops_per_token(1, training=False) == pytest.approx(2 * dense_weights, rel=1e-3)
    assert config.flops_per_token(4096) == 3 * config.flops_per_token(4096, training=False)


# ---- full-size presets, abstractly ---------------------------------------------------------
@pytest.mark.parametrize("name", ["mixtral-8x7b", "mixtral-8x22b"])
def test_full_presets_shapes_and_counts_without_memory(name):
    config = preset(name)
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state,
                            jax.ShapeDtypeStruct((2, 16), jnp.int32))
    assert logits.shape == (2, 16, config.vocab_size) and logits.dtype == jnp.float32
    w_gate = model.layers.moe.w_gate
    assert w_gate.shape == (config.num_hidden_layers, 8, config.hidden_size, config.intermediate_size)
    assert w_gate.get_metadata()["out_sharding"] == ("layers", "expert", "embed", "mlp")


# ---- forward pass ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    return init(preset("tiny", sliding_window=6), seed=1)


def test_causal_future_tokens_do_not_change_past_logits(tiny_model):
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % 256)
    a, b = tiny_model(tokens), tiny_model(changed)
    np.testing.assert_array_equal(a[:, :8], b[:, :8])
    assert not np.allclose(a[:, 8:], b[:, 8:])


def test_segment_ids_isolate_packed_documents(tiny_model):
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 256)
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2]])
    packed = tiny_model.forward(tokens, positions, segment_ids=segments).logits
    alone = tiny_model(tokens[:, 4:])
    np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-5)


@pytest.mark.parametrize("cache_size", [6, 32])  # rolling (= window) and full
def test_cached_decoding_equals_full_forward(tiny_model, cache_size):
    tokens = jax.random.randint(jax.random.key(2), (2, 14), 0, 256)
    full = tiny_model(tokens)
    cache = tiny_model.init_cache(2, cache_size)
    positions = jnp.broadcast_to(jnp.arange(14), (2, 14))
    out = tiny_model.forward(tokens[:, :9], positions[:, :9], cache=cache)  # prefill longer than the window
    np.testing.assert_allclose(out.logits, full[:, :9], atol=1e-5)
    cache = out.cache
    for t in range(9, 14):
        out = tiny_model.forward(tokens[:, t:t + 1], positions[:, t:t + 1], cache=cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=1e-5)


def test_left_padding_leaves_real_tokens_unchanged(tiny_model):
    tokens = jax.random.randint(jax.random.key(3), (1, 7), 0, 256)
    padded = jnp.concatenate([jnp.zeros((1, 3), tokens.dtype), tokens], axis=1)
    positions = jnp.array([[-1, -1, -1, 0, 1, 2, 3, 4, 5, 6]])
    out = tiny_model.forward(padded, positions)
    np.testing.assert_allclose(out.logits[:, 3:], tiny_model(tokens), atol=1e-5)
    assert float(out.aux.num_tokens[0]) == 7  # padding is left out of the router statistics


def test_bfloat16_compute_with_float32_params():
    model = init(preset("tiny", dtype="bfloat16"), seed=0)
    assert model.layers.moe.w_up.dtype == jnp.float32
    tokens = jnp.ones((1, 5), jnp.int32)
    logits = model(tokens)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    reference = init(preset("tiny"), seed=0)(tokens)
    difference = float(jnp.max(jnp.abs(logits - reference)))
    assert 0 < difference < 0.02  # bfloat16's rounding (~0.4% of the logits' spread), not none
    operands = [dot.invars[0].aval.dtype for dot in _dots(jax.make_jaxpr(model)(tokens).jaxpr)]
    assert operands.count(jnp.bfloat16) > operands.count(jnp.float32)  # the router stays float32


def _dots(jaxpr) -> list:
    """Every matmul equation (dot_general, ragged_dot...) in a jaxpr and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if "dot" in eqn.primitive.name:
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dots(inner)
    return found


def _dot_precisions(jaxpr) -> list:
    """The precision of every matmul in a jaxpr and its sub-jaxprs."""
    return [eqn.params["precision"] for eqn in _dots(jaxpr)]


@pytest.mark.parametrize("moe_impl", ["reference", "grouped", "ragged"])
def test_matmul_precision_reaches_every_matmul_of_the_forward_and_backward(moe_impl):
    """float32 by default, so GPUs (TensorFloat-32) and TPUs (one bfloat16 pass) compute the
    same float32 model as the CPU and transformers; the backward of the hand-written grouped
    kernel, which JAX traces outside the forward, included."""
    tokens = jnp.ones((1, 6), jnp.int32)
    for setting, expected in [("float32", jax.lax.Precision.HIGHEST), ("default", jax.lax.Precision.DEFAULT)]:
        graphdef, state = nnx.split(init(preset("tiny", moe_impl=moe_impl, matmul_precision=setting), seed=0))
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens))
        precisions = _dot_precisions(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
        assert len(precisions) >= 20  # attention, router, experts, LM head; forward and backward
        assert all(p in (expected, (expected, expected)) for p in precisions), (setting, set(precisions))


def test_dense_derivatives_equal_autodiff_of_the_matmul():
    x, w, dx, dw, g = (jax.random.normal(jax.random.key(i), shape) for i, shape in
                       enumerate([(2, 3, 5), (5, 7), (2, 3, 5), (5, 7), (2, 3, 7)]))
    plain = lambda x, w: jnp.einsum("btd,dv->btv", x, w)
    out, vjp = jax.vjp(dense, x, w)
    ref_out, ref_vjp = jax.vjp(plain, x, w)
    np.testing.assert_array_equal(out, ref_out)
    for ours, ref in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    # forward mode too (jax.jvp, Hessian-vector products)
    np.testing.assert_allclose(jax.jvp(dense, (x, w), (dx, dw))[1], jax.jvp(plain, (x, w), (dx, dw))[1],
                               rtol=1e-6, atol=1e-6)
    hvp = lambda f: jax.jvp(jax.grad(lambda w: jnp.sum(jnp.sin(f(x, w)))), (w,), (dw,))[1]
    np.testing.assert_allclose(hvp(dense), hvp(plain), rtol=1e-5, atol=1e-6)


def _entry_operands(hlo: str) -> dict[str, list[str]]:
    """{instruction: its operands} of a compiled HLO module's entry computation."""
    graph = {}
    for line in hlo[hlo.index("\nENTRY"):].splitlines()[1:]:
        found = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = [^(]*\((.*)", line)
        if found:
            graph[found[1]] = re.findall(r"%([\w.\-]+)", re.split(r", (?:calls|metadata|backend_config)=", found[2])[0])
    return graph


def _reaches(graph: dict[str, list[str]], start: str, target: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name == target:
            return True
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, []))
    return False


def test_dense_reverse_gives_dense_gradients_with_the_weight_gradient_after_the_input_gradient():
    """The same bits as `dense` in reverse mode; compiled, the weight gradient's matmul depends
    on the input gradient's (with `dense` the two are independent, free to run side by side)."""
    x = jax.random.normal(jax.random.key(0), (2, 24, 16))
    w = jax.random.normal(jax.random.key(1), (16, 40))
    grads = {f: jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), (0, 1)))
             for f in (dense, dense_reverse)}
    for ours, ref in zip(grads[dense_reverse](x, w), grads[dense](x, w)):
        np.testing.assert_array_equal(ours, ref)
    for f, ordered in ((dense_reverse, True), (dense, False)):
        graph = _entry_operands(grads[f].lower(x, w).compile().as_text())
        (root,) = [name for name, operands in graph.items() if name.startswith("tuple")]
        dx, dw = graph[root]
        dx = graph[dx][0] if dx.startswith("bitcast") else dx  # [N, D] -> [B, T, D]
        assert _reaches(graph, dw, dx) == ordered


def test_skinny_rows_follow_the_cpu():
    """The transposed form's row counts by CPU: AVX2 from 2 rows, AVX-512 from 16, and 32
    rows left to YNNPACK only on Zen 5 (AMD family 26; Intel's family 6 keeps Zen 4's bounds)."""
    def cpuinfo(vendor, family, flags):
        return f"vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 2\nflags\t\t: fpu {flags} sse\n" * 2

    assert _skinny_rows(cpuinfo("AuthenticAMD", 23, "avx2")) == (2, 32)
    assert _skinny_rows(cpuinfo("AuthenticAMD", 25, "avx2 avx512f avx512bw")) == (16, 32)
    assert _skinny_rows(cpuinfo("AuthenticAMD", 26, "avx2 avx512f avx512bw")) == (16, 31)
    assert _skinny_rows(cpuinfo("GenuineIntel", 6, "avx2 avx512f")) == (16, 32)
    assert _skinny_rows(cpuinfo("AuthenticAMD", 26, "avx2")) == (2, 32)
    assert _skinny_rows("") == (2, 32)


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 32, 33])
def test_matmul_equals_the_einsum_and_keeps_few_rows_off_ynnpack(rows):
    """`matmul` is x @ w for any row count and weight rank; on CPU, SKINNY_ROWS rows compile
    to a matmul that XLA leaves to Eigen (the transposed copy of x is not folded back), other
    counts above one to YNNPACK's."""
    x = jax.random.normal(jax.random.key(0), (1, rows, 64))
    w = jax.random.normal(jax.random.key(1), (64, 4, 16))
    want = np.einsum("btd,dnh->btnh", np.float64(x), np.float64(w))
    np.testing.assert_allclose(jax.jit(matmul)(x, w), want, rtol=1e-5, atol=1e-5)
    if jax.default_backend() == "cpu":
        hlo = jax.jit(matmul).lower(x, w).compile().as_text()
        transposed = SKINNY_ROWS[0] <= rows <= SKINNY_ROWS[1]
        assert ("ynn_fusion" in hlo) == (rows > 1 and not transposed)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layout choice")
def test_lm_head_weight_gradient_reads_the_logit_gradient_as_it_is():
    """The [B, T, V] logit gradient is not transposed to [V, B * T] for the LM head's weight
    gradient (a 262 MB copy per bench-small step before `dense`), and that matmul runs on
    YNNPACK (x transposed into its own buffer) rather than on Eigen."""
    vocab, tokens = 1000, jnp.ones((2, 16), jnp.int32)
    config = preset("tiny", vocab_size=vocab)
    graphdef, state = nnx.split(init(config, seed=0))
    loss = lambda s: jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, s)(tokens)))
    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    assert not re.search(rf"= f32\[{vocab},(32|2,16)\]", hlo)
    assert re.search(rf"%ynn_fusion[.\d]* = f32\[{config.hidden_size},{vocab}\]", hlo)


def test_remat_policies_give_the_same_gradients():
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 256)

    def grads(remat):
        graphdef, state = nnx.split(init(preset("tiny", remat=remat), seed=0))
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)
        return jax.grad(loss)(state)

    base = grads("none")  # recomputation may fuse differently: equal up to float32 rounding
    for remat in ("full", "dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), base, grads(remat))


def test_every_public_name_resolves():
    import mixtral_jax

    for name in mixtral_jax.__all__:  # imported on first use: a wrong module in the table fails here
        assert getattr(getattr(mixtral_jax, name), "__name__", name) == name  # PRESETS is a dict


def test_init_takes_numpy_seeds_and_refuses_seeds_that_would_repeat(tmp_path):
    config = preset("tiny", vocab_size=272, tokenizer="bytes")
    assert np.array_equal(init(config, seed=np.int64(3)).embed[...], init(config, seed=3).embed[...])
    for seed in (2**32, -1, 1.5, "0", None):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
            init(config, seed=seed)
    from mixtral_jax import load, save_params
    from mixtral_jax.configtools import UserError

    save_params(tmp_path / "run", init(config, seed=0))
    with pytest.raises(UserError, match="already holds checkpoints/"):  # Orbax would keep the old step 0
        save_params(tmp_path / "run", init(config, seed=1))
    assert np.array_equal(load(tmp_path / "run").embed[...], init(config, seed=0).embed[...])


def test_an_eager_call_refuses_token_ids_outside_the_vocabulary():
    model = init(preset("tiny"), seed=0)  # vocab 256
    for ids in ([[1, 256]], [[-1, 5]]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model(jnp.array(ids))  # the embedding lookup alone would clamp it
    assert model([[1, 255]]).shape == (1, 2, 256)  # a plain list is fine
    for bad in (jnp.array([1, 2]), jnp.array([[1.0, 2.0]]), jnp.zeros((1, 0), jnp.int32), jnp.zeros((0, 3), jnp.int32)):
        with pytest.raises(ValueError, match=r"integer ids \[batch, seq\] with batch, seq >= 1"):
            model(bad)
    with pytest.raises(ValueError, match="encode text with a tokenizer first"):
        model("hello")
    tokens = jnp.ones((1, 3), jnp.int32)
    for name, wrong in (("positions", jnp.arange(2)), ("segment_ids", jnp.ones((2, 3), jnp.int32)),
                        ("token_mask", jnp.ones((3,)))):
        with pytest.raises(ValueError, match=rf"{name} must have the tokens' shape \[1, 3\]"):
            model.forward(tokens, **{name: wrong})


def test_a_cache_that_cannot_take_the_tokens_is_refused():
    model = init(preset("tiny"), seed=0)
    cache = model.init_cache(1, 16)
    with pytest.raises(ValueError, match="20 tokens do not fit the cache's 16 slots"):
        model.forward(jnp.ones((1, 20), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="tokens have 2 rows but the cache holds 1"):
        model.forward(jnp.ones((2, 4), jnp.int32), cache=cache)


def test_from_params_refuses_params_of_another_shape():
    from mixtral_jax.checkpoint import param_tree
    from mixtral_jax.configtools import UserError
    from mixtral_jax.loading import from_params

    config = preset("tiny")
    params = param_tree(init(config, seed=0))
    with pytest.raises(UserError, match=r"embed is \(256, 64\) in params, \(256, 128\) in the model"):
        from_params(config.replace(hidden_size=128), params)
    with pytest.raises(UserError, match="lm_head is missing in params"):
        from_params(config, {k: v for k, v in params.items() if k != "lm_head"})
    with pytest.raises(UserError, match="extra is in params but not in the model"):
        from_params(config, {**params, "extra": np.zeros(3)})


def test_init_takes_a_preset_name_and_load_expands_the_home_folder(tmp_path, monkeypatch):
    from mixtral_jax.checkpoint import param_tree, save_params
    from mixtral_jax.loading import load

    by_name = init("tiny", seed=3)
    jax.tree.map(np.testing.assert_array_equal, param_tree(by_name), param_tree(init(preset("tiny"), seed=3)))
    monkeypatch.setenv("HOME", str(tmp_path))
    save_params(tmp_path / "run", by_name)
    jax.tree.map(np.testing.assert_array_equal, param_tree(load("~/run")), param_tree(by_name))
