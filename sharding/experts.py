"""The expert-parallel MoE: tokens travel to the devices that own their experts.

Inside `jax.shard_map`, each device holds its own tokens (split over data,
fsdp and expert) and E/X of the experts (X = mesh size of `expert`):

1. dispatch: every (token, slot) pair gets a place in a fixed-capacity buffer
   [E, C, D] of its expert; pairs past the capacity C are dropped (their
   contribution is zero, the residual stream carries the token on);
2. all_to_all over `expert`: device j receives the rows for its experts from
   every device, [X, E/X, C, D];
3. its experts run on the rows that hold tokens, with the single-device
   grouped compute the config's `moe_impl` names (`moe.experts_fn_for`; empty
   buffer rows belong to no group: the CPU kernel skips their blocks); with
   `tensor` > 1 each device holds a slice of F and the partial outputs are
   summed over `tensor`;
4. a second all_to_all brings the rows home, where each token sums its
   slots' rows weighted by the router.

Capacity per (source device, expert): C = ceil(capacity_factor * n * k / E)
for n local tokens; capacity_factor 0 means C = n, which no routing can
exceed (a token picks an expert at most once), so nothing is ever dropped.
Slot 0 (each token's first choice) is placed before slot 1, so under a tight
capacity second choices are dropped first.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.config import MixtralConfig
from mixtral_jax.layers import EMBED, EXPERT, MLP
from mixtral_jax.moe import ExpertsFn, experts_fn_for
from mixtral_jax.sharding.mesh import batch_devices
from mixtral_jax.sharding.rules import BATCH_AXES, logical_to_spec

_SPECS = {  # logical axes of the ExpertsFn arguments and results
    "x": ("batch", EMBED),  # [N, D]
    "expert_idx": ("batch", None),  # [N, k]
    "expert_weights": ("batch", None),  # [N, k]
    "w_gate": (EXPERT, EMBED, MLP),  # [E, D, F]
    "w_up": (EXPERT, EMBED, MLP),
    "w_down": (EXPERT, MLP, EMBED),  # [E, F, D]
}
_ARGS = tuple(_SPECS)


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows per (source device, expert) buffer for `tokens` local tokens (0 = never drop)."""
    if capacity_factor == 0:
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def _local_moe(x, expert_idx, expert_weights, w_gate, w_up, w_down, *, capacity_factor: float,
               moe_impl: str):
    """One device's part: x [n, D], expert_idx/expert_weights [n, k] (index E marks padding),
    w_* its E/X local experts (F maybe split over tensor) -> (y [n, D], dropped pairs, pairs)."""
    n, k = expert_idx.shape
    local_experts, d = w_gate.shape[0], x.shape[1]
    num_experts = local_experts * jax.lax.axis_size("expert")
    cap = capacity(n, k, num_experts, capacity_factor)

    pair_expert = expert_idx.T.reshape(-1)  # [k*n], slot-major: first choices claim places first
    pair_token = jnp.tile(jnp.arange(n), k)
    real = pair_expert < num_experts
    onehot = jax.nn.one_hot(pair_expert, num_experts, dtype=jnp.int32)  # [k*n, E]
    place = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # rank among the expert's pairs
    kept = real & (place < cap)
    filled = jnp.minimum(jnp.sum(onehot, axis=0), cap)  # [E] rows used in each buffer

    # [E, C, D]: out-of-range places (dropped or padding) fall off the buffer
    send = jnp.zeros((num_experts, cap, d), x.dtype).at[pair_expert, place].set(x[pair_token], mode="drop")
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [X*E/X, C, D]: source-major
    recv_filled = jax.lax.all_to_all(filled, "expert", 0, 0, tiled=True)  # [X*E/X]

    # expert-major rows [E/X*X*C, D]; empty rows get the out-of-range expert E/X (no work, zero out)
    rows = recv.reshape(-1, local_experts, cap, d).transpose(1, 0, 2, 3).reshape(-1, d)
    used = recv_filled.reshape(-1, local_experts).T[:, :, None] > jnp.arange(cap)  # [E/X, X, C]
    row_expert = jnp.where(used, jnp.arange(local_experts)[:, None, None], local_experts).reshape(-1, 1)
    # the buffers' rows are mostly padding: an expert gets n * k * X / E of them on average
    local_experts_fn = experts_fn_for(moe_impl, rows_per_expert=-(-n * k * jax.lax.axis_size("expert") // num_experts))
    out, _ = local_experts_fn(rows, row_expert, jnp.ones(row_expert.shape, rows.dtype),
                              w_gate, w_up, w_down)  # partial sums over F when tensor > 1
    out = out.reshape(local_experts, -1, cap, d).transpose(1, 0, 2, 3).reshape(num_experts, cap, d)
    back = jax.lax.all_to_all(out, "expert", 0, 0, tiled=True)  # [E, C, D]: this device's rows

    pair_out = back[jnp.where(kept, pair_expert, 0), jnp.where(kept, place, 0)]  # [k*n, D]
    pair_weight = jnp.where(kept, expert_weights.T.reshape(-1), 0).astype(pair_out.dtype)
    y = jnp.sum((pair_out * pair_weight[:, None]).reshape(k, n, d), axis=0)
    y = jax.lax.psum(y, "tensor")
    dropped = jax.lax.psum(jnp.sum(real & ~kept), BATCH_AXES)
    pairs = jax.lax.psum(jnp.sum(real), BATCH_AXES)
    return y, dropped, pairs


def experts_fn(mesh: Mesh, config: MixtralConfig) -> ExpertsFn | None:
    """The expert-parallel ExpertsFn for `mesh`, or None when mesh.expert is 1
    (then the model's own single-device path, partitioned by XLA, is used)."""
    if mesh.shape["expert"] == 1:
        return None
    specs = {name: logical_to_spec(axes) for name, axes in _SPECS.items()}
    shards = batch_devices(mesh)
    # check_vma=False: the local ExpertsFn is any single-device path (loops whose carries start
    # as plain zeros, kernels) and knows nothing of manual axes; the outputs are made
    # consistent by hand (psum over tensor; counts psummed over the batch axes).
    sharded = jax.shard_map(
        functools.partial(_local_moe, capacity_factor=config.capacity_factor,
                          moe_impl=config.moe_impl),
        mesh=mesh, in_specs=tuple(specs[a] for a in _ARGS), check_vma=False,
        out_specs=(specs["x"], PartitionSpec(), PartitionSpec()))

    def expert_parallel(x, expert_idx, expert_weights, w_gate, w_up, w_down):
        n = x.shape[0]
        pad = -n % shards  # e.g. one decode token per row on a wide mesh
        if pad:
            x = jnp.pad(x, ((0, pad), (0, 0)))
            expert_idx = jnp.pad(expert_idx, ((0, pad), (0, 0)), constant_values=w_gate.shape[0])
            expert_weights = jnp.pad(expert_weights, ((0, pad), (0, 0)))
        args = (x, expert_idx, expert_weights, w_gate, w_up, w_down)
        args = [jax.lax.with_sharding_constraint(a, NamedSharding(mesh, specs[name]))
                for name, a in zip(_ARGS, args)]
        y, dropped, pairs = sharded(*args)
        return y[:n], dropped / jnp.maximum(pairs, 1)

    return expert_parallel
