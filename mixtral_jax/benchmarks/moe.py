"""`mixtral-jax bench moe`: the dropless MoE layer against a dense FFN of equal active FLOPs.

Everything is timed as forward + backward (gradients with respect to the
input and every weight) of one MoE layer, router, dispatch and combine
included. The dense baseline is one SwiGLU FFN of width top_k x ffn: the
matmul FLOPs a token's active experts cost. Goal on CPU:
`ratio_vs_dense_active` <= 1.3; the reference (every expert on every token)
costs about experts / top_k times the dense one.

`moe_case` and `time_moe` are the hook for other expert paths (the
expert-parallel one in `mixtral_jax.sharding` times itself on the same inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import moe
from mixtral_jax.benchmarks.timing import median_seconds
from mixtral_jax.configtools import UserError

IMPLS = ("grouped", "reference", "ragged")  # the single-device paths, by `moe_impl` name


def add_arguments(parser):
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the batch (N)")
    parser.add_argument("--dim", type=int, default=512, help="model dim (D)")
    parser.add_argument("--ffn", type=int, default=1792, help="expert ffn dim (F)")
    parser.add_argument("--experts", type=int, default=8, help="experts (E)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (k)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")


def moe_case(tokens: int, dim: int, ffn: int, experts: int, top_k: int, dtype="float32", seed: int = 0):
    """The benchmark's inputs: (graphdef, state) of an `moe.MoE` layer and x [1, N, D]."""
    dtype = jnp.dtype(dtype)
    layer = moe.MoE(dim, ffn, experts, top_k, init_std=dim ** -0.5, param_dtype=dtype, dtype=dtype,
                    rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (1, tokens, dim), dtype)
    graphdef, state = nnx.split(layer)
    return graphdef, state, x


def time_moe(experts_fn: moe.ExpertsFn, graphdef, state, x, repeats: int) -> float:
    """Median seconds of forward + backward of the MoE layer with this expert path."""

    def loss(state, x):
        y, _ = nnx.merge(graphdef, state)(x, experts_fn)
        return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))

    return median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1))), state, x, repeats=repeats)


def time_dense(dim: int, ffn: int, x, repeats: int, seed: int = 0) -> float:
    """Median seconds of forward + backward of one SwiGLU FFN of width `ffn`."""
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((dim, ffn), (dim, ffn), (ffn, dim))  # w_gate, w_up, w_down
    weights = [jax.random.normal(key, shape, x.dtype) * shape[0] ** -0.5 for key, shape in zip(keys, shapes)]

    def loss(weights, x):
        y = moe.swiglu(x.reshape(-1, dim), *weights)
        return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))

    return median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1))), weights, x, repeats=repeats)


def run(args) -> dict:
    """Times the dense baseline and every single-device MoE path; ratios are to the dense one."""
    sizes = {"--tokens": args.tokens, "--dim": args.dim, "--ffn": args.ffn, "--experts": args.experts,
             "--top-k": args.top_k, "--repeats": args.repeats}
    for flag, value in sizes.items():
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.top_k > args.experts:
        raise UserError(f"--top-k ({args.top_k}) exceeds --experts ({args.experts})")
    graphdef, state, x = moe_case(args.tokens, args.dim, args.ffn, args.experts, args.top_k, args.dtype)
    dense = time_dense(args.dim, args.top_k * args.ffn, x, args.repeats)
    seconds = {impl: time_moe(moe.experts_fn_for(impl), graphdef, state, x, args.repeats)
               for impl in IMPLS}
    return {
        "tokens": args.tokens, "dim": args.dim, "ffn": args.ffn, "experts": args.experts,
        "top_k": args.top_k, "dtype": args.dtype, "backend": jax.default_backend(),
        "dense_active_seconds": dense,
        "fast_seconds": seconds["grouped"],
        "ratio_vs_dense_active": seconds["grouped"] / dense,
        "reference_seconds": seconds["reference"],
        "reference_ratio_vs_dense_active": seconds["reference"] / dense,
        "ragged_seconds": seconds["ragged"],
        "ragged_ratio_vs_dense_active": seconds["ragged"] / dense,
    }
