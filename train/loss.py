"""The training objective of one micro-batch: next-token cross-entropy plus the router losses.

Sums, not means, come back alongside the loss, so micro-batches (and hosts)
pool into exactly the numbers one big batch would give.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mixtral_jax.model import token_nll
from mixtral_jax.moe import MoEAux


class MicroStats(NamedTuple):
    """What one micro-batch adds to the step's metrics (summed over micro-batches)."""

    nll_sum: jax.Array  # [] float32: sum of token losses where loss_mask is 1
    aux: MoEAux  # router statistics, stacked [L, ...]


def micro_batch_loss(model, batch: dict, num_loss_tokens, num_micro_batches: int, experts_fn=None,
                     unroll_layers: bool = False):
    """(objective, MicroStats) of one micro-batch.

    The objective's cross-entropy part is this micro-batch's token-loss sum over
    `num_loss_tokens` (the masked tokens of the whole step's batch), so the
    micro-batches' gradients add up to the big batch's exactly. The router
    losses depend non-linearly on each batch's routing statistics; like other
    trainers, they are computed per micro-batch and averaged.
    batch: inputs, targets, positions, segment_ids [B, T] int32, loss_mask [B, T] float32.
    unroll_layers: the decoder layers unrolled instead of scanned (`Mixtral.forward`).
    """
    out = model.forward(batch["inputs"], batch["positions"], segment_ids=batch["segment_ids"],
                        token_mask=(batch["segment_ids"] > 0).astype(jnp.float32), experts_fn=experts_fn,
                        unroll_layers=unroll_layers, reverse_only=True)
    nll_sum = jnp.sum(token_nll(out.logits, batch["targets"]) * batch["loss_mask"])
    objective = nll_sum / num_loss_tokens + model.aux_loss(out.aux) / num_micro_batches
    return objective, MicroStats(nll_sum, out.aux)
