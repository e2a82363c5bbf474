"""The train state and the one jitted train step over the mesh.

A step splits the global batch into `grad_accum` micro-batches, scans over
them summing gradients, clips, applies AdamW, and returns the new state and
the step's metrics. A NaN or inf loss or gradient discards the update inside
the step (the state comes back as it went in, with `step` advanced): the loop
either stops on it or, with `train.skip_nonfinite`, goes on. Between steps
the loop keeps each layer's arrays apart when the layers unroll
(`StateLayout`); checkpoints hold them stacked.
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

__all__ = ["TrainState", "make_optimizer", "make_train_step", "init_state", "state_shardings", "unrolls_layers",
           "StateLayout", "split_layers", "stack_layers"]


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree, checkpointed whole."""

    step: jax.Array  # [] int32: optimizer steps taken
    params: dict[str, Any]  # the `checkpoint.param_tree` layout, its layers stacked or split (`StateLayout`)
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


def _under_layers(path) -> bool:
    return any(getattr(entry, "key", None) == "layers" for entry in path)


def _drop_layer_axis(sharding):
    if not isinstance(sharding, jax.sharding.NamedSharding):  # None, or one device's: the same for a layer
        return sharding
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))


def split_layers(tree, num_layers: int):
    """Each leaf under a "layers" key, stacked [L, ...], as a tuple of its L layers [...].

    Works on a TrainState (parameters and their moments), on arrays or
    abstract arrays, and on a tree of NamedShardings (each loses the layer
    axis, which the sharding rules never split)."""

    def split(path, leaf):
        if not _under_layers(path):
            return leaf
        if isinstance(leaf, jax.sharding.NamedSharding):
            return (_drop_layer_axis(leaf),) * num_layers
        if isinstance(leaf, jax.ShapeDtypeStruct):
            layer = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=_drop_layer_axis(leaf.sharding))
            return (layer,) * num_layers
        return tuple(leaf[i] for i in range(num_layers))

    return jax.tree_util.tree_map_with_path(split, tree)


def stack_layers(tree):
    """`split_layers` undone: each tuple of per-layer arrays under "layers" stacked into [L, ...];
    a tree in the stacked layout comes back as it is."""
    is_split = lambda x: type(x) is tuple and len(x) > 0 and all(hasattr(a, "shape") for a in x)
    stack = lambda path, leaf: jnp.stack(leaf) if is_split(leaf) and _under_layers(path) else leaf
    return jax.tree_util.tree_map_with_path(stack, tree, is_leaf=is_split)


class StateLayout:
    """How the loop keeps the TrainState between steps, and the stacked layout checkpoints hold.

    When the step unrolls the layers (`unrolls_layers`), every per-layer array
    of the parameters and their moments is kept in a buffer of its own
    (`split_layers`): the step reads each layer's weights where they are,
    where a stacked [L, ...] array has each layer's slice copied out first and
    its gradients concatenated back. With the LM head's ordered backward
    (`layers.dense_reverse`): a bench-tiny step 1.07x faster (121-127 -> 115-117
    ms, processes alternating, Zen 5), bench-small 1.04x; either alone
    1.00-1.03x. A scanned step keeps the stack, which the scan reads layer by layer.
    """

    def __init__(self, train_cfg, num_layers: int, saved_shardings=None):
        self.split, self.num_layers = unrolls_layers(train_cfg.layer_loop, num_layers), num_layers
        self.saved_shardings = saved_shardings  # the stacked state's; None: wherever the arrays are
        self.shardings = split_layers(saved_shardings, num_layers) if self.split else saved_shardings
        self._to_steps = jax.jit(lambda state: split_layers(state, num_layers), out_shardings=self.shardings)
        self._to_saved = jax.jit(stack_layers, out_shardings=saved_shardings)

    def for_steps(self, state):
        """The stacked `state` (a restored or fresh one) as the loop keeps it for the train step:
        arrays (placed by `shardings`), or abstract arrays to compile for."""
        if not self.split:
            return state
        if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(state)):
            return split_layers(state, self.num_layers)
        return self._to_steps(state)

    def for_saving(self, state):
        """The stepped `state` in the stacked layout (new arrays when it was split)."""
        return self._to_saved(state) if self.split else state


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

    The state's layers may be stacked or split (`StateLayout`); the new state
    keeps the layout it came in.

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
            model = nnx.merge(graphdef, stack_layers(params))  # XLA folds a split layer's stack and slice
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
        config = nnx.merge(graphdef, stack_layers(state.params)).config
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

