"""The native expert kernel: its products, the SwiGLU built on it, and how it is built and
switched off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import native
from mixtral_jax.infer import decode as programs
from mixtral_jax.moe import reference_experts, route, sorted_experts

needs_kernel = pytest.mark.skipif(not native.available(), reason="the native kernel runs on CPU with a compiler")


@needs_kernel
@pytest.mark.parametrize("sizes, columns", [
    ([3, 0, 17, 8], 64),   # an empty group, groups of 3 and 17 rows (partial 8-row tiles)
    ([0, 0, 0, 1], 40),    # one row; columns padded to two panels
    ([9, 9, 9, 9], 32),    # every row in a group
    ([5, 2, 0, 0], 96),    # rows past the groups' sum come out zero
    ([12, 1, 7, 20], 520), # 68 (group, panel) pairs: split over the intra-op threads
])
def test_grouped_rows_multiplies_each_group_by_its_weight(sizes, columns):
    rows, depth = 40, 19
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (rows, depth))
    w = jax.random.normal(keys[1], (len(sizes), depth, columns))
    got = np.asarray(jax.jit(native.grouped_rows, static_argnums=3)(
        x, jnp.asarray(sizes), native.to_panels(w), columns))
    want = np.zeros((rows, columns), np.float32)
    start = 0
    for group, size in enumerate(sizes):
        want[start:start + size] = np.asarray(x[start:start + size], np.float64) @ np.asarray(w[group], np.float64)
        start += size
    assert got.shape == (rows, columns)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_rows_product_does_not_depend_on_the_rows_beside_it():
    """Groups of 1, 3 and 8 rows (4- and 8-row register tiles) give a row the same bits."""
    keys = jax.random.split(jax.random.key(2), 2)
    x = jax.random.normal(keys[0], (8, 200))
    w = native.to_panels(jax.random.normal(keys[1], (1, 200, 64)))
    product = jax.jit(lambda rows: native.grouped_rows(x[:rows], jnp.asarray([rows]), w, 64), static_argnums=0)
    alone, three, eight = (np.asarray(product(rows)) for rows in (1, 3, 8))
    np.testing.assert_array_equal(three[:1], alone)
    np.testing.assert_array_equal(eight[:3], three)


def test_panels_are_contiguous_column_blocks_padded_with_zeros():
    w = jnp.arange(2 * 3 * 40, dtype=jnp.float32).reshape(2, 3, 40)
    panels = native.to_panels(w)
    assert panels.shape == (2, 2, 3, native.PANEL)
    np.testing.assert_array_equal(panels[:, 0], w[:, :, :32])
    np.testing.assert_array_equal(panels[:, 1, :, :8], w[:, :, 32:])
    assert not np.asarray(panels[:, 1, :, 8:]).any()


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 16, 40])
def test_panels_ffn_equals_reference_experts(tokens):
    """The kernel's SwiGLU equals every-expert-on-every-token, one expert left without rows."""
    d, f, e = 24, 40, 4
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (tokens, d))
    router_logits = jax.random.normal(keys[1], (tokens, e)).at[:, 1].set(-30.0)
    weights, expert_idx = route(router_logits, 2)
    w_gate, w_up = (jax.random.normal(k, (e, d, f)) / 4 for k in keys[2:4])
    w_down = jax.random.normal(keys[4], (e, f, d)) / 4
    want = reference_experts(x, expert_idx, weights, w_gate, w_up, w_down)[0]
    panels = [native.to_panels(w) for w in (w_gate, w_up, w_down)]
    got = jax.jit(sorted_experts(programs.panels_ffn))(x, expert_idx, weights, *panels)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_library_is_built_once_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = native.find_compiler()
    built = native.build(compiler)
    assert built.parent == tmp_path / "mixtral-jax" / "native" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert native.build(compiler) == built and built.stat().st_mtime_ns == stamp  # from the cache
    edited = tmp_path / "grouped_rows.cc"
    edited.write_text(native.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.library_path(compiler) != built
    assert [path.name for path in built.parent.iterdir()] == [built.name]  # no scratch left behind


@pytest.fixture
def fresh_availability():
    """`native.available` asked again in the test, and again after it."""
    native.available.cache_clear()
    yield
    native.available.cache_clear()


@pytest.mark.parametrize("setting, reason", [
    ({"MIXTRAL_JAX_NATIVE": "0"}, None),
    ({"CXX": "/nonexistent/c++"}, "did not build"),
])
def test_switched_off_or_unbuildable_kernel_leaves_inference_on_xla(setting, reason, monkeypatch, tmp_path,
                                                                    fresh_availability):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built earlier to load
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    if reason:
        with pytest.warns(UserWarning, match=reason):
            assert not native.available()
    else:
        assert not native.available()
    expected = programs.SPLIT if jax.default_backend() == "cpu" else None
    assert programs.generation_layout(mj.preset("tiny", moe_impl="grouped")) == expected


def test_a_stuck_build_is_given_up(monkeypatch, tmp_path, fresh_availability):
    if jax.default_backend() != "cpu":
        pytest.skip("the kernel is built for the CPU backend only")
    stuck = tmp_path / "stuck-c++"
    stuck.write_text("#!/bin/sh\nexec sleep 30\n")
    stuck.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(stuck))
    monkeypatch.setattr(native, "BUILD_SECONDS", 0.5)
    with pytest.warns(UserWarning, match="did not build .*timed out"):
        assert not native.available()


@needs_kernel
def test_generation_keeps_panels_for_float32_models_only():
    assert programs.generation_layout(mj.preset("tiny")) == programs.PANELS
    assert programs.generation_layout(mj.preset("tiny", dtype="bfloat16")) == programs.SPLIT
    assert programs.generation_layout(mj.preset("tiny", moe_impl="reference")) is None
