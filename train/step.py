"""The train state and the one jitted train step over the mesh.

A step splits the global batch into `grad_accum` micro-batches, scans over
them summing gradients, clips, applies AdamW, and returns the new state and
the step's metrics. A NaN or inf loss or gradient discards the update inside
the step (the state comes back as it went in, with `step` advanced): the loop
either stops on it or, with `train.skip_nonfinite`, goes on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mixtral_jax import moe
from mixtral_jax.checkpoint import abstract_arrays
from mixtral_jax.sharding.params import abstract_model
from mixtral_jax.train.loss import micro_batch_loss
from mixtral_jax.train.optim import learning_rate, make_optimizer

__all__ = ["TrainState", "make_optimizer", "make_train_step", "init_state", "state_shardings", "unrolls_layers"]


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree, checkpointed whole."""

    step: jax.Array  # [] int32: optimizer steps taken
    params: dict[str, Any]  # the `checkpoint.param_tree` layout: nested dict of arrays
    opt_state: optax.OptState
    rng: jax.Array  # [2] uint32 key data: for stochastic layers (Mixtral has none; kept exact on resume)


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A step-0 state around `params` (pure dict); jit it to place the optimizer state."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jax.random.key_data(jax.random.key(seed)))


def state_shardings(param_shardings, optimizer, abstract_params, mesh):
    """NamedShardings for a TrainState: parameters as given, optimizer moments like the
    parameters they follow, scalars (counts) replicated. (Not XLA's propagation through
    `optimizer.init`: the moments are zeros that do not depend on the parameters, so it
    leaves them replicated, 2x the full model on every device.)"""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, param_shardings,
                                          transform_non_params=lambda _: replicated)
    return TrainState(replicated, param_shardings, opt_shardings, replicated)


def abstract_train_state(config, mesh, optimizer: optax.GradientTransformation, seed: int = 0):
    """(graphdef, abstract TrainState, the state's shardings) of `config` on `mesh`: shapes and
    placements only, no memory."""
    graphdef, params = nnx.split(abstract_model(config, mesh))
    params = nnx.to_pure_dict(params)
    shardings = state_shardings(jax.tree.map(lambda a: a.sharding, params), optimizer, params, mesh)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, seed), params)
    return graphdef, abstract_arrays(state, shardings), shardings


UNROLL_MAX_LAYERS = 4  # `train.layer_loop: auto` unrolls up to this many layers on CPU


def unrolls_layers(layer_loop: str, num_layers: int) -> bool:
    """Whether the train step runs the decoder layers unrolled rather than as a `lax.scan`.

    "auto": on CPU, for up to UNROLL_MAX_LAYERS layers. A scan slices every
    layer's weights out of the stacked parameters, zero-fills stacked buffers
    for the residuals and gradients and writes them layer by layer; unrolled,
    XLA:CPU skips most of that: steps 4% faster (bench-tiny 289.5 -> 277.1 ms,
    bench-small 3.93 -> 3.76 s; the two programs alternating in one process,
    Zen 4). Up to 4 layers the unrolled step compiles as fast as the scanned one;
    each further layer adds ~1.2 s (16 layers: 20 s against 7), so deeper
    models, like accelerators, keep the scan.
    """
    if layer_loop == "auto":
        return jax.default_backend() == "cpu" and num_layers <= UNROLL_MAX_LAYERS
    return layer_loop == "unroll"


def _split_micro_batches(batch: dict, count: int) -> dict:
    """[B, T] -> [count, B / count, T]; micro-batch i takes rows i, i + count, ...

    Row-strided so that each micro-batch keeps an equal share of every
    device's rows: [B] is split over devices in contiguous blocks.
    """
    def split(x):
        rows = x.shape[0] // count
        return jnp.swapaxes(x.reshape(rows, count, *x.shape[1:]), 0, 1)

    return {name: split(x) for name, x in batch.items()}


def make_train_step(graphdef, optimizer: optax.GradientTransformation, train_cfg, *,
                    experts_fn=None, shardings: TrainState | None = None, batch_sharding=None,
                    metrics_sharding=None):
    """train_step(state, batch) -> (state, metrics), jitted, with the state donated.

    graphdef: `nnx.split(model)[0]` (it carries the model config). batch: the
    loader's dict of [B, T] global arrays. metrics: loss (cross-entropy),
    aux_loss (load balancing, unscaled; top_k when balanced), z_loss, grad_norm,
    lr, expert_load [L, E], dropped_fraction, finite (1.0, or 0.0 when the
    update was discarded). The optimizer's update gets the gradients' global
    norm as `global_norm=` (`optim.clip_by_global_norm` reads it; transforms
    that take no extra arguments never see it). shardings / batch_sharding /
    metrics_sharding: where the state, the batch and the metrics live (None:
    wherever the inputs are).
    Trace and call it under `sharding.use_mesh(mesh)`.
    """
    count = train_cfg.grad_accum
    schedule = learning_rate(train_cfg)
    optimizer = optax.with_extra_args_support(optimizer)

    def micro_step(params, micro, num_loss_tokens):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            unroll = unrolls_layers(train_cfg.layer_loop, model.config.num_hidden_layers)
            return micro_batch_loss(model, micro, num_loss_tokens, count, experts_fn, unroll_layers=unroll)

        (objective, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return objective, stats, grads

    def accumulate(params, batch):
        """(objective, MicroStats, gradients) summed over the micro-batches."""
        num_loss_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        micro_batches = _split_micro_batches(batch, count)  # [count, B / count, T]
        first = jax.tree.map(lambda x: x[0], micro_batches)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(micro_step, params, first, num_loss_tokens))

        def body(total, micro):
            return jax.tree.map(jnp.add, total, micro_step(params, micro, num_loss_tokens)), None

        totals, _ = jax.lax.scan(body, zeros, micro_batches)
        return (*totals, num_loss_tokens)

    def train_step(state: TrainState, batch: dict):
        config = nnx.merge(graphdef, state.params).config
        objective, stats, grads, num_loss_tokens = accumulate(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params, global_norm=grad_norm)
            return optax.apply_updates(params, updates), opt_state

        # a branch, not a select: the update runs in place, and only when it is kept
        params, opt_state = jax.lax.cond(finite, update, lambda *old: old, state.params, state.opt_state)
        new_state = TrainState(state.step + 1, params, opt_state, state.rng)
        metrics = {
            "loss": stats.nll_sum / num_loss_tokens,
            "aux_loss": moe.load_balancing_loss(stats.aux, config.aux_loss_style),
            "z_loss": moe.router_z_loss(stats.aux),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "expert_load": moe.expert_load(stats.aux),
            "dropped_fraction": jnp.mean(stats.aux.dropped_fraction) / count,
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    in_shardings = None if shardings is None else (shardings, batch_sharding)
    out_shardings = None if shardings is None else (shardings, metrics_sharding)
    return jax.jit(train_step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=0)

