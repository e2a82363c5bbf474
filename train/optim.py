"""The optimizer: AdamW with warm-up then cosine / linear / constant learning rate,
global-norm clipping, and weight decay on every weight except the RMSNorm scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mixtral_jax.train.config import TrainConfig


def learning_rate(train: TrainConfig) -> optax.Schedule:
    """Learning rate by optimizer step: linear warm-up from 0, then the named decay to
    lr * min_lr_ratio at the last step (constant: stays at lr)."""
    decay_steps = max(train.steps - train.warmup, 1)
    final = train.lr * train.min_lr_ratio
    if train.schedule == "cosine":
        decay = optax.cosine_decay_schedule(train.lr, decay_steps, alpha=train.min_lr_ratio)
    elif train.schedule == "linear":
        decay = optax.linear_schedule(train.lr, final, decay_steps)
    else:
        decay = optax.constant_schedule(train.lr)
    if train.warmup == 0:
        return decay
    warmup = optax.linear_schedule(0.0, train.lr, train.warmup)
    return optax.join_schedules([warmup, decay], [train.warmup])


def decay_mask(params) -> dict:
    """True for the parameters weight decay applies to: all but the RMSNorm scales
    (`.../attn_norm/weight`, `.../moe_norm/weight`, `norm/weight`). Mixtral has no biases.
    `params` is the nested dict of `checkpoint.param_tree`, its layers stacked or split
    (`train.step.split_layers`: the path then ends in the layer's index)."""

    def decayed(path, _):
        names = [str(entry.key) for entry in path if hasattr(entry, "key")]
        return not (len(names) > 1 and names[-2].endswith("norm"))

    return jax.tree.map_with_path(decayed, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Scales the gradients by min(1, max_norm / global norm), as torch's `clip_grad_norm_` does.

    `optax.clip_by_global_norm` gives the same values (up to rounding when it
    clips) but selects per element between g and g / norm * max_norm, which
    XLA:CPU materialises as a clipped copy that the moment updates then read
    beside the original: 2% of a bench-tiny step. One scalar factor fuses
    into the readers of g instead. The update takes the norm as `global_norm=`
    when the caller has it (the train step does, for its metrics): a second
    pass over every gradient to recompute it costs ~1% of a bench-tiny step.
    """

    # optax.chain hands every extra-args transform all the extra arguments: others' are ignored
    def update(grads, state, params=None, *, global_norm=None, **extra_args):
        norm = optax.tree.norm(grads) if global_norm is None else global_norm
        factor = jnp.where(norm > max_norm, max_norm / norm, 1.0)
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm (when train.clip > 0), then AdamW with the learning-rate schedule.

    Moments have the parameters' dtype: float32 master weights (the default
    `param_dtype`) give a float32 optimizer state whatever the compute dtype.
    """
    adamw = optax.adamw(learning_rate(train), b1=train.b1, b2=train.b2, eps=train.eps,
                        weight_decay=train.weight_decay, mask=decay_mask)
    if train.clip == 0:
        return adamw
    return optax.chain(clip_by_global_norm(train.clip), adamw)
