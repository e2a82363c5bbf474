"""`mixtral-jax bench compile`: compile time of the model's forward + backward at 2 and at 32 layers.

The decoder runs its stacked layers with `jax.lax.scan`, so the compiled
program holds one layer whatever the depth: the goal is `ratio` (32 layers
over 2) <= 1.5. Timed: `jax.jit(grad).lower(...).compile()` of the forward
and backward (language-model loss + aux loss) on abstract inputs, so no
parameters are allocated.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import from_section
from mixtral_jax.configtools import parse_overrides, require_positive
from mixtral_jax.model import init, token_nll


def add_arguments(parser):
    """Adds `mixtral-jax bench compile`'s options to `parser`."""
    parser.add_argument("--preset", default="bench-tiny", help="model preset name")
    parser.add_argument("--layers", type=int, nargs=2, default=(2, 32), metavar=("FEW", "MANY"),
                        help="the two depths to compare")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="compiles per depth (median)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="model field overrides, e.g. moe_impl=reference")


def compile_seconds(config, batch: int, seq_len: int) -> float:
    """Seconds to lower and compile forward + backward of `config`'s model."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init(config)))
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)

    def loss(state, tokens):
        model = nnx.merge(graphdef, state)
        out = model.forward(tokens[:, :-1])
        return jnp.mean(token_nll(out.logits, tokens[:, 1:])) + model.aux_loss(out.aux)

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(state, tokens).compile()
    return time.perf_counter() - start


def run(args) -> dict:
    """Median compile seconds at each depth and their ratio.

    One untimed warm-up compile first (the process's first compile pays
    one-off costs); the depths alternate so that a change in machine load
    falls on both.
    """
    require_positive({"--batch": args.batch, "--seq-len": args.seq_len, "--repeats": args.repeats,
                      "--layers": min(args.layers)})
    model = {"preset": args.preset, **parse_overrides(args.overrides)}
    configs = [from_section({**model, "num_hidden_layers": n}) for n in args.layers]
    compile_seconds(configs[0], args.batch, args.seq_len)
    times = [[compile_seconds(c, args.batch, args.seq_len) for c in configs] for _ in range(args.repeats)]
    few_s, many_s = (statistics.median(column) for column in zip(*times))
    return {
        "preset": args.preset, "moe_impl": configs[0].moe_impl, "batch": args.batch,
        "seq_len": args.seq_len, "layers": list(args.layers), "seconds": [few_s, many_s],
        "ratio": many_s / few_s, "backend": jax.default_backend(),
    }
