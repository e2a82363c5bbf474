"""`mixtral-jax bench moe`: the dropless MoE layer against a dense FFN of equal active FLOPs.

Everything is timed as forward + backward (gradients with respect to the
input and every weight) of one MoE layer, router, dispatch and combine
included. The cases alternate in rounds; times are medians, ratios medians
of the per-round ratios. The dense baseline is one SwiGLU FFN of width top_k
x ffn: the matmul FLOPs a token's active experts cost. Goal on CPU:
`ratio_vs_dense_active` <= 1.3; the reference (every expert on every token)
costs about experts / top_k times the dense one.

`moe_case` and `moe_grad` are the hook for other expert paths (the
expert-parallel one in `mixtral_jax.sharding` times itself on the same inputs).
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import moe
from mixtral_jax.benchmarks.timing import alternating_seconds, median_ratio
from mixtral_jax.configtools import UserError, require_positive

IMPLS = ("grouped", "reference", "ragged")  # the single-device paths, by `moe_impl` name


def add_arguments(parser):
    """Adds `mixtral-jax bench moe`'s options to `parser`."""
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the batch (N)")
    parser.add_argument("--dim", type=int, default=512, help="model dim (D)")
    parser.add_argument("--ffn", type=int, default=1792, help="expert ffn dim (F)")
    parser.add_argument("--experts", type=int, default=8, help="experts (E)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (k)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter and compute dtype (the router stays float32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--expert-parallel", type=int, default=8, metavar="DEVICES",
                        help="also time the expert-parallel layer on this many simulated devices "
                             "(mesh expert=DEVICES, in a subprocess; 0 skips)")


def _normal(rng: np.random.Generator, shape, std: float, dtype):
    # NumPy rather than jax.random: no XLA program to compile for each weight shape.
    return jnp.asarray(rng.standard_normal(shape, np.float32) * std, dtype)


def moe_case(tokens: int, dim: int, ffn: int, experts: int, top_k: int, dtype="float32", seed: int = 0):
    """The benchmark's inputs: (graphdef, state) of an `moe.MoE` layer with random weights, x [1, N, D]."""
    dtype = jnp.dtype(dtype)
    layer = nnx.eval_shape(lambda: moe.MoE(dim, ffn, experts, top_k, init_std=1.0, param_dtype=dtype,
                                           dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, shapes = nnx.split(layer)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: _normal(rng, a.shape, a.shape[-2] ** -0.5, dtype), shapes)
    return graphdef, state, _normal(rng, (1, tokens, dim), 1.0, dtype)


def moe_grad(experts_fn: moe.ExpertsFn, graphdef):
    """jit(grad) with respect to (state, x) of the MoE layer with this expert path."""

    def loss(state, x):
        y, _ = nnx.merge(graphdef, state)(x, experts_fn)
        return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def dense_case(dim: int, ffn: int, x, seed: int = 0):
    """(jit(grad) with respect to (weights, x), weights) of one SwiGLU FFN of width `ffn`."""
    rng = np.random.default_rng(seed)
    weights = [_normal(rng, shape, shape[0] ** -0.5, x.dtype) for shape in ((dim, ffn), (dim, ffn), (ffn, dim))]

    def loss(weights, x):
        y = moe.swiglu(x.reshape(-1, dim), *weights)
        return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1))), weights


def run(args) -> dict:
    """Times the dense baseline and every single-device MoE path; ratios are to the dense one."""
    require_positive({"--tokens": args.tokens, "--dim": args.dim, "--ffn": args.ffn, "--experts": args.experts,
                      "--top-k": args.top_k, "--repeats": args.repeats})
    if args.top_k > args.experts:
        raise UserError(f"--top-k ({args.top_k}) exceeds --experts ({args.experts})")
    graphdef, state, x = moe_case(args.tokens, args.dim, args.ffn, args.experts, args.top_k, args.dtype)
    dense_grad, dense_weights = dense_case(args.dim, args.top_k * args.ffn, x)
    calls = {"dense": functools.partial(dense_grad, dense_weights, x)}
    calls.update({impl: functools.partial(moe_grad(moe.experts_fn_for(impl), graphdef), state, x)
                  for impl in IMPLS})
    times = alternating_seconds(calls, repeats=args.repeats)
    median = {name: statistics.median(series) for name, series in times.items()}
    ratio = {impl: median_ratio(times[impl], times["dense"]) for impl in IMPLS}
    report = {
        "tokens": args.tokens, "dim": args.dim, "ffn": args.ffn, "experts": args.experts,
        "top_k": args.top_k, "dtype": args.dtype, "backend": jax.default_backend(),
        "dense_active_seconds": median["dense"],
        "fast_seconds": median["grouped"],
        "ratio_vs_dense_active": ratio["grouped"],
        "reference_seconds": median["reference"],
        "reference_ratio_vs_dense_active": ratio["reference"],
        "ragged_seconds": median["ragged"],
        "ragged_ratio_vs_dense_active": ratio["ragged"],
    }
    if args.expert_parallel:
        from mixtral_jax.sharding.bench import expert_parallel_case

        report["expert_parallel"] = expert_parallel_case(
            args.tokens, args.dim, args.ffn, args.experts, args.top_k, args.dtype, args.repeats,
            expert=args.expert_parallel)
    return report
